"""The jittered transfer set: the source's rows first, shifted copies after, everything else the same;
and the teacher's jitter of its training batches, for colour rows too."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.formats.prepared import open_prepared
from stages.jitter import JitterConfig, jitter_transfer_set
from tests.conftest import run_cli


def _content_shift(a: np.ndarray, b: np.ndarray, max_shift: int) -> tuple[int, int] | None:
    """The (dy, dx) that moves image ``a`` onto ``b`` with zeros shifted in, if there is one."""
    h, w = a.shape
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            moved = np.zeros_like(a)
            moved[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
                a[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            if np.array_equal(moved, b):
                return dy, dx
    return None


def test_jitter_keeps_the_source_and_appends_shifted_copies(tiny_prepared, tmp_path):
    cfg = JitterConfig(copies=2, max_shift=2, seed=3)
    out = jitter_transfer_set(cfg, tiny_prepared, tmp_path / "j.h5", log=lambda m: None)
    src, got = open_prepared(tiny_prepared), open_prepared(out)
    n = src.rows["train"]
    assert got.rows == {**src.rows, "train": 3 * n}
    assert (got.classes, got.scale, got.mean, got.std, got.shape) == (src.classes, src.scale, src.mean, src.std,
                                                                        src.shape)
    with h5py.File(tiny_prepared) as a, h5py.File(out) as b:
        for split in ("val", "test"):  # model selection and scoring see exactly the source's rows
            for k in ("x", "y"):
                np.testing.assert_array_equal(a[split][k][:], b[split][k][:])
        xs, ys, xj, yj = a["train"]["x"][:], a["train"]["y"][:], b["train"]["x"][:], b["train"]["y"][:]
    np.testing.assert_array_equal(xj[:n], xs)
    np.testing.assert_array_equal(yj, np.tile(ys, 3))
    shifts = [_content_shift(xs[i % n].reshape(28, 28), xj[i].reshape(28, 28), 2) for i in range(n, 3 * n, 7)]
    assert None not in shifts  # every copy is its source row moved by at most 2 px, zeros shifted in
    assert len(set(shifts)) > 10  # and the shifts vary (25 possible)


def test_jitter_is_seeded(tiny_prepared, tmp_path):
    a = jitter_transfer_set(JitterConfig(copies=1, seed=0), tiny_prepared, tmp_path / "a.h5", log=lambda m: None)
    b = jitter_transfer_set(JitterConfig(copies=1, seed=0), tiny_prepared, tmp_path / "b.h5", log=lambda m: None)
    c = jitter_transfer_set(JitterConfig(copies=1, seed=1), tiny_prepared, tmp_path / "c.h5", log=lambda m: None)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        np.testing.assert_array_equal(fa["train"]["x"][:], fb["train"]["x"][:])
        assert not np.array_equal(fa["train"]["x"][:], fc["train"]["x"][:])


@pytest.mark.parametrize("bad", [{"copies": 0}, {"max_shift": 0}, {"max_shift": 9}])
def test_jitter_config_refuses_bad_settings(bad):
    with pytest.raises(Exception, match="must"):
        JitterConfig(**bad)


@pytest.mark.slow
def test_jitter_cli(tiny_prepared, tmp_path):
    out = tmp_path / "j.h5"
    ok = run_cli("jitter", "--prepared", tiny_prepared, "--out", out, "--copies", "1", check=True)
    assert out.is_file() and "shifted copies" in ok.stderr and not (tmp_path / "j.h5.partial").exists()
    bad = run_cli("jitter", "--prepared", tmp_path / "missing.h5", "--out", tmp_path / "k.h5")
    assert bad.returncode == 3 and len(bad.stderr.strip().splitlines()) == 1
    assert "prepared dataset not found" in bad.stderr and not (tmp_path / "k.h5").exists()


def test_colour_copies_move_every_channel_together_and_never_mix(tmp_path):
    """[N, 3, H, W] rows: channel c holds 80 c + a pattern; every copy is its source moved along H and
    W only, all channels by the same shift, black (0) shifted in, no value of another channel."""
    from stages.prepare import PrepareConfig, prepare_dataset
    from tests.images import channel_distinct, spatial_shift

    x = channel_distinct(60, 3, 9, 11, step=80)
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(60) % 2)
    src = prepare_dataset(PrepareConfig(val_rows=5, classes=2), tmp_path / "c.h5", npz=tmp_path / "c.npz",
                          log=lambda m: None)
    info = open_prepared(src)
    assert info.shape == (3, 9, 11) and len(info.mean) == 3
    out = jitter_transfer_set(JitterConfig(copies=3, max_shift=2, seed=1), src, tmp_path / "j.h5", log=lambda m: None)
    assert open_prepared(out).norm == info.norm  # per-channel statistics carried over unchanged
    with h5py.File(src) as a, h5py.File(out) as b:
        xs, xj = a["train"]["x"][:], b["train"]["x"][:]
    n = len(xs)
    shifts = [spatial_shift(xs[i % n], xj[i], [0, 0, 0], 2) for i in range(n, 4 * n)]
    assert None not in shifts and len(set(shifts)) > 10
    for c in range(3):
        v = xj[:, c]
        assert ((v == 0) | ((v > 80 * c) & (v < 80 * (c + 1)))).all()


class _Trained(Exception):
    """Raised in place of the ensemble's ONNX export: the members are trained, the test has what it needs."""


def _stop_before_export(monkeypatch, stage):
    def stop(*a, **k):
        raise _Trained
    monkeypatch.setattr(stage.onnxio, "export", stop)


def test_teacher_jitters_colour_rows_with_each_channels_black(tmp_path, monkeypatch):
    """The teacher's training batches: normalised per channel, shifted with the normalised black of each
    channel (not one number for all) and never mixed; the spy checks every batch the teacher jitters."""
    import torch

    from pipeline.jitter import jitter as real_jitter
    from stages.prepare import PrepareConfig, prepare_dataset
    from stages.teacher import TeacherConfig, stage, train
    from tests.images import channel_distinct, spatial_shift

    x = channel_distinct(120, 3, 8, 8, step=80)
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(120) % 2)
    src = prepare_dataset(PrepareConfig(val_rows=10, classes=2), tmp_path / "c.h5", npz=tmp_path / "c.npz",
                          log=lambda m: None)
    info = open_prepared(src)
    black = info.black()
    np.testing.assert_array_equal(black, (-np.float32(info.mean)) / np.float32(info.std))
    assert len(set(black.tolist())) == 3  # three different numbers: one fill for all would be wrong
    seen = []

    def spy(batch, shift, gen, fill):
        out = real_jitter(batch, shift, gen, fill)
        fills = np.broadcast_to(torch.as_tensor(fill).numpy(), (3,))
        np.testing.assert_array_equal(fills, black)
        seen.append(all(spatial_shift(a, b, fills, shift) is not None for a, b in zip(batch.numpy(), out.numpy())))
        return out

    monkeypatch.setattr(train, "jitter", spy)
    _stop_before_export(monkeypatch, stage)
    with pytest.raises(_Trained):
        stage.train_teachers(TeacherConfig(members=1, arch="mlp:8", epochs=1, batch_size=32, threads=1, max_shift=2),
                             src, tmp_path / "t" / "e.onnx", log=lambda m: None)
    assert len(seen) == -(-info.rows["train"] // 32) and all(seen)  # every batch of the one epoch


@pytest.mark.slow
def test_teacher_refuses_to_shift_rows_that_are_not_images(tmp_path, monkeypatch):
    from pipeline.errors import UsageError
    from stages.prepare import PrepareConfig, prepare_dataset
    from stages.teacher import TeacherConfig, stage
    from tests.conftest import run_cli

    np.savez(tmp_path / "f.npz", x=np.random.default_rng(0).random((60, 12)).astype(np.float32),
             y=np.arange(60) % 2)
    src = prepare_dataset(PrepareConfig(val_rows=5, classes=2), tmp_path / "f.h5", npz=tmp_path / "f.npz",
                          log=lambda m: None)
    proc = run_cli("teacher", "--prepared", src, "--out", tmp_path / "t" / "e.onnx", "--arch", "mlp:4",
                   "--members", "1", "--epochs", "1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ("rows of shape [12] are not images and cannot be shifted, flipped or erased; "
            "train with --max-shift 0 --flip 0 --erase 0") in proc.stderr
    assert not (tmp_path / "t" / "e.onnx").exists() and not (tmp_path / "t" / "e.onnx.partial").exists()
    cfg = TeacherConfig(members=1, arch="mlp:4", epochs=1, threads=1, max_shift=0)
    _stop_before_export(monkeypatch, stage)
    with pytest.raises(_Trained):  # without the shift, feature rows train as before
        stage.train_teachers(cfg, src, tmp_path / "t" / "e.onnx", log=lambda m: None)
    with pytest.raises(UsageError, match="cannot be shifted"):
        stage.train_teachers(TeacherConfig(members=1, arch="mlp:4", epochs=1, threads=1, max_shift=1), src,
                             tmp_path / "u" / "e.onnx", log=lambda m: None)
