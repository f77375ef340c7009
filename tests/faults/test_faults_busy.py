"""Case 8: two writers on the same output -- the second fails at once (exit 6), the first is untouched.

The first writer is simulated by holding the output's lock in this process (exactly what a running
stage holds).  "At once" is shown by giving the second writer hours of work: it must still come back
within the subprocess timeout, having done none of it.
"""
import fcntl
import os

import pytest

from pipeline.artifacts import atomic_output, claim, exclusive, write_json
from tests.conftest import run_cli
from tests.faultkit import linear_model


def _stage_args(name, tiny_prepared, tiny_teacher, tiny_cache, tiny_student, tmp_path):
    out = {"teacher": tmp_path / "e.onnx", "cache": tmp_path / "c.h5", "student": tmp_path / "s.ckpt",
           "export": tmp_path / "s.onnx", "bench": tmp_path / "b.json"}[name]
    args = {
        "teacher": ["teacher", "--prepared", tiny_prepared, "--out", out, "--epochs", "100000"],
        "cache": ["cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", out, "--device", "cpu"],
        "student": ["student", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--out", out,
                    "--temperature", "2", "--epochs", "100000"],
        "export": ["export", "--checkpoint", tiny_student, "--transfer-set", tiny_prepared, "--out", out],
        "bench": ["bench", "--teacher", tiny_teacher, "--candidate", f"s={linear_model(tmp_path / 'm.onnx')}",
                  "--prepared", tiny_prepared, "--out", out, "--min-s", "100000"],
    }[name]
    return out, args


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "cache", "student", "export", "bench"])
def test_second_writer_fails_at_once(stage, tiny_prepared, tiny_teacher, tiny_cache, tiny_student, tmp_path):
    out, args = _stage_args(stage, tiny_prepared, tiny_teacher, tiny_cache, tiny_student, tmp_path)
    with exclusive(out) as tmp:
        tmp.write_bytes(b"the first writer's half-written bytes")
        proc = run_cli(*args, timeout=90)
        assert proc.returncode == 6, proc.stderr
        assert str(out) in proc.stderr and "another process is writing" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert tmp.read_bytes() == b"the first writer's half-written bytes"
    assert not out.exists()


def test_claim_is_handed_to_the_writer_and_released(tmp_path):
    out = tmp_path / "r.json"
    claim(out, tmp_path / "other.json")
    fd = os.open(tmp_path / "r.json.partial", os.O_RDWR)
    with pytest.raises(BlockingIOError):  # any other writer (another open file) is locked out
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    write_json(out, {"a": 1})  # this process's own claim is reused, then released on publish
    with atomic_output(out) as tmp:  # and the output can be written again afterwards
        tmp.write_text("{}")
    assert out.read_text() == "{}" and not (tmp_path / "r.json.partial").exists()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: the old inode is free again
    os.close(fd)
