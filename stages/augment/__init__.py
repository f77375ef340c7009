"""Stage 1b, augment: a prepared transfer set enlarged with shifted copies of its training rows.

``jitter_transfer_set(cfg, prepared, out)`` is the stage; :mod:`.settings` its settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.augment.settings import JitterConfig

_LAZY = {"jitter_transfer_set": "stages.augment.jitter"}
__all__ = ["JitterConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code (torch, onnxruntime) loads only when used
