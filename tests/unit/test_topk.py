"""Top-k soft targets (pipeline/topk.py): the bound on the rebuilt targets holds (hypothesis), the rule is exact
where its docstring says, and the compression keeps what it says."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import soft, topk


def tv(p, q):
    return 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(axis=1)


def exact(logits, T, combine, weights=None):
    """The full target in float64, from the definition (not via the float32 function)."""
    v = np.asarray(logits, np.float64)
    w = np.full(v.shape[1], 1 / v.shape[1]) if weights is None else np.asarray(weights) / np.sum(weights)
    if combine == "geometric":
        g = np.einsum("nmc,m->nc", v, w) / T
        e = np.exp(g - g.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    e = np.exp((v - v.max(2, keepdims=True)) / T)
    return np.einsum("nmc,m->nc", e / e.sum(2, keepdims=True), w)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 12), members=st.integers(1, 4), classes=st.integers(2, 60), k_frac=st.floats(0, 1),
       scale=st.sampled_from([0.1, 1.0, 4.0, 15.0]), T=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0, 20.0, 100.0]),
       combine=st.sampled_from(["arithmetic", "geometric"]), weighted=st.booleans(), seed=st.integers(0, 2**31),
       rule=st.sampled_from(["even", "spread", "prior"]))
def test_the_bound_holds(n, members, classes, k_frac, scale, T, combine, weighted, seed, rule):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (n, members, classes)) * rng.exponential(1, (n, members, 1))
    weights = rng.random(members) + 0.05 if weighted else None
    k = 1 + int(k_frac * (classes - 2))
    ids, kept, tail = topk.compress(logits, k, combine, weights)
    spread = topk.tail_spread(logits, ids, tail, weights) if rule == "spread" else None
    prior = rng.normal(0, 2 * scale, (classes, classes)).astype(np.float32) if rule == "prior" else None
    got = topk.rebuild(ids, kept, tail, classes, T, combine, weights, spread, prior)
    eps = topk.bound(kept, tail, classes, T, combine, weights)
    # float32 storage of kept and tail moves both sides a little: the slack for that rounding
    eta = max(np.max(np.abs(kept - np.take_along_axis(logits, ids[:, None, :].astype(int), 2))), 1e-7 * scale)
    slack = topk.rounding_slack(2 * float(eta) + 2e-6 * np.max(np.abs(logits)), T) + 2e-7  # + float32 output
    assert np.all(tv(exact(logits, T, combine, weights), got) <= eps + slack)
    assert np.all((eps >= 0) & (eps <= 1))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 10), members=st.integers(1, 4), classes=st.integers(3, 40), seed=st.integers(0, 2**31),
       k_frac=st.floats(0, 1))
def test_exact_at_T1_on_the_kept_classes_and_the_tail_mass(n, members, classes, seed, k_frac):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, members, classes))
    k = 1 + int(k_frac * (classes - 2))
    ids, kept, tail = topk.compress(logits, k)
    got = topk.rebuild(ids, kept, tail, classes, 1.0).astype(np.float64)
    want = exact(logits, 1.0, "arithmetic")
    idx = ids.astype(int)
    np.testing.assert_allclose(np.take_along_axis(got, idx, 1), np.take_along_axis(want, idx, 1), atol=2e-6)
    rest = np.ones_like(want, bool)
    np.put_along_axis(rest, idx, False, 1)
    np.testing.assert_allclose((got * rest).sum(1), (want * rest).sum(1), atol=2e-6)  # the tail's total
    # ...spread evenly: every tail class gets the same share
    tails = np.where(rest, got, np.nan)
    assert np.allclose(np.nanmax(tails, 1), np.nanmin(tails, 1), rtol=1e-6, atol=0)


def test_ids_are_the_ensemble_top_k_highest_first_in_the_smallest_type():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (50, 3, 300))
    ids, kept, tail = topk.compress(logits, 7)
    p = soft.combine_soft_targets(logits, 1.0)
    assert ids.dtype == np.uint16 and kept.shape == (50, 3, 7) and tail.shape == (50, 3)
    np.testing.assert_array_equal(ids, np.argsort(-p.astype(np.float64), axis=1, kind="stable")[:, :7])
    assert topk.id_dtype(256) == np.uint8 and topk.id_dtype(257) == np.uint16 and topk.id_dtype(70000) == np.uint32


def test_tail_is_the_log_sum_exp_of_the_rest():
    v = np.array([[[3.0, 1.0, 0.0, -1.0, 2.0]]])
    ids, kept, tail = topk.compress(v, 2)
    assert ids.tolist() == [[0, 4]] and kept.tolist() == [[[3.0, 2.0]]]
    assert tail[0, 0] == pytest.approx(math.log(math.exp(1) + 1 + math.exp(-1)), abs=1e-6)


def test_the_bound_is_not_vacuous_where_mass_is_kept_and_grows_with_T():
    """A peaked teacher: the bound is small at T=1 and grows with T (more tail mass when softer)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (20, 2, 100))
    logits[:, :, 0] += 12
    ids, kept, tail = topk.compress(logits, 5)
    b = [float(topk.bound(kept, tail, 100, T).max()) for T in (1.0, 4.0, 20.0)]
    assert b[0] < 0.01 and b[0] < b[1] < b[2] <= 1


def test_one_kept_class_short_of_all_is_exact_at_every_T():
    """k = C - 1: the tail is one class, so the even spread is the class itself (bound aside, exact)."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (30, 3, 8))
    ids, kept, tail = topk.compress(logits, 7)
    for T in (0.5, 1.0, 4.0, 20.0):
        np.testing.assert_allclose(topk.rebuild(ids, kept, tail, 8, T), exact(logits, T, "arithmetic"), atol=2e-6)


def test_member_logits_rebuilt():
    v = np.array([[[3.0, 1.0, 0.0, -1.0, 2.0]]])
    ids, kept, tail = topk.compress(v, 2)
    m = topk.member_logits(ids, kept, tail, 5)
    u = math.log(math.exp(1) + 1 + math.exp(-1)) - math.log(3)
    np.testing.assert_allclose(m, [[[3.0, u, u, u, 2.0]]], atol=1e-6)


@pytest.mark.parametrize("k", [0, 5, 6])
def test_k_outside_range_is_refused(k):
    with pytest.raises(ValueError, match="k must lie in"):
        topk.compress(np.zeros((2, 1, 5)), k)


def test_tail_of_a_rest_far_below_the_kept_classes():
    """Logits 2000 apart: the rest's share of the softmax underflows, and its log-sum-exp is still exact."""
    v = np.zeros((2, 1, 6))
    v[:, 0, 0] = 2000.0
    v[1, 0, 3] = 1990.0
    ids, kept, tail = topk.compress(v, 1)
    assert ids.tolist() == [[0], [0]]
    assert tail[0, 0] == pytest.approx(math.log(5), abs=1e-6) and tail[1, 0] == pytest.approx(1990.0, abs=1e-3)


def test_the_one_derivation_reads_stored_targets_or_derives_them():
    """pipeline.soft.targets: stored targets at T as they are; else the logits' or the top-k's targets."""
    from pipeline.formats.cache import StoredRows

    rng = np.random.default_rng(3)
    v = rng.normal(0, 2, (6, 2, 9)).astype(np.float16)
    base = StoredRows(9, "arithmetic", (0.75, 0.25))
    full = StoredRows(9, "arithmetic", (0.75, 0.25), logits=v)
    np.testing.assert_array_equal(soft.targets(full, 3.0), soft.combine_soft_targets(v, 3.0, "arithmetic", (3, 1)))
    stored = StoredRows(9, "arithmetic", None, logits=v, soft=np.full((6, 9), 1 / 9, np.float32), soft_T=3.0)
    assert np.all(soft.targets(stored, 3.0) == np.float32(1 / 9))  # read, not recomputed
    np.testing.assert_array_equal(soft.targets(stored, 3.0, use_stored=False), soft.combine_soft_targets(v, 3.0))
    np.testing.assert_array_equal(soft.targets(stored, 2.0), soft.combine_soft_targets(v, 2.0))  # another T
    ids, kept, tail = topk.compress(v.astype(np.float32), 4, "arithmetic", (3, 1))
    k = StoredRows(9, "arithmetic", (0.75, 0.25), ids=ids, kept=kept, tail=tail)
    np.testing.assert_array_equal(soft.targets(k, 2.0), topk.rebuild(ids, kept, tail, 9, 2.0, "arithmetic", (3, 1)))
    with pytest.raises(ValueError, match="no logits, no top-k"):
        soft.targets(base, 1.0)


def test_member_predictions_of_a_top_k_row():
    """A member whose even tail logit is above its kept ones predicts a tail class: -1, never a label."""
    from pipeline.formats.cache import StoredRows

    v = np.array([[[5.0, 1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 3.0, 3.0, 3.0]]])  # member 1's mass is in the tail
    ids, kept, tail = topk.compress(v, 2)
    s = StoredRows(5, "arithmetic", None, ids=ids, kept=kept, tail=tail)
    assert ids.tolist() == [[0, 2]] and soft.member_predictions(s).tolist() == [[0, 2]]
    ids, kept, tail = topk.compress(v, 1)
    s = StoredRows(5, "arithmetic", None, ids=ids, kept=kept, tail=tail)
    assert soft.member_predictions(s).tolist() == [[0, -1]]
    assert soft.member_predictions(StoredRows(5, "arithmetic", None, logits=v)).tolist() == [[0, 2]]


def _tail_mass(p, ids):
    rest = np.ones(p.shape, bool)
    np.put_along_axis(rest, ids.astype(int), False, 1)
    return (np.asarray(p, np.float64) * rest).sum(1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), members=st.integers(1, 3), classes=st.integers(3, 50), k_frac=st.floats(0, 1),
       T=st.sampled_from([1.5, 2.0, 4.0, 20.0]), seed=st.integers(0, 2**31))
def test_the_spread_rule_is_the_even_one_at_T1_and_never_gives_the_tail_more(n, members, classes, k_frac, T, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, members, classes))
    k = 1 + int(k_frac * (classes - 2))
    ids, kept, tail = topk.compress(logits, k)
    spread = topk.tail_spread(logits, ids, tail)
    assert np.all(spread >= 0)
    np.testing.assert_allclose(topk.rebuild(ids, kept, tail, classes, 1.0, spread=spread),
                               topk.rebuild(ids, kept, tail, classes, 1.0), atol=1e-7)
    even, spr = (topk.rebuild(ids, kept, tail, classes, T, spread=s) for s in (None, spread))
    assert np.all(_tail_mass(spr, ids) <= _tail_mass(even, ids) + 1e-6)


def test_the_spread_rule_is_closer_than_the_even_one_on_a_spread_tail():
    """A normal tail (the rule's model), one member, 200 classes, k = 10, at T = 4: the spread rule's tail
    mass within 2% of the true one, and its total variation from the full target within 5% of the least any
    even tail can have (the true tail mass spread evenly), where the even rule's is 20% above it."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (64, 1, 200))
    logits[:, 0, :10] += 8.0
    ids, kept, tail = topk.compress(logits, 10)
    spread = topk.tail_spread(logits, ids, tail)
    full = exact(logits, 4.0, "arithmetic")
    even, spr = (topk.rebuild(ids, kept, tail, 200, 4.0, spread=s) for s in (None, spread))
    np.testing.assert_allclose(_tail_mass(spr, ids), _tail_mass(full, ids), rtol=0.02)
    floor = full.copy()
    rest = np.ones(full.shape, bool)
    np.put_along_axis(rest, ids.astype(int), False, 1)
    floor[rest] = np.repeat(_tail_mass(full, ids) / 190, 190)
    least = tv(full, floor).mean()
    assert tv(full, spr).mean() < 1.05 * least and tv(full, even).mean() > 1.2 * least


def test_spread_is_the_jensen_gap_of_the_rest():
    v = np.array([[[3.0, 1.0, 0.0, -1.0, 2.0]]])
    ids, _, tail = topk.compress(v, 2)  # keeps 0 and 4; the rest 1, 0, -1
    want = math.log(math.exp(1) + 1 + math.exp(-1)) - math.log(3) - 0.0
    assert topk.tail_spread(v, ids, tail)[0] == pytest.approx(want, rel=1e-6)


def test_the_prior_rule_is_exact_at_T1_shares_the_tail_as_the_prior_and_a_zero_prior_is_the_even_rule():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (40, 2, 12))
    ids, kept, tail = topk.compress(logits, 4)
    prior = rng.normal(0, 2, (12, 12)).astype(np.float32)
    m = topk.member_logits(ids, kept, tail, 12, prior).astype(np.float64)
    rest = np.ones((40, 12), bool)
    np.put_along_axis(rest, ids.astype(np.int64), False, 1)
    lse = np.log(np.where(rest[:, None, :], np.exp(m), 0).sum(2))
    np.testing.assert_allclose(lse, tail, atol=1e-5)  # each member's tail log-sum-exp at T = 1, exact
    top = ids[:, 0].astype(np.int64)
    for r in range(40):  # within the tail, the logits differ as the top class's prior row does
        d = m[r, :, rest[r]] - prior[top[r], rest[r]][:, None]
        np.testing.assert_allclose(d - d[0], 0, atol=1e-5)
    p1 = topk.rebuild(ids, kept, tail, 12, 1.0, prior=prior)
    np.testing.assert_allclose(np.where(rest, p1, 0).sum(1), np.where(rest, exact(logits, 1.0, "arithmetic"), 0).sum(1),
                               atol=1e-6)
    for T in (0.5, 1.0, 4.0):
        np.testing.assert_allclose(topk.rebuild(ids, kept, tail, 12, T, prior=np.zeros((12, 12), np.float32)),
                                   topk.rebuild(ids, kept, tail, 12, T), atol=1e-6)


def test_the_class_prior_is_the_mean_log_probability_of_the_rows_each_class_tops():
    v = np.array([[[2.0, 0.0, 1.0]], [[3.0, 1.0, 0.0]], [[0.0, 0.5, 2.0]]])
    ids, _, _ = topk.compress(v, 1)
    got = topk.class_prior(v, ids, 3)
    ls = v[:, 0] - np.log(np.exp(v[:, 0]).sum(1, keepdims=True))
    np.testing.assert_allclose(got, [(ls[0] + ls[1]) / 2, [0, 0, 0], ls[2]], atol=1e-6)  # class 1 tops no row
    assert got.dtype == np.float32


def test_the_prior_rule_recovers_a_tail_the_prior_predicts():
    """Rows whose tail has the same shape for each top class: the prior rule rebuilds it, the spread rule cannot."""
    rng = np.random.default_rng(1)
    shape = rng.normal(0, 2, (10, 10))
    top = rng.integers(0, 10, 500)
    logits = shape[top][:, None, :].copy()
    logits[np.arange(500), 0, top] = 12.0  # the top class well above the rest
    logits += rng.normal(0, 0.1, logits.shape)
    ids, kept, tail = topk.compress(logits, 2)
    prior = topk.class_prior(logits, ids, 10)
    spread = topk.tail_spread(logits, ids, tail)
    full = exact(logits, 4.0, "arithmetic")
    by_prior = tv(full, topk.rebuild(ids, kept, tail, 10, 4.0, prior=prior)).mean()
    by_spread = tv(full, topk.rebuild(ids, kept, tail, 10, 4.0, spread=spread)).mean()
    assert by_prior < 0.25 * by_spread
