"""A stand-in quantiser for the export's gate tests: a variant that fails any gate, whatever the split."""
from __future__ import annotations

from pathlib import Path

import onnx
import onnx.numpy_helper


def degrading_variant(kind: str, fp32: Path, out: Path, calib, cfg, scales: str = "tensor",
                      first: str = "int8") -> Path:
    """Replaces ``stages.export.stage._make_variant``: a 'quantised' model that always says class 0
    (its 10-class bias raised by 1e4), so it loses ~90 points of accuracy on any split of 10 classes."""
    model = onnx.load(str(fp32))
    bias = next(t for t in model.graph.initializer if list(t.dims) == [10] and t.data_type == onnx.TensorProto.FLOAT)
    b = onnx.numpy_helper.to_array(bias).copy()
    b[0] += 1e4
    bias.CopyFrom(onnx.numpy_helper.from_array(b, bias.name))
    onnx.save(model, str(out))
    return out
