"""Process-level helpers every stage may use: torch threads, progress bars, workers tied to their parent.

onnxruntime sessions live in :mod:`pipeline.inference`; nothing here imports torch or onnxruntime at
module level, so a command's ``--help`` loads neither.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any


def set_torch_threads(n: int) -> None:
    """Set torch's intra-op threads (on 2 shared cores one thread trains a small MLP far faster)."""
    import torch

    torch.set_num_threads(max(1, int(n)))


PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(precision: str) -> str:
    """The arithmetic of training: ``auto`` -> ``bf16`` where the CPU has bfloat16 instructions
    (AVX512-BF16 or AMX: oneDNN then runs convolutions about twice as fast as in float32, measured
    in docs/results.md), else ``fp32``; ``fp32`` and ``bf16`` as given.  bf16 is autocast: weights,
    optimizer state, batch norm and the loss stay float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    import torch

    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if native else "fp32"


def die_with_parent() -> None:
    """In a worker process: SIGKILL it when its parent dies (even by SIGKILL), so a killed bench or
    sweep leaves no orphan training or timing on (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def progress(iterable: Iterable | None = None, **kw: Any):
    """A tqdm progress bar on stderr, quiet when stderr is not a terminal unless forced."""
    from tqdm.auto import tqdm

    disable = kw.pop("disable", None)
    if disable is None:
        disable = not bars_shown()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kw)


def bars_shown() -> bool:
    """Whether progress() draws its bars: on a terminal, or when DISTILL_PROGRESS is set. Where it
    does not (a log file, a background run), a long stage logs a line per epoch instead."""
    return sys.stderr.isatty() or bool(os.environ.get("DISTILL_PROGRESS"))
