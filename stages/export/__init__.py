"""Stage 5, export: a student checkpoint to ONNX (fp32, int8 and the other variants), checked numerically.

``export_student(cfg, checkpoint, transfer_set, out, out_int8, report)`` is the stage
(:mod:`.stage`); :mod:`.quantize` makes and gates the variants, :mod:`.mobile` the ORT-format
files; :mod:`.settings` holds the settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.export.settings import ExportConfig

_LAZY = {"export_student": "stages.export.stage", "fold_normalisation": "stages.export.stage",
         "RawInput": "stages.export.stage"}
__all__ = ["ExportConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code (torch, onnxruntime) loads only when used
