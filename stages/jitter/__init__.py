"""Stage 1b, jitter: a prepared transfer set enlarged with shifted copies of its training rows.

``jitter_transfer_set(cfg, prepared, out)`` is the stage (:mod:`.stage`); :mod:`.settings` its settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.jitter.settings import JitterConfig

_LAZY = {"jitter_transfer_set": "stages.jitter.stage"}
__all__ = ["JitterConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code (torch, onnxruntime) loads only when used
