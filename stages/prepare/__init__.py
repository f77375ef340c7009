"""Stage 1, prepare: a transfer set (IDX folder, .npz arrays) into the canonical prepared file.

``prepare_dataset(cfg, out, source=..., npz=...)`` is the stage (:mod:`.stage`); :mod:`.settings`
its settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.prepare.settings import PrepareConfig

_LAZY = {k: "stages.prepare.stage" for k in ("prepare_dataset", "read_idx", "load_idx_dir", "load_npz")}
__all__ = ["PrepareConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code loads only when used
