"""The student's training step: the loss of its settings and one epoch of optimiser steps, shared by the
stage (:mod:`stages.student.stage`) and the epoch-time benchmark (:mod:`stages.student.measure`).

Objective (Hinton, Vinyals & Dean 2015, section 2; :func:`pipeline.losses.kd_loss`)::

    L = alpha * T^2 * KL(p_T || softmax(z / T)) + (1 - alpha) * CE(y, softmax(z))

or, with ``objective = logits``, :func:`pipeline.losses.logit_matching_loss`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from pipeline import losses, models
from pipeline.errors import UsageError
from stages.student.batches import Batch, split_tail
from stages.student.settings import StudentConfig


def _loss(cfg: StudentConfig, z: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if cfg.objective == "logits":
        return losses.logit_matching_loss(z, target, y, cfg.alpha)
    if cfg.topk_tail == "bucket" and cfg.alpha > 0:
        p, tail = split_tail(target)
        return losses.kd_loss(z, p, y, cfg.temperature, cfg.alpha, tail=tail)
    return losses.kd_loss(z, target, y, cfg.temperature, cfg.alpha)


def train_epoch(cfg: StudentConfig, model: torch.nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, batches: Iterable[Batch], rank: int = 0,
                world: int = 1, precision: str = "fp32", channels_last: bool = False) -> float:
    """One epoch of steps over ``batches`` of ``(x, target, y)`` (a :class:`stages.student.batches.StudentLoader`'s
    ``epoch``, or any iterable of such batches); returns the last loss.  A loss that is not finite (NaN
    or inf) stops training with one line (:func:`diverged`).

    ``precision`` ``bf16`` runs the network under bfloat16 autocast (the loss in float32);
    ``channels_last`` hands image batches to the network in that memory layout (oneDNN's fast one for
    convolutions; the values are the same).

    Under DDP every rank draws the same *global* batch (same seed, same order) and trains on its
    contiguous share; DDP averages the ranks' gradients, so the loss of a share of n_r of n rows is
    scaled by n_r * world / n to make that average the gradient of the global batch mean (exact for
    the soft term; for the hard term exact when labelled rows split evenly).  A final batch smaller
    than the world is skipped (a rank with no rows cannot join the all-reduce).
    """
    model.train()
    loss = torch.zeros(())
    for step, (x, t, y) in enumerate(batches, 1):
        n = len(y)
        scale = 1.0
        if world > 1:
            if n < world:
                continue
            lo, hi = n * rank // world, n * (rank + 1) // world
            x, t, y, scale = x[lo:hi], t[lo:hi], y[lo:hi], (hi - lo) * world / n
        x = models.training_batch(x, channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            z = model(x)
        loss = _loss(cfg, z.float(), t, y)
        opt.zero_grad(set_to_none=True)
        (loss * scale).backward()  # x * 1.0 is exact: a single process is unchanged
        opt.step()
        sched.step()
        # Checked after the step, not before it: under DDP every rank joins this step's all-reduce, the
        # NaN reaches every rank's weights, and each stops at its next step instead of one rank
        # leaving the others waiting in the all-reduce.
        if not bool(torch.isfinite(loss)):
            raise diverged(cfg, f"the loss is {float(loss.detach())} at step {step} of this epoch")
    return float(loss.detach())


def diverged(cfg: StudentConfig, what: str) -> UsageError:
    """The one-line error that stops a student whose training left the finite numbers (exit 2: the inputs
    are checked finite, the temperature lies in its range, so the settings diverge)."""
    return UsageError(f"{what}: training diverged with these settings; lower --lr (now {cfg.lr:g}) and rerun; "
                      "nothing was published")
