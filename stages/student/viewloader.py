"""The student's data from a views cache: every epoch, one view of each transfer row, re-made on the fly.

A views cache holds, for K views of each transfer row, the view's 8 bytes of parameters and the
teacher's outputs for it (:mod:`pipeline.formats.cache`, :mod:`pipeline.views`); the pixels are not
stored.  Each epoch draws, for every selected row, one of its K views uniformly (from the epoch's
torch generator, so a seed fixes the whole schedule), and each batch re-makes those views from the
raw rows with :func:`pipeline.views.make`: the very pixels the teacher saw, normalised as the
teacher's input was.  Over E epochs a row is seen through E views drawn from K: K bounds how many
different functions values the student can match, the epochs how many it does (Beyer et al. 2022:
consistent views, and patience).

Resident only: the raw rows (uint8 for images), what the cache stores of every view (float16
logits, the top k, or targets stored at T; each batch's targets are derived when it is drawn,
:func:`stages.student.batches.batch_targets`) and the parameters must fit ``memory_budget_mib``; a
views cache that does not is refused with the figure to set.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from pipeline import views
from pipeline.errors import DataError, UsageError
from pipeline.formats.cache import CacheInfo
from pipeline.formats.prepared import Prepared
from stages.student.batches import Batch, batch_targets, chunk_rows

MiB = 1 << 20


class ViewLoader:
    """Minibatches ``(x, target, y)`` of one view per selected transfer row, one epoch at a time (a
    :class:`stages.student.batches.StudentLoader`).

    ``target``: ``soft`` (p_T of the view), ``logits`` (the members' mean logits for it) or ``none``;
    ``rows``: sorted transfer-row indices to use (None = all).  ``y`` is the row's label.
    """

    resident = True

    def __init__(self, cache: CacheInfo, prepared: Prepared, target: str, temperature: float,
                 rows: np.ndarray | None = None, budget_mib: float = 1024.0, views_used: int = 0):
        self.spec = views.spec_of(cache.views, cache.path)
        self.k, self.n_all = self.spec.count, cache.source_rows
        if views_used > self.k:
            raise UsageError(f"{cache.path}: views_used {views_used}, but the cache holds {self.k} views of each row")
        self.used = views_used or self.k  # views 0 .. used-1 of each row (view j does not depend on K)
        split = cache.transfer_split
        if prepared.rows[split] != self.n_all:
            raise DataError(f"{cache.path}: views of {self.n_all} rows, but the {split} split of {prepared.path} "
                            f"has {prepared.rows[split]}; rebuild with `make cache`")
        if target in ("soft", "bucket"):
            cache.require_temperature(temperature)
        self.rows = np.arange(self.n_all) if rows is None else np.asarray(rows, dtype=np.int64)
        self.n = len(self.rows)
        self.target, self.T, self.classes = target, float(temperature), cache.classes
        T = self.T if target in ("soft", "bucket") else None
        pixel_bytes = math.prod(prepared.shape) * np.dtype(prepared.dtype).itemsize
        per_view = views.PARAM_BYTES + (cache.stored(0, 1, T).nbytes if target != "none" else 0)
        need = self.n_all * (pixel_bytes * (2 if self.spec.flip else 1) + 8) + cache.rows * per_view
        if need > budget_mib * MiB:
            raise UsageError(f"{cache.path}: a views cache is read into memory: it needs {need / MiB:.0f} MiB "
                             f"(rows, every view's targets and parameters), more than --memory-budget-mib "
                             f"{budget_mib:g}; raise it")
        self.prepared = prepared
        x, labels = prepared.load_raw(split)
        self.maker = views.Maker(x, self.spec.max_shift, self.spec.flip > 0)  # the rows, padded once
        self.labels_all = labels.astype(np.int64)
        self.params = cache.read("view_params")
        self.stored = cache.stored(T=T) if target != "none" else None  # every view, as stored
        self.peak_buffer_rows = self.n

    def labels(self) -> np.ndarray:
        """Labels of the selected rows (-1 where unlabelled)."""
        return self.labels_all[self.rows]

    def steps(self, batch_size: int) -> int:
        return -(-self.n // batch_size)

    def batch(self, src: np.ndarray, view: np.ndarray) -> Batch:
        """View ``view[i]`` of transfer row ``src[i]``: its normalised pixels, target and label."""
        vr = src * self.k + view
        x = self.prepared.normalise(self.maker(src, self.params[vr]))
        t = batch_targets(None if self.stored is None else self.stored.take(vr), self.target, self.T, len(vr),
                          self.classes)
        return torch.from_numpy(x), t, torch.from_numpy(self.labels_all[src])

    def epoch(self, gen: torch.Generator, batch_size: int) -> Iterator[Batch]:
        """One pass over the selected rows in a random order, each through one uniformly drawn view."""
        order = torch.randperm(self.n, generator=gen).numpy()
        view = torch.randint(0, self.used, (self.n,), generator=gen).numpy()
        step = chunk_rows(batch_size, self.classes)
        for lo in range(0, self.n, step):
            x, t, y = self.batch(self.rows[order[lo:lo + step]], view[lo:lo + step])
            for i in range(0, len(y), batch_size):
                yield x[i:i + batch_size], t[i:i + batch_size], y[i:i + batch_size]


def view_row_labels(cache: CacheInfo) -> np.ndarray:
    """Labels per transfer row of a views cache."""
    return cache.source_labels()

