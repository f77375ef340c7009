"""Crash safety and sharding with real subprocesses: SIGKILL at several points then resume; an
unreadable .partial; three shards (one through torchrun's RANK/WORLD_SIZE) merged; merge refusals."""
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import pytest

from tests.cache_helpers import digest
from tests.conftest import ROOT, run_cli
from tests.faultkit import committed_rows

pytestmark = pytest.mark.slow
ARGS = ("--device", "cpu", "--threads", "1", "--batch-size", "64", "--temperatures", "1,2,4")  # 1200 rows: 19 batches


def _build(teacher, prepared, out, *extra, env=None):
    return run_cli("cache", "--teacher", teacher, "--transfer-set", prepared, "--out", out, *ARGS, *extra,
                   check=True, env=env)


@pytest.fixture(scope="module")
def reference(tiny_teacher, tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    _build(tiny_teacher, tiny_prepared, out)
    return out


@pytest.mark.parametrize("batches", [0, 1, 7, 15])
def test_sigkill_then_resume_gives_identical_content(batches, reference, tiny_teacher, tiny_prepared, tmp_path):
    out = tmp_path / "c.h5"
    partial = tmp_path / "c.h5.partial"
    # 0.05 s per batch (tests/throttled_cli.py): slow enough to poll, while the kill still lands mid-batch
    cmd = [sys.executable, "-m", "tests.throttled_cli", "0.05", "cache", "--teacher", tiny_teacher,
           "--transfer-set", tiny_prepared, "--out", out, *ARGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = committed_rows(partial) if partial.exists() else None
        if (batches == 0 and partial.exists()) or (done is not None and done >= batches * 64 and batches):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial.exists()
    done = committed_rows(partial) or 0
    assert done <= 1200 and done % 64 == 0  # only whole batches are ever committed
    rerun = _build(tiny_teacher, tiny_prepared, out)
    if done:
        assert f"resuming {partial} at row {done} (its last committed batch)" in rerun.stderr
    assert digest(out) == digest(reference)  # every dataset in row order and every attribute
    assert not partial.exists()


VIEWS = ("--views", "4", "--view-flip", "0.5", "--view-mixup", "0.5")
PRIOR = ("--top-k", "3", "--tail-prior-rows", "500")


def _kill_and_resume(teacher, prepared, tmp_path, extra, batches, rows, timeout):
    """An uninterrupted run and one SIGKILLed once ``batches`` batches of 64 are committed, then rerun:
    (the reference, the rerun's output, the rerun's process, the rows committed when killed)."""
    ref = tmp_path / "ref.h5"
    _build(teacher, prepared, ref, *extra)
    out, partial = tmp_path / "c.h5", tmp_path / "c.h5.partial"
    cmd = [sys.executable, "-m", "tests.throttled_cli", "0.05", "cache", "--teacher", teacher,
           "--transfer-set", prepared, "--out", out, *ARGS, *extra]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and (committed_rows(partial) or 0) < batches * 64:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = committed_rows(partial)
    assert done and batches * 64 <= done < rows and not out.exists()
    rerun = _build(teacher, prepared, out, *extra)
    assert f"resuming {partial} at row {done}" in rerun.stderr
    return ref, out, rerun, done


def test_killed_views_cache_resumes_to_the_identical_content(tiny_teacher, tiny_prepared, tmp_path):
    """K views (4800 cache rows, 75 batches of 64): killed once 20 batches are committed, rerun, the
    content equals an uninterrupted views cache (each view's parameters are drawn per block of rows,
    not per run, so a resumed run draws the same)."""
    ref, out, _, _ = _kill_and_resume(tiny_teacher, tiny_prepared, tmp_path, VIEWS, 20, 4800, 180)
    assert digest(out) == digest(ref)


def test_killed_prior_rule_cache_resumes_to_the_identical_content(tiny_teacher, tiny_prepared, tmp_path):
    """A top-k cache with the prior rule killed after 5 batches: the rerun reads the class prior from the
    partial (it does not run the sample again) and ends equal to an uninterrupted run, prior included."""
    ref, out, rerun, _ = _kill_and_resume(tiny_teacher, tiny_prepared, tmp_path, PRIOR, 5, 1200, 120)
    assert "class prior from" not in rerun.stderr
    assert digest(out) == digest(ref)
    with h5py.File(out) as f:
        assert f.attrs["tail_rule"] == "prior" and f["topk/prior"].shape == (10, 10)


def test_unreadable_partial_restarts_from_zero(reference, tiny_teacher, tiny_prepared, tmp_path):
    out = tmp_path / "c.h5"
    (tmp_path / "c.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))  # a torn HDF5 header
    proc = _build(tiny_teacher, tiny_prepared, out)
    assert "unreadable partial cache (killed writer?); restarting from row 0" in proc.stderr
    assert digest(out) == digest(reference)


def test_three_shards_merged_equal_one_process(reference, tiny_teacher, tiny_prepared, tmp_path):
    out = tmp_path / "s.h5"
    procs = [subprocess.Popen([sys.executable, "-m", "commands", "cache", "--teacher", str(tiny_teacher),
                               "--transfer-set", str(tiny_prepared), "--out", str(out), *ARGS, *extra],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                              stderr=subprocess.PIPE, text=True)
             for extra, env in [(("--shard", "0/3"), {}), (("--shard", "1/3"), {}),
                                ((), {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0"})]]  # as torchrun sets it
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    parts = [tmp_path / f"s.part{i}of3.h5" for i in range(3)]
    assert all(p.is_file() for p in parts)
    proc = run_cli("student", "--cache", parts[1], "--transfer-set", tiny_prepared, "--out", tmp_path / "s.ckpt")
    assert proc.returncode == 4 and "distill cache merge" in proc.stderr  # a part is no cache to train from
    merged = tmp_path / "m.h5"
    run_cli("cache", "merge", *[a for p in reversed(parts) for a in ("--part", p)], "--out", merged, check=True)
    # equal content; only the provenance record differs (it names the parts and the merge step)
    # (content_sha256 covers the provenance too, so it differs with it)
    skip = ("provenance", "content_sha256")
    assert digest(merged, skip) == digest(reference, skip)


@pytest.fixture(scope="module")
def parts(tiny_teacher, tiny_prepared, tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    for i in range(3):
        _build(tiny_teacher, tiny_prepared, d / "s.h5", "--shard", f"{i}/3")
    _build(tiny_teacher, tiny_prepared, d / "t.h5", "--shard", "0/3", "--temperatures", "1,2")
    return d


@pytest.mark.parametrize("case, code, fragment", [
    ("missing", 3, "parts not found"),
    ("gap", 4, "rows [384, 768) are in no part"),
    ("twice", 4, "are in two parts"),
    ("foreign", 4, "made from other inputs or settings"),
    ("incomplete", 4, "incomplete part"),
    ("whole", 3, "not a shard part"),
])
def test_merge_refuses(case, code, fragment, parts, reference, tmp_path):
    p = [parts / f"s.part{i}of3.h5" for i in range(3)]
    if case == "missing":
        p[2] = parts / "nope.h5"
    elif case == "gap":
        p = [p[0], p[2]]
    elif case == "twice":
        p = [p[0], p[1], p[1], p[2]]
    elif case == "foreign":
        p[0] = parts / "t.part0of3.h5"
    elif case == "incomplete":
        p[1] = shutil.copy(p[1], tmp_path / "p1.h5")
        with h5py.File(p[1], "r+") as f:
            f.attrs["committed_rows"] = 64
    elif case == "whole":
        p[0] = reference
    proc = run_cli("cache", "merge", *[a for x in p for a in ("--part", x)], "--out", tmp_path / "m.h5")
    assert proc.returncode == code, proc.stderr
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.h5").exists()
