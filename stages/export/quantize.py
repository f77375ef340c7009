"""Quantised and half-precision variants of an exported student, and the quality gate they must pass.

Every conversion is onnxruntime's own; this module only chooses and checks.

- ``int8`` static QDQ (``quantize_static``, QDQ format, int8 weights; uint8 activations by default,
  int8 on request): activation ranges calibrated on transfer-set rows with MinMax, Entropy (KL,
  TensorRT's method) or Percentile.
  ``quant_pre_process`` runs first: on a raw export quantisation fails with "Inferred shape and
  existing shape differ" (docs/design.md, "pitfalls").
- ``dynamic`` int8 (``quantize_dynamic``): weights int8 ahead of time, activation scales computed per
  run.  For an MLP it yields MatMulInteger / DynamicQuantizeLinear; for convolutions it gives the slow
  ConvInteger, which is why static QDQ is the default shipped int8.
- ``fp16`` (``onnxruntime.transformers.float16.convert_float_to_float16``; onnxconverter-common is not
  installed and onnxruntime ships the same converter): weights and activations half precision, the
  graph's input and output kept float32 (``keep_io_types``) so callers feed the same arrays.  Meant for
  CUDA; the gate is evaluated on whatever provider the export ran (CPU here), whose fp16 kernels may
  accumulate differently from cuBLAS, so a GPU check should re-measure accuracy.

Quality gate (:func:`gate`): against fp32 on the whole test split, the change of top-1 accuracy in
percentage points, top-1 agreement with fp32 and with the teacher, and the mean KL divergence
``KL(p_fp32 || p_q) = sum_i p_i (log p_i - log q_i)`` (nats) of the softmax outputs at T = 1.
A variant that loses more than ``max_drop`` points fails.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from pipeline import inference
from pipeline.formats.onnx_model import IR_VERSION
from pipeline.onnxio import quiet
from stages.export.rewrites import FIRST_LAYERS, float_logits, pixel_path, pixel_zero_point, pixels_in

VARIANTS = ("int8", "dynamic", "fp16")


class _Calibration:
    """onnxruntime CalibrationDataReader over a fixed array of rows, in equal batches of at most 64.

    Equal: the Entropy and Percentile calibrators stack each tensor's batches into one array
    (``np.asarray`` in onnxruntime's HistogramCollector), which fails on a shorter last batch (2000
    rows in 64s end with 16).  The batch is the largest divisor of the row count up to 64 (2000: 50)."""

    def __init__(self, name: str, x: np.ndarray):
        size = max(d for d in range(1, min(64, max(1, len(x))) + 1) if len(x) % d == 0)
        self._batches = [{name: x[i:i + size]} for i in range(0, len(x), size)]
        self._it = iter(self._batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # Entropy and Percentile calibrators may read the rows more than once
        self._it = iter(self._batches)


def _finish(out: Path, *rewrites: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Path:
    """Apply ``rewrites`` to the quantiser's file, lower the IR version it leaves (onnx 1.23 writes 14;
    onnxruntime 1.31 reads 13), check and save: one load and one save."""
    model = onnx.load(str(out))
    for rewrite in rewrites:
        model = rewrite(model)
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    return out


def _preprocessed(fp32: Path, tmp: str) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = Path(tmp) / "pre.onnx"
    with quiet():
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
    return pre


def first_layer(graph: onnx.GraphProto) -> str:
    """The name of the first Conv / Gemm / MatMul of ``graph`` (its nodes are in topological order)."""
    return next(n.name for n in graph.node if n.op_type in FIRST_LAYERS)


def static_int8(fp32: Path, out: Path, calib: np.ndarray, method: str = "minmax",
                per_channel: bool = False, activations: str = "uint8", float_first: bool = False) -> Path:
    """Static QDQ int8 of ``fp32`` into ``out``, activation ranges calibrated on ``calib`` rows.

    Activations asymmetric (ReLU outputs are non-negative: a symmetric range would waste a bit),
    ``activations`` uint8 (U8S8: onnxruntime's x86 kernels for QLinearConv, QGemm and QLinearAdd take a
    uint8 input; with int8 activations its CPU build ran 6 of the 9 convolutions of a ResNet-8 in
    float between Dequantize / Quantize pairs, 0.77x the speed of fp32 instead of 1.77x, docs/results.md)
    or int8, weights symmetric, per output channel when ``per_channel``.  Logits stay float32
    (:func:`stages.export.rewrites.float_logits`).  A raw uint8 model whose first layer takes the
    pixels unchanged (MLP: normalisation folded into its weights) or shifted by a constant (CNN: the
    mean in pixel units) quantises that input at scale 1 with the zero point that gives back the
    pixels themselves, and takes them without any conversion
    (:func:`stages.export.rewrites.pixels_in`).  With ``float_first`` the first layer is left float32
    (``nodes_to_exclude``): the graph takes its input as before (pixels cast, shifted) and is quantised
    from that layer's output on.  A first layer whose 8-bit weight rounding alone costs accuracy (a
    ResNet-8 lost 0.57 points that way, docs/results.md) keeps it at the cost of one float
    convolution per run.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]
    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocessed(fp32, tmp)
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
        graph = onnx.load(str(pre)).graph
        path, shift = pixel_path(graph)
        if path and not float_first and (zero := pixel_zero_point(shift)) is not None:
            extra["TensorQuantOverrides"] = {path[-1].output[0]: [{
                "quant_type": QuantType.QUInt8, "scale": np.array(1.0, np.float32),
                "zero_point": np.array(zero, np.uint8)}]}
        with quiet():
            quantize_static(str(pre), str(out), _Calibration(name, calib), quant_format=QuantFormat.QDQ,
                            activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations],
                            weight_type=QuantType.QInt8,
                            per_channel=per_channel, calibrate_method=cm, extra_options=extra,
                            nodes_to_exclude=[first_layer(graph)] if float_first else None)
    return _finish(out, float_logits, pixels_in)


def dynamic_int8(fp32: Path, out: Path, per_channel: bool = False) -> Path:
    """Dynamic int8 of ``fp32`` into ``out``: int8 weights, activation scales computed at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocessed(fp32, tmp)
        with quiet():
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    return _finish(out)


def fp16(fp32: Path, out: Path) -> Path:
    """Half-precision weights and activations, float32 input and output (``keep_io_types``)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with quiet():
        model = OnnxModel(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True))
        # the converter appends its input Casts at the end of the node list: onnxruntime sorts the
        # graph itself, onnx.checker refuses it, so sort it (onnxruntime's own sorter)
        model.topological_sort()
    onnx.save(model.model, str(out))
    return _finish(out)


def logits_of(sess, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The first output of ``sess`` on ``x``, in batches of ``batch`` rows, as float64."""
    return inference.run_batched(sess, x, batch).astype(np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over rows of ``KL(softmax(ref) || softmax(logits))`` in nats (0 when they agree)."""
    lp, lq = _log_softmax(np.asarray(ref_logits, np.float64)), _log_softmax(np.asarray(logits, np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def gate(fp32_logits: np.ndarray, logits: np.ndarray, y: np.ndarray, teacher_pred: np.ndarray | None,
         max_drop: float) -> dict:
    """Quality of a variant against fp32 on labelled rows ``y``; ``passed`` unless it loses more than
    ``max_drop`` percentage points of top-1 accuracy.  Accuracies are fractions, the change is in points."""
    ref, got = fp32_logits.argmax(1), logits.argmax(1)
    acc32, acc = float(np.mean(ref == y)), float(np.mean(got == y))
    change = (acc - acc32) * 100.0
    return {"accuracy": acc, "fp32_accuracy": acc32, "accuracy_change_points": change,
            "agreement_with_fp32": float(np.mean(got == ref)),
            "agreement_with_teacher": None if teacher_pred is None else float(np.mean(got == teacher_pred)),
            "mean_kl_vs_fp32_nats": mean_kl(fp32_logits, logits),
            "max_accuracy_drop_points": max_drop,
            "passed": bool(-change <= max_drop + 1e-9)}  # 1e-9: float round-off of the points
