"""The kernels onnxruntime's CPU provider actually runs for each ONNX file given: the operator
counts of the graph it optimises (its fusions of Dequantize -> op -> Quantize groups into integer
kernels applied), one line per file.  A float ``Conv`` left in an int8 graph runs between a stray
DequantizeLinear / QuantizeLinear pair.

    .venv/bin/python scripts/ort_ops.py model.onnx model.int8.onnx
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def optimised_ops(path: str) -> collections.Counter:
    """Operator type -> count in the graph onnxruntime runs for ``path`` (one thread, CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3  # it warns that the saved graph is specific to this machine
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


if __name__ == "__main__":
    print(f"onnxruntime {ort.__version__}")
    for p in sys.argv[1:]:
        ops = optimised_ops(p)
        print(f"{p}: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
