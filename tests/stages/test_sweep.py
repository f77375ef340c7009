"""`distill student sweep` on the tiny cache: the grid (with the hard baseline), parallel jobs, the
CSV / Markdown / PNG outputs, resuming, and the summary arithmetic."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.student import sweep as sw
from tests.conftest import ROOT, run_cli


def test_grid_always_holds_the_hard_baseline():
    cfg = sw.SweepConfig(temperatures=(2.0, 4.0), alphas=(0.5,), archs=("mlp:8", "mlp:16"), seeds=(0, 1))
    jobs = cfg.students()
    assert len(jobs) == 2 * 2 * (1 + 2 * 1)
    assert sum(j.alpha == 0 for j in jobs) == 4 and all(j.threads == 1 for j in jobs)
    assert len({sw.job_name(j) for j in jobs}) == len(jobs)  # no two jobs share a checkpoint


def test_grid_passes_weight_decay_and_mixup_to_every_student():
    plain = sw.SweepConfig(temperatures=(4.0,), alphas=(0.5,), archs=("mlp:8",), seeds=(0,))
    mixed = sw.SweepConfig(temperatures=(4.0,), alphas=(0.5,), archs=("mlp:8",), seeds=(0,), weight_decay=0.02,
                           mixup=0.5)
    assert all(j.weight_decay == 0.02 and j.mixup == 0.5 for j in mixed.students())  # the baseline's inputs too
    assert all(j.weight_decay == 0 and j.mixup == 0 for j in plain.students())
    # two sweeps sharing a --work-dir never take each other's students for their own
    names = [sw.job_name(j) for j in plain.students()], [sw.job_name(j) for j in mixed.students()]
    assert not set(names[0]) & set(names[1]) and names[1][1] == "mlp-8-wd0.02-mix0.5-T4-a0.5-s0"
    with pytest.raises(sw.UsageError, match="mixup"):  # refused before any worker starts
        sw.SweepConfig(archs=("mlp:8",), mixup=0.5, objective="logits")


def test_summary_and_gap_closed_arithmetic():
    rows = [dict(arch="a", temperature="", alpha=0.0, val_accuracy=v, test_accuracy=v, test_accuracy_last_epoch=v)
            for v in (0.80, 0.82)]
    rows += [dict(arch="a", temperature=4.0, alpha=0.5, val_accuracy=v, test_accuracy=v, test_accuracy_last_epoch=v)
             for v in (0.85, 0.87)]
    s = sw.summarise(rows)
    assert s[0]["test_accuracy"] == pytest.approx(0.81) and s[0]["test_accuracy_std"] == pytest.approx(0.02 / 2**0.5)
    (b,) = sw.best_per_arch(s, teacher_acc=0.91)
    assert b["gain"] == pytest.approx(0.05) and b["gap_closed"] == pytest.approx(0.05 / 0.10)


@pytest.mark.slow
def test_sweep_cli_writes_csv_markdown_plot(tiny_cache, tiny_prepared, tiny_teacher, tmp_path):
    out = tmp_path / "sweep.csv"
    args = ["student", "sweep", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--work-dir", tmp_path / "w",
            "--csv", out, "--teacher", tiny_teacher, "--temperatures", "2,4", "--alphas", "0.5", "--archs", "mlp:8",
            "--seeds", "0,1", "--epochs", "1", "--jobs", "2"]
    proc = run_cli(*args, check=True)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 3 and sum(r["alpha"] == "0.0" for r in rows) == 2
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    md = out.with_suffix(".md").read_text()
    assert "| mlp:8 | hard | 0 | 2 |" in md and "Teacher ensemble:" in md and "gap closed" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["provenance"]["inputs"]["cache"]["sha256"] and len(report["rows"]) == 6
    # A second run reuses the trained students (same settings, same cache): nothing is retrained.
    proc = run_cli(*args, check=True)
    assert "6 already trained" in proc.stderr
    # Another temperature list: the hard baselines (alpha 0, T never read) are reused, T=1 is new.
    i = args.index("--temperatures")
    proc = run_cli(*args[:i + 1], "1", *args[i + 2:], "--csv", tmp_path / "t1.csv", check=True)
    assert "4 students, 2 already trained" in proc.stderr


def test_same_student_ignores_T_of_a_hard_baseline():
    hard, soft = sw.StudentConfig(alpha=0.0, temperature=2.0), sw.StudentConfig(alpha=0.5, temperature=2.0)
    stored = lambda cfg, T: {**sw.to_dict(cfg), "temperature": T}  # noqa: E731
    assert sw._same_student(stored(hard, 8.0), hard) and sw._same_student(stored(hard, 2.0), hard)
    assert not sw._same_student(stored(soft, 8.0), soft) and sw._same_student(stored(soft, 2.0), soft)
    assert not sw._same_student({**stored(hard, 2.0), "seed": 7}, hard)


def test_sweep_refuses_a_missing_teacher_before_training(tiny_cache, tiny_prepared, tmp_path):
    proc = run_cli("student", "sweep", "--cache", tiny_cache, "--transfer-set", tiny_prepared,
                   "--work-dir", tmp_path / "w", "--csv", tmp_path / "s.csv", "--teacher", tmp_path / "nope.onnx",
                   "--temperatures", "2", "--alphas", "0.5", "--archs", "mlp:8", "--seeds", "0", "--epochs", "1")
    assert proc.returncode != 0 and "teacher ONNX not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())  # nothing was trained


def _workers_of(pid: int) -> list[int]:
    """PIDs of the multiprocessing workers whose parent is ``pid`` (from /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            status, cmd = (d / "status").read_text(), (d / "cmdline").read_bytes()
        except OSError:  # not a process, or gone meanwhile
            continue
        ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(d.name))
    return found


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (dead, waiting for a reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_killed_sweep_leaves_no_student_training(tiny_cache, tiny_prepared, tmp_path):
    """SIGKILL the sweep (no handler can run): its two training workers must die with it, not go on
    training for hours and writing into the work folder."""
    args = ["student", "sweep", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--work-dir", tmp_path / "w",
            "--csv", tmp_path / "s.csv", "--temperatures", "2", "--alphas", "0.5", "--archs", "mlp:8",
            "--seeds", "0", "--epochs", "100000", "--jobs", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "commands", *map(str, args)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # both students claimed (their .partial files exist): the workers are past start-up, training
        while len(list((tmp_path / "w").glob("*.ckpt.partial"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _workers_of(proc.pid)
        assert len(workers) == 2, "the sweep never started its two workers"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while (alive := [w for w in workers if _running(w)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for w in alive:  # do not leave them running whatever the outcome
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed sweep"
