"""The student's data: rows of the soft-target cache joined with x of the prepared transfer set.

docs/formats.md: readers never index rows one by one through h5py (fancy indexing is slow and
needs sorted indices).  Every read here is a contiguous slice ``[lo, hi)`` of the cache (what it
stores, labels) and of the prepared file (x, normalised as in :meth:`Prepared.normalise`).  The
rows are held as the cache stores them (float16 logits, or the top k of many classes, or targets
stored at T) and each batch's targets are derived when it is drawn, by :func:`stages.student.batches.batch_targets`.

Two modes, chosen by a memory budget (MiB) against the bytes the selected rows need (float32 x, the
stored numbers, an int64 label):

- resident: the rows fit; they are read block by block once into preallocated arrays, and every
  epoch permutes them in memory (the same as training from arrays handed in).
- streaming: they do not fit; every epoch visits the blocks in a seeded random order, gathers as
  many blocks (at least MIN_BLOCKS) as half the budget holds into a buffer (x as stored, counted as
  float32: the other half covers the chunks gathered from it), draws the buffer's rows in a random
  order (so rows mix *within and across* blocks) and yields full batches, carrying the remainder
  into the next buffer.  The two files are opened once an epoch.  Resident memory is bounded by the budget, whatever
  the cache's size; the number of steps per epoch is the same as in resident mode.

Under a hard memory ceiling (``ulimit -v``, a cgroup's memory.max) a resident copy that would not fit
under it is refused before it is allocated (exit 7, naming the budget that streams it instead): under
a cgroup the allocation would not fail, the kernel would kill the process.

Row selection (a transfer subset: a fraction of the rows, one class left out) is a sorted index of
cache rows, applied inside each contiguous block with numpy, never through h5py.  Labels (8 bytes
a row) are read whole to choose the rows.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.errors import DataError, ResourceError
from pipeline.formats.cache import CacheInfo, StoredRows
from pipeline.formats.prepared import Prepared
from pipeline.resources import human, memory_headroom
from stages.student.batches import Batch, batch_targets, chunk_rows

MiB = 1 << 20
TARGETS = ("soft", "bucket", "logits", "none")
MIN_BLOCKS = 4  # blocks a streaming buffer mixes at least


class TransferLoader:
    """Minibatches ``(x, target, y)`` (torch tensors) of the selected cache rows, one epoch at a time
    (a :class:`stages.student.batches.StudentLoader`).

    ``target``: ``soft`` (p_T at ``temperature``), ``logits`` (members' mean logits) or ``none``
    (hard labels only: zeros, never read).  ``rows``: sorted cache row indices to use (None = all).
    """

    def __init__(self, cache: CacheInfo, prepared: Prepared, target: str, temperature: float,
                 rows: np.ndarray | None = None, budget_mib: float = 1024.0, block_rows: int = 8192):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if prepared.rows[cache.transfer_split] != cache.rows:
            raise DataError(f"{cache.path}: {cache.rows} rows, but the {cache.transfer_split} split of "
                            f"{prepared.path} has {prepared.rows[cache.transfer_split]}; rebuild with `make cache`")
        if target in ("soft", "bucket"):
            cache.require_temperature(temperature)  # UsageError when targets at T can be neither read nor derived
        self.cache, self.prepared, self.target, self.T = cache, prepared, target, float(temperature)
        self.split = cache.transfer_split
        self.block_rows = max(1, int(block_rows))
        self.labels_all = cache.labels()
        self.rows = np.arange(cache.rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(self.rows) and (np.any(np.diff(self.rows) <= 0) or self.rows[0] < 0 or self.rows[-1] >= cache.rows):
            raise ValueError("rows must be sorted, distinct cache row indices")
        self.n = len(self.rows)
        # float32 x + the stored numbers + int64 label per row (what a resident copy holds).
        stored_bytes = self._stored(0, min(1, cache.rows)).nbytes if target != "none" and cache.rows else 0
        self.row_bytes = 4 * math.prod(prepared.shape) + stored_bytes + 8
        self.budget_bytes = int(budget_mib * MiB)
        self.resident = self.n * self.row_bytes <= self.budget_bytes
        self.peak_buffer_rows = 0  # largest number of rows held at once (what the memory test checks)
        if self.resident:
            _require_memory(self.n * self.row_bytes, self.n, budget_mib)
            x, stored, y = self._read(0, cache.rows)
            self._all = torch.from_numpy(x), stored, torch.from_numpy(y)
            self.peak_buffer_rows = self.n
        else:
            # Half the budget for the buffer, half for its permuted copy; blocks shrink so that the
            # buffer holds at least MIN_BLOCKS of them (rows must mix across blocks, not only within).
            half = self.budget_bytes // 2
            self.block_rows = max(1, min(self.block_rows, half // (MIN_BLOCKS * self.row_bytes)))
            self.buffer_blocks = max(1, half // (self.block_rows * self.row_bytes))

    def _stored(self, lo: int, hi: int, reader=None) -> StoredRows | None:
        """What the cache stores of rows [lo, hi) for this loader's targets (None: targets never read)."""
        if self.target == "none":
            return None
        T = self.T if self.target in ("soft", "bucket") else None
        return reader.stored(lo, hi, T) if reader is not None else self.cache.stored(lo, hi, T)

    def targets(self, stored: StoredRows | None, n: int) -> torch.Tensor:
        return batch_targets(stored, self.target, self.T, n, self.cache.classes)

    def arrays(self) -> Batch:
        """The resident (x, target, y) tensors, every target derived (resident mode only)."""
        if not self.resident:
            raise ValueError("a streaming loader holds no arrays")
        x, stored, y = self._all
        return x, self.targets(stored, len(y)), y

    def labels(self) -> np.ndarray:
        """Labels of the selected rows (-1 where unlabelled)."""
        return self.labels_all[self.rows]

    def steps(self, batch_size: int) -> int:
        return -(-self.n // batch_size)

    def _read(self, lo: int, hi: int, readers=None, raw: bool = False
              ) -> tuple[np.ndarray, StoredRows | None, np.ndarray]:
        """Selected rows within cache rows [lo, hi), read block by block as contiguous slices: x
        (normalised float32, or as stored when ``raw``), the stored numbers their targets derive from, y.
        ``readers``: the cache's and the prepared file's open row readers (opened here when None)."""
        if readers is None:
            with self.cache.rows_reader() as fc, self.prepared.rows_reader(self.split) as fp:
                return self._read(lo, hi, (fc, fp), raw)
        fc, fp = readers
        a, b = np.searchsorted(self.rows, [lo, hi])
        n = int(b - a)
        x = np.empty((n, *self.prepared.shape), self.prepared.dtype if raw else np.float32)
        parts: list[StoredRows] = []
        y = np.empty(n, np.int64)
        done = 0
        for blo in range(lo, hi, self.block_rows):
            bhi = min(hi, blo + self.block_rows)
            i, j = np.searchsorted(self.rows, [blo, bhi])
            if i == j:
                continue
            # Slice the covering span [first selected, last selected] only: one contiguous read.
            first, last = int(self.rows[i]), int(self.rows[j - 1]) + 1
            keep = self.rows[i:j] - first
            k = done + len(keep)
            xb = fp(first, last)[0][keep]
            x[done:k] = xb if raw else self.prepared.normalise(xb)
            y[done:k] = self.labels_all[first:last][keep]
            if self.target != "none":
                parts.append(self._stored(first, last, fc).take(keep))
            done = k
        stored = StoredRows.concat(parts) if parts else (None if self.target == "none" else self._stored(lo, lo, fc))
        return x, stored, y

    def epoch(self, gen: torch.Generator, batch_size: int) -> Iterator[Batch]:
        """One pass over the selected rows in a random order drawn from ``gen``."""
        step = chunk_rows(batch_size, self.cache.classes)
        if self.resident:
            x, stored, y = self._all
            order = torch.randperm(self.n, generator=gen)
            for lo in range(0, self.n, step):
                idx = order[lo:lo + step]
                ts = self.targets(None if stored is None else stored.take(idx.numpy()), len(idx))
                for i in range(0, len(idx), batch_size):  # x gathered a batch at a time: it stays in cache
                    b = idx[i:i + batch_size]
                    yield x[b], ts[i:i + batch_size], y[b]
            return
        with self.cache.rows_reader() as fc, self.prepared.rows_reader(self.split) as fp:  # open once an epoch
            yield from self._stream(gen, batch_size, step, (fc, fp))

    def _stream(self, gen: torch.Generator, batch_size: int, step: int, readers) -> Iterator[Batch]:
        """The streaming epoch: buffers of whole blocks in a random block order, each buffer's rows (and
        the previous buffer's remainder) in a random order.  The buffer holds x as stored (raw bytes for
        images); a chunk of whole batches is gathered in the buffer's permuted order, then normalised and
        its targets derived: the same numbers as permuting normalised rows, without copying the buffer."""
        starts = list(range(0, self.cache.rows, self.block_rows))
        block_order = torch.randperm(len(starts), generator=gen).tolist()
        carry = None
        for g in range(0, len(block_order), self.buffer_blocks):
            parts = [self._read(starts[b], min(self.cache.rows, starts[b] + self.block_rows), readers, raw=True)
                     for b in block_order[g:g + self.buffer_blocks]]
            if carry is not None:
                parts.insert(0, carry)
            x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[2] for p in parts])
            t = None if self.target == "none" else StoredRows.concat([p[1] for p in parts])
            perm = torch.randperm(len(y), generator=gen).numpy()
            self.peak_buffer_rows = max(self.peak_buffer_rows, len(y))
            full = len(y) - len(y) % batch_size
            for lo in range(0, full, step):
                idx = perm[lo:min(full, lo + step)]
                xs, ys = torch.from_numpy(self.prepared.normalise(x[idx])), torch.from_numpy(y[idx])
                ts = self.targets(None if t is None else t.take(idx), len(idx))
                for i in range(0, len(idx), batch_size):
                    yield xs[i:i + batch_size], ts[i:i + batch_size], ys[i:i + batch_size]
            rest = perm[full:]
            carry = (x[rest], None if t is None else t.take(rest), y[rest])
        if carry is not None and len(carry[2]):
            yield (torch.from_numpy(self.prepared.normalise(carry[0])), self.targets(carry[1], len(carry[2])),
                   torch.from_numpy(carry[2]))


def _require_memory(need: int, rows: int, budget_mib: float) -> None:
    """ResourceError when a resident copy of ``need`` bytes cannot fit under the process's memory ceiling."""
    left = memory_headroom()
    if left is not None and need > left[0]:
        raise ResourceError(f"out of memory: the {rows} training rows need {human(need)} held in memory (they fit "
                            f"--memory-budget-mib {budget_mib:g}), only {human(max(0, left[0]))} is left under "
                            f"{left[1]}; lower --memory-budget-mib below {max(1, left[0] // MiB // 2)} so they are "
                            f"streamed in blocks")


def select_rows(labels: np.ndarray, fraction: float = 1.0, drop_class: int = -1, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a transfer subset: every row except those labelled ``drop_class``, then a
    seeded ``fraction`` of them (stratified by nothing: a uniform sample, as Hinton's 3%)."""
    rows = np.flatnonzero(labels != drop_class) if drop_class >= 0 else np.arange(len(labels))
    if fraction < 1.0:
        k = max(1, int(round(fraction * len(rows))))
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=k, replace=False))
    return rows

