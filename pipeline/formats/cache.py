"""The soft-target cache: its layout (schema ``kd-cache/2``) and its only reader, of ``kd-cache/2`` and ``kd-cache/1``.

Layout of ``kd-cache/2`` (docs/formats.md, "kd-cache"; the writer is :mod:`pipeline.formats.cache_writer`)::

    /                 attrs: schema, rows, members, classes, temperatures, soft_temperatures, layout, top_k,
                             tail_rule (top-k: "spread", "prior" with /topk/prior, or "even" and no /topk/spread),
                             logits_dtype, source_rows, combine, committed_rows, complete, identity, ...
    /logits           float16|32 [rows, members, classes]  layout "full": raw per-member logits
    /topk/ids         uint8|16|32 [rows, k]                layout "topk": the k classes kept (pipeline/topk.py)
    /topk/logits      float16|32 [rows, members, k]        ... each member's logits at them
    /topk/tail        float16|32 [rows, members]           ... each member's log-sum-exp of the rest (T = 1)
    /topk/spread      float16|32 [rows]                    ... the tail's spread (absent in older top-k caches)
    /labels           int8|16|32 [transfer rows]           one per transfer row (-1: unlabelled)
    /view_params      uint8 [rows, 8]                      a views cache only
    /soft/<T>         float32 [rows, classes]              only the temperatures stored (--store-soft)
    /diagnostics/<T>  attrs: mean_entropy_nats, teacher_accuracy, member_disagreement, ece

Soft targets at any T are derived from what is stored by one function, :func:`pipeline.soft.targets`,
which every reader of targets calls (the student's loaders, ``verify``, ``add-temperature``, the
diagnostics); this module only reads the stored numbers (:class:`StoredRows`).  ``kd-cache/1`` (float32
or float16 logits, soft targets at every temperature, an int64 label per cache row) is read through
the same :class:`CacheInfo`, so a reader never asks which version it holds.

A views cache holds K views of each of N transfer rows as its ``rows = N * K`` rows, view k of
transfer row r at row ``r * K + k`` (:mod:`pipeline.views`); its labels are the N transfer rows'.
A shard part holds cache rows ``[lo, hi)`` of the whole and the labels of the transfer rows they
touch, ``[lo // K, ceil(hi / K))``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import DataError, IntegrityError, UsageError
from pipeline.formats import h5seal
from pipeline.formats.cache_layout import (  # noqa: F401  (the names readers of a cache import from here)
    VIEW_PARAM_BYTES,
    CacheLayout,
    RowReader,
    StoredRows,
    chunk_rows,
    id_dtype,
    label_dtype,
    recorded_weights,
    soft_size,
    t_key,
)

SCHEMA = "kd-cache/2"
OLDEST = 1  # the oldest version read: kd-cache/1
WHAT = "soft-target cache"
REBUILD = "make cache"
LAYOUTS = ("full", "topk")


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """A checked, finished cache (or shard part) of either version: its shape, provenance and rows."""

    path: Path
    rows: int
    members: int
    classes: int
    temperatures: tuple[float, ...]       # diagnosed (and, in kd-cache/1, stored) temperatures
    transfer_sha256: str
    transfer_split: str
    attrs: dict
    version: int = 2
    layout: CacheLayout | None = None
    soft_temperatures: tuple[float, ...] = ()  # temperatures with stored soft targets

    @property
    def top_k(self) -> int:
        return self.layout.top_k

    @property
    def combine(self) -> str:
        return str(self.attrs["combine"])

    @property
    def weights(self) -> tuple[float, ...] | None:
        """The member weights recorded (normalised), None when equal or not recorded."""
        return recorded_weights(self.attrs)

    @property
    def logits_dtype(self) -> str:
        return self.layout.logits_dtype

    @property
    def teacher_sha256(self) -> list[str]:
        return [str(s) for s in self.attrs["teacher_sha256"]]

    @property
    def identity(self) -> dict:
        return json.loads(self.attrs["identity"])

    @property
    def part(self) -> dict | None:
        return json.loads(self.attrs["part"]) if "part" in self.attrs else None

    @property
    def provenance(self) -> dict:
        return json.loads(self.attrs.get("provenance", "{}"))

    @property
    def member_accuracy(self) -> list[float] | None:
        """Each member's accuracy on the labelled rows (argmax of its logits), if recorded."""
        v = self.attrs.get("member_accuracy")
        return None if v is None else [float(a) for a in np.atleast_1d(v)]

    @property
    def teacher_inputs(self) -> list[dict] | None:
        """Per teacher file: its input contract, where each field came from, its sanity-gate record."""
        return json.loads(self.attrs["teacher_inputs"]) if "teacher_inputs" in self.attrs else None

    @property
    def views(self) -> dict | None:
        """The view function's version and settings (``count`` = K) of a views cache, else None."""
        return json.loads(self.attrs["views"]) if "views" in self.attrs else None

    @property
    def source_rows(self) -> int:
        """Transfer rows the cache covers (``rows / K`` for a views cache)."""
        return int(self.attrs.get("source_rows", self.rows))

    @property
    def has_logits(self) -> bool:
        """Whether targets at a temperature not stored can be derived (logits or top-k stored)."""
        if self.top_k:
            return True
        with h5py.File(self.path, "r") as f:
            return "logits" in f

    def require_temperature(self, T: float) -> None:
        """UsageError unless targets at T are stored or can be derived from the stored logits."""
        if float(T) in self.soft_temperatures or self.has_logits:
            return
        raise UsageError(f"{self.path}: no soft targets at T={t_key(T)} and no logits to derive them from; the cache "
                         f"has " + ", ".join(map(t_key, self.soft_temperatures)))

    def stored_soft(self, T: float, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """The soft targets stored at T; UsageError when they are not stored (derive them instead)."""
        if float(T) not in self.soft_temperatures:
            raise UsageError(f"{self.path}: no stored soft targets at T={t_key(T)} (they are derived from the "
                             f"stored logits: pipeline.soft.targets)")
        return self.read(f"soft/{t_key(T)}", lo, hi)

    def read(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` of dataset ``name`` as stored: one contiguous read."""
        with self.rows_reader() as r:
            return r.read(name, lo, hi)

    def labels(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """int64 label of each cache row in ``[lo, hi)`` (-1 unlabelled; a view: its transfer row's)."""
        with self.rows_reader() as r:
            return r.labels(lo, hi)

    def source_labels(self) -> np.ndarray:
        """int64 label of each transfer row of a whole cache (a views cache's N rows)."""
        return self.read("labels").astype(np.int64)[::self.layout.k if self.layout.label_per_row else 1]

    def logits(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Per-member logits ``[rows, members, classes]`` as float32 (layout full only)."""
        if self.top_k:
            raise UsageError(f"{self.path}: a top-k cache keeps {self.top_k} of {self.classes} logits a row")
        return self.read("logits", lo, hi).astype(np.float32)

    def stored(self, lo: int = 0, hi: int | None = None, T: float | None = None) -> StoredRows:
        with self.rows_reader() as r:
            return r.stored(lo, hi, T)

    def prior(self) -> np.ndarray | None:
        """The class prior ``[classes, classes]`` float32 of a top-k cache with the prior rule, else None."""
        with self.rows_reader() as r:
            return r.prior

    @contextlib.contextmanager
    def rows_reader(self) -> Iterator[RowReader]:
        with h5py.File(self.path, "r") as f:
            yield RowReader(f, self.layout, self.combine, self.weights, self.path)

    def diagnostics(self) -> dict[float, dict]:
        """Stored per-temperature diagnostics: {T: {mean_entropy_nats, teacher_accuracy, ...}}."""
        with h5py.File(self.path, "r") as f:
            return {T: {k: float(v) for k, v in f[f"diagnostics/{t_key(T)}"].attrs.items()}
                    for T in self.temperatures if f"diagnostics/{t_key(T)}" in f}


def layout_of(f: h5py.File, version: int | None = None) -> CacheLayout:
    """The layout a file's attributes declare (a kd-cache/1 file: its logits, soft targets and labels)."""
    a = f.attrs
    version = version or int(str(a["schema"]).rsplit("/", 1)[1])
    rows, members, classes = int(a["rows"]), int(a["members"]), int(a["classes"])
    views = "views" in a
    k = int(json.loads(a["views"])["count"]) if views else 1
    ident = json.loads(a["identity"]) if "identity" in a else {}
    first = int(ident["part"]["rows"][0]) if "part" in ident else 0
    if version == 1:  # a label per cache row; every temperature stored
        dt = str(f["logits"].dtype) if "logits" in f else "float32"
        return CacheLayout(rows, members, classes, dt, 0, tuple(float(t) for t in a.get("temperatures", [])),
                           k, views, first, label_per_row=True)
    return CacheLayout(rows, members, classes, str(a["logits_dtype"]), int(a["top_k"]),
                       tuple(float(t) for t in json.loads(a["soft_temperatures"])), k, views, first,
                       tail_spread=a.get("tail_rule", "even") in ("spread", "prior"),
                       tail_prior=a.get("tail_rule") == "prior")


def _fail(path: Path, why: str) -> DataError:
    return DataError(f"{path}: corrupt {WHAT}: {why}")


def _check(path: Path, f: h5py.File, part: bool) -> CacheInfo:
    h5seal.check_attrs(path, f)
    version = h5seal.check_schema(path, f, SCHEMA, WHAT, REBUILD, oldest=OLDEST)
    a = dict(f.attrs)
    if part and "part" not in a:
        raise DataError(f"{path}: not a shard part (built without --shard); nothing to merge")
    if not part and "part" in a:
        raise IntegrityError(f"{path}: one part of a sharded cache; join the parts with `distill cache merge`")
    try:
        rows, committed, complete = int(a["rows"]), int(a["committed_rows"]), bool(a.get("complete"))
    except (KeyError, TypeError, ValueError):
        raise _fail(path, "missing or malformed attributes") from None
    if not complete or committed != rows:
        if part:
            p = json.loads(a["part"])
            raise IntegrityError(f"{path}: incomplete part ({committed} of {rows} rows); rerun shard "
                                 f"{p['index']}/{p['count']} with the same arguments to resume it")
        raise IntegrityError(f"{path}: incomplete cache ({committed} of {rows} rows); rebuild with `{REBUILD}`")
    h5seal.verify(path, f, REBUILD)
    try:
        lay = layout_of(f, version)
        temps = tuple(float(t) for t in a["temperatures"])
        info = CacheInfo(path, rows, lay.members, lay.classes, temps, str(a["transfer_sha256"]),
                         str(a["transfer_split"]), a, version, lay, lay.soft_temperatures)
        if version > 1 and (str(a["layout"]) != lay.layout or lay.logits_dtype not in ("float16", "float32")):
            raise ValueError("layout")
    except (KeyError, TypeError, ValueError):
        raise _fail(path, "missing or malformed attributes") from None
    _check_datasets(path, f, info, part)
    return info


def _check_datasets(path: Path, f: h5py.File, info: CacheInfo, part: bool) -> None:
    """Shapes against the attributes, a views cache's K, labels in [-1, classes), top-k ids in [0, classes)."""
    lay = info.layout
    if info.version == 1:
        want = {"logits": ((info.rows, info.members, info.classes), None), "labels": ((info.rows,), None),
                **{f"soft/{t_key(T)}": ((info.rows, info.classes), None) for T in info.temperatures}}
    else:
        want = {**lay.datasets(), **lay.shared()}
    for name, (shape, dt) in want.items():
        if name == "logits" and info.version == 1 and name not in f:
            continue  # soft targets alone still train a student; tools that need logits say so
        if name not in f or f[name].shape != shape or (dt is not None and f[name].dtype != dt):
            raise DataError(f"{path}: dataset {name} is missing or not of shape {shape}"
                            + ("" if dt is None else f" and type {dt}"))
    if "views" in info.attrs and not part:
        try:
            k, n = int(json.loads(info.attrs["views"])["count"]), int(info.attrs["source_rows"])
        except (KeyError, TypeError, ValueError):
            raise _fail(path, "malformed views attributes") from None
        if k < 1 or n * k != info.rows or f.get("view_params") is None \
                or f["view_params"].shape != (info.rows, VIEW_PARAM_BYTES):
            raise DataError(f"{path}: views cache of {info.rows} rows does not hold K={k} views of {n} rows "
                            f"with {VIEW_PARAM_BYTES}-byte parameters each")
    y = f["labels"][:]
    if ((y < -1) | (y >= info.classes)).any():
        raise DataError(f"{path}: labels outside [-1, {info.classes})")
    if lay.top_k:
        step = max(1, (8 << 20) // lay.top_k)
        ids = f["topk/ids"]
        if any(int(ids[lo:lo + step].max(initial=0)) >= info.classes for lo in range(0, info.rows, step)):
            raise DataError(f"{path}: top-k class ids outside [0, {info.classes})")


def open_cache(path: Path) -> CacheInfo:
    """Open and check a finished cache (kd-cache/2 or kd-cache/1); DataError/IntegrityError with one line
    when unusable.

    Untrusted input (:mod:`pipeline.formats.h5seal`): schema, completeness, the seal (content
    checksum), then the datasets' shapes against the attributes and labels in [-1, classes).
    """
    with h5seal.open_untrusted(Path(path), WHAT, REBUILD) as f:
        return _check(Path(path), f, part=False)


def open_part(path: Path) -> CacheInfo:
    """Open and check one finished part of a sharded cache (``--shard i/n``), seal included."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: part not found (run its shard first)")
    with h5seal.open_untrusted(path, f"{WHAT} part", REBUILD) as f:
        return _check(path, f, part=True)
