"""Stage 4, student: distil a student from the soft-target cache alone.

``distill_student(cfg, cache, transfer_set, out, metrics)`` is the stage (:mod:`.stage`), its
training step :mod:`.train`; many students from one cache are :mod:`.sweep` and :mod:`.experiments`
(the paper's), the epoch-time measurement :mod:`.measure`; :mod:`.loader` reads the cache's rows and
:mod:`.viewloader` a views cache's, both the :class:`~.batches.StudentLoader` the training loop takes;
:mod:`.settings` holds every command's settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.student.settings import ExperimentConfig, StudentBenchConfig, StudentConfig, SweepConfig

_LAZY = {"distill_student": "stages.student.stage", "train_epoch": "stages.student.train",
         "run_sweep": "stages.student.sweep", "run_experiment": "stages.student.experiments",
         "bench_student": "stages.student.measure", "TransferLoader": "stages.student.loader",
         "select_rows": "stages.student.loader"}
__all__ = ["StudentConfig", "SweepConfig", "ExperimentConfig", "StudentBenchConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code (torch) loads only when used
