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
"""
from __future__ import annotations

import argparse
import gc
import io
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort

from pipeline import inference, resources, runtime
from pipeline.errors import DataError, PipelineError, ResourceError, RuntimeUnavailable
from pipeline.formats.onnx_model import IR_VERSION, OPSET
from stages.bench import stats as benchstats
from stages.bench.settings import TIMING_DEFAULTS

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROVIDERS = inference.PROVIDERS
ENGINES = ("onnxruntime", "iobinding", "torch", "timeit", "timeit-iobinding")
TORCH_PROVIDER = "torch-eager-cpu"
POOL_CACHE_BYTES = 64 << 20  # at most this much of pre-cut batches is kept


# ---------------------------------------------------------------- session and inputs
def make_session(model: str | Path, threads: int, provider: str = "cpu") -> ort.InferenceSession:
    """:func:`pipeline.inference.session` on ``provider`` (asserted), without re-checking the file: the bench
    stage checked it before any timing, and the worker times session creation."""
    return inference.session(Path(model), provider, threads, check=False)


def load_pool(inputs: str | Path | np.ndarray) -> np.ndarray:
    """The pool of input rows, from an array or a .npy file; at least one row."""
    pool = inputs if isinstance(inputs, np.ndarray) else np.load(inputs, allow_pickle=False)
    if pool.ndim < 1 or pool.shape[0] < 1:
        raise ValueError(f"input pool needs at least one row, got shape {pool.shape}")
    return pool


def save_pool(path: Path, pool: np.ndarray) -> Path:
    """Write a pool of rows as .npy through Python's own file I/O: ``np.save`` to a file reports a
    full disk as "N requested and M written", without the errno that makes it exit 7."""
    buf = io.BytesIO()
    np.save(buf, pool, allow_pickle=False)
    with resources.writing(path):
        Path(path).write_bytes(buf.getbuffer())
    return Path(path)


def cut_batches(pool: np.ndarray, batch: int) -> list[np.ndarray]:
    """Contiguous batches of ``batch`` rows cycling through the pool (wrapping around).

    One full cycle of distinct batches when it fits in POOL_CACHE_BYTES, else as many as fit
    (at least one); cut before timing so slicing never enters a measurement.
    """
    n = pool.shape[0]
    period = n // math.gcd(n, batch)
    per_batch = max(1, batch * pool[0].nbytes)
    count = max(1, min(period, POOL_CACHE_BYTES // per_batch))
    rows = np.arange(batch)
    return [np.ascontiguousarray(np.take(pool, (i * batch + rows) % n, axis=0))
            for i in range(count)]


Runner = Callable[[], object]


def cpu_runners(sess: ort.InferenceSession, batches: list[np.ndarray]) -> list[Runner]:
    name = sess.get_inputs()[0].name
    return [lambda feed={name: b}: sess.run(None, feed) for b in batches]


def iobinding_runners(sess: ort.InferenceSession, batches: list[np.ndarray],
                      device: str = "cuda") -> list[Runner]:
    """CUDA: every pool batch copied to ``device`` once and bound with outputs allocated there by a
    first run, so neither host<->device copies nor numpy conversion nor output allocation enter the
    timed ``run_with_iobinding`` (CUDA is not testable on a CPU-only machine; the code is the same,
    and runs here with ``device="cpu"``).  The CPU engine uses :func:`frame_buffer_runner`."""
    name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    runners = []
    for b in batches:
        first = sess.io_binding()
        first.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(b, device, 0))
        for out in outs:
            first.bind_output(out, device, 0)
        sess.run_with_iobinding(first)  # allocates outputs of this batch's shape, bound below for good
        binding = sess.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(b, device, 0))
        for out, value in zip(outs, first.get_outputs()):
            binding.bind_ortvalue_output(out, value)
        runners.append(lambda bd=binding: sess.run_with_iobinding(bd))
    return runners


class FrameBuffer(NamedTuple):
    run: Runner  # the timed call
    refills: list[Callable[[], None]]  # refills[i] copies pool batch i into the bound input
    binding: ort.IOBinding  # (its outputs hold the last run's result)


def frame_buffer_runner(sess: ort.InferenceSession, batches: list[np.ndarray], device: str = "cpu") -> FrameBuffer:
    """One input and the outputs bound once, as an embedded caller with a fixed frame buffer binds
    them: returns the timed call (``run_with_iobinding``) and, per pool batch, the refill that copies
    that batch into the bound input (``OrtValue.update_inplace``), run before the clock starts.  The
    input changes every run, as in the other engines, and only the C API's per-run cost is timed;
    1,024 separately bound rows instead would time cache misses on 1,024 bindings, which a real
    caller does not have (measured: 0.7 us more per run on the Identity floor)."""
    name = sess.get_inputs()[0].name
    value = ort.OrtValue.ortvalue_from_numpy(np.array(batches[0], copy=True), device, 0)  # ours, not the pool's
    binding = sess.io_binding()
    binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, device, 0)
    sess.run_with_iobinding(binding)  # allocates the outputs once; they stay bound
    outputs = binding.get_outputs()
    binding.clear_binding_outputs()
    for out, v in zip(sess.get_outputs(), outputs):
        binding.bind_ortvalue_output(out.name, v)
    return FrameBuffer(lambda: sess.run_with_iobinding(binding), [lambda b=b: value.update_inplace(b) for b in batches],
                       binding)


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


def torch_session(checkpoint: str | Path, threads: int):
    """A student checkpoint as a PyTorch eager model in inference mode, ``threads`` intra-op threads."""
    import torch

    from pipeline import models

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    return models.load(Path(checkpoint))[0].eval()


def torch_runners(net, batches: list[np.ndarray]) -> list[Runner]:
    import torch

    tensors = [torch.from_numpy(b) for b in batches]

    def run(t):
        with torch.inference_mode():
            return net(t)
    return [lambda t=t: run(t) for t in tensors]


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


# ---------------------------------------------------------------- helpers for the bench stage
def run_isolated(model, inputs, threads: int, batch: int, provider: str = "cpu",
                 *, timeout_s: float | None = None, engine: str = "onnxruntime", max_spread: float = 0.10,
                 **timing) -> dict:
    """Run the worker in a fresh ``python -m stages.bench.worker`` process and return its JSON.

    ``timing`` takes warmup_count, warmup_s, min_count, min_s, trials. When the worker fails, raises
    RuntimeUnavailable (its exit 5), ResourceError (its exit 7: out of memory) or DataError (any other
    exit) with its exit code and the last line of its stderr.
    """
    unknown = set(timing) - set(TIMING_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown timing options {sorted(unknown)}")
    cmd = [sys.executable, "-m", "stages.bench.worker", "--model", str(Path(model).resolve()),
           "--inputs", str(Path(inputs).resolve()), "--threads", str(threads),
           "--batch", str(batch), "--provider", provider, "--engine", engine, "--max-spread", str(max_spread)]
    for key, value in timing.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout_s,
                          preexec_fn=runtime.die_with_parent)
    if proc.returncode != 0:  # a documented exit for the bench command, never a traceback
        lines = proc.stderr.strip().splitlines()
        why = f"bench worker exited {proc.returncode}: {lines[-1] if lines else '(no stderr)'}"
        if proc.returncode == ResourceError.exit_code:
            raise ResourceError(f"{model}: {why}")
        if proc.returncode == RuntimeUnavailable.exit_code:
            raise RuntimeUnavailable(why)
        raise DataError(f"{model}: {why}")
    return json.loads(proc.stdout)


def write_identity_model(path, input_shape_without_batch: tuple[int, ...],
                         dtype=np.float32) -> Path:
    """Write an ONNX Identity model (input ``x``, output ``y``, batch dim 'batch'), the floor of
    what one run() costs. Opset and IR of :mod:`pipeline.formats.onnx_model`; checked with full_check;
    written via a .partial twin."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shape = ["batch", *input_shape_without_batch]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "identity",
        [onnx.helper.make_tensor_value_info("x", elem, shape)],
        [onnx.helper.make_tensor_value_info("y", elem, shape)])
    opset = [onnx.helper.make_opsetid("", OPSET)]
    model = onnx.helper.make_model(graph, opset_imports=opset, producer_name="stages.bench.worker")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with resources.writing(partial):
        onnx.save_model(model, str(partial))
    os.replace(partial, path)
    return path


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


if __name__ == "__main__":
    sys.exit(main())
