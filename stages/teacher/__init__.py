"""Stage 2, teacher: train an ensemble in PyTorch and export it as one ONNX graph.

``train_teachers(cfg, prepared, out)`` is the stage (:mod:`.stage`), a member's training :mod:`.train`;
:mod:`.settings` its settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.teacher.settings import TeacherConfig

_LAZY = {"train_teachers": "stages.teacher.stage", "train_member": "stages.teacher.train"}
__all__ = ["TeacherConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code (torch, onnxruntime) loads only when used
