"""`distill student sweep` on the tiny cache: the grid (with the hard baseline), parallel jobs, the
CSV / Markdown / PNG outputs, resuming, and the summary arithmetic."""
import csv
import json

import pytest

from stages import sweep as sw
from tests.conftest import run_cli


def test_grid_always_holds_the_hard_baseline():
    cfg = sw.SweepConfig(temperatures=(2.0, 4.0), alphas=(0.5,), archs=("mlp:8", "mlp:16"), seeds=(0, 1))
    jobs = cfg.students()
    assert len(jobs) == 2 * 2 * (1 + 2 * 1)
    assert sum(j.alpha == 0 for j in jobs) == 4 and all(j.threads == 1 for j in jobs)
    assert len({sw.job_name(j) for j in jobs}) == len(jobs)  # no two jobs share a checkpoint


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
