"""Settings of the bench stage: the benchmark and its fidelity check (torch- and onnxruntime-free: the
CLI builds ``--help`` from them)."""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

from pipeline.config import require, setting


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark edge inference (latency percentiles, throughput across batch sizes, start-up, memory,
    size, accuracy) of student ONNX models (and PyTorch eager baselines) against the teacher
    ensemble, each configuration in a fresh process."""

    FOOTPRINT: ClassVar[str] = "lower --batches (now {batches}): each timed process holds one batch and its outputs"

    threads: tuple[int, ...] = setting((1, 0), "intra-op thread counts to time; 0 = all cores (os.cpu_count())")
    batches: tuple[int, ...] = setting((1, 16, 256), "batch sizes to time (1 = latency; larger = throughput)")
    warmup_count: int = setting(50, "warm-up runs (at least) before timing")
    warmup_s: float = setting(0.5, "warm-up seconds (at least) before timing")
    min_count: int = setting(200, "timed runs (at least) per trial at batch 1; batched runs need 1/10 of it")
    min_s: float = setting(0.5, "seconds (at least) per trial")
    trials: int = setting(5, "trials; the median is reported and their spread flags a noisy result")
    max_spread: float = setting(0.10, "a result is flagged invalid when (max - min) / median of the trials' "
                                      "p50s exceeds this")
    provider: str = setting("cpu", "execution provider: cpu or cuda (asserted, never a silent fallback)")
    iobinding: bool = setting(True, "also time every ONNX model at batch 1 through IOBinding (input and output "
                                    "OrtValues bound once: the per-run cost of the C/C++ API), as <model>-iobinding")

    def __post_init__(self) -> None:
        require(all(t >= 0 for t in self.threads) and self.threads, "threads must be >= 0 (0 = all cores)")
        require(all(b >= 1 for b in self.batches) and self.batches, "batches must be >= 1")
        require(self.trials >= 1 and self.min_count >= 1, "trials and min_count must be >= 1")
        require(self.warmup_count >= 0 and self.warmup_s >= 0 and self.min_s >= 0, "warm-up and min_s must be >= 0")
        require(self.max_spread > 0, "max_spread must be > 0")
        require(self.provider in ("cpu", "cuda"), "provider must be cpu or cuda")

    def thread_counts(self) -> list[int]:
        """The thread counts with 0 resolved to this machine's cores, duplicates dropped, in order."""
        return list(dict.fromkeys(t or (os.cpu_count() or 1) for t in self.threads))


@dataclasses.dataclass(frozen=True)
class PickConfig:
    """Pick the edge model for a device from a bench report: the most accurate model whose batch-1
    latency and file size fit the budgets (ties: faster, then smaller); prints the choice, why, the
    runner-up and what each budget left out.  Exit 7 when no model fits."""

    max_latency_us: float = setting(0.0, "latency budget in microseconds per image at batch 1 (0: none)")
    max_size_kib: float = setting(0.0, "size budget of the model file(s) in KiB (0: none)")
    engine: str = setting("iobinding", "call path the device will use: iobinding (C/C++ API, inputs bound once) "
                                       "or run (Python session.run)")
    threads: int = setting(1, "intra-op threads the device will give the model (a count the report timed)")
    latency: str = setting("p50", "latency percentile held to the budget: p50, p90, p99 or p999 (a frame "
                                  "deadline wants p99)")
    min_agreement: float = setting(0.0, "least top-1 agreement with the teacher (fraction, 0 to 1)")
    allow_noisy: bool = setting(True, "count timings whose trials spread more than the bench's max_spread")

    def __post_init__(self) -> None:
        require(self.max_latency_us >= 0 and self.max_size_kib >= 0, "budgets must be >= 0 (0: none)")
        require(self.engine in ("iobinding", "run"), "engine must be iobinding or run")
        require(self.threads >= 1, "threads must be >= 1")
        require(self.latency in ("p50", "p90", "p99", "p999"), "latency must be p50, p90, p99 or p999")
        require(0.0 <= self.min_agreement <= 1.0, "min_agreement must lie in [0, 1]")


#: The worker's own defaults (``python -m stages.bench.worker``): the bench settings' defaults, one source.
TIMING_DEFAULTS = {k: getattr(BenchConfig(), k) for k in ("warmup_count", "warmup_s", "min_count", "min_s", "trials")}


@dataclasses.dataclass(frozen=True)
class FidelityConfig:
    """Check the benchmark against a bare timeit loop, and the student against the teacher ensemble
    and the Identity floor, all at batch 1 in one run."""

    threads: int = setting(1, "intra-op threads for every timing")
    warmup_count: int = setting(200, "warm-up runs (at least) before timing")
    warmup_s: float = setting(0.5, "warm-up seconds (at least) before timing")
    min_count: int = setting(2000, "timed runs (at least) per trial; also the timeit loop's runs per repeat")
    min_s: float = setting(0.5, "seconds (at least) per trial")
    trials: int = setting(5, "trials (and timeit repeats); medians are compared")
    max_harness_gap: float = setting(0.10, "target: |harness p50 / timeit - 1| at most this")
    min_speedup: float = setting(50.0, "target: teacher p50 / int8 student p50 at least this")
    max_floor_ratio: float = setting(2.0, "target: fp32 student p50 / Identity p50 at most this")
    profile_runs: int = setting(2000, "runs profiled by onnxruntime to attribute the student's time")
    rounds: int = setting(3, "rounds of all the timings, interleaved; each p50 is the median over rounds, so a "
                             "slow phase of a shared host weighs on every model alike, not on one of a ratio")

    def __post_init__(self) -> None:
        require(self.threads >= 1 and self.trials >= 1 and self.min_count >= 1, "threads, trials, min_count >= 1")
        require(self.rounds >= 1, "rounds must be >= 1")
        require(self.profile_runs >= 1, "profile_runs must be >= 1")
