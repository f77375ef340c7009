"""Latency statistics for the bench stage (docs/design.md, "measuring").

The method follows onnxruntime_perf_test and MLPerf LoadGen: every timed ``run()`` is recorded
individually, tails are reported as percentiles (p50/p90/p95/p99/p99.9, as LoadGen's single-stream
summary does), a measurement is repeated in several independent trials, and the reported figure is
the median across trials together with the trials' spread, so a noisy machine shows up as an
*invalid* result instead of a confident wrong number.

Everything here is a pure function of synthetic or measured timings; nothing measures time.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: Percentile levels reported, keyed by their output name.
PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}
#: Every statistic a summary holds, in order; all but ``count`` are in microseconds.
STAT_KEYS: tuple[str, ...] = ("count", "min", "mean", *PERCENTILES, "max")
#: Fewer trials than this cannot show whether the machine was steady.
MIN_TRIALS = 3


def _as_latencies(latencies_s: Iterable[float] | np.ndarray) -> np.ndarray:
    """Validated 1-D float64 array of latencies in seconds."""
    arr = np.asarray(latencies_s, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("no latencies to summarise")
    if not np.all(np.isfinite(arr)):
        raise ValueError("latencies contain NaN or infinity")
    if np.any(arr < 0):
        raise ValueError("latencies contain negative values")
    return arr


def summarize(latencies_s: Iterable[float] | np.ndarray) -> dict:
    """Summary of per-run latencies given in seconds; statistics come back in microseconds.

    Keys: ``count`` (int) and ``min, mean, p50, p90, p95, p99, p999, max`` (float, us).
    Percentiles use numpy's default (linear interpolation between order statistics), as
    onnxruntime_perf_test's sorted-array percentiles do up to interpolation.
    Raises ValueError on empty input, NaN/inf, or negative latencies.
    """
    us = _as_latencies(latencies_s) * 1e6
    levels = np.percentile(us, list(PERCENTILES.values()))
    out: dict = {"count": int(us.size), "min": float(us.min()), "mean": float(us.mean())}
    out.update({name: float(v) for name, v in zip(PERCENTILES, levels)})
    out["max"] = float(us.max())
    return out


def p50_spread(p50s: Sequence[float]) -> float:
    """(max - min) / median of the trials' p50s; 0 for identical trials, inf if the median is 0."""
    arr = np.asarray(p50s, dtype=np.float64)
    width = float(arr.max() - arr.min())
    mid = float(np.median(arr))
    if mid == 0.0:
        return 0.0 if width == 0.0 else float("inf")
    return width / mid


def _invalid_reasons(n_trials: int, spread: float, max_spread: float) -> list[str]:
    reasons = []
    if n_trials < MIN_TRIALS:
        reasons.append(f"only {n_trials} trial(s), need at least {MIN_TRIALS}")
    if spread > max_spread:
        reasons.append(f"p50 spread across trials {spread:.1%} exceeds {max_spread:.1%}")
    return reasons


def combine_trials(trials: Sequence[dict], max_spread: float = 0.10) -> dict:
    """Median across trials of each statistic of :func:`summarize`, with a validity verdict.

    Adds ``trials`` (how many), ``spread`` ((max p50 - min p50) / median p50), ``valid``
    (False when fewer than 3 trials or spread > ``max_spread``) and ``reason`` ("" when valid;
    otherwise every failed condition, joined by "; "). Like LoadGen's "result is INVALID", an
    invalid result is still reported, never silently dropped. Raises ValueError on no trials or a
    trial missing a statistic.
    """
    if not trials:
        raise ValueError("no trials to combine")
    missing = [k for k in STAT_KEYS for t in trials if k not in t]
    if missing:
        raise ValueError(f"trial summary lacks {sorted(set(missing))}")
    out = {k: float(np.median([t[k] for t in trials])) for k in STAT_KEYS}
    spread = p50_spread([t["p50"] for t in trials])
    reasons = _invalid_reasons(len(trials), spread, max_spread)
    out.update(trials=len(trials), spread=spread, valid=not reasons, reason="; ".join(reasons))
    return out


def median_trial_index(trials: Sequence[dict]) -> int:
    """Index of the trial whose p50 is the (lower) median of all trials' p50s."""
    if not trials:
        raise ValueError("no trials")
    order = sorted(range(len(trials)), key=lambda i: trials[i]["p50"])
    return order[(len(order) - 1) // 2]


def throughput(batch: int, latencies_s: Iterable[float] | np.ndarray) -> float:
    """Rows per second at the median latency: ``batch / median(latencies_s)``.

    The median (not the mean) keeps a few stalls from moving the figure, as in
    onnxruntime_perf_test's reported throughput over steady-state runs.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    med = float(np.median(_as_latencies(latencies_s)))
    if med <= 0.0:
        raise ValueError("median latency is zero; throughput undefined")
    return batch / med
