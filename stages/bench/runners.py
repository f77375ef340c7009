"""What one timing calls: a session (or a PyTorch model) and the batches it runs, built before any clock starts.

The engines of the bench worker (:mod:`stages.bench.worker`) in one place: ``session.run`` with numpy
feeds (:func:`cpu_runners`), a CUDA IOBinding per pool batch (:func:`iobinding_runners`), one bound
frame buffer refilled outside the clock (:func:`frame_buffer_runner`) and PyTorch eager on a student
checkpoint (:func:`torch_runners`).  Batches are cut from a pool of real rows and cycled
(:func:`cut_batches`), so slicing never enters a measurement.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from pipeline import inference

TORCH_PROVIDER = "torch-eager-cpu"  # what a torch-engine result reports as the provider that ran
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
