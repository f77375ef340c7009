"""Stage 5, export: the student to ONNX, fp32 and int8, each checked before it is published.

fp32: the torch.export-based exporter, one self-contained file (no ``.onnx.data``), dynamic batch,
opset 18, IR 10, metadata an edge runtime needs (class names, input normalisation, T and alpha, the
hashes of the checkpoint and of the cache it was distilled from).  onnxruntime must reproduce
PyTorch on real test rows at batch sizes 1, 7 and 256 (:func:`pipeline.onnxio.validate`).

int8: onnxruntime's static QDQ quantisation (``quant_pre_process`` first: a raw export fails with
"Inferred shape and existing shape differ"), calibrated on transfer-set rows.  Static QDQ rather
than dynamic: dynamic quantisation of convolutions yields the slow ConvInteger.  Its test accuracy
and top-1 agreement with fp32 are reported.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from pipeline import onnxio, provenance, runtime
from pipeline.artifacts import atomic_output, claim, write_json
from pipeline.config import require, setting, to_dict
from stages.prepare import open_prepared
from stages.student import load_checkpoint

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Export a student checkpoint to ONNX (fp32) and to int8 (static QDQ), each checked
    numerically against PyTorch / fp32 on real test rows."""

    calibration_rows: int = setting(2000, "transfer-set rows used to calibrate int8 activation ranges")
    calibration_method: str = setting("minmax", "calibration method: minmax, entropy or percentile")
    per_channel: bool = setting(True, "per-channel (per output unit) weight scales for int8")
    rtol: float = setting(1e-5, "fp32 parity tolerance, relative to the largest |logit| of a batch")
    seed: int = setting(0, "seed choosing the calibration rows")

    def __post_init__(self) -> None:
        require(self.calibration_rows >= 1, "calibration_rows must be >= 1")
        require(self.calibration_method in CALIBRATION_METHODS,
                f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)}")
        require(self.rtol > 0, "rtol must be > 0")


def _metadata(ckpt: dict, checkpoint: Path) -> dict[str, str]:
    prov = json.loads(ckpt["provenance"])
    return {"class_names": json.dumps(ckpt["class_names"]),
            "normalisation": json.dumps({**ckpt["norm"], "formula": "(x / scale - mean) / std"}),
            "temperature": str(ckpt["temperature"]), "alpha": str(ckpt["alpha"]),
            "checkpoint_sha256": provenance.sha256_file(checkpoint),
            "cache_sha256": prov["inputs"]["cache"]["sha256"], "arch": ckpt["arch"]}


class _Calibration:
    """onnxruntime CalibrationDataReader over a fixed array of rows, in batches of 64."""

    def __init__(self, name: str, x: np.ndarray):
        self._it = iter([{name: x[i:i + 64]} for i in range(0, len(x), 64)])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # some onnxruntime versions call it
        pass


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray, cfg: ExportConfig) -> Path:
    """Static QDQ int8 of ``fp32`` into ``out``, calibrated on ``calib`` rows."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
        with onnxio._quiet():
            quantize_static(str(pre), str(out), _Calibration("x", calib), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            per_channel=cfg.per_channel, calibrate_method=method,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    model = onnx.load(str(out))
    model.ir_version = min(model.ir_version, onnxio.IR_VERSION)
    onnx.save(model, str(out))
    return out


def _scores(sess, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1024]})[0] for i in range(0, len(x), 1024)])


def export_student(cfg: ExportConfig, checkpoint: Path, transfer_set: Path, out: Path, out_int8: Path,
                   report: Path, log: Callable[[str], None] = print) -> Path:
    """Write ``out`` (fp32) and ``out_int8`` (QDQ int8) from ``checkpoint``, and the check ``report``."""
    claim(out, out_int8, report)
    net, ckpt = load_checkpoint(checkpoint)
    info = open_prepared(transfer_set)
    xtest, ytest = info.load("test")
    rng = np.random.default_rng(cfg.seed)
    ntrain = info.rows["train"]
    calib_idx = np.sort(rng.choice(ntrain, size=min(cfg.calibration_rows, ntrain), replace=False))
    xtrain = info.load("train")[0]
    calib = xtrain[calib_idx]
    meta = _metadata(ckpt, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        onnxio.export(net, torch.from_numpy(xtest[:2]), tmp, "logits", metadata=meta)
        sess = runtime.session(tmp, "cpu", threads=1)
        worst = onnxio.validate(net, sess, [xtest[:1], xtest[:7], xtest[:256]], rtol=cfg.rtol, what=str(out))
        fp32_logits = _scores(sess, xtest, ytest)
        with atomic_output(out_int8) as tmp8:
            quantize_int8(tmp, tmp8, calib, cfg)
            int8_logits = _scores(runtime.session(tmp8, "cpu", threads=1), xtest, ytest)
    acc32 = float(np.mean(fp32_logits.argmax(1) == ytest))
    acc8 = float(np.mean(int8_logits.argmax(1) == ytest))
    result = {"fp32": {"path": str(out), "test_accuracy": acc32, "max_abs_diff_vs_torch": worst,
                       "sha256": provenance.sha256_file(out)},
              "int8": {"path": str(out_int8), "test_accuracy": acc8, "sha256": provenance.sha256_file(out_int8),
                       "agreement_with_fp32": float(np.mean(fp32_logits.argmax(1) == int8_logits.argmax(1)))},
              "settings": to_dict(cfg), "metadata": meta,
              "provenance": provenance.record("export", to_dict(cfg), {"checkpoint": checkpoint,
                                                                      "transfer_set": transfer_set})}
    write_json(report, result)
    log(f"export: fp32 test {acc32:.4f} (max |diff| vs torch {worst:.2g}) -> {out}; "
        f"int8 test {acc8:.4f} -> {out_int8}")
    return out
