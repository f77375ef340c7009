"""Cases 1 and 2: SIGKILL at several points of each long stage, then run it again.

Progress is watched from outside (files appearing, the cache's committed_rows counter, worker
processes starting), with no test hooks in the code: the cache is slowed by tests/throttled_cli.py, a
wrapper that lives in the tests.  After every kill: no published artifact is partial (each one present
loads completely), a previous artifact being replaced is still the previous one, and the rerun
succeeds.  The cache's identical-content resume is tested in tests/faults/test_cache_crash.py; here
that nothing half-written is published, that the second kill lands mid-file (by committed rows) and
that the rerun resumes from there.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import inference
from pipeline.formats.cache import open_cache
from pipeline.formats.checkpoint import read_checkpoint, write_checkpoint
from tests.conftest import ROOT, run_cli
from tests.faultkit import committed_rows, kill_when, linear_model, start_cli


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _valid(path: Path) -> None:
    """An artifact that is present must load completely."""
    if not path.exists():
        return
    if path.suffix == ".onnx":
        inference.session(path, "cpu")
    elif path.suffix == ".ckpt":
        read_checkpoint(path, role=None)
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".h5":
        open_cache(path)
    elif path.suffix in (".md", ".csv"):
        assert path.read_text().endswith("\n")


def _workers_started(pid: int, n: int):
    """ready() once ``n`` distinct bench workers (children of ``pid``) have been seen."""
    seen = set()

    def ready():
        for d in os.listdir("/proc"):
            if d.isdigit() and d not in seen:
                try:
                    stat = open(f"/proc/{d}/stat").read()
                    cmd = open(f"/proc/{d}/cmdline", "rb").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"stages.bench.worker" in cmd:
                    seen.add(d)
        return len(seen) >= n
    return ready


def _rerun(args):
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_kill_teacher_then_resume(tiny_prepared, tmp_path):
    out = tmp_path / "t" / "ensemble.onnx"
    members = [out.with_name(f"member{i}.ckpt") for i in range(2)]
    args = ["teacher", "--prepared", tiny_prepared, "--out", out, "--members", "2", "--arch", "mlp:16",
            "--epochs", "1", "--threads", "1", "--max-shift", "0"]
    # after the first member; then, on the rerun that reuses it, as soon as the output is claimed
    # (while member 1 trains or the graph is exported: a window of seconds, not of one export call)
    points = [lambda: members[0].exists(),
              lambda: out.with_name("ensemble.onnx.partial").exists()]
    for ready in points:
        assert kill_when(start_cli(*args), ready)
        assert not out.exists()
        for p in [out, *members]:
            _valid(p)
    proc = _rerun(args)
    assert "reusing" in proc.stderr  # member checkpoints made before the kill are not retrained
    _valid(out)


@pytest.mark.slow
def test_kill_cache_never_publishes_a_partial(tiny_teacher, tiny_prepared, tmp_path):
    out = tmp_path / "c.h5"
    args = ["cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", out, "--device", "cpu",
            "--threads", "1", "--batch-size", "64", "--temperatures", "1,2,4"]  # 1200 rows: 19 batches
    partial = tmp_path / "c.h5.partial"
    # Where the kill lands is read from the file's own commit counter, not from its size (HDF5
    # allocates the datasets up front, so bytes say nothing about rows).  0.05 s per batch
    # (tests/throttled_cli.py) lets a 10 ms poll stop it within a batch of its mark.
    points = [("as soon as the partial exists", lambda: partial.exists()),
              ("half way, by committed rows", lambda: (committed_rows(partial) or 0) >= 600)]
    for what, ready in points:
        assert kill_when(start_cli(*args, throttle_s=0.05), ready, poll=0.01), f"finished before {what}"
        assert not out.exists()
    done = committed_rows(partial)
    assert done is not None and 600 <= done < 1200 and done % 64 == 0, done  # really mid-file
    ran = tmp_path / "rows.txt"  # the first row of each batch the rerun's teachers run (tests/throttled_cli.py)
    rerun = start_cli(*args, throttle_s=0, env={"THROTTLED_CLI_ROWS": str(ran)})
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"resuming {partial} at row {done}" in err  # the rerun says it starts where the kill left it
    # and does: it runs the teachers on the uncommitted batches only (a rerun that recomputed committed
    # rows would log the same line and publish the same bytes)
    assert sorted(int(r) for r in ran.read_text().split()) == list(range(done, 1200, 64))
    _valid(out)
    assert open_cache(out).rows == 1200 and not partial.exists()


@pytest.mark.slow
def test_kill_student_keeps_previous_checkpoint_and_metrics(tiny_cache, tiny_prepared, tmp_path):
    out, metrics = tmp_path / "s.ckpt", tmp_path / "s.metrics.json"
    base = ["student", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--out", out, "--temperature", "2",
            "--arch", "mlp:8"]
    _rerun([*base, "--epochs", "1"])
    before = out.read_bytes(), metrics.read_bytes()
    proc = start_cli(*base, "--epochs", "500", "--seed", "1")  # its replacement, killed mid-training
    seen = []

    def training():  # the output is claimed at the start of the stage; kill a second into training
        if not seen and _size(tmp_path / "s.ckpt.partial") >= 0:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 1.0

    assert kill_when(proc, training)
    assert (out.read_bytes(), metrics.read_bytes()) == before
    _valid(out), _valid(metrics)


@pytest.mark.slow
def test_kill_bench_then_rerun(tiny_teacher, tiny_prepared, tmp_path):
    out = tmp_path / "b.json"
    student = linear_model(tmp_path / "s.onnx")
    args = ["bench", "--teacher", tiny_teacher, "--candidate", f"s={student}", "--prepared", tiny_prepared,
            "--out", out, "--warmup-count", "1", "--warmup-s", "0", "--min-count", "5", "--min-s", "0.05",
            "--trials", "1", "--batches", "1"]
    for n in (1, 3):  # while the first and the third model are timed
        proc = start_cli(*args)
        assert kill_when(proc, _workers_started(proc.pid, n), poll=0.02)
        for p in (out, out.with_suffix(".md"), out.with_suffix(".csv")):
            assert not p.exists()
    _rerun(args)
    for p in (out, out.with_suffix(".md"), out.with_suffix(".csv")):
        _valid(p)


CHILD = r"""
import sys, time
from pathlib import Path
import numpy as np
from pipeline import artifacts
from pipeline.formats.checkpoint import Checkpoint, write_checkpoint
ckpt = lambda w: Checkpoint("student", "mlp:1", (1,), ("a", "b"), {"scale": 1.0, "mean": 0.0, "std": 1.0}, {"w": w},
                            {"temperature": 1.0, "alpha": 0.0, "epoch": 1}, {})
path, how = Path(sys.argv[1]), sys.argv[2]
if how == "before-rename":  # everything written and fsynced; killed just before os.replace
    real = artifacts.publish
    def slow(partial, final):
        artifacts.fsync_path(partial); print("ready", flush=True); time.sleep(60); return real(partial, final)
    artifacts.publish = slow
with artifacts.atomic_output(path) as tmp:
    if path.suffix == ".ckpt":
        write_checkpoint(tmp, ckpt(np.ones(1000, np.float32)))
    else:
        tmp.write_text('{"new": ' + "[1, 2, 3, " * 10000)
    if how == "mid-write":
        with open(tmp, "r+b") as f:
            f.truncate(tmp.stat().st_size // 2)
        print("ready", flush=True)
        time.sleep(60)
"""


def _ckpt(w):
    from pipeline.formats.checkpoint import Checkpoint

    return Checkpoint("student", "mlp:1", (1,), ("a", "b"), {"scale": 1.0, "mean": 0.0, "std": 1.0}, {"w": w},
                      {"temperature": 1.0, "alpha": 0.0, "epoch": 1}, {})


@pytest.mark.parametrize("suffix", [".json", ".ckpt"])
@pytest.mark.parametrize("how", ["mid-write", "before-rename"])
def test_kill_while_replacing_leaves_previous(tmp_path, suffix, how):
    from pipeline.artifacts import atomic_output, write_json

    path = tmp_path / f"report{suffix}"
    if suffix == ".json":
        write_json(path, {"old": True})
    else:
        with atomic_output(path) as tmp:
            write_checkpoint(tmp, _ckpt(np.zeros(3, np.float32)))
    before = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), how], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline().strip() == "ready"
    child.kill()
    child.wait()
    assert path.read_bytes() == before
    _valid(path)
    if suffix == ".json":  # and the next writer is not blocked by the dead one
        write_json(path, {"next": 1})
        assert json.loads(path.read_text()) == {"next": 1}
