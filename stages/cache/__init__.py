"""Stage 3, cache: run the teachers once with onnxruntime and write the soft-target cache.

``cache_soft_targets(cfg, teachers, transfer_set, out)`` is the stage (:mod:`.build`); the tools on
a finished cache are :mod:`.tools` (add-temperature, verify, merge), its benchmarks :mod:`.bench`;
:mod:`.settings` holds every command's settings.
"""
from __future__ import annotations

from pipeline import lazy
from stages.cache.settings import (AddTemperatureConfig, CacheBenchConfig, CacheConfig, CacheScaleConfig,
                                   MergeConfig, VerifyConfig)

_LAZY = {"cache_soft_targets": "stages.cache.stage", "build_cache": "stages.cache.stage",
         "add_temperature": "stages.cache.tools", "verify": "stages.cache.tools", "merge": "stages.cache.tools",
         "plot_diagnostics": "stages.cache.tools", "bench_speed": "stages.cache.bench",
         "bench_scale": "stages.cache.bench"}
__all__ = ["CacheConfig", "AddTemperatureConfig", "VerifyConfig", "MergeConfig", "CacheBenchConfig",
           "CacheScaleConfig", *_LAZY]

__getattr__ = lazy.exports(__name__, _LAZY)  # the stage's code (torch, onnxruntime) loads only when used
