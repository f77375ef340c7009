"""prepare --image-folder and the .npz layouts: one content whatever form the images come in."""
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DataError, UsageError
from pipeline.formats.prepared import open_prepared
from stages.prepare import PrepareConfig, prepare_dataset, read_idx
from tests.conftest import run_cli
from tests.images import CLASSES, assert_same_content, coloured_shapes, folder_order, write_folder
from tests.stages.test_prepare import write_idx

QUIET = dict(log=lambda m: None)
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def shapes():
    """Coloured shapes in folder order (by class, then index): 300 train, 100 test, channel-last."""
    x, y = coloured_shapes(300, seed=0)
    xt, yt = coloured_shapes(100, seed=1)
    return x, y, xt, yt


@pytest.mark.parametrize("with_test", [True, False], ids=["train-and-test", "test-carved"])
def test_png_folder_and_both_npz_layouts_prepare_to_identical_content(shapes, tmp_path, with_test):
    x, y, xt, yt = shapes
    if with_test:
        write_folder(tmp_path / "png" / "train", x, y)
        write_folder(tmp_path / "png" / "test", xt, yt)
    else:
        write_folder(tmp_path / "png", x, y)
    o, ot = folder_order(y), folder_order(yt)
    arrays = dict(y=y[o], **({"y_test": yt[ot]} if with_test else {}))
    np.savez(tmp_path / "last.npz", x=x[o], **({"x_test": xt[ot]} if with_test else {}), **arrays)
    np.savez(tmp_path / "first.npz", x=x[o].transpose(0, 3, 1, 2),
             **({"x_test": xt[ot].transpose(0, 3, 1, 2)} if with_test else {}), **arrays)
    cfg = PrepareConfig(val_rows=40, class_names=CLASSES)
    logged = []
    png = prepare_dataset(PrepareConfig(val_rows=40), tmp_path / "png.h5", image_folder=tmp_path / "png", **QUIET)
    last = prepare_dataset(cfg, tmp_path / "last.h5", npz=tmp_path / "last.npz", log=logged.append)
    first = prepare_dataset(cfg, tmp_path / "first.h5", npz=tmp_path / "first.npz", **QUIET)
    assert_same_content(png, last)
    assert_same_content(png, first)
    assert any("channel-last (nhwc, inferred); stored channel-first as [N, 3, 32, 32]" in m for m in logged)
    info = open_prepared(png)
    assert info.shape == (3, 32, 32) and info.classes == CLASSES and len(info.mean) == len(info.std) == 3
    assert info.rows["test"] == (100 if with_test else 42)  # a seeded 1/7 of the 300 labelled rows
    xtr = info.load("train")[0]  # every channel standardised with its own statistics
    np.testing.assert_allclose(xtr.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(xtr.std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert max(info.mean) - min(info.mean) > 0.02  # red and blue shapes: the channels differ
    prov = info.provenance
    assert prov["images"]["files"] == 400 - (0 if with_test else 100) and len(prov["images"]["sha256"]) == 64
    assert "layout" not in prov["settings"] and prov["settings"]["mode"] == "auto"


def test_fashion_mnist_as_png_prepares_to_the_idx_arrays(tmp_path):
    """300 train and 100 test images of Fashion-MNIST written out as a PNG folder read back as the
    IDX path reads them: written to IDX files in the folder's order, both prepare to the same file."""
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (make setup installs it)")
    xs = read_idx(FASHION / "train-images-idx3-ubyte.gz")[:300]
    ys = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:300].astype(np.int64)
    xt = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:100]
    yt = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")[:100].astype(np.int64)
    names = tuple(str(c) for c in range(10))
    write_folder(tmp_path / "png" / "train", xs, ys, names)
    write_folder(tmp_path / "png" / "test", xt, yt, names)
    o, ot = folder_order(ys), folder_order(yt)
    idx = tmp_path / "idx"
    idx.mkdir()
    for stem, arr in (("train-images-idx3-ubyte", xs[o]), ("train-labels-idx1-ubyte", ys[o]),
                      ("t10k-images-idx3-ubyte", xt[ot]), ("t10k-labels-idx1-ubyte", yt[ot])):
        write_idx(idx / stem, arr)
    png = prepare_dataset(PrepareConfig(val_rows=50, seed=3), tmp_path / "png.h5", image_folder=tmp_path / "png",
                          **QUIET)
    ref = prepare_dataset(PrepareConfig(val_rows=50, seed=3, class_names=names), tmp_path / "idx.h5", source=idx,
                          **QUIET)
    assert_same_content(png, ref)
    info = open_prepared(png)
    assert info.shape == (1, 28, 28) and isinstance(info.mean, float)  # grey: mode auto is L, scalar statistics
    with h5py.File(png) as f:
        np.testing.assert_array_equal(f["test/x"][:, 0], xt[ot])


def test_jpeg_rgba_grey_and_modes(shapes, tmp_path):
    x, y = shapes[0][:60], shapes[1][:60]
    jpg = write_folder(tmp_path / "jpg", x, y, suffix=".jpg", quality=95)
    info = open_prepared(prepare_dataset(PrepareConfig(val_rows=5), tmp_path / "j.h5", image_folder=jpg, **QUIET))
    assert info.shape == (3, 32, 32)
    with h5py.File(info.path) as f:
        got = np.concatenate([f[s]["x"][:] for s in ("train", "val", "test")])
    o = folder_order(y)
    assert np.abs(np.sort(got.astype(int), axis=0).mean() - np.sort(x[o].transpose(0, 3, 1, 2).astype(int),
                                                                    axis=0).mean()) < 2  # lossy, but close
    grey = prepare_dataset(PrepareConfig(val_rows=5, mode="L"), tmp_path / "l.h5", image_folder=jpg, **QUIET)
    first = sorted((jpg / CLASSES[0]).iterdir())[0]
    want = np.asarray(Image.open(first).convert("L"))
    with h5py.File(grey) as f:
        rows = np.concatenate([f[s]["x"][:] for s in ("train", "val", "test")])
    assert rows.shape[1:] == (1, 32, 32) and any(np.array_equal(r[0], want) for r in rows)
    # RGBA: alpha dropped; a grey image among colour ones: auto is RGB, the grey one replicated
    mixed = tmp_path / "mixed"
    for c, img in (("a", Image.new("RGBA", (4, 4), (10, 20, 30, 0))), ("b", Image.new("L", (4, 4), 77))):
        (mixed / c).mkdir(parents=True)
        for i in range(4):
            img.save(mixed / c / f"{i}.png")
    m = prepare_dataset(PrepareConfig(val_rows=1), tmp_path / "m.h5", image_folder=mixed, **QUIET)
    with h5py.File(m) as f:
        rows = {int(label): row for s in ("train", "val", "test") for row, label in zip(f[s]["x"][:], f[s]["y"][:])}
    assert open_prepared(m).shape == (3, 4, 4)
    assert (rows[0][:, 0, 0].tolist(), rows[1][:, 0, 0].tolist()) == ([10, 20, 30], [77, 77, 77])


def test_size_resizes_every_image_with_pillows_bilinear(shapes, tmp_path):
    x, y = shapes[0][:30], shapes[1][:30]
    root = write_folder(tmp_path / "f", x, y)
    odd = sorted((root / CLASSES[y[0]]).iterdir())[0]
    Image.fromarray(x[0][:20, :24]).save(odd)  # one image of another size
    with pytest.raises(DataError, match=f"{odd}: 20x24 pixels, but .* is 32x32; give --size"):
        prepare_dataset(PrepareConfig(val_rows=3), tmp_path / "p.h5", image_folder=root, **QUIET)
    out = prepare_dataset(PrepareConfig(val_rows=3, size="16x12"), tmp_path / "p.h5", image_folder=root, **QUIET)
    info = open_prepared(out)
    assert info.shape == (3, 16, 12)
    want = np.asarray(Image.open(odd).convert("RGB").resize((12, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    with h5py.File(out) as f:
        rows = np.concatenate([f[s]["x"][:] for s in ("train", "val", "test")])
    assert any(np.array_equal(r, want) for r in rows)
    assert info.provenance["settings"]["size"] == "16x12" and info.provenance["images"]["size"] == [16, 12]


def _bad_folder(tmp_path, case):
    """A small valid folder with one thing wrong; returns (folder, what the message must name)."""
    x, y = coloured_shapes(12, seed=5)
    y = np.arange(12) % 2  # two classes, six images each
    names = CLASSES[:2]
    root = tmp_path / "bad"
    if case in ("missing-test-class", "extra-test-class"):
        write_folder(root / "train", x, y, names)
        write_folder(root / "test", x[:4], y[:4], names)
        victim = root / "test" / names[1]
        if case == "missing-test-class":
            for f in victim.iterdir():
                f.unlink()
            victim.rmdir()
            return root, f"{root / 'test'}: no folder for class '{names[1]}'"
        extra = root / "test" / "zebra"
        extra.mkdir()
        Image.fromarray(x[0]).save(extra / "z.png")
        return root, f"{extra}: class 'zebra' has no folder in train/"
    write_folder(root, x, y, names)
    first = sorted((root / names[1]).iterdir())[0]
    if case == "corrupt":
        first.write_bytes(first.read_bytes()[:60])  # a PNG cut short inside its image data
        return root, f"{first}: corrupt image"
    if case == "not-an-image":
        notes = root / names[0] / "notes.txt"
        notes.write_text("not a picture")
        return root, f"{notes}: not a PNG or JPEG image"
    if case == "empty-class":
        (root / "zebra").mkdir()
        return root, f"{root / 'zebra'}: empty class folder"
    if case == "sixteen-bit":
        Image.fromarray(np.zeros((32, 32), np.uint16) + 4000).save(first)
        return root, f"{first}: I;16 image .* convert it to 8-bit"
    if case == "nested":
        (root / names[0] / "more").mkdir()
        return root, f"{root / names[0] / 'more'}: a folder inside class folder"
    if case == "train-beside-classes":
        (root / "train").mkdir()
        return root, f"{root}: holds train/ beside other folders"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["corrupt", "not-an-image", "empty-class", "sixteen-bit", "nested",
                                  "missing-test-class", "extra-test-class", "train-beside-classes"])
def test_bad_image_folder_is_one_line_naming_the_file(tmp_path, case):
    root, message = _bad_folder(tmp_path, case)
    with pytest.raises(DataError, match=message.replace("[", "\\[")) as e:
        prepare_dataset(PrepareConfig(val_rows=2), tmp_path / "p.h5", image_folder=root, **QUIET)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "p.h5").exists() and not (tmp_path / "p.h5.partial").exists()


def test_hidden_and_stray_files_are_skipped(shapes, tmp_path):
    x, y = shapes[0][:40], shapes[1][:40]
    root = write_folder(tmp_path / "f", x, y)
    (root / ".DS_Store").write_bytes(b"\0junk")
    (root / CLASSES[0] / ".thumbs").write_bytes(b"\0junk")
    (root / "README.txt").write_text("my shapes")
    logged = []
    out = prepare_dataset(PrepareConfig(val_rows=4), tmp_path / "p.h5", image_folder=root, log=logged.append)
    assert sum(open_prepared(out).rows.values()) == 40
    assert any("1 file(s) beside the class folders skipped" in m for m in logged)


@pytest.mark.parametrize("shape, layout, stored, fragment", [
    ((20, 3, 8, 3), "auto", None, "\\[N, 3, 8, 3\\] could be channel-first or channel-last; give --layout"),
    ((20, 5, 8, 8), "auto", None, "\\[N, 5, 8, 8\\] has no axis of 1, 3, 4 channels first or last"),
    ((20, 8, 8), "nchw", None, "\\[N, 8, 8\\] is 3-D, layout nchw is 4-D"),
    ((20, 3, 8, 3), "nhwc", (3, 3, 8), None),
    ((20, 3, 8, 3), "nchw", (3, 8, 3), None),
    ((20, 5, 8, 8), "nchw", (5, 8, 8), None),
    ((20, 8, 8, 1), "auto", (1, 8, 8), None),
    ((20, 8, 8), "auto", (8, 8), None),  # single-channel images without a channel axis stay as they are
    ((20, 2, 8, 8), "flat", (128,), None),
])
def test_npz_layouts(tmp_path, shape, layout, stored, fragment):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(20) % 2)
    cfg = PrepareConfig(val_rows=2, classes=2, layout=layout)
    if fragment:
        with pytest.raises(DataError, match=f"{tmp_path / 'a.npz'}: x of shape {fragment}"):
            prepare_dataset(cfg, tmp_path / "p.h5", npz=tmp_path / "a.npz", **QUIET)
        assert not (tmp_path / "p.h5").exists()
        return
    info = open_prepared(prepare_dataset(cfg, tmp_path / "p.h5", npz=tmp_path / "a.npz", **QUIET))
    assert info.shape == stored
    assert info.provenance["layout"] == (layout if layout != "auto" else {4: "nhwc", 3: "nhw"}[len(shape)])


@pytest.mark.parametrize("source, cfg, fragment", [
    ("npz", dict(size="16x16"), "--size applies to --image-folder sources only"),
    ("idx", dict(mode="L"), "--mode applies to --image-folder sources only"),
    ("image-folder", dict(layout="nhwc"), "--layout applies to --npz sources only"),
    ("image-folder", dict(classes=3), "--classes 3, but .* has 2 class folders"),
])
def test_options_of_another_source_are_refused(tiny_npz, tmp_path, source, cfg, fragment):
    x, _ = coloured_shapes(8)
    write_folder(tmp_path / "f", x, np.arange(8) % 2, CLASSES[:2])
    where = {"npz": dict(npz=tiny_npz), "idx": dict(source=tmp_path), "image-folder": dict(image_folder=tmp_path / "f")}
    with pytest.raises(UsageError, match=fragment):
        prepare_dataset(PrepareConfig(val_rows=2, **cfg), tmp_path / "p.h5", **where[source], **QUIET)


@pytest.mark.parametrize("size", ["32x", "0x4", "axb", "5000x5"])
def test_size_setting_is_checked(size):
    with pytest.raises(UsageError, match="size"):
        PrepareConfig(size=size)


def test_cli_image_folder(shapes, tmp_path):
    """The CLI end: progress and what was read said on stderr; bad input one line, exit 3, nothing written."""
    x, y = shapes[0][:50], shapes[1][:50]
    root = write_folder(tmp_path / "f", x, y)
    ok = run_cli("prepare", "--image-folder", root, "--out", tmp_path / "p.h5", "--val-rows", "5", check=True)
    assert "10 classes, 50 train images -> mode RGB, 32x32" in ok.stderr and "per-channel mean [" in ok.stderr
    (root / CLASSES[3] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = run_cli("prepare", "--image-folder", root, "--out", tmp_path / "q.h5", "--val-rows", "5")
    assert bad.returncode == 3 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert f"{root / CLASSES[3] / 'broken.jpg'}: " in bad.stderr and not (tmp_path / "q.h5").exists()
    np.savez(tmp_path / "amb.npz", x=np.zeros((10, 3, 8, 3), np.uint8), y=np.arange(10) % 2)
    amb = run_cli("prepare", "--npz", tmp_path / "amb.npz", "--out", tmp_path / "r.h5", "--val-rows", "2")
    assert amb.returncode == 3 and len(amb.stderr.strip().splitlines()) == 1 and "give --layout" in amb.stderr
    use = run_cli("prepare", "--npz", tmp_path / "amb.npz", "--image-folder", root, "--out", tmp_path / "r.h5")
    assert use.returncode == 2 and "give exactly one of" in use.stderr and not (tmp_path / "r.h5").exists()


def test_an_idx_file_records_what_it_always_did(tmp_path):
    """Settings of other sources are not recorded for an IDX source, so a Fashion-MNIST prepared file
    is byte for byte the one prepared before image folders existed (its sha256 was compared)."""
    from tests.stages.test_prepare import make_idx_dir

    src, _, _ = make_idx_dir(tmp_path / "src")
    prov = open_prepared(prepare_dataset(PrepareConfig(val_rows=50), tmp_path / "p.h5", source=src, **QUIET)).provenance
    assert list(prov["settings"]) == ["val_rows", "train_rows", "test_rows", "classes", "class_names", "seed"]
    assert list(prov) == ["stage", "settings", "inputs", "versions", "source"]
