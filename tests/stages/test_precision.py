"""Training precision (pipeline/runtime.resolve_precision): ``auto`` follows the CPU's bfloat16 instructions,
and a bf16-autocast student learns what the float32 one learns (weights stay float32)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import runtime
from pipeline.errors import UsageError
from pipeline.formats.checkpoint import read_checkpoint
from stages.student import StudentConfig, distill_student
from stages.teacher import TeacherConfig


@pytest.mark.parametrize("flags, expected", [((True, False), "bf16"), ((False, True), "bf16"),
                                             ((False, False), "fp32")])
def test_auto_follows_the_cpus_bfloat16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags[0], raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags[1], raising=False)
    assert runtime.resolve_precision("auto") == expected
    assert runtime.resolve_precision("fp32") == "fp32" and runtime.resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("settings", [StudentConfig, TeacherConfig])
def test_an_unknown_precision_is_a_usage_error(settings):
    with pytest.raises(UsageError, match="precision must be one of fp32, bf16, auto"):
        settings(precision="fp16")


def test_a_bf16_student_learns_what_the_fp32_one_does(tiny_chw_cache, tiny_chw_prepared, tmp_path):
    acc, weights = {}, {}
    for p in ("fp32", "bf16"):
        cfg = StudentConfig(arch="conv:8/2-16/2", epochs=3, lr=1e-2, temperature=2.0, alpha=0.5, precision=p)
        out = distill_student(cfg, tiny_chw_cache[1], tiny_chw_prepared, tmp_path / f"{p}.ckpt",
                              tmp_path / f"{p}.json", log=lambda m: None)
        metrics = json.loads((tmp_path / f"{p}.json").read_text())
        assert metrics["precision"] == p
        acc[p] = metrics["test_accuracy"]
        weights[p] = read_checkpoint(out).state
    assert all(w.dtype in (np.float32, np.int64) for w in weights["bf16"].values()), "weights stay float32"
    assert acc["fp32"] > 0.5 and abs(acc["bf16"] - acc["fp32"]) <= 0.05  # 300 test rows: 0.05 is 15 rows
    assert any(not np.array_equal(weights["fp32"][k], weights["bf16"][k]) for k in weights["fp32"])
