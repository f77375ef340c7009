"""The kernels onnxruntime's CPU provider actually runs for each ONNX file given: the operator
counts of the graph it optimises (its fusions of Dequantize -> op -> Quantize groups into integer
kernels applied), one line per file.  A float ``Conv`` left in an int8 graph runs between a stray
DequantizeLinear / QuantizeLinear pair.

    .venv/bin/python scripts/ort_ops.py model.onnx model.int8.onnx
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.inference import optimised_ops

if __name__ == "__main__":
    print(f"onnxruntime {ort.__version__}")
    for p in sys.argv[1:]:
        ops = collections.Counter(optimised_ops(Path(p)))
        print(f"{p}: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
