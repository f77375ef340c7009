"""The layout of an .npz's image arrays, and the canonical form the prepared file stores.

Canonical rows are channel-first, ``[C, H, W]``; an array of single-channel images without a
channel axis (``[N, H, W]``) and one of feature vectors (``[N, D]``) are stored as they are.

``--layout auto`` infers what is unambiguous: 2-D is ``flat``, 3-D ``nhw``, and 4-D is ``nchw`` or
``nhwc`` when exactly one of axes 1 and 3 has 1, 3 or 4 entries (grey, RGB, RGBA).  ``[N, 3, 32,
3]`` (either) and ``[N, 5, 32, 32]`` (neither) need ``--layout``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

CHANNELS = (1, 3, 4)
NDIM = {"nchw": 4, "nhwc": 4, "nhw": 3}


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(["N", *map(str, shape[1:])]) + "]"


def infer(path: Path, name: str, shape: tuple[int, ...]) -> str:
    """The layout of an array of ``shape`` where it is unambiguous; DataError (one line) otherwise."""
    if len(shape) == 2:
        return "flat"
    if len(shape) == 3:
        return "nhw"
    if len(shape) != 4:
        raise DataError(f"{path}: {name} of shape {_dims(shape)} is not [N, features], [N, H, W] or "
                        "[N, C, H, W] / [N, H, W, C]")
    first, last = shape[1] in CHANNELS, shape[3] in CHANNELS
    if first and not last:
        return "nchw"
    if last and not first:
        return "nhwc"
    how = ("could be channel-first or channel-last" if first else
           f"has no axis of {', '.join(map(str, CHANNELS))} channels first or last")
    raise DataError(f"{path}: {name} of shape {_dims(shape)} {how}; give --layout nchw or --layout nhwc")


def canonical(path: Path, name: str, x: np.ndarray, layout: str) -> tuple[np.ndarray, str]:
    """``x`` in the canonical layout and the layout it was read as (``layout``, or inferred if auto)."""
    if x.ndim < 2:
        raise DataError(f"{path}: {name} of shape {list(x.shape)} is not an array of rows")
    got = infer(path, name, x.shape) if layout == "auto" else layout
    if got in NDIM and x.ndim != NDIM[got]:
        raise DataError(f"{path}: {name} of shape {_dims(x.shape)} is {x.ndim}-D, layout {got} is "
                        f"{NDIM[got]}-D")
    if got == "nhwc":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), got
    if got == "flat":
        return x.reshape(len(x), -1), got
    return x, got


def describe(path: Path, shape: tuple[int, ...], layout: str, inferred: bool, log: Callable[[str], None]) -> None:
    """Say how a 4-D array was read (the other layouts are stored as given)."""
    how = "inferred" if inferred else "as given"
    if layout == "nhwc":
        log(f"prepare: {path}: x {_dims(shape)} is channel-last (nhwc, {how}); stored channel-first as "
            f"{_dims((shape[0], shape[3], shape[1], shape[2]))}")
    elif layout == "nchw":
        log(f"prepare: {path}: x {_dims(shape)} is channel-first (nchw, {how}); stored as it is")
    elif layout == "flat" and len(shape) > 2:
        log(f"prepare: {path}: x {_dims(shape)} flattened to rows of {int(np.prod(shape[1:]))} features")
