"""The class prior of a top-k cache built with the prior rule (:func:`pipeline.topk.class_prior`): the
teachers run once on a seeded sample of transfer rows, before the cache's own rows.

The sample depends only on the split's size, the count and :data:`SEED`, so every shard of a sharded run,
and ``cache verify`` after it, draws the same rows and computes the same prior (to device rounding:
``stages.cache.shards.PRIOR_ATOL``).  The rows are the transfer rows themselves, never views.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline import topk

SEED = 0  # of the sample: fixed, so that parts and verify agree without recording more than the count


def sample_rows(rows: int, count: int) -> np.ndarray:
    """Sorted indices of ``min(count, rows)`` transfer rows drawn without replacement."""
    return np.sort(np.random.default_rng(SEED).choice(rows, size=min(count, rows), replace=False))


def compute(teachers, info, split: str, count: int, top_k: int, combine: str, weights,
            batch: int, log: Callable[[str], None] = print) -> np.ndarray:
    """The class prior ``[classes, classes]`` float32 from the teachers' outputs on the sample."""
    rows = sample_rows(info.rows[split], count)
    parts = []
    for a in range(0, len(rows), batch):
        x, _ = info.take(split, rows[a:a + batch])
        parts.append(teachers(teachers.adapt(x), int(rows[a])))
    v = np.concatenate(parts)
    ids = topk.compress(v, top_k, combine, weights)[0]
    prior = topk.class_prior(v, ids, v.shape[2], weights)
    seen = int(np.count_nonzero(np.bincount(ids[:, 0].astype(np.int64), minlength=v.shape[2])))
    log(f"cache: class prior from {len(rows)} sampled rows ({seen} of {v.shape[2]} classes top one of them)")
    return prior
