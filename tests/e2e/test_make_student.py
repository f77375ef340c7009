"""The student make targets (bench-student, sweep, the three experiments) at tiny size: the real
recipes, pointed at the tiny fixtures (`-o` keeps make from rebuilding them from Fashion-MNIST)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_student_targets_at_tiny_size(tiny_cache, tiny_prepared, tiny_teacher, tmp_path):
    venv = Path(sys.executable).parent.parent  # the running interpreter's environment, already set up
    files = {"CACHE": tiny_cache, "PREPARED": tiny_prepared, "TEACHER_ONNX": tiny_teacher}
    args = ["make", "--no-print-directory", f"DATA={tmp_path}", f"VENV={venv}", "EPOCHS=1", "JOBS=2", "VIEWS_K=2",
            "SWEEP_ARGS=--temperatures 2 --alphas 0.5 --archs mlp:8 --seeds 0,1",
            "EXP_ARGS=--arch mlp:8 --temperature 2 --seeds 0", "EXP_T_ARCHS=mlp:8,mlp:16",
            "EXP_T_ARGS=--temperatures 1,4 --seeds 0",
            "BENCH_STUDENT_ARGS=--arch mlp:8 --epochs 1 --temperature 2",
            *[f"{k}={v}" for k, v in files.items()], *[f"-o{v}" for v in files.values()],
            "bench-student", "sweep", "experiments"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "sweeps" / "fashion-mnist"
    for name in ("sweep.csv", "sweep.md", "sweep.png", "temperature-size.md", "temperature-size.png",
                 "small-transfer.md", "omitted-class.md"):
        assert (out / name).is_file(), name
    assert "| mlp:16 | hard |" in (out / "temperature-size.md").read_text()
    assert json.loads((tmp_path / "bench" / "fashion-mnist-student.json").read_text())["modes"]["online"]
    # the fixtures are not rebuilt: the only cache built is bench-student's views cache (of the tiny rows)
    caches = [line for line in proc.stdout.splitlines() if "distill cache " in line]
    assert "distill prepare" not in proc.stdout and caches and all("--views" in line for line in caches), caches
