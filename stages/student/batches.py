"""What the student's training loop asks of its data: :class:`StudentLoader`, the interface both loaders offer.

- :class:`stages.student.loader.TransferLoader`: rows of a cache of the transfer rows themselves, joined
  with x of the prepared file, resident or streamed in contiguous blocks;
- :class:`stages.student.viewloader.ViewLoader`: one view of each transfer row per epoch, re-made from
  a views cache's parameters.

Neither inherits from it (a :class:`typing.Protocol` is structural); ``tests/stages/test_loader.py``
checks that both satisfy it, member by member and signature by signature.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pipeline import soft
from pipeline.formats.cache import StoredRows

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(x, target, y)``: float32 inputs as the student takes them, float32 targets ``[rows, classes]`` (the
soft targets at T, the members' mean logits, or zeros never read) and int64 labels (-1: unlabelled).
Targets of kind ``bucket`` carry a top-k cache's tail classes negated (:func:`split_tail`)."""


@runtime_checkable
class StudentLoader(Protocol):
    """Minibatches of a student's selected transfer rows, one epoch at a time."""

    n: int
    """Selected transfer rows: one epoch visits each once."""
    resident: bool
    """True when every selected row is held in memory; False when they are streamed in blocks."""
    peak_buffer_rows: int
    """The most rows held in memory at once so far."""

    def labels(self) -> np.ndarray:
        """Labels of the selected rows (-1 where unlabelled)."""
        ...

    def steps(self, batch_size: int) -> int:
        """Optimiser steps of one epoch at ``batch_size`` (the last batch may be short)."""
        ...

    def epoch(self, gen: torch.Generator, batch_size: int) -> Iterator[Batch]:
        """One pass over the selected rows in a random order drawn from ``gen``."""
        ...


CHUNK_BYTES = 4 << 20
"""About how many bytes of float32 targets a loader derives in one call (4 MiB: 1,024 rows at 1000 classes)."""


def chunk_rows(batch_size: int, classes: int) -> int:
    """Rows a loader draws at once: whole batches whose targets take about :data:`CHUNK_BYTES` (at least one
    batch, at most 32).  Targets are derived a chunk at a time, not a batch at a time: the same numbers
    (the derivation is row by row), a thirty-second of the calls at 10 classes, and memory that does not
    grow with the rows."""
    return batch_size * max(1, min(32, CHUNK_BYTES // (4 * classes * batch_size)))


def batch_targets(stored: StoredRows | None, target: str, T: float, n: int, classes: int) -> torch.Tensor:
    """A batch's float32 targets ``[n, classes]`` from its stored rows: ``soft`` (p_T,
    :func:`pipeline.soft.targets`), ``bucket`` (the same, with a top-k row's tail classes negated: the
    tail-bucket loss, :func:`pipeline.losses.kd_loss`, needs to know them), ``logits`` (the members'
    mean logits) or ``none`` (zeros, never read)."""
    if target in ("soft", "bucket"):
        p = soft.targets(stored, T)
        if target == "bucket" and stored.ids is not None:
            tail = np.ones(p.shape, bool)
            np.put_along_axis(tail, np.asarray(stored.ids, dtype=np.int64), False, 1)
            np.negative(p, out=p, where=tail)  # -0.0 too: the sign bit marks the class, whatever its mass
        return torch.from_numpy(p)
    if target == "logits":
        return torch.from_numpy(soft.member_outputs(stored).mean(axis=1))
    return torch.zeros(n, classes)


def split_tail(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, tail)`` of ``bucket`` targets: the soft targets and the bool mask of the tail classes (the
    negated entries, sign bit set; ``-0.0`` included)."""
    tail = torch.signbit(target)
    return target.abs(), tail
