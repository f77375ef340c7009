"""Stage 3, cache: run the teachers once with onnxruntime and write the soft-target cache.

``cache_soft_targets(cfg, teachers, transfer_set, out)`` is the stage (:mod:`.stage`); the tools on
a finished cache are :mod:`.temperatures` (add-temperature), :mod:`.verification` (verify),
:mod:`.shards` (merge) and :mod:`.plots`; the stage's measurements of itself :mod:`.measure`;
:mod:`.settings` holds every command's settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.cache.settings import (
                                   AddTemperatureConfig,
                                   CacheBenchConfig,
                                   CacheConfig,
                                   CacheScaleConfig,
                                   MergeConfig,
                                   VerifyConfig,
)

# Module names differ from the functions they hold: an imported submodule becomes an attribute of the
# package and would shadow a lazy function of the same name.
_LAZY = {"cache_soft_targets": "stages.cache.stage", "build_cache": "stages.cache.stage",
         "add_temperature": "stages.cache.temperatures", "verify": "stages.cache.verification",
         "merge": "stages.cache.shards", "plot_diagnostics": "stages.cache.plots",
         "bench_speed": "stages.cache.measure", "bench_scale": "stages.cache.measure"}
__all__ = ["CacheConfig", "AddTemperatureConfig", "VerifyConfig", "MergeConfig", "CacheBenchConfig",
           "CacheScaleConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code (torch, onnxruntime) loads only when used
