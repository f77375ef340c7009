"""Cases 5, 6 and 7: untrusted checkpoints, bad data, and stale inputs.

5. A checkpoint whose pickle would run code is refused (exit 3) and the code never runs: checkpoints
   are HDF5 arrays and nothing in the project unpickles; a member checkpoint that cannot be read is
   exit 3, not silently retrained; the project's own checkpoints round-trip their weights exactly.
6. Labels outside [0, classes), images of the wrong size, NaN, an empty split, and a transfer set
   with no labels where labels are needed: one line, a documented exit code, no artifact.
7. A teacher, transfer set or setting changed since the cache was made is detected by hash and the
   message names the make target.
"""
import builtins
import hashlib
import json
import re

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.formats.cache import open_cache
from pipeline.models import load as load_checkpoint
from stages.cache import CacheConfig, cache_soft_targets
from stages.prepare import PrepareConfig, prepare_dataset
from stages.student import StudentConfig, distill_student
from stages.teacher import TeacherConfig, train_teachers
from tests.conftest import ROOT, run_cli, synthetic_images
from tests.faultkit import linear_model

QUIET = dict(log=lambda m: None)


class Evil:
    """Unpickling this calls open(marker, "w"): a file appears if the pickle ever runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _evil_checkpoint(path, marker):
    torch.save({"arch": "mlp:16", "state_dict": {}, "input_shape": [28, 28], "class_names": list("0123456789"),
                "payload": Evil(marker)}, path)
    return path


# ------------------------------------------------------------------------------- 5. checkpoints
@pytest.mark.slow
def test_malicious_student_checkpoint_is_refused(tiny_prepared, tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(DataError, match="not a kd-checkpoint/1 checkpoint .*never loaded"):
        load_checkpoint(evil)
    proc = run_cli("export", "--checkpoint", evil, "--transfer-set", tiny_prepared, "--out", tmp_path / "e.onnx")
    assert proc.returncode == 3 and str(evil) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "e.onnx").exists()
    torch.load(evil, weights_only=False)  # the control: the payload is real, and would have run
    assert marker.exists()


@pytest.mark.slow
def test_malicious_member_checkpoint_is_refused_not_retrained(tiny_prepared, tmp_path):
    """A member checkpoint that cannot be read is exit 3 naming it: never unpickled, never silently replaced."""
    out = tmp_path / "t" / "ensemble.onnx"
    out.parent.mkdir()
    marker = tmp_path / "pwned"
    member = _evil_checkpoint(out.with_name("member0.ckpt"), marker)
    before = member.read_bytes()
    proc = run_cli("teacher", "--prepared", tiny_prepared, "--out", out, "--members", "1", "--arch", "mlp:8",
                   "--epochs", "1", "--threads", "1", "--max-shift", "0")
    assert proc.returncode == 3 and str(member) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists() and member.read_bytes() == before


@pytest.mark.slow
def test_corrupt_member_checkpoint_is_refused_not_retrained(tiny_prepared, tiny_teacher, tmp_path):
    """The other unreadable member: one of our own HDF5 checkpoints, cut short (a full disk, a copy
    interrupted).  Exit 3 naming it; not retrained over, not replaced."""
    out = tmp_path / "t" / "ensemble.onnx"
    out.parent.mkdir()
    good = tiny_teacher.with_name("member0.ckpt").read_bytes()
    member = out.with_name("member0.ckpt")
    member.write_bytes(good[: len(good) // 2])
    before = member.read_bytes()
    proc = run_cli("teacher", "--prepared", tiny_prepared, "--out", out, "--members", "1", "--arch", "mlp:8",
                   "--epochs", "1", "--threads", "1", "--max-shift", "0")
    assert proc.returncode == 3 and str(member) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "truncated" in proc.stderr and not out.exists() and member.read_bytes() == before


def test_no_pickle_anywhere():
    """Checkpoints are HDF5 arrays (kd-checkpoint/1): no code path unpickles anything."""
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "stages").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"torch\.load\(|\bpickle\.loads?\(|allow_pickle=True", text), path.name


def test_own_checkpoints_round_trip(tiny_student, tiny_teacher):
    net, ckpt = load_checkpoint(tiny_student)
    assert ckpt.role == "student" and ckpt.meta["temperature"] == 2.0 and ckpt.meta["alpha"] == 0.5
    for name, value in net.state_dict().items():  # the weights as stored, bit for bit
        assert np.array_equal(value.numpy(), ckpt.state[name]), name
    member_net, member = load_checkpoint(tiny_teacher.with_name("member0.ckpt"), role="teacher-member")
    assert member.meta["key"]["index"] == 0 and 0 < member.meta["val_accuracy"] <= 1
    with pytest.raises(DataError, match="a teacher-member checkpoint, expected a student one"):
        load_checkpoint(tiny_teacher.with_name("member0.ckpt"))


# ------------------------------------------------------------------------------------- 6. data
def _npz(tmp_path, mutate):
    x, y = synthetic_images(300)
    xt, yt = synthetic_images(60, seed=1)
    arrays = dict(x=x, y=y, x_test=xt, y_test=yt)
    mutate(arrays)
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz"


def _set(key, index, value):
    def mutate(a):
        a[key] = a[key].copy()
        a[key][index] = value
    return mutate


@pytest.mark.parametrize("mutate, fragment", [
    (_set("y", 17, 10), "train label 10 at row 17 is outside"),
    (_set("y_test", 3, -1), "test label -1 at row 3 is outside"),
    (lambda a: a.update(x_test=a["x_test"][:, :27, :27]), "images have shape \\(27, 27\\)"),
    (lambda a: a.update(x=a["x"].astype(np.float32)) or _set("x", (5, 1, 1), np.nan)(a), "NaN"),
    (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]), "test split is empty"),
    (lambda a: a.update(y_test=a["y_test"][:-1]), "60 images but 59 labels"),
])
def test_bad_data_is_refused(tmp_path, mutate, fragment):
    npz = _npz(tmp_path, mutate)
    with pytest.raises(DataError, match=fragment):
        prepare_dataset(PrepareConfig(val_rows=50), tmp_path / "p.h5", npz=npz)
    assert not (tmp_path / "p.h5").exists() and not (tmp_path / "p.h5.partial").exists()


def test_cli_bad_data_exit_code(tmp_path):
    npz = _npz(tmp_path, _set("y", 17, 10))
    proc = run_cli("prepare", "--npz", npz, "--out", tmp_path / "p.h5", "--val-rows", "50")
    assert proc.returncode == 3 and "label 10 at row 17" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.h5").exists()


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """A transfer set whose train split has no labels (every labelled row went to validation)."""
    d = tmp_path_factory.mktemp("unlabelled")
    x, y = synthetic_images(400)
    xt, yt = synthetic_images(60, seed=1)
    y = y.copy()
    y[50:] = -1
    np.savez(d / "u.npz", x=x, y=y, x_test=xt, y_test=yt)
    prepared = prepare_dataset(PrepareConfig(val_rows=50), d / "u.h5", npz=d / "u.npz")
    teacher = linear_model(d / "t.onnx")
    cache = cache_soft_targets(CacheConfig(temperatures=(2.0,), device="cpu", threads=1, gate=False), [teacher],
                               prepared,
                               d / "c.h5", **QUIET)
    return prepared, cache


@pytest.mark.slow
def test_unlabelled_transfer_set(unlabelled, tmp_path):
    prepared, cache = unlabelled
    assert (open_cache(cache).read("labels") == -1).all()
    proc = run_cli("student", "--cache", cache, "--transfer-set", prepared, "--out", tmp_path / "s.ckpt",
                   "--temperature", "2", "--alpha", "0.5", "--epochs", "1")
    assert proc.returncode == 2 and "no labels; use --alpha 1" in proc.stderr
    assert not (tmp_path / "s.ckpt").exists() and not (tmp_path / "s.ckpt.partial").exists()
    with pytest.raises(DataError, match="no labelled rows"):  # a teacher cannot be trained on it
        train_teachers(TeacherConfig(members=1, arch="mlp:8", epochs=1), prepared, tmp_path / "t.onnx", **QUIET)
    distill_student(StudentConfig(arch="mlp:8", epochs=1, temperature=2.0, alpha=1.0), cache, prepared,
                    tmp_path / "s.ckpt", tmp_path / "s.json", **QUIET)  # soft targets alone need no labels


# ------------------------------------------------------------------------------- 7. staleness
@pytest.fixture
def chain(tmp_path, tiny_prepared):
    prepared = tmp_path / "p.h5"
    prepared.write_bytes(tiny_prepared.read_bytes())
    teacher = linear_model(tmp_path / "t.onnx")
    cache = cache_soft_targets(CacheConfig(temperatures=(2.0,), device="cpu", threads=1, gate=False), [teacher],
                               prepared,
                               tmp_path / "c.h5", **QUIET)
    return prepared, teacher, cache


def _student(cache, prepared, out):
    return run_cli("student", "--cache", cache, "--transfer-set", prepared, "--out", out, "--temperature", "2",
                   "--epochs", "1", "--arch", "mlp:8")


@pytest.mark.slow
def test_teacher_changed_since_cache(chain, tmp_path):
    prepared, teacher, cache = chain
    linear_model(teacher, seed=1)  # retrained in place
    proc = _student(cache, prepared, tmp_path / "s.ckpt")
    assert proc.returncode == 4 and str(teacher) in proc.stderr and "`make cache`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.ckpt").exists()


@pytest.mark.slow
def test_transfer_set_changed_since_cache(chain, tmp_path, tiny_npz):
    prepared, teacher, cache = chain
    prepared.unlink()
    prepare_dataset(PrepareConfig(val_rows=201), prepared, npz=tiny_npz)  # re-prepared in place
    proc = _student(cache, prepared, tmp_path / "s.ckpt")
    assert proc.returncode == 4 and str(prepared) in proc.stderr and "`make cache`" in proc.stderr
    assert not (tmp_path / "s.ckpt").exists()


def test_unchanged_inputs_pass(chain, tmp_path):
    """The control of the two tests above: unchanged inputs train, and the student records the very
    files it was trained from (sha256 computed here with hashlib, not with the stage's helper)."""
    prepared, teacher, cache = chain
    out = distill_student(StudentConfig(arch="mlp:8", epochs=1, temperature=2.0), cache, prepared,
                          tmp_path / "s.ckpt", tmp_path / "s.json", **QUIET)
    assert out == tmp_path / "s.ckpt" and out.is_file() and not list(tmp_path.glob("*.partial"))
    inputs = load_checkpoint(out)[1].provenance["inputs"]
    assert json.loads((tmp_path / "s.json").read_text())["provenance"]["inputs"] == inputs
    for key, path in (("cache", cache), ("transfer_set", prepared)):
        assert inputs[key]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), key


def test_cache_partial_from_other_teacher_or_settings_restarts(tmp_path, tiny_prepared, monkeypatch):
    from stages.cache import stage as cache_mod

    teacher = linear_model(tmp_path / "t.onnx")
    out = tmp_path / "c.h5"
    cfg = CacheConfig(temperatures=(2.0,), device="cpu", threads=1, gate=False, batch_size=256)

    def killed(*a, **k):
        raise KeyboardInterrupt  # every row committed, never finished: a .partial stays behind

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "_finish", killed)
        with pytest.raises(KeyboardInterrupt):
            cache_soft_targets(cfg, [teacher], tiny_prepared, out, **QUIET)
    assert not out.exists() and (tmp_path / "c.h5.partial").stat().st_size > 0
    for change in ("teacher", "settings"):
        if change == "teacher":
            linear_model(teacher, seed=1)
        else:
            cfg = CacheConfig(temperatures=(2.0, 4.0), device="cpu", threads=1, gate=False, batch_size=256)
        logs = []
        with monkeypatch.context() as m:
            m.setattr(cache_mod, "_finish", killed)
            with pytest.raises(KeyboardInterrupt):
                cache_soft_targets(cfg, [teacher], tiny_prepared, out, log=logs.append)
        assert any("made from other inputs or settings; restarting from row 0" in line for line in logs), logs
    logs = []
    cache_soft_targets(cfg, [teacher], tiny_prepared, out, log=logs.append)
    assert any("resuming" in line for line in logs)  # same inputs and settings: the partial is worth resuming
    c = open_cache(out)
    assert c.temperatures == (2.0, 4.0)
    fresh = cache_soft_targets(cfg, [teacher], tiny_prepared, tmp_path / "fresh.h5", **QUIET)
    assert np.array_equal(c.read("logits"), open_cache(fresh).read("logits"))  # only the new teacher's rows
