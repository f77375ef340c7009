"""The teacher's resumable training state (pipeline/formats/train_state.py): every nested type an optimizer's
state dict holds comes back as it went in, and an edited, truncated or foreign file is refused in one line."""
import h5py
import numpy as np
import pytest

from pipeline.errors import DataError, IntegrityError
from pipeline.formats.train_state import read_train_state, write_train_state

STATE = {
    "opt": {"state": {0: {"step": np.array(3.0, np.float32), "exp_avg": np.arange(4, dtype=np.float32)},
                      7: {"momentum_buffer": np.ones((2, 3), np.float32)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "nesterov": True, "fused": None, "params": [0, 7]}]},
    "gen": np.arange(10, dtype=np.uint8), "run": {"epoch": 4, "best": 0.93, "history": [{"epoch": 1}], "name": "x"},
}


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_round_trip_keeps_types_keys_and_arrays(tmp_path):
    key = {"prepared_sha256": "ab", "index": 1}
    write_train_state(tmp_path / "m.state", key, STATE)
    got_key, got = read_train_state(tmp_path / "m.state")
    assert got_key == key and _same(STATE, got)
    assert list(got["opt"]["state"]) == [0, 7]  # integer keys stay integers, in order


def test_edited_truncated_and_foreign_files_are_refused(tmp_path):
    p = write_train_state(tmp_path / "m.state", {}, STATE)
    data = p.read_bytes()
    with h5py.File(p, "r+") as f:
        f["arrays/0"][...] = 9  # one number changed after sealing
    with pytest.raises(IntegrityError):
        read_train_state(p)
    (tmp_path / "t.state").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated|corrupt"):
        read_train_state(tmp_path / "t.state")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["schema"] = "kd-checkpoint/1"
    with pytest.raises(DataError, match="training state"):
        read_train_state(tmp_path / "other.h5")


def test_objects_it_cannot_store_are_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="cannot store a set"):
        write_train_state(tmp_path / "m.state", {}, {"bad": {1, 2}})
