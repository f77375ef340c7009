"""The soft-target cache's only writer: ``kd-cache/2`` files (:mod:`pipeline.formats.cache` has the layout and
the reader), and the additions ``add-temperature`` makes to a finished file of either version.

Crash safety: rows are written in batches (:meth:`CacheWriter.put`); after each batch the data is
flushed, then ``committed_rows`` advanced, flushed and the file fsynced (:meth:`CacheWriter.commit`),
so a committed row is always on disk and a killed writer resumes after its last committed batch.
Each commit also chains the sha256 of what it commits onto ``committed_sha256``
(``sha256(previous chain + sha256 of the batch's rows of every row dataset, in name order)``), and a
resume recomputes the chain over the committed rows before it appends: a partial edited after a kill
is restarted, never sealed in.  What one batch wrote, dataset by dataset, is
:meth:`CacheWriter.spans` (the labels of a views cache are per transfer row, so their span is not
the batch's rows): the unit the chain covers.  The chain is resume state, not content: it is removed
before the seal.  The seal is written last; readers verify it before returning anything, so a
finished cache that changed since is refused as corrupt.

A failed write (full disk, file-size limit) is raised as the OSError it was, at the latest by the
commit of its batch and before ``committed_rows`` can advance (:mod:`pipeline.formats.h5write`: HDF5
never sees the failure, and every write after it is dropped), so the partial file on disk holds
exactly the batches committed before the fault and a rerun resumes after them.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.formats import h5seal
from pipeline.formats.cache import SCHEMA, layout_of
from pipeline.formats.cache_layout import CacheLayout, RowReader, chunk_rows, recorded_weights, t_key
from pipeline.formats.h5write import H5Output

CHAIN = "committed_sha256"  # a partial's checksum chain over its commits (removed before the seal)


class CacheWriter:
    """An open cache being written (a ``.partial``); the stage's tools change a cache only through it."""

    def __init__(self, out: H5Output, layout: CacheLayout):
        self.out, self.layout = out, layout
        self.f = out.f

    # ---- opening
    @classmethod
    def create(cls, path: Path, identity: dict, layout: CacheLayout, views: dict | None = None,
               source_rows: int | None = None, prior: np.ndarray | None = None) -> CacheWriter:
        """A new, empty ``kd-cache/2`` file at ``path`` (truncated if it exists) with the datasets of
        ``layout``; ``views`` (the view function's settings, with ``count`` K) makes it a views cache;
        ``prior``: the class prior a layout with ``tail_prior`` stores (written now, whole)."""
        out = H5Output(path, "w")
        f = out.f
        for name, (shape, dt) in layout.datasets().items():
            row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
            f.create_dataset(name, shape, dt, chunks=(chunk_rows(shape[0], row), *shape[1:]) if shape[0] else None)
        f.attrs.update(schema=SCHEMA, rows=layout.rows, members=layout.members, classes=layout.classes,
                       layout=layout.layout, top_k=layout.top_k, logits_dtype=layout.logits_dtype,
                       soft_temperatures=json.dumps([float(t) for t in layout.soft_temperatures]),
                       source_rows=int(source_rows if source_rows is not None else layout.rows),
                       committed_rows=0, complete=False, identity=json.dumps(identity))
        if views is not None:
            f.attrs["views"] = json.dumps(views)
        if layout.top_k:
            f.attrs["tail_rule"] = layout.tail_rule
        for name, (shape, dt) in layout.shared().items():
            if prior is None or np.shape(prior) != shape or not np.all(np.isfinite(prior)):
                raise ValueError(f"{name}: a finite array of shape {shape} is needed")
            with np.errstate(over="ignore"):
                stored = np.asarray(prior, dtype=dt)
            if not np.all(np.isfinite(stored)):
                raise ValueError(f"{name}: beyond the range of {dt}; build with --logits-dtype float32")
            f.create_dataset(name, data=stored)
        return cls(out, layout)

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
        f = out.f
        try:
            if (f.attrs.get("schema") != SCHEMA or json.loads(f.attrs["identity"]) != identity
                    or "teacher_probabilities" not in f.attrs
                    or (int(f.attrs["top_k"]) and f.attrs.get("tail_rule") not in ("spread", "prior"))):  # older
                log(f"{path}: made from other inputs or settings; restarting from row 0")
            else:
                w = cls(out, layout_of(f))
                if w.attrs.get(CHAIN, "") == w.chain(0, w.committed_rows, step, b""):
                    log(f"resuming {path} at row {w.committed_rows} (its last committed batch)")
                    return w
                log(f"{path}: its {w.committed_rows} committed rows no longer match their checksums (changed "
                    "since they were written?); restarting from row 0")
        except (OSError, KeyError, ValueError, RuntimeError):
            log(f"{path}: unreadable partial cache (killed writer?); restarting from row 0")
        out.close()
        return None

    @classmethod
    def update(cls, path: Path) -> CacheWriter:
        """Open a copy of a finished cache (``path``, a ``.partial``, either version) to extend it;
        reseal on finish."""
        out = H5Output(path, "r+")
        return cls(out, layout_of(out.f))

    # ---- writing
    @property
    def attrs(self) -> h5py.AttributeManager:
        return self.f.attrs

    @property
    def committed_rows(self) -> int:
        return int(self.f.attrs["committed_rows"])

    def add_soft(self, T: float) -> h5py.Dataset:
        """A new stored soft-target dataset at T (``add-temperature`` on a cache that stores them)."""
        rows, classes = self.layout.rows, self.layout.classes
        return self.f.create_dataset(f"soft/{t_key(T)}", (rows, classes), np.float32,
                                     chunks=(chunk_rows(rows, classes * 4), classes))

    def spans(self, lo: int, hi: int) -> dict[str, tuple[int, int]]:
        """The rows of every row dataset that cache rows ``[lo, hi)`` write: ``[lo, hi)``, and for the
        labels the transfer rows they cover."""
        names = [n for n in (*self.layout.datasets(), *(f"soft/{k}" for k in self.f.get("soft", {}))) if n in self.f]
        return {n: self.layout.label_span(lo, hi) if n == "labels" else (lo, hi) for n in dict.fromkeys(names)}

    def put(self, lo: int, rows: dict[str, np.ndarray], labels: np.ndarray | None = None) -> None:
        """Rows ``[lo, lo + n)`` of the datasets in ``rows`` (name -> array of n rows), and ``labels``, one
        per cache row, stored once per transfer row (no commit: see :meth:`commit`)."""
        n = len(next(iter(rows.values()))) if rows else len(labels)
        for name, a in rows.items():
            self.f[name][lo:lo + n] = a
        if labels is not None and n:
            a, b = self.layout.label_span(lo, lo + n)
            s, first = self.layout.label_step, self.layout.first_row
            at = (first + np.arange(lo, lo + n)) // s - first // s - a  # label row of each cache row
            y = np.empty(b - a, labels.dtype)
            y[at] = labels  # the views of one row share its label: any of them gives it
            self.f["labels"][a:b] = y
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
        ``sha256(chain + sha256(what it wrote of every row dataset, in name order))`` (:meth:`spans`),
        as hex ("" for none)."""
        chain = start
        for a in range(lo, hi, max(1, step)):
            rows = hashlib.sha256()
            for name, (x, y) in sorted(self.spans(a, min(hi, a + step)).items()):
                rows.update(np.ascontiguousarray(self.f[name][x:y]).tobytes())
            chain = hashlib.sha256(chain + rows.digest()).digest()
        return chain.hex()

    def prior(self) -> np.ndarray | None:
        """The class prior the file holds (a prior-rule top-k cache), else None."""
        return self.f["topk/prior"][...] if self.layout.tail_prior else None

    def read(self, name: str, lo: int, hi: int) -> np.ndarray:
        return self.f[name][lo:hi]

    def reader(self, combine: str | None = None, weights: Any = "recorded") -> RowReader:
        """The rows written so far, read as a finished cache's; ``combine`` and ``weights`` (normalised,
        None: equal) of the cache being written, else as recorded."""
        combine = combine or str(self.f.attrs["combine"])
        w = recorded_weights(self.f.attrs) if isinstance(weights, str) else weights
        return RowReader(self.f, self.layout, combine, None if w is None else tuple(map(float, w)),
                         Path(self.out.path))

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
