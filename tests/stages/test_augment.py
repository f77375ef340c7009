"""The jittered transfer set: the source's rows first, shifted copies after, everything else the same."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from stages.augment import JitterConfig, jitter_transfer_set
from pipeline.formats.prepared import open_prepared
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


def test_jitter_cli(tiny_prepared, tmp_path):
    out = tmp_path / "j.h5"
    ok = run_cli("jitter", "--prepared", tiny_prepared, "--out", out, "--copies", "1", check=True)
    assert out.is_file() and "shifted copies" in ok.stderr and not (tmp_path / "j.h5.partial").exists()
    bad = run_cli("jitter", "--prepared", tmp_path / "missing.h5", "--out", tmp_path / "k.h5")
    assert bad.returncode == 3 and len(bad.stderr.strip().splitlines()) == 1
    assert "prepared dataset not found" in bad.stderr and not (tmp_path / "k.h5").exists()
