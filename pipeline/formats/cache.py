"""The soft-target cache, schema ``kd-cache/1``: its only writer and its only reader.

Layout (docs/formats.md, "kd-cache")::

    /                 attrs: schema, rows, members, classes, temperatures, combine, committed_rows,
                             complete, identity, teacher_sha256, transfer_sha256, transfer_split,
                             settings, teacher_probabilities, classes_names, provider,
                             onnxruntime_version, package_version, provenance, [part],
                             content_sha256 (the seal)
    /logits           float32 [rows, members, classes]   raw per-member logits
    /soft/<T>         float32 [rows, classes]            combined soft targets at temperature T
    /labels           int64   [rows]                     -1 where the transfer set has no label
    /diagnostics/<T>  attrs: mean_entropy_nats, teacher_accuracy, member_disagreement, ece
    /view_params      uint8   [rows, 8]                  a views cache only: each view's parameters

A views cache (attribute ``views``: the view function's version and settings, JSON; ``source_rows``
N) holds K views of each of N transfer rows as its ``rows = N * K`` rows, view k of transfer row r
at row ``r * K + k``; the student re-makes each view from the prepared rows and these parameters
(:mod:`pipeline.views`).  ``/logits`` may be float16 (``logits_dtype``); soft targets are then
computed from the rounded logits, so the file stays self-consistent.

Crash safety (the writer): rows are written in batches; after each batch the data is flushed, then
``committed_rows`` advanced, flushed and the file fsynced, so a committed row is always on disk and
a killed writer resumes after its last committed batch.  The seal is written last; readers verify
it before returning anything, so a finished cache that changed since is refused as corrupt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from pipeline.artifacts import fsync_path
from pipeline.errors import DataError, IntegrityError, UsageError
from pipeline.formats import h5seal

SCHEMA = "kd-cache/1"
WHAT = "soft-target cache"
REBUILD = "make cache"
VIEW_PARAM_BYTES = 8  # pipeline.views.PARAM_BYTES: a view's parameters
CHUNK_BYTES = 512 << 10  # chunks of whole rows, ~512 KiB: in the 256 KiB - 1 MiB band of docs/formats.md


def t_key(T: float) -> str:
    """Dataset name of temperature T: ``4`` for 4.0, ``2.5`` for 2.5."""
    return f"{float(T):g}"


class CacheWriter:
    """An open cache being written (a ``.partial``); the stage's tools change a cache only through it."""

    def __init__(self, f: h5py.File):
        self.f = f

    # ---- opening
    @classmethod
    def create(cls, path: Path, identity: dict, rows: int, members: int, classes: int,
               temperatures: tuple[float, ...], views: dict | None = None, source_rows: int | None = None,
               logits_dtype: str = "float32") -> "CacheWriter":
        """A new, empty cache at ``path`` (truncated if it exists) with its datasets; ``views`` (the
        view function's settings, with ``count`` K) makes it a views cache of ``rows = N * K`` rows."""
        f = h5py.File(path, "w", locking=False)
        dt = np.dtype(logits_dtype)
        chunk = max(1, min(rows, CHUNK_BYTES // (members * classes * dt.itemsize)))
        f.create_dataset("logits", (rows, members, classes), dt, chunks=(chunk, members, classes))
        w = cls(f)
        for T in temperatures:
            w.add_soft(T)
        f.create_dataset("labels", (rows,), np.int64, chunks=(max(1, min(rows, CHUNK_BYTES // 8)),))
        f.attrs.update(schema=SCHEMA, rows=rows, members=members, classes=classes, committed_rows=0,
                       complete=False, identity=json.dumps(identity))
        if views is not None:
            f.create_dataset("view_params", (rows, VIEW_PARAM_BYTES), np.uint8,
                             chunks=(max(1, min(rows, CHUNK_BYTES // VIEW_PARAM_BYTES)), VIEW_PARAM_BYTES))
            f.attrs.update(views=json.dumps(views), source_rows=int(source_rows))
        return w

    @classmethod
    def resume(cls, path: Path, identity: dict, log: Callable[[str], None]) -> "CacheWriter | None":
        """Reopen a partial cache made from the same inputs and settings, else None (restart), saying
        which in the log."""
        if path.stat().st_size == 0:  # just created by the lock: nothing to resume
            return None
        try:
            f = h5py.File(path, "r+", locking=False)
        except (OSError, KeyError, ValueError):
            log(f"{path}: unreadable partial cache (killed writer?); restarting from row 0")
            return None
        try:
            if (json.loads(f.attrs["identity"]) == identity and "logits" in f
                    and "teacher_probabilities" in f.attrs):
                log(f"resuming {path} at row {int(f.attrs['committed_rows'])} (its last committed batch)")
                return cls(f)
            log(f"{path}: made from other inputs or settings; restarting from row 0")
        except (OSError, KeyError, ValueError):
            log(f"{path}: unreadable partial cache (killed writer?); restarting from row 0")
        f.close()
        return None

    @classmethod
    def update(cls, path: Path) -> "CacheWriter":
        """Open a copy of a finished cache (``path``, a ``.partial``) to extend it; reseal on finish."""
        return cls(h5py.File(path, "r+", locking=False))

    # ---- writing
    @property
    def attrs(self) -> h5py.AttributeManager:
        return self.f.attrs

    @property
    def committed_rows(self) -> int:
        return int(self.f.attrs["committed_rows"])

    def add_soft(self, T: float) -> h5py.Dataset:
        rows, classes = self.f["logits"].shape[0], self.f["logits"].shape[2]
        soft_chunk = max(1, min(rows, CHUNK_BYTES // (classes * 4)))
        return self.f.create_dataset(f"soft/{t_key(T)}", (rows, classes), np.float32, chunks=(soft_chunk, classes))

    def put(self, lo: int, logits: np.ndarray | None, soft: dict[float, np.ndarray], labels: np.ndarray | None,
            view_params: np.ndarray | None = None) -> None:
        """Rows ``[lo, lo + n)`` of the datasets given (no commit: see :meth:`commit`)."""
        n = len(next(iter(soft.values()))) if logits is None else len(logits)
        if logits is not None:
            self.f["logits"][lo:lo + n] = logits
        for T, p in soft.items():
            self.f[f"soft/{t_key(T)}"][lo:lo + n] = p
        if labels is not None:
            self.f["labels"][lo:lo + n] = labels
        if view_params is not None:
            self.f["view_params"][lo:lo + n] = view_params

    def commit(self, rows: int) -> None:
        """Data before the counter: flush, advance ``committed_rows``, flush, fsync (h5py's flush
        reaches the OS only; the counter must survive a crash)."""
        self.f.flush()
        self.f.attrs["committed_rows"] = rows
        self.f.flush()
        fsync_path(Path(self.f.filename))

    def read(self, name: str, lo: int, hi: int) -> np.ndarray:
        return self.f[name][lo:hi]

    def write_diagnostics(self, T: float, d: dict) -> None:
        self.f.require_group(f"diagnostics/{t_key(T)}").attrs.update(d)

    def finish(self, attrs: dict[str, Any], part: dict | None = None) -> None:
        """Write the content attributes, mark the cache complete and seal it (call after every change)."""
        self.f.attrs.update(attrs)
        if part is not None:
            self.f.attrs["part"] = json.dumps(part)
        self.f.attrs["complete"] = True
        h5seal.seal(self.f)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """A checked, finished cache (or shard part): its shape and provenance, and readers of its rows."""

    path: Path
    rows: int
    members: int
    classes: int
    temperatures: tuple[float, ...]
    transfer_sha256: str
    transfer_split: str
    attrs: dict

    @property
    def combine(self) -> str:
        return str(self.attrs["combine"])

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
    def views(self) -> dict | None:
        """The view function's version and settings (``count`` = K) of a views cache, else None."""
        return json.loads(self.attrs["views"]) if "views" in self.attrs else None

    @property
    def source_rows(self) -> int:
        """Transfer rows the cache covers (``rows / K`` for a views cache)."""
        return int(self.attrs.get("source_rows", self.rows))

    @property
    def has_logits(self) -> bool:
        with h5py.File(self.path, "r") as f:
            return "logits" in f

    def soft(self, T: float, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Soft targets at T [rows, classes]; UsageError naming the stored ones when absent."""
        self.require_temperature(T)
        return self.read(f"soft/{t_key(T)}", lo, hi)

    def require_temperature(self, T: float) -> None:
        if float(T) not in self.temperatures:
            raise UsageError(f"{self.path}: no soft targets at T={t_key(T)}; the cache has "
                             + ", ".join(map(t_key, self.temperatures))
                             + " (add one with `distill cache add-temperature`)")

    def read(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` of dataset ``name`` (``logits``, ``labels``, ``soft/<T>``): one contiguous read."""
        with h5py.File(self.path, "r") as f:
            return f[name][lo:hi]

    @contextlib.contextmanager
    def rows_reader(self) -> Iterator[Callable[[str, int, int], np.ndarray]]:
        """``read(name, lo, hi)``: rows of any dataset over one open handle (a loader's many reads)."""
        with h5py.File(self.path, "r") as f:
            yield lambda name, lo, hi: f[name][lo:hi]

    def diagnostics(self) -> dict[float, dict]:
        """Stored per-temperature diagnostics: {T: {mean_entropy_nats, teacher_accuracy, ...}}."""
        with h5py.File(self.path, "r") as f:
            return {T: {k: float(v) for k, v in f[f"diagnostics/{t_key(T)}"].attrs.items()}
                    for T in self.temperatures if f"diagnostics/{t_key(T)}" in f}

    def check_built_from(self, transfer_set: Path, transfer_sha256: str) -> None:
        """IntegrityError (stale) unless the cache was built from the file whose sha256 is given."""
        if transfer_sha256 != self.transfer_sha256:
            raise IntegrityError(
                f"{transfer_set}: the transfer set has changed since the cache {self.path} was built from it "
                f"(sha256 {transfer_sha256[:12]} != {self.transfer_sha256[:12]}); rebuild with `{REBUILD}`")


def _check(path: Path, f: h5py.File, part: bool) -> CacheInfo:
    h5seal.check_attrs(path, f)
    h5seal.check_schema(path, f, SCHEMA, WHAT, REBUILD)
    a = dict(f.attrs)
    if part and "part" not in a:
        raise DataError(f"{path}: not a shard part (built without --shard); nothing to merge")
    if not part and "part" in a:
        raise IntegrityError(f"{path}: one part of a sharded cache; join the parts with `distill cache merge`")
    try:
        rows, committed, complete = int(a["rows"]), int(a["committed_rows"]), bool(a.get("complete"))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: corrupt {WHAT}: missing or malformed attributes") from None
    if not complete or committed != rows:
        if part:
            p = json.loads(a["part"])
            raise IntegrityError(f"{path}: incomplete part ({committed} of {rows} rows); rerun shard "
                                 f"{p['index']}/{p['count']} with the same arguments to resume it")
        raise IntegrityError(f"{path}: incomplete cache ({committed} of {rows} rows); rebuild with `{REBUILD}`")
    h5seal.verify(path, f, REBUILD)
    try:
        info = CacheInfo(path, rows, int(a["members"]), int(a["classes"]),
                         tuple(float(t) for t in a["temperatures"]), str(a["transfer_sha256"]),
                         str(a["transfer_split"]), a)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: corrupt {WHAT}: missing or malformed attributes") from None
    want = {"logits": (info.rows, info.members, info.classes), "labels": (info.rows,),
            **{f"soft/{t_key(T)}": (info.rows, info.classes) for T in info.temperatures}}
    for name, shape in want.items():
        if name == "logits" and name not in f:
            continue  # soft targets alone still train a student; tools that need logits say so
        if name not in f or f[name].shape != shape:
            raise DataError(f"{path}: dataset {name} is missing or not of shape {shape}")
    if "views" in a and not part:
        try:
            k, n = int(json.loads(a["views"])["count"]), int(a["source_rows"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: corrupt {WHAT}: malformed views attributes") from None
        if k < 1 or n * k != info.rows or f.get("view_params") is None \
                or f["view_params"].shape != (info.rows, VIEW_PARAM_BYTES):
            raise DataError(f"{path}: views cache of {info.rows} rows does not hold K={k} views of {n} rows "
                            f"with {VIEW_PARAM_BYTES}-byte parameters each")
    y = f["labels"][:]
    if ((y < -1) | (y >= info.classes)).any():
        raise DataError(f"{path}: labels outside [-1, {info.classes})")
    return info


def open_cache(path: Path) -> CacheInfo:
    """Open and check a finished cache; DataError/IntegrityError with one line when unusable.

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
