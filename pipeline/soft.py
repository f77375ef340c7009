"""Knowledge-distillation maths in numpy: tempered softmax, ensemble soft targets, diagnostics, gradients.

After Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", arXiv:1503.02531,
and docs/design.md (the maths). The torch losses that use these targets are
in :mod:`pipeline.losses`; this module imports numpy only, so the cache and the bench never load torch.

Tempered softmax, with student logits ``z``, teacher logits ``v`` and ``N`` classes::

    q_i = exp(z_i / T) / sum_j exp(z_j / T)        p_i = exp(v_i / T) / sum_j exp(v_j / T)

Higher T gives a softer distribution. An ensemble of M members gives the soft target
``p_T = mean_m softmax(v_m / T)`` ("arithmetic", Hinton's ensemble target, the default) or
``p_T = softmax(mean_m(v_m) / T)`` ("geometric"); they differ, and averaging logits is *not* the
ensemble's averaged distribution.  With member weights ``w`` (normalised to sum to 1; equal by
default, which is the plain mean above bit for bit)::

    arithmetic: p_T = sum_m w_m softmax(v_m / T)      (a mixture of the members' distributions)
    geometric:  p_T = softmax(sum_m w_m v_m / T)      (the normalised weighted geometric mean of the
                                                       members' q_T: prod_m q_m^w_m / Z)

Loss of the student, averaged over the rows of a batch::

    L = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)

KL(p || q) = CE(p, q) - H(p), and H(p) does not depend on z, so the KL form has the same gradient as
Hinton's cross entropy while being exactly 0 when the student matches. Gradient of the soft term
before the T^2 factor (exact)::

    dC/dz_i = (q_i - p_i) / T

For T large against the logits, exp(x) ~ 1 + x gives::

    dC/dz_i ~ (1/T) * ((1 + z_i/T) / (N + sum_j z_j/T) - (1 + v_i/T) / (N + sum_j v_j/T))

and for zero-mean logits (sum_j z_j = sum_j v_j = 0; softmax is shift invariant, so any logits may be
zero-meaned first)::

    dC/dz_i ~ (z_i - v_i) / (N T^2)

so T^2 * dC/dz_i -> (z_i - v_i) / N: at high T distillation becomes logit matching (Caruana), and the
T^2 factor keeps the soft gradients' scale independent of T. The seed notes' worked example has two
slips that this module does not copy: its high-temperature gradient divides by the low T (1.5)
instead of the high one (5), and its zero-mean gradient uses the raw logits, not the zero-meaned ones.
"""
from __future__ import annotations

import math

import numpy as np

COMBINES = ("arithmetic", "geometric")
#: Floor for log(p): the smallest normal float32, so a probability of 0 gives a finite logit.
_TINY32 = float(np.finfo(np.float32).tiny)
#: Equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15).
ECE_BINS = 15


#: The lowest temperature, the one definition of the range every command accepts: [T_MIN, inf).
#:
#: Why 1e-3, from float32 arithmetic (the student divides its float32 logits by T):
#:
#: - no overflow: ``z / T`` stays finite for every ``|z| <= FLT_MAX * T = 3.4e38 * 1e-3 = 3.4e35``, far
#:   beyond any logit a trained network gives (``tests/faults/test_faults_numeric.py`` trains on logits of
#:   1e30 at this T); at T = 1e-38 a logit of 4 already overflows, and ``inf - inf`` in the softmax is NaN;
#: - no underflow of the scale: ``T^2 = 1e-6`` is a normal float32 (smallest normal 1.2e-38), so the
#:   ``T^2``-scaled soft term keeps its 24 bits;
#: - nothing lost: at T = 1e-3 two logits 0.104 apart already give ``exp(-104) < 1.4e-45``, below the
#:   smallest float32 (subnormal), so the tempered softmax is one-hot in float32 for any logits that
#:   differ by more than a tenth: a lower T gives the same targets, only closer to overflow.
#:
#: No ceiling is needed for the soft targets (computed in float64 for any T); in the student ``T^2``
#: overflows float32 only beyond ``sqrt(FLT_MAX) = 1.8e19``, and a loss that is not finite stops
#: training (:mod:`stages.student.train`).
T_MIN = 1e-3


def check_temperature(T: float) -> float:
    """``T`` as a float; ValueError unless it is finite and ``>= T_MIN`` (the range above)."""
    try:
        T = float(T)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number, got {T!r}") from None
    if not math.isfinite(T) or T <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {T!r}")
    if T < T_MIN:
        raise ValueError(f"temperature must be >= {T_MIN:g}: below it a student's float32 logits / T overflow (and "
                         f"the targets are one-hot anyway), got {T!r}")
    return T


def normalise_weights(weights, members: int) -> np.ndarray | None:
    """Member weights ``w / sum(w)`` as float64, or None when they are all equal (or not given).

    None selects the unweighted formulas, so ``--member-weights 1,1,1`` writes the very bytes of the
    default.  One weight per member, each finite and >= 0 (0 leaves a member out), their sum > 0;
    ValueError otherwise.
    """
    if weights is None or len(weights) == 0:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != members:
        raise ValueError(f"member weights: {len(w)} given for {members} members (one per member, in the "
                         f"order of the teachers' outputs)")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"member weights must be finite, >= 0 and not all 0, got {list(map(float, w))}")
    if np.all(w == w[0]):
        return None
    return w / w.sum()


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    return alpha


# ----------------------------------------------------------------------------------------- numpy


def _softmax64(logits: np.ndarray, T: float) -> np.ndarray:
    """softmax(logits / T) over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        # A NaN/inf logit is a broken teacher; failing here beats writing NaN into the cache.
        raise ValueError("logits contain NaN or infinity")
    # Subtract the max *before* dividing by T: the largest entry becomes exactly 0, so exp() never
    # overflows and every row sum is >= 1 (no 0/0), however large the logits or small T; a very
    # negative difference may reach -inf, whose exp is a harmless 0.
    with np.errstate(over="ignore"):
        x = (x - x.max(axis=-1, keepdims=True)) / T
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def tempered_softmax(logits: np.ndarray, T: float) -> np.ndarray:
    """softmax(logits / T) over the last axis, computed in float64, returned as float32."""
    return _softmax64(logits, check_temperature(T)).astype(np.float32)


def combine_soft_targets(member_logits: np.ndarray, T: float, combine: str = "arithmetic",
                         weights=None) -> np.ndarray:
    """Ensemble soft targets ``[n, classes]`` from per-member logits ``[n, members, classes]``.

    arithmetic: ``sum_m w_m softmax(v_m / T)`` (Hinton's ensemble target for equal ``w_m = 1/M``).
    geometric:  ``softmax(sum_m w_m v_m / T)`` (normalised weighted geometric mean of the members' q_T).
    ``weights``: one per member, normalised here (:func:`normalise_weights`); None or all equal is
    the plain mean, computed exactly as without weights.
    """
    T = check_temperature(T)
    x = np.asarray(member_logits)
    if x.ndim != 3:
        raise ValueError(f"member_logits must be [n, members, classes], got shape {x.shape}")
    w = normalise_weights(weights, x.shape[1])
    if combine == "arithmetic":
        # Average in float64 before rounding, so the rows still sum to 1 to float32 precision.
        p = _softmax64(x, T)
        out = p.mean(axis=1) if w is None else np.einsum("nmc,m->nc", p, w)
    elif combine == "geometric":
        if not np.all(np.isfinite(x)):
            raise ValueError("logits contain NaN or infinity")
        # Scale before summing: the mean then stays finite even for float64 logits near 1e308.
        scaled = x.astype(np.float64) / x.shape[1] if w is None else x.astype(np.float64) * w[:, None]
        out = _softmax64(scaled.sum(axis=1), T)
    else:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    return out.astype(np.float32)


def targets(stored, T: float, use_stored: bool = True) -> np.ndarray:
    """Soft targets ``[n, classes]`` float32 at T of cache rows as stored: the one derivation every reader
    of a cache's targets calls (the student's loaders, ``cache verify``, ``add-temperature``, diagnostics).

    ``stored`` is a :class:`pipeline.formats.cache.StoredRows`: targets stored at T are returned as
    they are (``use_stored``); per-member logits give :func:`combine_soft_targets` with the cache's
    combine and member weights; a top-k row gives :func:`pipeline.topk.rebuild` (its docstring has the
    rule and the bound on its error).
    """
    T = check_temperature(T)
    if use_stored and stored.soft is not None and stored.soft_T == T:
        return np.asarray(stored.soft, dtype=np.float32)
    if stored.logits is not None:
        return combine_soft_targets(stored.logits, T, stored.combine, stored.weights)
    if stored.ids is not None:
        from pipeline import topk

        return topk.rebuild(stored.ids, stored.kept, stored.tail, stored.classes, T, stored.combine, stored.weights,
                            stored.spread, stored.prior)
    raise ValueError(f"no logits, no top-k and no soft targets at T={T:g} to take targets from")


def member_outputs(stored) -> np.ndarray:
    """Each member's logits ``[n, members, classes]`` float32 as stored (a top-k row: rebuilt, the tail
    classes at its even value, or as the cache's class prior shares them: :func:`pipeline.topk.member_logits`)."""
    if stored.logits is not None:
        return np.asarray(stored.logits, dtype=np.float32)
    from pipeline import topk

    return topk.member_logits(stored.ids, stored.kept, stored.tail, stored.classes, stored.prior)


def member_predictions(stored) -> np.ndarray:
    """Each member's argmax ``[n, members]`` (int64) of cache rows as stored; a top-k row: the kept class
    of its highest logit, or -1 (a tail class) where the member's even tail logit is higher."""
    if stored.logits is not None:
        return np.asarray(stored.logits).argmax(axis=2)
    kept = np.asarray(stored.kept, dtype=np.float64)
    best = kept.argmax(axis=2)
    pred = np.take_along_axis(np.asarray(stored.ids, dtype=np.int64), best, 1)
    u = np.asarray(stored.tail, dtype=np.float64) - math.log(stored.classes - kept.shape[2])
    return np.where(kept.max(axis=2) >= u, pred, -1)


def looks_like_probabilities(outputs: np.ndarray, atol: float = 1e-3) -> bool:
    """True when every entry is >= 0 and every row (last axis) sums to 1 within ``atol``."""
    x = np.asarray(outputs, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)) or np.any(x < 0):
        return False
    return bool(np.all(np.abs(x.sum(axis=-1) - 1.0) <= atol))


def as_logits(outputs: np.ndarray) -> np.ndarray:
    """Teacher outputs as float32 logits: ``log(p)`` when they are already probabilities.

    ``log(p)`` leaves every tempered softmax unchanged up to the temperature: if p = softmax(v) then
    log p = v - logsumexp(v), a per-row shift, and softmax((v - c) / T) = softmax(v / T) for every T.
    p is floored at the smallest normal float32 so a zero probability gives a finite (~-87.3) logit,
    not -inf; that floor only alters classes whose probability already underflows float32.
    Anything else is returned unchanged (as float32).
    """
    x = np.asarray(outputs)
    if looks_like_probabilities(x):
        return np.log(np.maximum(x.astype(np.float64), _TINY32)).astype(np.float32)
    return x.astype(np.float32, copy=False)


def model_soft_targets(outputs: np.ndarray, T: float = 1.0, combine: str = "arithmetic") -> np.ndarray:
    """Soft targets ``[n, classes]`` from a model's raw outputs: ``[n, classes]`` (one classifier) or
    ``[n, members, classes]`` (an ensemble), probabilities taken as ``log p`` (:func:`as_logits`)."""
    logits = as_logits(outputs)
    return combine_soft_targets(logits[:, None] if logits.ndim == 2 else logits, T, combine)


def diagnostics(member_logits: np.ndarray, soft: np.ndarray, labels: np.ndarray, T: float) -> dict:
    """Teacher diagnostics at temperature T (the attrs of ``/diagnostics/<T>``), all floats.

    mean_entropy_nats: mean over rows of H(soft). teacher_accuracy: argmax(soft) vs labels, over rows
    with label >= 0 (NaN if none). member_disagreement: mean over members of the fraction of rows
    where the member's argmax differs from argmax(soft). ece: expected calibration error of soft,
    15 equal-width confidence bins, labelled rows (NaN if none). argmax does not depend on T, which is
    only validated here; ``soft`` is expected to have been computed at that T.  The whole array is
    one block of :class:`DiagnosticSums`, so streamed and in-memory diagnostics share one formula.
    """
    check_temperature(T)
    logits = np.asarray(member_logits)
    p = np.asarray(soft, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    if logits.ndim != 3 or p.ndim != 2 or logits.shape[0] != p.shape[0] or logits.shape[2] != p.shape[1]:
        raise ValueError(f"shapes do not match: member_logits {logits.shape}, soft {p.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} rows, soft has {p.shape[0]}")
    sums = DiagnosticSums()
    if p.shape[0]:
        sums.add(logits, p, y)
    return sums.result()


class DiagnosticSums:
    """Running sums over blocks of rows from which :func:`diagnostics` is finished exactly, so a
    cache of any size is diagnosed in bounded memory."""

    def __init__(self) -> None:
        self.rows = self.labelled = 0
        self.entropy = self.correct = self.disagree = 0.0
        self.members = 1
        self.gap = np.zeros(ECE_BINS)

    def add(self, member_logits: np.ndarray, soft: np.ndarray, labels: np.ndarray) -> None:
        """One block: members' logits ``[n, M, C]`` (or their argmax ``[n, M]``), targets, labels."""
        # Renormalise the float32 rows and clip: rounding must not push H outside [0, log C].
        p = np.asarray(soft, dtype=np.float64)
        classes = p.shape[1]
        p = p / p.sum(axis=1, keepdims=True)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # 0 log 0 = 0
        self.entropy += float(np.clip(-plogp.sum(axis=1), 0.0, math.log(classes)).sum())
        pred = p.argmax(axis=1)
        self.members = member_logits.shape[1]
        member_pred = member_logits if member_logits.ndim == 2 else member_logits.argmax(axis=2)
        self.disagree += float(np.sum(member_pred != pred[:, None]))
        self.rows += len(p)
        y = np.asarray(labels).astype(np.int64, copy=False)
        keep = y >= 0
        if keep.any():
            correct = (pred[keep] == y[keep]).astype(np.float64)
            conf = p[keep].max(axis=1)
            # Bins (k/15, (k+1)/15]; confidence >= 1/C > 0, so ceil-1 lands in 0..14 (clip guards 0).
            bins = np.clip(np.ceil(conf * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
            # sum_b (n_b/n) |acc_b - conf_b| = (1/n) sum_b |sum_{i in b} (correct_i - conf_i)|: the
            # per-bin sums add across blocks, so ECE is exact when streamed.
            self.gap += np.bincount(bins, weights=correct - conf, minlength=ECE_BINS)
            self.correct += float(correct.sum())
            self.labelled += int(keep.sum())

    def result(self) -> dict[str, float]:
        nan = float("nan")
        if self.rows == 0:
            return {"mean_entropy_nats": nan, "teacher_accuracy": nan, "member_disagreement": nan, "ece": nan}
        lab = self.labelled
        return {
            "mean_entropy_nats": self.entropy / self.rows,
            "teacher_accuracy": self.correct / lab if lab else nan,
            "member_disagreement": self.disagree / (self.rows * self.members),
            "ece": float(np.clip(np.abs(self.gap).sum() / lab, 0.0, 1.0)) if lab else nan,
        }


# --------------------------------------------------------------------- gradients (docs/design.md, the maths)


def soft_term_gradient_exact(z: np.ndarray, v: np.ndarray, T: float) -> np.ndarray:
    """Exact dC/dz of the soft term before the T^2 factor: ``(q - p) / T`` (1-D, float64)."""
    T = check_temperature(T)
    return (_softmax64(z, T) - _softmax64(v, T)) / T


def soft_term_gradient_high_T(z: np.ndarray, v: np.ndarray, T: float) -> np.ndarray:
    """First-order (exp(x) ~ 1 + x) approximation for T large against the logits.

    ``(1/T) * ((1 + z/T)/(N + sum z/T) - (1 + v/T)/(N + sum v/T))``; the 1/T in front is the same
    high T as inside (the seed example divided by the low T, 1.5, instead).
    """
    T = check_temperature(T)
    z = np.asarray(z, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n = z.shape[-1]
    return ((1 + z / T) / (n + z.sum() / T) - (1 + v / T) / (n + v.sum() / T)) / T


def soft_term_gradient_zero_mean(z: np.ndarray, v: np.ndarray, T: float) -> np.ndarray:
    """High-T approximation for zero-mean logits: ``(z_zm - v_zm) / (N T^2)``.

    Both logit vectors are zero-meaned first (the seed example used the raw ones, which is wrong
    whenever the means differ: softmax ignores the mean, this formula would not).
    """
    T = check_temperature(T)
    z = np.asarray(z, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n = z.shape[-1]
    return ((z - z.mean()) - (v - v.mean())) / (n * T * T)
