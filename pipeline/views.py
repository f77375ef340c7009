"""Views of transfer rows, described by 8 bytes of parameters instead of stored pixels (docs/design.md, "views").

Function matching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent") needs many augmented views of every transfer row, each seen by the student exactly as
the teacher saw it.  Storing the views (``distill jitter`` writes 9 shifted copies: 10x the pixels)
does not scale to real images; apple/ml-dr and FKD store how a view was made.  So does this module:
the cache stores each view's parameters beside the teacher's outputs for it, and the student re-makes
the very same pixels from the prepared rows.

A view of row ``i`` with parameters ``(dy, dx, flip, lam, j)`` is, on raw pixels ``x`` (any channel
count, float32 arithmetic, spatial axes only)::

    m = (1 - lam/255) * x_i + (lam/255) * x_j        mixup with partner row j (lam = 0: no mixing)
    m = m[..., ::-1]          if flip                 horizontal flip
    v[..., r, c] = m[..., r - dy, c - dx]             shift; pixels shifted in are 0 (black)

and the model sees ``normalise(v)``.  Parameters, 8 bytes a view (:data:`PARAM_BYTES`, little-endian):
``dy`` int8, ``dx`` int8, ``flags`` uint8 (bit 0 flip), ``lam`` uint8, ``partner`` uint32.

View 0 of every row is the row itself (all zero parameters), so a cache of K = 1 view is the plain
cache.  View j >= 1 is drawn per block of :data:`BLOCK` rows from ``SeedSequence([seed, block, j])``
(:func:`params`), so any batch, resume or shard draws the same parameters, and the first K' views
of a K-view cache are a K'-view cache; a mixing partner lies in the same block, so readers of
contiguous blocks always hold it.  ``VERSION`` names this function:
a cache made by another version is refused (docs/formats.md, "kd-cache").
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from pipeline.errors import DataError

VERSION = 1
PARAM_BYTES = 8
BLOCK = 4096  # rows per parameter block (and the reach of a mixing partner)
_DT = np.dtype([("dy", "i1"), ("dx", "i1"), ("flags", "u1"), ("lam", "u1"), ("partner", "<u4")])


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """How the views of a cache are drawn (recorded in the cache; the student re-makes them from it)."""

    count: int = 1                 # K views per row, view 0 the row itself
    max_shift: int = 2             # |dy|, |dx| <= max_shift pixels
    flip: float = 0.0              # probability of a horizontal flip
    mixup: float = 0.0             # probability that a view mixes in a partner row
    mixup_alpha: float = 1.0       # lam/255 ~ Beta(alpha, alpha), folded to <= 0.5 (the row stays dominant)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"views: count (K) must be >= 1, got {self.count}")
        if not 0 <= self.max_shift <= 127:
            raise ValueError(f"views: max_shift must lie in [0, 127], got {self.max_shift}")
        for name in ("flip", "mixup"):
            p = getattr(self, name)
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"views: {name} is a probability in [0, 1], got {p}")
        if not (self.mixup_alpha > 0 and math.isfinite(self.mixup_alpha)):
            raise ValueError(f"views: mixup_alpha must be finite and > 0, got {self.mixup_alpha}")

    def as_dict(self) -> dict[str, Any]:
        return {"version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewSpec:
        if d.get("version") != VERSION:
            raise ValueError(f"views made by view function version {d.get('version')!r}; this code makes "
                             f"version {VERSION}")
        return cls(**{k: v for k, v in d.items() if k != "version"})

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """ValueError unless the views apply to rows of ``shape`` ([H, W] or [C, H, W] images)."""
        if len(shape) not in (2, 3):
            if self.max_shift or self.flip:
                raise ValueError(f"views: shifts and flips need image rows [H, W] or [C, H, W], the data has {shape}")
        elif self.max_shift >= min(shape[-2:]):
            raise ValueError(f"views: max_shift {self.max_shift} does not fit images of {shape[-2]} x {shape[-1]}")


def spec_of(views: dict | None, path: Any) -> ViewSpec | None:
    """The :class:`ViewSpec` a cache records (None for a cache of the rows themselves); DataError when
    this code cannot re-make its views (another view function version, settings it does not know)."""
    if views is None:
        return None
    try:
        return ViewSpec.from_dict(dict(views))
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: cannot re-make the cache's views ({e}); rebuild it with this version") from None


def params(spec: ViewSpec, lo: int, hi: int, rows: int) -> np.ndarray:
    """Parameters of the views of rows ``[lo, hi)`` of a transfer set of ``rows`` rows: uint8
    ``[(hi - lo) * K, 8]``, view ``k`` of row ``r`` at ``(r - lo) * K + k``."""
    out = []
    for b in range(lo // BLOCK, -(-hi // BLOCK)):
        block = _block(spec, b, rows)
        a, z = max(lo, b * BLOCK) - b * BLOCK, min(hi, (b + 1) * BLOCK) - b * BLOCK
        out.append(block[a * spec.count:z * spec.count])
    return np.concatenate(out).view(np.uint8).reshape(-1, PARAM_BYTES) if out else np.zeros((0, PARAM_BYTES), np.uint8)


@functools.lru_cache(maxsize=4)  # a reader asks for the same block batch after batch: draw it once
def _block(spec: ViewSpec, b: int, rows: int) -> np.ndarray:
    """The structured parameters of every view of block ``b`` (rows [b*BLOCK, min(rows, (b+1)*BLOCK))).

    View j >= 1 of every row of the block is drawn from ``SeedSequence([seed, b, j])``: it does not
    depend on K, so the first K' views of a cache of K are the views of a cache of K' (a student may
    use fewer views than were cached, and an experiment over K needs one cache)."""
    start = b * BLOCK
    n, k = min(rows, start + BLOCK) - start, spec.count
    p = np.zeros((n, k), _DT)
    for j in range(1, k):
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, b, j]))
        dy, dx = (rng.integers(-spec.max_shift, spec.max_shift + 1, n) for _ in range(2))
        flip = rng.random(n) < spec.flip
        mix = rng.random(n) < spec.mixup
        lam = rng.beta(spec.mixup_alpha, spec.mixup_alpha, n)
        partner = start + rng.integers(0, n, n)
        v = p[:, j]
        v["dy"], v["dx"], v["flags"] = dy, dx, flip
        v["lam"] = np.where(mix, np.rint(np.minimum(lam, 1 - lam) * 255), 0)
        v["partner"] = np.where(mix, partner, 0)
    out = p.reshape(-1)
    out.flags.writeable = False
    return out


def decode(p: np.ndarray) -> np.ndarray:
    """Structured view of uint8 parameters ``[n, 8]`` (fields dy, dx, flags, lam, partner)."""
    p = np.ascontiguousarray(p, dtype=np.uint8)
    if p.ndim != 2 or p.shape[1] != PARAM_BYTES:
        raise ValueError(f"view parameters must be [n, {PARAM_BYTES}] bytes, got {p.shape}")
    return p.view(_DT).reshape(-1)


class Maker:
    """Views of a resident array of raw rows ``x [N, *shape]``: the hot path of the student and the cache.

    The rows are padded by ``max_shift`` zeros once (and flipped once, when views may flip); a view is
    then a window of the padded row, and a batch of views one gather from numpy's sliding-window view
    of the padded rows (no copy until the gather): ``win[flip, row, :, s - dy, s - dx]``.  Bytes are
    gathered, not floats; the float32 conversion and the mixing follow, in one pass each.
    """

    def __init__(self, x: np.ndarray, max_shift: int, flip: bool):
        from numpy.lib.stride_tricks import sliding_window_view

        x = np.asarray(x)
        self.shape, n = x.shape[1:], len(x)
        if len(self.shape) < 2:
            raise ValueError(f"views need image rows [H, W] or [C, H, W], got rows of shape {self.shape}")
        h, w = self.shape[-2:]
        self.s = s = int(max_shift)
        rows = x.reshape(n, -1, h, w)
        pad = np.zeros((2 if flip else 1, n, rows.shape[1], h + 2 * s, w + 2 * s), x.dtype)
        pad[0, :, :, s:s + h, s:s + w] = rows
        if flip:
            pad[1, :, :, s:s + h, s:s + w] = rows[..., ::-1]
        self.win = sliding_window_view(pad, (h, w), axis=(3, 4))  # [F, N, C, 2s+1, 2s+1, H, W]

    def moved(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Rows ``rows`` flipped and shifted by the (decoded) parameters ``q``, in their own dtype."""
        dy, dx = q["dy"].astype(np.intp), q["dx"].astype(np.intp)
        if (np.abs(dy) > self.s).any() or (np.abs(dx) > self.s).any():
            raise ValueError(f"a view shifts further than the {self.s} pixels these rows were padded by")
        flip = (q["flags"] & 1).astype(np.intp)
        if flip.any() and self.win.shape[0] == 1:
            raise ValueError("a view flips, but these rows were prepared without flips")
        return self.win[flip, rows, :, self.s - dy, self.s - dx].reshape(len(rows), *self.shape)

    def __call__(self, rows: np.ndarray, p: np.ndarray) -> np.ndarray:
        """The views (float32, raw pixel scale) of rows ``rows`` of ``x`` with parameters ``p``
        ``[n, 8]``; partners are rows of ``x`` too (their index is in the parameters)."""
        q = decode(p)
        rows = np.asarray(rows, dtype=np.intp)
        if len(q) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(q)} view parameters")
        v = self.moved(rows, q).astype(np.float32)
        lam = q["lam"]
        if lam.any():
            other = self.moved(q["partner"].astype(np.intp), q).astype(np.float32)
            w = (lam.astype(np.float32) / np.float32(255)).reshape(-1, *([1] * len(self.shape)))
            v *= np.float32(1) - w
            v += other * w
        return v


def make(x: np.ndarray, p: np.ndarray, partners: np.ndarray | None = None) -> np.ndarray:
    """The views ``[n, *shape]`` (float32, raw pixel scale) of rows ``x`` with parameters ``p`` ``[n, 8]``;
    ``partners[i]``: the pixels of view i's partner row (needed when any view mixes).  :class:`Maker`
    over these rows (a convenience for a few rows; readers of many views build one Maker)."""
    q = decode(p).copy()
    n = len(x)
    if len(q) != n:
        raise ValueError(f"{n} rows but {len(q)} view parameters")
    if (q["lam"] > 0).any() and partners is None:
        raise ValueError("views mix in partner rows: give their pixels")
    rows = np.asarray(x) if partners is None else np.concatenate([x, partners])
    q["partner"] = n + np.arange(n)  # partner i is row n + i of the stacked rows
    s = int(max(np.abs(q["dy"].astype(int)).max(initial=0), np.abs(q["dx"].astype(int)).max(initial=0)))
    return Maker(rows, s, bool((q["flags"] & 1).any()))(np.arange(n), q.view(np.uint8).reshape(-1, PARAM_BYTES))
