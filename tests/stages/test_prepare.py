"""prepare: IDX and .npz sources, checks of bad input, the canonical file."""
import gzip
import struct

import h5py
import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.formats.prepared import open_prepared
from stages.prepare import PrepareConfig, prepare_dataset, read_idx
from tests.conftest import run_cli, synthetic_images


def write_idx(path, arr, magic_type=0x08, compress=False):
    header = bytes([0, 0, magic_type, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_idx_dir(d, n_train=300, n_test=100, labels=None):
    d.mkdir(parents=True, exist_ok=True)
    x, y = synthetic_images(n_train)
    xt, yt = synthetic_images(n_test, seed=1)
    write_idx(d / "train-images-idx3-ubyte.gz", x, compress=True)
    write_idx(d / "train-labels-idx1-ubyte.gz", y if labels is None else labels, compress=True)
    write_idx(d / "t10k-images-idx3-ubyte", xt)
    write_idx(d / "t10k-labels-idx1-ubyte", yt)
    return d, x, y


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", arr)), arr)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b.gz", arr, compress=True)), arr)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda b: b"\x01" + b[1:], "bad magic"),
    (lambda b: b[:-5], "header declares"),
    (lambda b: b[:6], "truncated IDX header"),
])
def test_read_idx_rejects_corrupt(tmp_path, mutate, fragment):
    good = write_idx(tmp_path / "a", np.zeros((2, 3, 4), np.uint8)).read_bytes()
    (tmp_path / "bad").write_bytes(mutate(good))
    with pytest.raises(DataError, match=fragment):
        read_idx(tmp_path / "bad")


def test_prepare_idx_dir_writes_splits_and_stats(tmp_path):
    src, x, y = make_idx_dir(tmp_path / "src")
    out = prepare_dataset(PrepareConfig(val_rows=50), tmp_path / "p.h5", source=src)
    info = open_prepared(out)
    assert info.rows == {"train": 250, "val": 50, "test": 100} and info.shape == (1, 28, 28)
    with h5py.File(out) as f:
        raw = f["train/x"][:]
    assert info.mean == pytest.approx(raw.mean() / 255, rel=1e-9)  # statistics of the train split
    xtr, _ = info.load("train")
    assert xtr.dtype == np.float32 and abs(float(xtr.mean())) < 1e-4 and float(xtr.std()) == pytest.approx(1, abs=1e-4)
    with h5py.File(out) as f:
        together = np.sort(np.concatenate([f["train/y"][:], f["val/y"][:]]))
    assert np.array_equal(together, np.sort(y))  # val is carved out of train, nothing lost
    assert not (tmp_path / "p.h5.partial").exists()


def test_prepare_is_deterministic(tmp_path):
    src, _, _ = make_idx_dir(tmp_path / "src")
    a = prepare_dataset(PrepareConfig(val_rows=50), tmp_path / "a.h5", source=src)
    b = prepare_dataset(PrepareConfig(val_rows=50), tmp_path / "b.h5", source=src)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for s in ("train", "val", "test"):
            assert np.array_equal(fa[s]["x"][:], fb[s]["x"][:]) and np.array_equal(fa[s]["y"][:], fb[s]["y"][:])


def test_label_out_of_range(tmp_path):
    labels = np.zeros(300, np.uint8)
    labels[17] = 12
    src, _, _ = make_idx_dir(tmp_path / "src", labels=labels)
    with pytest.raises(DataError, match="label 12 at row 17"):
        prepare_dataset(PrepareConfig(val_rows=50), tmp_path / "p.h5", source=src)


def test_npz_nan_and_missing_arrays(tmp_path):
    x = np.random.default_rng(0).random((50, 4)).astype(np.float32)
    x[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(50, np.int64))
    with pytest.raises(DataError, match="NaN"):
        prepare_dataset(PrepareConfig(val_rows=5), tmp_path / "p.h5", npz=tmp_path / "nan.npz")
    np.savez(tmp_path / "nox.npz", images=x)
    with pytest.raises(DataError, match="needs arrays"):
        prepare_dataset(PrepareConfig(val_rows=5), tmp_path / "p.h5", npz=tmp_path / "nox.npz")
    assert not (tmp_path / "p.h5").exists()


def test_cli_missing_dataset_dir(tmp_path):
    out = tmp_path / "p.h5"
    proc = run_cli("prepare", "--source", tmp_path / "nowhere", "--out", out)
    assert proc.returncode == 3
    assert len(proc.stderr.strip().splitlines()) == 1 and "not found" in proc.stderr
    assert not out.exists() and not (tmp_path / "p.h5.partial").exists()


def test_cli_corrupt_idx(tmp_path):
    src, _, _ = make_idx_dir(tmp_path / "src")
    (src / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    proc = run_cli("prepare", "--source", src, "--out", tmp_path / "p.h5", "--val-rows", "50")
    assert proc.returncode == 3 and "t10k-images" in proc.stderr
    assert not (tmp_path / "p.h5").exists()
