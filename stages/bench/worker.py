"""Measure one (model, threads, batch, provider) in a fresh process; print one JSON object.

Internal worker of the bench stage (docs/design.md, "measuring", after onnxruntime_perf_test / MLPerf
LoadGen): session creation and the first run are timed apart from the steady state; warm-up lasts
until both a count and a duration are reached; each of several trials lasts until both a minimum
count and a minimum duration are reached; batches are cycled from a pool of real rows; the
execution provider that actually ran is asserted (exit 5, never a silent CPU fallback).

    python -m stages.bench.worker --model m.onnx --inputs pool.npy --threads 1 --batch 1

Engines: ``onnxruntime`` (default: ``session.run`` with numpy feeds, what a Python caller pays),
``iobinding`` (one input and the outputs bound once to OrtValues, the next pool batch copied into
the bound input before each run's clock starts, timed ``run_with_iobinding``: the per-run cost of
the C/C++ API, which is what onnxruntime_perf_test and an embedded caller pay), ``torch``
(PyTorch eager on a student checkpoint, the baseline the ONNX models are compared with; same pool,
same loop) and ``timeit`` / ``timeit-iobinding`` (a bare ``timeit`` loop over the same call, the
reference the harness's own p50 is checked against by ``distill bench-fidelity``).

Only the JSON object goes to stdout: anything a library prints there is redirected to stderr.
The calls timed are built by :mod:`stages.bench.runners`; the bench stage starts this process, and
writes the pool and the floor model it reads, through :mod:`stages.bench.launcher`.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
import timeit

import numpy as np

from pipeline import inference, resources
from pipeline.errors import PipelineError, RuntimeUnavailable
from stages.bench import stats as benchstats
from stages.bench.runners import (
    TORCH_PROVIDER,
    cpu_runners,
    cut_batches,
    frame_buffer_runner,
    iobinding_runners,
    load_pool,
    make_session,
    torch_runners,
    torch_session,
)
from stages.bench.settings import TIMING_DEFAULTS

PROVIDERS = inference.PROVIDERS
ENGINES = ("onnxruntime", "iobinding", "torch", "timeit", "timeit-iobinding")


# ---------------------------------------------------------------- measurement
def rss_mb() -> dict[str, float | None]:
    """Current (VmRSS) and peak (VmHWM) resident set size in MiB from /proc/self/status."""
    found: dict[str, float | None] = {"VmRSS": None, "VmHWM": None}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in found:
                    found[key] = int(rest.split()[0]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return found


def timed_loop(runners: list, start: int, min_count: int, min_s: float,
               refills: list | None = None) -> tuple[np.ndarray, int]:
    """Run until both ``min_count`` runs and ``min_s`` wall seconds; per-run latencies in s.
    ``refills[k]``, when given, runs before run k's clock starts (it loads that run's input)."""
    lat_ns: list[int] = []
    clock = time.perf_counter_ns
    k, deadline = start, clock() + int(min_s * 1e9)
    while len(lat_ns) < min_count or clock() < deadline:
        fn = runners[k % len(runners)]
        if refills:
            refills[k % len(refills)]()
        t0 = clock()
        fn()
        lat_ns.append(clock() - t0)
        k += 1
    return np.asarray(lat_ns, dtype=np.float64) * 1e-9, k


def measure(model: str, inputs: str, threads: int, batch: int, provider: str,
            warmup_count: int, warmup_s: float, min_count: int, min_s: float, trials: int,
            engine: str = "onnxruntime", max_spread: float = 0.10) -> dict:
    """The whole measurement of one configuration, as the JSON-ready dict the worker prints.

    ``load`` covers session creation (for torch: import, checkpoint load and model build) and the
    resident memory it added; ``first_run`` the first inference alone; ``steady`` the median of the
    trials' statistics (:func:`stages.bench.stats.combine_trials`) with its validity verdict.
    """
    if engine.startswith("timeit"):
        return _timeit_result(model, inputs, threads, batch, min_count, trials, engine)
    batches = cut_batches(load_pool(inputs), batch)
    before = rss_mb()["VmRSS"]
    t0 = time.perf_counter_ns()
    if engine == "torch":
        if provider != "cpu":
            raise RuntimeUnavailable("the torch baseline runs on the CPU only")
        sess = torch_session(model, threads)
    else:
        sess = make_session(model, threads, provider)
    create_s = (time.perf_counter_ns() - t0) * 1e-9
    after = rss_mb()["VmRSS"]
    refills = None  # only the CPU IOBinding engine loads its input outside the clock
    if engine == "torch":
        runners, used = torch_runners(sess, batches), [TORCH_PROVIDER]
    else:
        if engine == "iobinding" and provider == "cpu":
            run, refills, _ = frame_buffer_runner(sess, batches)
            runners = [run]
        elif provider == "cuda" or engine == "iobinding":  # CUDA: every batch already on the device
            runners = iobinding_runners(sess, batches, provider)
        else:
            runners = cpu_runners(sess, batches)
        used = sess.get_providers()
    gc.collect()
    gc.disable()  # as timeit does: no collector pauses inside the timed runs
    try:
        first, k = timed_loop(runners, 0, 1, 0.0, refills)
        _, k = timed_loop(runners, k, max(0, warmup_count - 1), warmup_s, refills)
        details, lats = [], []
        for _ in range(trials):
            lat, k = timed_loop(runners, k, min_count, min_s, refills)
            details.append(benchstats.summarize(lat))
            lats.append(lat)
    finally:
        gc.enable()
    mid = benchstats.median_trial_index(details)
    steady = benchstats.combine_trials(details, max_spread=max_spread)
    steady["throughput_rows_s"] = benchstats.throughput(batch, lats[mid])
    return {
        "model": str(model), "engine": engine, "provider_requested": provider, "providers_used": used,
        "threads": threads, "batch": batch,
        "load": {"session_create_s": create_s, "rss_before_mb": before, "rss_after_mb": after,
                 "rss_added_mb": None if None in (before, after) else after - before},
        "first_run": {"latency_us": float(first[0]) * 1e6}, "first_run_s": float(first[0]),
        "steady": steady, "trials_detail": details,
        "latencies_s": lats[mid].tolist(), "trial_latencies_s": [lat.tolist() for lat in lats],
        "peak_rss_mb": rss_mb()["VmHWM"],
    }


TIMEIT_NUMBER = 100  # runs per timeit repeat: short repeats, so a preempted one is an outlier the median drops


def _timeit_result(model, inputs, threads: int, batch: int, min_count: int, trials: int,
                   engine: str = "timeit") -> dict:
    """The bare-loop reference as a worker result: ``steady.p50`` is the median over repeats of
    timeit's mean per-run time.  Repeats of TIMEIT_NUMBER runs, min_count * trials runs in all:
    on a shared machine one long repeat's mean absorbs every preemption, a median of short ones
    does not, and it estimates the same centre as the harness's p50 for a steady loop."""
    number = max(1, min(TIMEIT_NUMBER, min_count))
    repeat = max(trials, min_count * trials // number)
    per_run = timeit_floor(model, inputs, threads, batch, number, repeat=repeat, cycle=True,
                           bound=engine == "timeit-iobinding")
    return {"model": str(model), "engine": engine, "provider_requested": "cpu",
            "providers_used": ["CPUExecutionProvider"], "threads": threads, "batch": batch,
            "steady": {"p50": per_run * 1e6, "number": number, "repeat": repeat}, "peak_rss_mb": rss_mb()["VmHWM"]}


def timeit_floor(model, inputs, threads: int, batch: int, number: int, *, repeat: int = 5,
                 cycle: bool = True, bound: bool = False) -> float:
    """Median over ``repeat`` timeit repeats of seconds per session.run (``run_with_iobinding`` when
    ``bound``), in-process: the bare-loop reference the worker's p50 is checked against. With
    ``cycle`` it walks the same batches as the worker (so only the harness differs); without, it
    reruns one fixed batch (hot caches, which for a model of a few microseconds is measurably faster
    than cycling a pool)."""
    sess = make_session(model, threads, "cpu")
    batches = cut_batches(load_pool(inputs), batch)
    batches = batches if cycle else batches[:1]
    if bound:  # the harness's bound call on its frame buffer; a bare loop cannot refill outside the clock
        timer = timeit.Timer(frame_buffer_runner(sess, batches).run)
    else:
        runs = itertools.cycle(cpu_runners(sess, batches))
        timer = timeit.Timer(lambda: next(runs)())
    timer.timeit(number=max(1, number // 10))  # warm-up
    return statistics.median(timer.repeat(repeat=repeat, number=number)) / number


# ---------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages.bench.worker",
                                description=__doc__.split("\n")[0])
    pos_int = lambda s: _checked(int(s), 1, s)  # noqa: E731
    nonneg_int = lambda s: _checked(int(s), 0, s)  # noqa: E731
    nonneg = lambda s: _checked(float(s), 0.0, s)  # noqa: E731
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--threads", type=pos_int, required=True)
    p.add_argument("--batch", type=pos_int, required=True)
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    p.add_argument("--warmup-count", type=nonneg_int, default=TIMING_DEFAULTS["warmup_count"])
    p.add_argument("--warmup-s", type=nonneg, default=TIMING_DEFAULTS["warmup_s"])
    p.add_argument("--min-count", type=pos_int, default=TIMING_DEFAULTS["min_count"])
    p.add_argument("--min-s", type=nonneg, default=TIMING_DEFAULTS["min_s"])
    p.add_argument("--trials", type=pos_int, default=TIMING_DEFAULTS["trials"])
    p.add_argument("--engine", choices=ENGINES, default="onnxruntime")
    p.add_argument("--max-spread", type=nonneg, default=0.10)
    return p.parse_args(argv)


def _checked(value, low, text):
    if not (value >= low and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries that print to stdout now print to stderr
    try:
        result = measure(**vars(args))
    except PipelineError as exc:
        print(f"bench_worker: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # out of memory is exit 7 for the bench to report; the rest is a bug
        err = resources.as_resource_error(exc, "lower --batches")
        if err is None:
            raise
        print(f"bench_worker: {err}", file=sys.stderr)
        return err.exit_code
    json.dump(result, real_stdout)
    real_stdout.write("\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
