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
        disable = not sys.stderr.isatty() and not os.environ.get("DISTILL_PROGRESS")
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kw)
