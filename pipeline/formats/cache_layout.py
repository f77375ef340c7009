"""The soft-target cache's layout (``kd-cache/2``): the datasets and their bytes, and the stored rows as read.

:class:`CacheLayout` is what a file holds (docs/formats.md, "kd-cache"), :class:`StoredRows` what a
block of rows stores, read by :class:`RowReader` over one open handle; soft targets are derived from
them by :func:`pipeline.soft.targets`.  The reader is :mod:`pipeline.formats.cache`, the writer
:mod:`pipeline.formats.cache_writer`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import DataError

VIEW_PARAM_BYTES = 8  # pipeline.views.PARAM_BYTES: a view's parameters
CHUNK_BYTES = 512 << 10  # chunks of whole rows, ~512 KiB: in the 256 KiB - 1 MiB band of docs/formats.md
METADATA_BYTES = 64 << 10  # headroom for HDF5's own structures, attributes and provenance (~30 KiB measured)


def t_key(T: float) -> str:
    """Dataset name of temperature T: ``4`` for 4.0, ``2.5`` for 2.5."""
    return f"{float(T):g}"


def chunk_rows(rows: int, row_bytes: int) -> int:
    """Rows a chunk holds: at most CHUNK_BYTES of whole rows, as even as the rows allow, so the last
    chunk (which HDF5 allocates whole) is nearly full: 55,000 rows of 20 bytes take 3 chunks of 18,334
    rows (2 rows spare), not 3 of 26,214 (23,642 spare, 0.47 MB)."""
    most = max(1, min(rows, CHUNK_BYTES // max(1, row_bytes)))
    return -(-rows // -(-rows // most)) if rows else 1


def _whole_chunks(rows: int, row_bytes: int) -> int:
    """Bytes HDF5 allocates for a dataset of ``rows`` rows: whole chunks, the last one included."""
    chunk = chunk_rows(rows, row_bytes)
    return -(-rows // chunk) * chunk * row_bytes


def soft_size(rows: int, classes: int, temperatures: int) -> int:
    """Bytes of ``temperatures`` stored soft-target datasets (what ``add-temperature`` adds to such a cache)."""
    return temperatures * _whole_chunks(rows, classes * 4)


def label_dtype(classes: int) -> np.dtype:
    """The smallest signed integer type holding every label in ``[-1, classes)``."""
    for dt in (np.int8, np.int16, np.int32):
        if classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def id_dtype(classes: int) -> np.dtype:
    """The smallest unsigned integer type holding every class id in ``[0, classes)`` (top-k ids)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The datasets of one ``kd-cache/2`` file and the bytes they take."""

    rows: int                                 # cache rows in this file (a part: its own)
    members: int
    classes: int
    logits_dtype: str = "float16"             # of the logits (full) or kept logits and tail (top-k)
    top_k: int = 0                            # 0: every class (layout "full")
    soft_temperatures: tuple[float, ...] = ()  # stored soft targets (--store-soft)
    k: int = 1                                # views per transfer row
    views: bool = False                       # a views cache (view parameters stored)
    first_row: int = 0                        # a part: its first row in the whole cache
    label_per_row: bool = False               # kd-cache/1: a label per cache row, not per transfer row
    tail_spread: bool = True                  # top-k: the row's tail spread stored (pipeline/topk.py's
                                              # spread rule); False in top-k caches built before it was
    tail_prior: bool = False                  # top-k: the class prior stored (the prior rule, tail_rule "prior")

    @property
    def label_step(self) -> int:
        """Cache rows per stored label: K (a label per transfer row), 1 in kd-cache/1."""
        return 1 if self.label_per_row else self.k

    @property
    def layout(self) -> str:
        return "topk" if self.top_k else "full"

    def label_span(self, lo: int, hi: int) -> tuple[int, int]:
        """The label rows (local) that cache rows ``[lo, hi)`` (local, ``hi > lo``) cover."""
        s = self.label_step
        base = self.first_row // s
        return (self.first_row + lo) // s - base, (self.first_row + hi - 1) // s + 1 - base

    @property
    def label_rows(self) -> int:
        return self.label_span(0, self.rows)[1] if self.rows else 0

    def datasets(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every row dataset: name -> (shape, dtype); labels has ``label_rows`` rows, the rest ``rows``."""
        r, m, c, dt = self.rows, self.members, self.classes, np.dtype(self.logits_dtype)
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        if self.top_k:
            out.update({"topk/ids": ((r, self.top_k), id_dtype(c)), "topk/logits": ((r, m, self.top_k), dt),
                        "topk/tail": ((r, m), dt)})
            if self.tail_spread:
                out["topk/spread"] = ((r,), dt)
        else:
            out["logits"] = ((r, m, c), dt)
        out["labels"] = ((self.label_rows,), label_dtype(c))
        if self.views:
            out["view_params"] = ((r, VIEW_PARAM_BYTES), np.dtype(np.uint8))
        for T in self.soft_temperatures:
            out[f"soft/{t_key(T)}"] = ((r, c), np.dtype(np.float32))
        return out

    def shared(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Datasets of the whole file, not of its rows: name -> (shape, dtype) (the class prior, in the
        logits' dtype)."""
        c = self.classes
        return {"topk/prior": ((c, c), np.dtype(self.logits_dtype))} if self.top_k and self.tail_prior else {}

    @property
    def tail_rule(self) -> str:
        """How a top-k row's tail is rebuilt (pipeline/topk.py): prior, spread or even."""
        return "prior" if self.tail_prior else "spread" if self.tail_spread else "even"

    def size(self) -> tuple[int, str]:
        """Bytes of the finished file (every dataset in whole chunks, plus :data:`METADATA_BYTES`) and
        the per-row figure as a formula a user can check."""
        total, terms = METADATA_BYTES, []
        for name, (shape, dt) in self.datasets().items():
            row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
            total += _whole_chunks(shape[0], row)
            if name != "labels" and not name.startswith("soft/"):
                terms.append(f"{row} ({name})")
        soft = len(self.soft_temperatures)
        if soft:
            terms.append(f"{soft} x {self.classes} x 4 (soft targets)")
        labels = f" + {self.label_rows} labels x {label_dtype(self.classes).itemsize} bytes"
        shared = ""
        for name, (shape, dt) in self.shared().items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            total += nbytes
            shared += f" + {nbytes} ({name})"
        return total, (f"{self.rows} rows x ({' + '.join(terms)}) bytes{labels}, in whole chunks{shared}, "
                       f"+ {METADATA_BYTES >> 10} KiB")

    def bytes_per_row(self) -> float:
        """Bytes a cache row costs, chunks and metadata aside (labels shared by the k views of a row)."""
        out = 0.0
        for name, (shape, dt) in self.datasets().items():
            row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
            out += row / self.label_step if name == "labels" else row
        return out


@dataclasses.dataclass(frozen=True)
class StoredRows:
    """Rows of a cache as stored: what :func:`pipeline.soft.targets` turns into soft targets at any T.

    Either ``logits`` (layout full) or ``ids``, ``kept``, ``tail`` and ``spread`` (layout topk; ``spread``
    None in a top-k cache built before it was stored), in their stored dtypes,
    and ``soft``: stored targets at ``soft_T`` (read instead when that T is asked for), or None.
    ``prior``: a top-k cache's class prior ``[classes, classes]`` (the file's, not a row's), or None.
    """

    classes: int
    combine: str
    weights: tuple[float, ...] | None  # the recorded member weights, None: equal
    logits: np.ndarray | None = None
    ids: np.ndarray | None = None
    kept: np.ndarray | None = None
    tail: np.ndarray | None = None
    spread: np.ndarray | None = None
    soft: np.ndarray | None = None
    soft_T: float | None = None
    prior: np.ndarray | None = None

    _ARRAYS = ("logits", "ids", "kept", "tail", "spread", "soft")

    def __len__(self) -> int:
        return next(len(getattr(self, a)) for a in self._ARRAYS if getattr(self, a) is not None)

    def take(self, idx: Any) -> StoredRows:
        """The rows ``idx`` (an index array or a slice)."""
        return dataclasses.replace(self, **{a: getattr(self, a)[idx] for a in self._ARRAYS
                                            if getattr(self, a) is not None})

    @staticmethod
    def concat(parts: list[StoredRows]) -> StoredRows:
        p0 = parts[0]
        return dataclasses.replace(p0, **{a: np.concatenate([getattr(p, a) for p in parts]) for a in p0._ARRAYS
                                          if getattr(p0, a) is not None})

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, a).nbytes for a in self._ARRAYS if getattr(self, a) is not None)


class RowReader:
    """Rows of a cache over one open handle (a loader's or a tool's many contiguous reads; the writer's
    own file while it finishes)."""

    def __init__(self, f: h5py.File, layout: CacheLayout, combine: str, weights: tuple[float, ...] | None,
                 path: Path):
        self.f, self.layout, self.combine, self.weights, self.path = f, layout, combine, weights, path
        self._prior = None  # the class prior, read once a handle (4 MB at 1000 classes)

    @property
    def prior(self) -> np.ndarray | None:
        """The file's class prior (a top-k cache built with one), or None."""
        if self._prior is None and self.layout.tail_prior:
            self._prior = self.f["topk/prior"][...]
        return self._prior

    def read(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` of dataset ``name`` as stored: one contiguous read."""
        return self.f[name][lo:hi]

    def labels(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """int64 label of each cache row in ``[lo, hi)`` (a views cache: its transfer row's)."""
        lay = self.layout
        hi = lay.rows if hi is None else hi
        if hi <= lo:
            return np.empty(0, np.int64)
        a, b = lay.label_span(lo, hi)
        y = self.f["labels"][a:b].astype(np.int64)
        s, first = lay.label_step, lay.first_row
        if s == 1:
            return y
        return y[(first + np.arange(lo, hi)) // s - first // s - a]

    def stored(self, lo: int = 0, hi: int | None = None, T: float | None = None) -> StoredRows:
        """Rows ``[lo, hi)`` as stored: the targets at T when stored, else the logits or the top-k."""
        lay = self.layout
        base = StoredRows(lay.classes, self.combine, self.weights)
        if T is not None and float(T) in lay.soft_temperatures:
            return dataclasses.replace(base, soft=self.read(f"soft/{t_key(T)}", lo, hi), soft_T=float(T))
        if lay.top_k:
            return dataclasses.replace(base, ids=self.read("topk/ids", lo, hi), kept=self.read("topk/logits", lo, hi),
                                       tail=self.read("topk/tail", lo, hi),
                                       spread=self.read("topk/spread", lo, hi) if lay.tail_spread else None,
                                       prior=self.prior)
        if "logits" not in self.f:
            raise DataError(f"{self.path}: the cache stores no logits and no soft targets at T={t_key(T or 1)}; "
                            f"it has {', '.join(map(t_key, lay.soft_temperatures))}")
        return dataclasses.replace(base, logits=self.read("logits", lo, hi))


def recorded_weights(attrs: Any) -> tuple[float, ...] | None:
    """The member weights recorded (normalised), None when equal or not recorded."""
    w = json.loads(attrs.get("member_weights", "[]"))
    return tuple(float(x) for x in w) if w and len(set(w)) > 1 else None
