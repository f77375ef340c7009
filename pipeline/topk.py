"""Top-k soft targets for many classes: what a top-k cache stores, how targets at any T are rebuilt, and the bound.

**Stored, per row** (an ensemble of M members with logits ``v_m`` over C classes, member weights
``w_m`` summing to 1, equal by default): the ids ``K`` of the k classes (k < C) with the highest
ensemble target at T = 1 (:func:`pipeline.soft.combine_soft_targets`; the members share the ids),
each member's logits at them, ``a_m = v_m[K]``, and each member's log-sum-exp of the rest at T = 1,
``s_m = log sum_{j in R} exp(v_mj)``, where ``R`` is the other ``n = C - k`` classes, and the row's
tail spread ``d`` (below).  At 1000 classes, 3 members and k = 10 in float16: 10 x 2 bytes of ids +
3 x 10 x 2 of logits + 3 x 2 of log-sum-exp + 2 of spread = 88 bytes a row, against 6,000 for
every logit.  Ids shared by the members cost k ids a row, where ids per member would cost M k: at
the same bytes a shared selection keeps more classes.

**Rebuilt at temperature T** (:func:`rebuild`): each member's tail classes get one logit; the members
are then combined as the cache says::

    q_m(T) = softmax([a_m, u_m(T), ..., u_m(T)] / T)            (each member, tail logits even)
    arithmetic: p(T) = sum_m w_m q_m(T)          geometric: p(T) = softmax(sum_m w_m [a_m, u_m(T) ...] / T)

The *spread rule* (the default since the tail's spread is stored, 2 bytes a row): with the row's
spread ``d = sum_m w_m d_m``, ``d_m = s_m - log n - mean_{j in R} v_mj >= 0`` (Jensen's gap between the
tail's log-sum-exp and its mean logit; ``sigma^2 / 2`` when the tail logits are normal with variance
``sigma^2``), ::

    u_m(T) = s_m - log n - d (1 - 1 / max(T, 1))

At T = 1 this is the *even rule*, ``u_m = s_m - log n``, which spreads the member's tail mass at T = 1
evenly over the n classes (as apple/ml-dr's smoothing of its top-k probabilities, but per member and
exact at T = 1); it is what a cache without a stored spread (built before it was) is rebuilt with.
For T > 1 the even rule over-states the tail's tempered mass (Jensen: ``sum_R exp(v_j / T) <= n
exp(u / T)``), more the wider the tail is spread: on the 100-class pairs task at T = 4 and k = 10 it
gives the tail 50% of the target where the full one has 28%.  For one member (``d = d_1``) the
spread rule's tempered tail mass is ``n exp(m / T + d / T^2)`` (``m`` the tail's mean logit), the
normal model's: exact at T = 1, and tending to the true ``log n + m / T`` in the log as T grows.  On
the pairs task at T = 4 and k = 10 it halves the even rule's total-variation error (0.30 -> 0.14, mean
of 5,000 rows; docs/results.md, "Caches that scale").  Only how the mass is shared inside the tail
is lost, by either rule.  For T < 1 both rules are the even one.

The *prior rule* (a cache built with ``--tail-prior-rows N``, its ``tail_rule`` "prior"): the cache also
stores one ``C x C`` table, the *class prior* ``pi`` (:func:`class_prior`): row c is the mean, over a seeded
sample of N transfer rows whose top class (``ids[0]``) is c, of the members' weighted log-probabilities at
T = 1 (zeros where no sampled row tops c).  A row whose top class is c shares each member's tail as the
prior says, its log-sum-exp at T = 1 exact::

    u_mj = pi[c, j] + s_m - log sum_{i in R} exp(pi[c, i])        (j in R; the same logits at every T)

The tail's mass at T then follows from how the prior spreads it, and classes near the top class in the
prior (on the pairs task, (a, b') and (a', b) for (a, b)) keep their share; a row of zeros is the even
rule.  On the 100-class pairs task at k = 10 and T = 4 it cuts the spread rule's mean total variation
from the full targets from 0.078 to 0.050, and the student's accuracy cost from 0.64 to 0.02 points
(docs/results.md, "Caches that scale").  ``C x C`` once a file, in the logits' dtype: 20 KB at 100
classes and 2 MB at 1000 in float16, nothing a row.

**The bound** (:func:`bound`): with ``TV(p, p') = 1/2 sum_c |p_c - p'_c|`` (total variation: the most
that any set of classes can gain or lose), the full target ``p(T)`` and the rebuilt ``p^(T)`` satisfy,
for every row, every T > 0 and any choice of K::

    TV(p(T), p^(T)) <= sum_m w_m eps(a_m, s_m)   (arithmetic),    eps(sum_m w_m a_m, sum_m w_m s_m)   (geometric)
    eps(a, s) = B / (A + B),   A = sum_{i in K} exp(a_i / T),   B = n^max(0, 1 - 1/T) exp(s / T)

so the error is at most the tail's share of the rebuilt target, taken at its largest possible value:
it is small when the kept classes hold the mass at that T, and it grows with T as the tail does.

*Proof.*  (1) One distribution, true tail logits ``v_j`` (j in R), ``b = sum_R exp(v_j / T)``, rebuilt
``b^ = n exp(u / T)``.  On K both are ``exp(a_i / T)`` over their own normaliser, so
``sum_K |p_i - p^_i| = A |1/(A + b) - 1/(A + b^)| = |P - P^|`` with the tail shares ``P = b/(A + b)``,
``P^ = b^/(A + b^)``; on R, ``|p_j - p^_j| <= p_j + p^_j`` sums to ``P + P^``.  So
``2 TV <= |P - P^| + P + P^ = 2 max(P, P^)``.  (2) ``x_j = exp(v_j) > 0`` sum to ``S = exp(s)``: for
T >= 1, ``t -> t^(1/T)`` is concave and ``b = sum x_j^(1/T) <= n (S/n)^(1/T)`` (Jensen), which is
``b^``; for T < 1, ``sum x_j^(1/T) <= (sum x_j)^(1/T) = S^(1/T)`` (an l_p norm is at most the l_1 norm)
and ``b^ = n^(1 - 1/T) S^(1/T) <= S^(1/T)``.  Both are at most B, and ``x -> x/(A + x)`` grows, so
``max(P, P^) <= eps``.  (3) Arithmetic: TV is convex, ``TV(sum w_m q_m, sum w_m q^_m) <= sum w_m TV(q_m,
q^_m)``.  Geometric: the combined logits ``g = sum_m w_m v_m`` are exact on K and rebuilt as
``sum_m w_m u_m`` on R; by Hoelder, ``sum_R prod_m exp(v_mj)^w_m <= prod_m (sum_R exp(v_mj))^w_m``, so
``sum_m w_m s_m`` bounds g's tail log-sum-exp and (1)-(2) apply to g with it (the rebuilt tail value
is at most ``(sum_m w_m s_m - log n)``, as (2) needs).  QED.

The bound holds for the prior rule too: step (1) holds for any share of the rebuilt tail, and step
(2) for any tail whose values at T = 1 sum to ``S`` (the power mean: ``sum x_j^(1/T) <= n^(1 - 1/T)
S^(1/T)`` for T >= 1; the l_p norm for T < 1), which the prior rule's does exactly.

The bound holds for the numbers stored, by any rule (a stored spread is clipped at 0, so it never
raises ``u``); float16 storage rounds them first (its effect is measured in docs/results.md, and
``distill cache verify`` allows for the difference it finds between the stored and re-run values,
the tail's and the spread's added for a tail logit: :func:`rounding_slack`).  ``tests/unit/test_topk.py``
checks the bound on random logits (hypothesis) for both rules, that k = C - 1 and T = 1 behave as
stated, and that the spread rule never gives the tail more than the even one.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline import soft
from pipeline.formats.cache_layout import id_dtype


def _weights(weights, members: int) -> np.ndarray:
    w = soft.normalise_weights(weights, members)
    return np.full(members, 1.0 / members) if w is None else w


def compress(member_logits: np.ndarray, k: int, combine: str = "arithmetic",
             weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids [n, k], kept [n, M, k] float32, tail [n, M] float32)`` of per-member logits ``[n, M, C]``.

    ids: the k classes of highest ensemble target at T = 1, highest first (ties: lower id first);
    kept: each member's logits at them; tail: each member's log-sum-exp over the other classes.
    """
    v = np.asarray(member_logits, dtype=np.float64)
    n, members, classes = v.shape
    if not 1 <= k < classes:
        raise ValueError(f"top-k: k must lie in [1, {classes - 1}] for {classes} classes, got {k}")
    if not np.all(np.isfinite(v)):
        raise ValueError("logits contain NaN or infinity")
    mx = v.max(axis=2, keepdims=True)
    q = np.exp(v - mx)  # each member's softmax at T = 1, once: the ranking and the tail both use it
    z = q.sum(axis=2, keepdims=True)
    q /= z
    if combine == "arithmetic":
        w = soft.normalise_weights(weights, members)
        p = q.mean(axis=1) if w is None else np.einsum("nmc,m->nc", q, w)
    else:
        p = soft.combine_soft_targets(v, 1.0, combine, weights).astype(np.float64)
    part = np.argpartition(-p, k - 1, axis=1)[:, :k]
    # order the k by target, then id: one answer for equal inputs, whatever argpartition returned
    order = np.lexsort((part, -np.take_along_axis(p, part, 1)), axis=1)
    ids = np.take_along_axis(part, order, 1)
    kept = np.take_along_axis(v, ids[:, None, :], 2)
    rest = np.ones(p.shape, bool)
    np.put_along_axis(rest, ids, False, 1)
    # log-sum-exp of the rest: log z + max + log(the rest's share of the softmax), a sum of positive
    # terms (no cancellation); where that share underflows, shifted by the rest's own largest logit
    share = (q * rest[:, None, :]).sum(axis=2)
    tiny = share < 1e-250
    with np.errstate(divide="ignore"):
        tail = (mx + np.log(z))[..., 0] + np.log(share)
    if tiny.any():
        r, m = np.nonzero(tiny)
        vt = np.where(rest[r], v[r, m], -np.inf)
        mt = vt.max(axis=1, keepdims=True)
        tail[r, m] = (mt + np.log(np.exp(np.minimum(vt - mt, 0.0)).sum(axis=1, keepdims=True)))[:, 0]
    return ids.astype(id_dtype(classes)), kept.astype(np.float32), tail.astype(np.float32)


def tail_spread(member_logits: np.ndarray, ids: np.ndarray, tail: np.ndarray, weights=None) -> np.ndarray:
    """The spread rule's ``d`` of each row (float32 ``[n]``): ``sum_m w_m (s_m - log n - mean_R v_m)``,
    the members' Jensen gaps between the log-sum-exp ``tail`` of their logits outside ``ids`` (as
    :func:`compress` returns it) and the mean of those logits."""
    v = np.asarray(member_logits, dtype=np.float64)
    n, members, classes = v.shape
    n_tail = classes - np.shape(ids)[1]
    rest = np.ones((n, classes), bool)
    np.put_along_axis(rest, np.asarray(ids, dtype=np.int64), False, 1)
    mean_rest = np.where(rest[:, None, :], v, 0.0).sum(axis=2) / n_tail
    gap = np.asarray(tail, dtype=np.float64) - math.log(n_tail) - mean_rest
    return np.maximum(gap @ _weights(weights, members), 0.0).astype(np.float32)


def _member_terms(kept: np.ndarray, tail: np.ndarray, classes: int, combine: str, weights, spread=None,
                  T: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept logits [n, G, k], tail logit ``u(T)`` [n, G], mixing weights [G]) of the G distributions
    that are mixed: the M members (arithmetic), or their weighted mean logits (geometric, G = 1); the
    even rule without ``spread``, the spread rule with it."""
    a = np.asarray(kept, dtype=np.float64)
    s = np.asarray(tail, dtype=np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(s))):
        raise ValueError("top-k logits contain NaN or infinity")
    w = _weights(weights, a.shape[1])
    n_tail = classes - a.shape[2]
    if spread is not None:  # the spread rule; clipped at 0 so that rounding never raises u above the even rule
        d = np.maximum(np.asarray(spread, dtype=np.float64), 0.0)
        if not np.all(np.isfinite(d)):
            raise ValueError("top-k spread contains NaN or infinity")
        s = s - (d * (1.0 - 1.0 / max(T, 1.0)))[:, None]
    if combine == "arithmetic":
        return a, s - math.log(n_tail), w
    if combine == "geometric":
        return np.einsum("nmk,m->nk", a, w)[:, None], (s @ w - math.log(n_tail))[:, None], np.ones(1)
    raise ValueError(f"combine must be one of {soft.COMBINES}, got {combine!r}")


def rebuild(ids: np.ndarray, kept: np.ndarray, tail: np.ndarray, classes: int, T: float,
            combine: str = "arithmetic", weights=None, spread=None, prior=None) -> np.ndarray:
    """Soft targets ``[n, classes]`` float32 at T from a top-k row (float64 inside): the prior rule when
    the cache's class ``prior`` is given, else the spread rule when the row's ``spread`` is, else the even rule."""
    T = soft.check_temperature(T)
    if prior is not None:
        return soft.combine_soft_targets(member_logits(ids, kept, tail, classes, prior), T, combine, weights)
    a, u, w = _member_terms(kept, tail, classes, combine, weights, spread, T)
    n_tail = classes - a.shape[2]
    mx = np.maximum(a.max(axis=2), u)[..., None]  # [n, G, 1]: exp never overflows
    ea, eu = np.exp((a - mx) / T), np.exp((u[..., None] - mx) / T)
    z = ea.sum(axis=2, keepdims=True) + n_tail * eu
    p_kept = np.einsum("ngk,g->nk", ea / z, w)
    p_tail = np.einsum("ng,g->n", (eu / z)[..., 0], w)
    out = np.repeat(p_tail[:, None], classes, axis=1)
    np.put_along_axis(out, np.asarray(ids, dtype=np.int64), p_kept, 1)
    return out.astype(np.float32)


def bound(kept: np.ndarray, tail: np.ndarray, classes: int, T: float, combine: str = "arithmetic",
          weights=None) -> np.ndarray:
    """Per row, the module's bound on ``TV(full target, rebuilt target)`` at T (float64 ``[n]``)."""
    T = soft.check_temperature(T)
    a, u, w = _member_terms(kept, tail, classes, combine, weights)
    n_tail = classes - a.shape[2]
    s = u + math.log(n_tail)  # the tail log-sum-exp (the geometric one: sum_m w_m s_m)
    mx = a.max(axis=2)
    log_a = mx / T + np.log(np.exp((a - mx[..., None]) / T).sum(axis=2))
    log_b = max(0.0, 1.0 - 1.0 / T) * math.log(n_tail) + s / T
    # B / (A + B) = 1 / (1 + e^(log A - log B)) = exp(-log(1 + e^(log A - log B))): no overflow, no clip
    eps = np.exp(-np.logaddexp(0.0, log_a - log_b))
    return eps @ w


def member_logits(ids: np.ndarray, kept: np.ndarray, tail: np.ndarray, classes: int,
                  prior: np.ndarray | None = None) -> np.ndarray:
    """Each member's rebuilt logits ``[n, M, classes]`` float32: kept at K, elsewhere ``u_m`` (the even
    rule at T = 1), or with a class ``prior`` ``[classes, classes]`` the prior rule's tail (exact at T = 1)."""
    ids64 = np.asarray(ids, dtype=np.int64)
    s = np.asarray(tail, dtype=np.float64)
    if prior is None:
        out = np.repeat((s - math.log(classes - kept.shape[2]))[..., None], classes, axis=2)
    else:
        pr = np.asarray(prior, dtype=np.float64)[ids64[:, 0]]  # [n, C]: the row's top class's prior
        np.put_along_axis(pr, ids64, -np.inf, 1)  # the tail's classes only
        mx = pr.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(pr - mx).sum(axis=1))
        out = pr[:, None, :] + (s - lse[:, None])[..., None]
    idx = np.broadcast_to(ids64[:, None, :], kept.shape)
    np.put_along_axis(out, idx, np.asarray(kept, dtype=np.float64), 2)
    return out.astype(np.float32)


def class_prior(member_logits: np.ndarray, ids: np.ndarray, classes: int, weights=None) -> np.ndarray:
    """The class prior ``pi`` ``[classes, classes]`` float32 of sampled rows (their per-member logits
    ``[n, M, classes]`` and top-k ``ids`` as :func:`compress` returns them): row c, the mean over the rows
    whose top class is c of ``sum_m w_m log softmax(v_m)``; zeros for a class no row tops."""
    v = np.asarray(member_logits, dtype=np.float64)
    mx = v.max(axis=2, keepdims=True)
    ls = v - mx - np.log(np.exp(v - mx).sum(axis=2, keepdims=True))
    mixed = np.einsum("nmc,m->nc", ls, _weights(weights, v.shape[1]))
    top = np.asarray(ids, dtype=np.int64)[:, 0]
    out = np.zeros((classes, classes))
    np.add.at(out, top, mixed)
    out /= np.maximum(np.bincount(top, minlength=classes), 1)[:, None]
    return out.astype(np.float32)


def rounding_slack(eta: float, T: float) -> float:
    """How much rounding the stored values by at most ``eta`` (logits and log-sum-exp) may move both
    sides of the bound at T: every rebuilt probability moves by a factor within ``exp(+-2 eta / T)``,
    so the rebuilt target by at most ``exp(2 eta / T) - 1`` in TV, and eps (a logistic function of
    ``log B - log A``, each moved by at most ``eta / T``) by at most ``eta / (2 T)``."""
    return math.expm1(2.0 * eta / T) + eta / (2.0 * T)
