"""The measurement scripts kept under scripts/ still run and still build what docs/results.md says."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_int8_graph_steps_rebuilds_the_four_graphs(tmp_path):
    out = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, "scripts/int8_graph_steps.py", "--runs", "50", "--rounds", "1",
                           "--calibration-rows", "64", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = json.loads(out.read_text())["steps"]
    # the graphs onnxruntime runs, as docs/results.md describes each step
    assert steps["qdq"]["onnxruntime_ops"] == ["QuantizeLinear", "Reshape", "QGemm", "QGemm", "DequantizeLinear"]
    assert steps["float-logits"]["onnxruntime_ops"] == ["QuantizeLinear", "Reshape", "QGemm", "QGemm"]
    assert steps["raw-pixels"]["onnxruntime_ops"] == steps["per-tensor"]["onnxruntime_ops"] == ["Reshape", "QGemm",
                                                                                                "QGemm"]
    # per-channel scales cost 2.1 KiB over per-tensor ones for mlp:128 (docs/results.md, the int8 size)
    assert steps["qdq"]["size_bytes"] - steps["per-tensor"]["size_bytes"] == pytest.approx(2.1 * 1024, abs=60)
    assert all(s["us_per_run_p50"] > 0 and len(s["round_p50s_us"]) == 1 for s in steps.values())
