"""The cache's input rows: the transfer set's rows, or K views of each made from their parameters.

A plain cache's row ``i`` is transfer row ``i``.  A views cache's row ``i`` is view ``i % K`` of
transfer row ``i // K`` (:mod:`pipeline.views`): the reader thread draws the parameters of the
batch's views, re-makes their pixels from the raw rows (and the mixing partners, which lie in the
same block of :data:`pipeline.views.BLOCK` rows) at the stored pixels' scale; each teacher's input
contract then adapts them (:meth:`Teachers.adapt`), so the teachers see exactly what the student
will re-make.  Views that mix no partner are whole pixels and keep the stored dtype (a uint8 teacher
takes them); mixed views are float32.  Raw rows are read one block at a time: memory is flat in K.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline import views
from pipeline.formats.prepared import Prepared


class RowSource:
    """``read(lo, hi) -> (rows x at the stored scale, (labels, view parameters or None))`` for cache rows
    ``[lo, hi)``."""

    def __init__(self, info: Prepared, split: str, spec: views.ViewSpec | None, raw: Callable):
        self.info, self.spec, self.raw = info, spec, raw
        self.n = info.rows[split]
        self.k = spec.count if spec is not None else 1
        self.block: tuple[int, views.Maker, np.ndarray] | None = None  # (first row, views of, y) of one block

    @property
    def rows(self) -> int:
        """Cache rows: N transfer rows, or N * K views."""
        return self.n * self.k

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray | None]]:
        if self.spec is None:
            x, y = self.raw(lo, hi)
            return x, (y, None)
        r0, r1 = lo // self.k, (hi - 1) // self.k + 1
        p = views.params(self.spec, r0, r1, self.n)[lo - r0 * self.k:hi - r0 * self.k]
        start, maker, y = self._rows(r0, r1)
        src = np.arange(lo, hi) // self.k - start
        local = views.decode(p).copy()
        local["partner"] = np.where(local["lam"] > 0, local["partner"].astype(np.int64) - start, 0)
        if self.spec.mixup > 0:
            x = maker(src, local.view(np.uint8).reshape(-1, views.PARAM_BYTES))
        else:  # whole pixels: the gather alone, in the stored dtype
            x = maker.moved(src, local)
        return x, (y[src], p)

    def _rows(self, r0: int, r1: int) -> tuple[int, views.Maker, np.ndarray]:
        """Views of whole parameter blocks covering transfer rows ``[r0, r1)`` (kept while reused)."""
        b0, b1 = r0 // views.BLOCK * views.BLOCK, min(self.n, -(-r1 // views.BLOCK) * views.BLOCK)
        if self.block is None or self.block[0] != b0 or len(self.block[2]) != b1 - b0:
            x, y = self.raw(b0, b1)
            self.block = (b0, views.Maker(x, self.spec.max_shift, self.spec.flip > 0), y)
        return self.block
