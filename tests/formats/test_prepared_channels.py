"""Per-channel statistics of the prepared set: stored as float64 arrays of one value per channel for
[C, H, W] rows (C > 1), scalars otherwise; normalise broadcasts them per channel; the reader refuses
any that do not fit the rows."""
import h5py
import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.formats import h5seal
from pipeline.formats.prepared import Normalisation, PreparedWriter, open_prepared

MEAN, STD = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)


def _write(path, x, norm):
    y = np.arange(len(x)) % 2
    with PreparedWriter(path, ["a", "b"], norm, {}) as w:
        for split in ("train", "val", "test"):
            w.put(split, x, y)
    return path


@pytest.fixture
def colour(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 5), dtype=np.uint8)
    return _write(tmp_path / "c.h5", x, Normalisation(255.0, MEAN, STD)), x


def test_per_channel_statistics_roundtrip_and_broadcast(colour):
    path, x = colour
    with h5py.File(path) as f:
        for key, want in (("mean", MEAN), ("std", STD)):
            a = f.attrs[key]
            assert a.dtype == np.float64 and a.shape == (3,) and tuple(a) == want
    info = open_prepared(path)
    assert (info.mean, info.std, info.channels, info.norm.per_channel) == (MEAN, STD, 3, True)
    got = info.load("train")[0]
    for c in range(3):  # channel c with its own statistics, in float32 as the models are fed
        want = (x[:, c].astype(np.float32) / np.float32(255) - np.float32(MEAN[c])) / np.float32(STD[c])
        np.testing.assert_array_equal(got[:, c], want)
    np.testing.assert_array_equal(info.black(), -np.float32(MEAN) / np.float32(STD))
    assert info.norm.as_dict() == {"scale": 255.0, "mean": list(MEAN), "std": list(STD)}  # JSON-ready


def test_single_channel_statistics_stay_scalars(tmp_path):
    x = np.arange(2 * 1 * 3 * 3, dtype=np.uint8).reshape(2, 1, 3, 3)
    info = open_prepared(_write(tmp_path / "g.h5", x, Normalisation(255.0, 0.25, 0.5)))
    with h5py.File(info.path) as f:
        assert f.attrs["mean"].shape == () and f.attrs["std"].shape == ()
    assert (info.mean, info.std, info.channels, info.norm.per_channel) == (0.25, 0.5, 1, False)
    np.testing.assert_array_equal(info.black(), [np.float32(-0.5)])


@pytest.mark.parametrize("mean, std, fragment", [
    ((0.1, 0.5), (0.2, 0.3), "per-channel mean \\(2 values\\) and std \\(2 values\\) for rows of shape \\[3, 4, 5\\]"),
    (MEAN, 0.3, "per-channel mean \\(3 values\\) and std \\(a scalar\\)"),
    ((0.1, np.nan, 0.9), STD, "bad normalisation"),
    (MEAN, (0.2, 0.0, 0.5), "bad normalisation"),
    (MEAN, (0.2, -1.0, 0.5), "bad normalisation"),
    (np.zeros((3, 1)), STD, "missing or malformed attributes"),
])
def test_reader_refuses_statistics_that_do_not_fit(colour, tmp_path, mean, std, fragment):
    path, _ = colour
    with h5py.File(path, "r+") as f:
        f.attrs["mean"], f.attrs["std"] = mean, std
        h5seal.seal(f)  # sealed: the statistics themselves are refused, not the checksum
    with pytest.raises(DataError, match=fragment):
        open_prepared(path)


def test_per_channel_statistics_need_a_channel_axis(tmp_path):
    flat = np.zeros((4, 3), np.uint8)  # rows of 3 features are not 3 channels
    path = _write(tmp_path / "f.h5", flat, Normalisation(255.0, MEAN, STD))
    with pytest.raises(DataError, match="rows of shape \\[3\\]"):
        open_prepared(path)
