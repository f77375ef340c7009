"""The student end to end in its other modes: under torchrun with DDP (two CPU processes, gloo), and
with the logit-matching objective, through the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.models import load as load_checkpoint
from tests.conftest import ROOT, run_cli
from tests.oracles import median

pytestmark = pytest.mark.slow


def _train_args(cache, prepared, out):
    # 1200 rows / 100 = 12 global batches, even, so each rank's share is exactly half of every batch.
    return ["student", "--cache", cache, "--transfer-set", prepared, "--out", out, "--arch", "mlp:16",
            "--epochs", "2", "--batch-size", "100", "--temperature", "2", "--alpha", "1", "--seed", "3"]


def test_ddp_two_processes_match_one(tiny_cache, tiny_prepared, tmp_path):
    single = tmp_path / "single.ckpt"
    run_cli(*_train_args(tiny_cache, tiny_prepared, single), check=True)
    ddp = tmp_path / "ddp.ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "commands", *map(str, _train_args(tiny_cache, tiny_prepared, ddp))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(ddp.with_suffix(".metrics.json").read_text())
    assert m["world_size"] == 2 and not (tmp_path / "ddp.ckpt.partial").exists()
    a, b = load_checkpoint(single)[0].state_dict(), load_checkpoint(ddp)[0].state_dict()
    # Same global batches, loss of each half scaled so DDP's average is the global batch mean: the
    # only difference is float32 summation order (two half-batch gradients all-reduced vs one batch),
    # ~1e-7 relative per step. Measured: 1.5e-8 max abs after 24 steps. 1e-5 leaves room for Adam
    # amplifying it where gradients are near zero (it divides by sqrt(v)) on other builds, while a
    # wrong reduction (sum instead of mean, unscaled shares, different batches) moves weights ~1e-3.
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    single_m = json.loads(single.with_suffix(".metrics.json").read_text())
    assert abs(m["val_accuracy"] - single_m["val_accuracy"]) <= 0.01  # at most 2 of 200 val rows


def test_logit_matching_objective_end_to_end(tiny_cache, tiny_prepared, tmp_path):
    out = tmp_path / "logits.ckpt"
    args = _train_args(tiny_cache, tiny_prepared, out)
    proc = run_cli(*args, "--objective", "logits", check=True)
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    assert m["settings"]["objective"] == "logits" and m["test_accuracy"] > 0.5, proc.stderr


def test_bench_student_writes_side_by_side_ratios(tiny_cache, tiny_prepared, tiny_teacher, tmp_path):
    views = tmp_path / "views.h5"
    run_cli("cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", views, "--views", "4",
            "--temperatures", "2", "--device", "cpu", "--threads", "1", check=True)
    out = tmp_path / "bench.json"
    # three epochs, so that a median differs from a mean or a min of the same times
    run_cli("student", "bench", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--teacher", tiny_teacher,
            "--out", out, "--arch", "mlp:8", "--epochs", "3", "--stream-budget-mib", "0.5", "--temperature", "2",
            "--views-cache", views, check=True)
    r = json.loads(out.read_text())
    assert set(r["modes"]) == {"in_memory", "cache_resident", "cache_streaming", "online", "views"}
    assert r["rows"] == 1200 and r["views"]["views"]["count"] == 4
    # every figure is recomputed here from the raw epoch times the report records beside it
    floor = median(r["modes"]["in_memory"]["epoch_seconds"])
    for name, m in r["modes"].items():
        assert len(m["epoch_seconds"]) == 3 and all(t > 0 for t in m["epoch_seconds"]), name
        assert m["median_epoch_seconds"] == median(m["epoch_seconds"]), name
        assert m["min_epoch_seconds"] == min(m["epoch_seconds"]), name
        assert m["ratio_to_in_memory"] == pytest.approx(median(m["epoch_seconds"]) / floor, rel=1e-12), name
    assert r["onnxruntime_provider"] == "CPUExecutionProvider" and r["provenance"]["inputs"]["teacher"]["sha256"]
    assert r["provenance"]["inputs"]["views_cache"]["sha256"]
