"""Stage 6, bench: edge inference of the students against the teacher ensemble, and its fidelity check.

``benchmark(cfg, teacher, candidates, prepared, out, markdown, csv)`` is the stage (:mod:`.stage`);
every timing runs in a fresh ``python -m stages.bench.worker`` process (:mod:`.worker`, started by
:mod:`.launcher`; the calls it times are built by :mod:`.runners`), summarised
by :mod:`.stats` and rendered by :mod:`.report`; :mod:`.fidelity` checks the harness itself;
``pick_model(cfg, report)`` (:mod:`.choice`) picks a model from a report under budgets;
:mod:`.settings` holds the settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.bench.settings import BenchConfig, FidelityConfig

_LAZY = {"benchmark": "stages.bench.stage", "check_fidelity": "stages.bench.fidelity",
         "pick_model": "stages.bench.choice"}
__all__ = ["BenchConfig", "FidelityConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code (onnxruntime) loads only when used
