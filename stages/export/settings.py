"""Settings of the export stage (torch-free: the CLI builds ``--help`` from it)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from pipeline.config import require, setting

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_ACTIVATIONS = ("uint8", "int8")
WEIGHT_SCALES = {"auto": ("tensor", "channel"), "tensor": ("tensor",), "channel": ("channel",)}  # tried in order
FIRST_LAYER = {"auto": ("int8", "float"), "int8": ("int8",), "float": ("float",)}  # tried in order, after the scales
GATE_SPLITS = ("val", "test")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Export a student checkpoint to ONNX (fp32) and its quantised variants (static QDQ int8,
    dynamic int8, fp16), fp32 checked against PyTorch and each variant gated against fp32 on the
    validation split and scored on the test split; ORT format, reduced-build operator config and mobile
    usability for the shipped ones."""

    FOOTPRINT: ClassVar[str] = ("lower --calibration-rows (now {calibration_rows}); the test "
                                "and validation splits are held in memory whole")

    calibration_rows: int = setting(2000, "transfer-set rows used to calibrate int8 activation ranges")
    calibration_method: str = setting("minmax", "calibration method: minmax, entropy or percentile")
    weight_scales: str = setting("auto", "int8 weight scales: tensor (one per matrix), channel (one per output unit) "
                                        "or auto (tensor, and channel where tensor fails the gate); onnxruntime's "
                                        "QGemm requantises per-tensor faster (5.1 vs 5.8 us per batch-1 run of "
                                        "mlp:128)")
    int8_activations: str = setting("uint8", "int8 activation type: uint8 (asymmetric, onnxruntime's U8S8 kernels) "
                                             "or int8 (S8S8, which onnxruntime's x86 CPU build leaves partly in "
                                             "float for a residual CNN: docs/results.md, 'ResNet-8 from the views "
                                             "cache, and int8 activations')")
    int8_first_layer: str = setting("auto", "static int8's first layer (the one that takes the pixels): int8 like the "
                                            "rest, float (kept float32, the graph quantised from its output on) "
                                            "or auto (int8, and float where every weight scale fails the gate); "
                                            "docs/results.md, 'int8 and the first layer'")
    rtol: float = setting(1e-5, "fp32 parity tolerance, relative to the largest |logit| of a batch")
    seed: int = setting(0, "seed choosing the calibration rows")
    raw_input: bool = setting(False, "bake the input normalisation into the graph: the model takes raw uint8 pixels")
    max_accuracy_drop: float = setting(0.5, "quality gate: most accuracy (percentage points) a variant may lose "
                                            "against fp32 on the gate's split")
    gate_split: str = setting("val", "split the quality gate judges on, and so picks the int8 build on: val (the "
                                     "test figures of the report stay an unbiased estimate) or test (a transfer set "
                                     "whose validation split is too small to tell a row from noise)")
    force: bool = setting(False, "write a variant even when it fails the quality gate (the report says so)")
    mobile: bool = setting(True, "write ORT-format files, the reduced-build operator config and the mobile "
                                 "usability analysis (needs a mobile folder)")

    def __post_init__(self) -> None:
        require(self.calibration_rows >= 1, "calibration_rows must be >= 1")
        require(self.calibration_method in CALIBRATION_METHODS,
                f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)}")
        require(self.rtol > 0, "rtol must be > 0")
        require(self.max_accuracy_drop >= 0, "max_accuracy_drop must be >= 0")
        require(self.int8_activations in INT8_ACTIVATIONS,
                f"int8_activations must be one of {', '.join(INT8_ACTIVATIONS)}")
        require(self.weight_scales in WEIGHT_SCALES, f"weight_scales must be one of {', '.join(WEIGHT_SCALES)}")
        require(self.int8_first_layer in FIRST_LAYER, f"int8_first_layer must be one of {', '.join(FIRST_LAYER)}")
        require(self.gate_split in GATE_SPLITS, f"gate_split must be one of {', '.join(GATE_SPLITS)}")
