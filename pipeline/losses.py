"""The student's losses in torch (Hinton, Vinyals & Dean 2015, section 2; docs/design.md, the maths).

``kd_loss``: ``alpha * T^2 * KL(p_T || softmax(z / T)) + (1 - alpha) * CE(y, softmax(z))``, or with a
top-k cache's tail classes given, the KL over the kept classes and one bucket of the tail;
``logit_matching_loss``: its high-temperature limit (Caruana).  The numpy side (soft targets,
diagnostics, the gradient formulas these losses are checked against) is :mod:`pipeline.soft`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.soft import check_alpha, check_temperature


def _hard_term(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(y, softmax(z)) averaged over rows whose label is not -1 (unlabelled).

    With no labelled row the term is 0, kept attached to the graph (z.sum() * 0) so that backward()
    still works and contributes zero gradient.
    """
    labels = labels.to(device=student_logits.device, dtype=torch.long)
    labelled = int((labels != -1).sum())
    if labelled == 0:
        return student_logits.sum() * 0.0
    # "sum" over labelled rows / their count: ignore_index rows add nothing and are not counted.
    return F.cross_entropy(student_logits, labels, ignore_index=-1, reduction="sum") / labelled


def _check_shapes(student_logits: torch.Tensor, other: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if student_logits.dim() != 2 or tuple(other.shape) != tuple(student_logits.shape):
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and {what} {tuple(other.shape)} "
                         "must both be [n, classes]")
    if tuple(labels.shape) != (student_logits.shape[0],):
        raise ValueError(f"labels must be [n] = [{student_logits.shape[0]}], got {tuple(labels.shape)}")


def kd_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, labels: torch.Tensor,
            T: float, alpha: float, tail: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * T^2 * KL(p_T || softmax(z/T)) + (1 - alpha) * CE(labels, softmax(z))``, a scalar.

    KL uses "batchmean" semantics: sum over classes, mean over rows (PyTorch's ``"mean"`` would also
    divide by the class count). KL(p || q_T) = CE(p, q_T) - H(p) and H(p) is a constant in z, so the
    gradient in z equals that of Hinton's CE(p_T, q_T), ``T * (q - p)`` after the T^2 factor; unlike
    CE it is exactly 0 when the student matches the soft targets. The T^2 factor keeps the soft
    gradients on the same scale as the hard ones whatever T is.

    The hard term ignores rows labelled -1 and averages over the labelled ones; if alpha < 1 and no
    row of the batch is labelled, the hard term is 0 (the batch teaches through soft targets only).
    alpha == 1 skips the hard term, alpha == 0 skips the soft term (so soft_targets may be anything
    of the right shape).

    ``tail`` (bool ``[n, classes]``, a top-k cache's classes outside each row's kept k): the soft term
    becomes the *tail bucket*'s KL, over k + 1 outcomes, the kept classes and the tail as one::

        KL_bucket = sum_{i in K} p_i log(p_i / q_i) + P log(P / Q),   P = sum_{j in R} p_j,  Q = sum_{j in R} q_j

    Only the tail's total mass is taught, not how it is shared (which the cache does not hold): the
    gradient in ``z_i / T`` is ``q_i - p_i`` on K, as in the full KL, and ``q_j (1 - P / Q)`` on R,
    which moves the tail's mass towards P and leaves its shares the student's own.  With one tail
    class (k = C - 1) it is the full KL.
    """
    T = check_temperature(T)
    alpha = check_alpha(alpha)
    _check_shapes(student_logits, soft_targets, labels, "soft_targets")
    loss = student_logits.new_zeros(())
    if alpha > 0:
        log_q = F.log_softmax(student_logits / T, dim=-1)
        p = soft_targets.to(dtype=student_logits.dtype, device=student_logits.device)
        if tail is None:
            # kl_div computes xlogy(p, p) - p * log_q, so p = 0 contributes 0, not NaN.
            soft = F.kl_div(log_q, p, reduction="batchmean")
        else:
            soft = _bucket_kl(log_q, p, tail.to(device=p.device, dtype=torch.bool))
        loss = loss + alpha * (T * T) * soft
    if alpha < 1:
        loss = loss + (1.0 - alpha) * _hard_term(student_logits, labels)
    return loss


def _bucket_kl(log_q: torch.Tensor, p: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """``KL_bucket`` (:func:`kd_loss`) averaged over rows; a row with no tail class is its full KL."""
    if tuple(tail.shape) != tuple(p.shape):
        raise ValueError(f"tail {tuple(tail.shape)} must be [n, classes] = {tuple(p.shape)}")
    kept = F.kl_div(torch.where(tail, 0.0, log_q), torch.where(tail, 0.0, p), reduction="sum")
    big_p = (p * tail).sum(dim=-1)
    log_big_q = torch.logsumexp(log_q.masked_fill(~tail, float("-inf")), dim=-1)
    # P log(P / Q) as xlogy(P, P) - P log Q; a row without tail (log Q = -inf, P = 0) adds 0, not NaN
    bucket = torch.xlogy(big_p, big_p) - big_p * torch.where(tail.any(dim=-1), log_big_q, 0.0)
    return (kept + bucket.sum()) / p.shape[0]


def logit_matching_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                        alpha: float) -> torch.Tensor:
    """High-temperature limit of ``kd_loss`` (Caruana's logit matching), a scalar.

    ``alpha * mean_rows 0.5 * sum_i (z_zm,i - v_zm,i)^2 + (1 - alpha) * CE(labels, softmax(z))``, with
    z_zm, v_zm the row-wise zero-meaned student and teacher logits (teacher_logits = the members' mean
    logits, ``[n, classes]``) and the hard term as in ``kd_loss``.

    Why: for zero-mean logits dC/dz_i ~ (z_i - v_i) / (N T^2), so T^2 * dC/dz_i -> (z_zm,i - v_zm,i)/N,
    which is the gradient of (1/N) * 0.5 * ||z_zm - v_zm||^2 (centring is an orthogonal projection,
    so d/dz 0.5||P(z - v)||^2 = P(z - v)). Scaling chosen here: the soft term is 0.5 * ||.||^2 *without*
    the 1/N, so ``grad logit_matching / N`` is the T -> infinity limit of kd_loss's T^2-scaled soft
    gradient (the constant H(p) part is dropped, as KL already drops it).
    """
    alpha = check_alpha(alpha)
    _check_shapes(student_logits, teacher_logits, labels, "teacher_logits")
    loss = student_logits.new_zeros(())
    if alpha > 0:
        v = teacher_logits.to(dtype=student_logits.dtype, device=student_logits.device)
        z = student_logits
        diff = (z - z.mean(dim=-1, keepdim=True)) - (v - v.mean(dim=-1, keepdim=True))
        loss = loss + alpha * 0.5 * diff.pow(2).sum(dim=-1).mean()
    if alpha < 1:
        loss = loss + (1.0 - alpha) * _hard_term(student_logits, labels)
    return loss
