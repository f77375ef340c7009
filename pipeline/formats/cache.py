"""The soft-target cache, schema ``kd-cache/1``: its only writer and its only reader.

Layout (docs/formats.md, "kd-cache")::

    /                 attrs: schema, rows, members, classes, temperatures, combine, committed_rows,
                             complete, identity, teacher_sha256, transfer_sha256, transfer_split,
                             settings, teacher_probabilities, classes_names, provider,
                             onnxruntime_version, package_version, provenance, [part],
                             teacher_inputs, member_weights, member_accuracy (not in a part),
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
a killed writer resumes after its last committed batch.  Each commit also chains the sha256 of the
rows it commits onto ``committed_sha256`` (``sha256(previous chain + sha256 of the batch's rows of
every dataset)``), and a resume recomputes the chain over the committed rows before it appends: a
partial edited after a kill is restarted, never sealed in.  The chain is resume state, not content:
it is removed before the seal.  The seal is written last; readers verify it before returning
anything, so a finished cache that changed since is refused as corrupt.

A failed write (full disk, file-size limit) is raised as the OSError it was, at the latest by the
commit of its batch and before ``committed_rows`` can advance (:mod:`pipeline.formats.h5write`: HDF5
never sees the failure, and every write after it is dropped), so the partial file on disk holds
exactly the batches committed before the fault and a rerun resumes after them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import DataError, IntegrityError, UsageError
from pipeline.formats import h5seal
from pipeline.formats.h5write import H5Output

SCHEMA = "kd-cache/1"
WHAT = "soft-target cache"
REBUILD = "make cache"
VIEW_PARAM_BYTES = 8  # pipeline.views.PARAM_BYTES: a view's parameters
CHUNK_BYTES = 512 << 10  # chunks of whole rows, ~512 KiB: in the 256 KiB - 1 MiB band of docs/formats.md
METADATA_BYTES = 64 << 10  # headroom for HDF5's own structures, attributes and provenance (~30 KiB measured)
CHAIN = "committed_sha256"  # a partial's checksum chain over its commits (removed before the seal)


def t_key(T: float) -> str:
    """Dataset name of temperature T: ``4`` for 4.0, ``2.5`` for 2.5."""
    return f"{float(T):g}"


def _chunk_rows(rows: int, row_bytes: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // row_bytes))


def _whole_chunks(rows: int, row_bytes: int) -> int:
    """Bytes HDF5 allocates for a dataset of ``rows`` rows: whole chunks, the last one included."""
    chunk = _chunk_rows(rows, row_bytes)
    return -(-rows // chunk) * chunk * row_bytes


def soft_size(rows: int, classes: int, temperatures: int) -> int:
    """Bytes of ``temperatures`` soft-target datasets (what ``add-temperature`` adds)."""
    return temperatures * _whole_chunks(rows, classes * 4)


def predicted_size(rows: int, members: int, classes: int, temperatures: int, logit_bytes: int = 4,
                   views: bool = False) -> tuple[int, str]:
    """Bytes a finished cache of this shape takes (every dataset in whole chunks, as HDF5 allocates
    them, plus :data:`METADATA_BYTES`), and the figure as a formula a user can check. ``logit_bytes``:
    4 (float32) or 2 (float16 logits); ``views``: a views cache, with 8 bytes of parameters per row."""
    size = (_whole_chunks(rows, members * classes * logit_bytes) + soft_size(rows, classes, temperatures)
            + _whole_chunks(rows, 8) + METADATA_BYTES)
    extra = ""
    if views:
        size += _whole_chunks(rows, VIEW_PARAM_BYTES)
        extra = f" + {rows} x {VIEW_PARAM_BYTES} bytes of view parameters"
    return size, (f"{rows} rows x {members} members x {classes} classes x {logit_bytes} bytes + {rows} x {classes} "
                  f"x {temperatures} temperatures x 4 bytes + {rows} labels x 8 bytes{extra}, in whole chunks, "
                  f"+ {METADATA_BYTES >> 10} KiB")


class CacheWriter:
    """An open cache being written (a ``.partial``); the stage's tools change a cache only through it."""

    def __init__(self, out: H5Output):
        self.out = out
        self.f = out.f

    # ---- opening
    @classmethod
    def create(cls, path: Path, identity: dict, rows: int, members: int, classes: int,
               temperatures: tuple[float, ...], views: dict | None = None, source_rows: int | None = None,
               logits_dtype: str = "float32") -> CacheWriter:
        """A new, empty cache at ``path`` (truncated if it exists) with its datasets; ``views`` (the
        view function's settings, with ``count`` K) makes it a views cache of ``rows = N * K`` rows."""
        out = H5Output(path, "w")
        f = out.f
        dt = np.dtype(logits_dtype)
        chunk = _chunk_rows(rows, members * classes * dt.itemsize)
        f.create_dataset("logits", (rows, members, classes), dt, chunks=(chunk, members, classes))
        w = cls(out)
        for T in temperatures:
            w.add_soft(T)
        f.create_dataset("labels", (rows,), np.int64, chunks=(_chunk_rows(rows, 8),))
        f.attrs.update(schema=SCHEMA, rows=rows, members=members, classes=classes, committed_rows=0,
                       complete=False, identity=json.dumps(identity))
        if views is not None:
            f.create_dataset("view_params", (rows, VIEW_PARAM_BYTES), np.uint8,
                             chunks=(_chunk_rows(rows, VIEW_PARAM_BYTES), VIEW_PARAM_BYTES))
            f.attrs.update(views=json.dumps(views), source_rows=int(source_rows))
        return w

    @classmethod
    def resume(cls, path: Path, identity: dict, log: Callable[[str], None], step: int) -> CacheWriter | None:
        """Reopen a partial cache made from the same inputs and settings whose committed rows still match
        their checksum chain (commits of ``step`` rows, the stage's batch), else None (restart), saying
        which in the log."""
        if path.stat().st_size == 0:  # just created by the lock: nothing to resume
            return None
        try:
            out = H5Output(path, "r+")
        except (OSError, KeyError, ValueError, RuntimeError):
            log(f"{path}: unreadable partial cache (killed writer?); restarting from row 0")
            return None
        w = cls(out)
        try:
            if (json.loads(w.attrs["identity"]) != identity or "logits" not in w.f
                    or "teacher_probabilities" not in w.attrs):
                log(f"{path}: made from other inputs or settings; restarting from row 0")
            elif w.attrs.get(CHAIN, "") != w.chain(0, w.committed_rows, step, b""):
                log(f"{path}: its {w.committed_rows} committed rows no longer match their checksums (changed since "
                    "they were written?); restarting from row 0")
            else:
                log(f"resuming {path} at row {w.committed_rows} (its last committed batch)")
                return w
        except (OSError, KeyError, ValueError, RuntimeError):
            log(f"{path}: unreadable partial cache (killed writer?); restarting from row 0")
        out.close()
        return None

    @classmethod
    def update(cls, path: Path) -> CacheWriter:
        """Open a copy of a finished cache (``path``, a ``.partial``) to extend it; reseal on finish."""
        return cls(H5Output(path, "r+"))

    # ---- writing
    @property
    def attrs(self) -> h5py.AttributeManager:
        return self.f.attrs

    @property
    def committed_rows(self) -> int:
        return int(self.f.attrs["committed_rows"])

    def add_soft(self, T: float) -> h5py.Dataset:
        rows, classes = self.f["logits"].shape[0], self.f["logits"].shape[2]
        soft_chunk = _chunk_rows(rows, classes * 4)
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
        self.out.check()

    def commit(self, rows: int) -> None:
        """Data before the counter: flush, advance ``committed_rows`` and its checksum chain, flush, fsync
        (h5py's flush reaches the OS only; the counter must survive a crash).  A failed write of the
        data is raised by the first flush, before the counter changes."""
        self.out.flush()
        prev = self.committed_rows
        chain = self.chain(prev, rows, rows - prev, bytes.fromhex(str(self.attrs.get(CHAIN, ""))))
        self.f.attrs.update({"committed_rows": rows, CHAIN: chain})
        self.out.flush(fsync=True)

    def chain(self, lo: int, hi: int, step: int, start: bytes) -> str:
        """The checksum chain from ``start`` over commits of ``step`` rows of ``[lo, hi)``: for each,
        ``sha256(chain + sha256(its rows of every row dataset, in name order))``, as hex ("" for none)."""
        names = sorted(n for n in ("logits", "labels", "view_params") if n in self.f)
        names += sorted(f"soft/{k}" for k in self.f.get("soft", {}))
        chain = start
        for a in range(lo, hi, max(1, step)):
            rows = hashlib.sha256()
            for name in names:
                rows.update(np.ascontiguousarray(self.f[name][a:min(hi, a + step)]).tobytes())
            chain = hashlib.sha256(chain + rows.digest()).digest()
        return chain.hex()

    def read(self, name: str, lo: int, hi: int) -> np.ndarray:
        return self.f[name][lo:hi]

    def write_diagnostics(self, T: float, d: dict) -> None:
        self.f.require_group(f"diagnostics/{t_key(T)}").attrs.update(d)

    def finish(self, attrs: dict[str, Any], part: dict | None = None) -> None:
        """Write the content attributes, mark the cache complete and seal it (call after every change)."""
        self.f.attrs.update(attrs)
        if part is not None:
            self.f.attrs["part"] = json.dumps(part)
        if CHAIN in self.f.attrs:  # resume state, not content: equal runs, resumed or not, seal alike
            del self.f.attrs[CHAIN]
        self.f.attrs["complete"] = True
        self.out.flush()  # a failed write is raised here, never sealed over
        h5seal.seal(self.f)
        self.out.flush()

    def close(self) -> None:
        """Close the file; raises a failed write not raised yet (the last flush happens here)."""
        self.out.close()


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
