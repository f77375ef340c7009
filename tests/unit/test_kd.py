"""Tests of stages/kd.py against DESIGN.md section 4 (Hinton, Vinyals & Dean 2015, arXiv:1503.02531).

Layer 1: seeded numeric checks with hand-computed references (math / numpy, not the module).
Layer 2: hypothesis properties over wide input ranges.
Every tolerance is stated where it is used, with the reason for its size.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline import losses
from pipeline import soft as sm

torch.set_num_threads(1)  # 2-core machine: one thread is faster for these tiny tensors

# The seed notes' worked example (DESIGN.md section 4).
Z = [2.34, 1.64, 4.54, 3.44]
V = [0.06, 0.003, 1.0, 0.6]
N = 4


def _softmax_list(x, T):
    """Independent reference: softmax(x / T) with the math module."""
    m = max(x)
    e = [math.exp((xi - m) / T) for xi in x]
    s = sum(e)
    return [ei / s for ei in e]


# ------------------------------------------------------------------------------ layer 1: numeric


def test_autograd_soft_gradient_is_q_minus_p_over_T():
    # float64 autograd against the closed form; 1e-6 is far above float64 rounding (~1e-16).
    torch.manual_seed(0)
    for T in (0.5, 1.0, 3.0, 20.0):
        z = torch.randn(7, dtype=torch.float64, requires_grad=True)
        v = torch.randn(7, dtype=torch.float64) * 3
        p = torch.softmax(v / T, dim=-1)
        ce = -(p * F.log_softmax(z / T, dim=-1)).sum()  # CE(p_T, q_T), single row, no T^2
        (g_ce,) = torch.autograd.grad(ce, z)
        expected = sm.soft_term_gradient_exact(z.detach().numpy(), v.numpy(), T)
        np.testing.assert_allclose(g_ce.numpy(), expected, atol=1e-6, rtol=0)
        # KL route: kd_loss(alpha=1) is T^2 * KL; its gradient / T^2 is the same (q - p) / T.
        z2 = z.detach().clone().requires_grad_(True)
        loss = losses.kd_loss(z2[None], p[None], torch.tensor([-1]), T=T, alpha=1.0)
        (g_kl,) = torch.autograd.grad(loss, z2)
        np.testing.assert_allclose(g_kl.numpy() / T**2, expected, atol=1e-6, rtol=0)


def test_kd_loss_hand_computed_two_rows():
    # Reference computed with math only; float64 tensors, so 1e-10 covers rounding.
    z = [[1.0, -0.5, 2.0], [0.3, 0.3, -1.2]]
    teacher = [[0.5, 0.0, 1.5], [2.0, -1.0, 0.0]]
    y = [2, 0]
    T, alpha = 2.0, 0.3
    soft_rows, hard_rows = [], []
    for zr, vr, yr in zip(z, teacher, y):
        p = _softmax_list(vr, T)
        q = _softmax_list(zr, T)
        soft_rows.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        hard_rows.append(-math.log(_softmax_list(zr, 1.0)[yr]))
    expected = alpha * T * T * sum(soft_rows) / 2 + (1 - alpha) * sum(hard_rows) / 2
    p_t = torch.tensor([_softmax_list(vr, T) for vr in teacher], dtype=torch.float64)
    got = losses.kd_loss(torch.tensor(z, dtype=torch.float64), p_t, torch.tensor(y), T=T, alpha=alpha)
    assert got.item() == pytest.approx(expected, abs=1e-10)


def test_seed_example_corrected():
    # Exact gradient at the seed's low T = 1.5, checked against math (1e-12: float64 rounding).
    T = 1.5
    q, p = _softmax_list(Z, T), _softmax_list(V, T)
    exact = [(qi - pi) / T for qi, pi in zip(q, p)]
    np.testing.assert_allclose(sm.soft_term_gradient_exact(np.array(Z), np.array(V), T), exact, atol=1e-12)

    # High-T approximation at Th = 5 divides by 5 (the seed divided by T = 1.5: slip 1).
    Th = 5.0
    qh = [(1 + zi / Th) / (N + sum(Z) / Th) for zi in Z]
    ph = [(1 + vi / Th) / (N + sum(V) / Th) for vi in V]
    right = [(a - b) / Th for a, b in zip(qh, ph)]
    seed_slip = [(a - b) / T for a, b in zip(qh, ph)]
    got = sm.soft_term_gradient_high_T(np.array(Z), np.array(V), Th)
    np.testing.assert_allclose(got, right, atol=1e-12)
    assert not np.allclose(got, seed_slip, atol=1e-6)

    # Zero-mean approximation uses the zero-meaned logits (the seed used the raw ones: slip 2).
    zm = [zi - sum(Z) / N for zi in Z]
    vm = [vi - sum(V) / N for vi in V]
    right_zm = [(a - b) / (N * Th**2) for a, b in zip(zm, vm)]
    raw_slip = [(a - b) / (N * Th**2) for a, b in zip(Z, V)]
    got_zm = sm.soft_term_gradient_zero_mean(np.array(Z), np.array(V), Th)
    np.testing.assert_allclose(got_zm, right_zm, atol=1e-12)
    assert not np.allclose(got_zm, raw_slip, atol=1e-6)
    # The right one sums to 0 like the exact gradient (q and p both sum to 1); 1e-15: rounding.
    assert abs(got_zm.sum()) < 1e-15


def _rel_err(approx, exact):
    return np.linalg.norm(approx - exact) / np.linalg.norm(exact)


def test_approximations_converge_monotonically_in_T():
    temps = [2, 5, 10, 20, 50, 100]
    z, v = np.array(Z), np.array(V)
    zz, vv = z - z.mean(), v - v.mean()
    err_high = [_rel_err(sm.soft_term_gradient_high_T(z, v, T), sm.soft_term_gradient_exact(z, v, T))
                for T in temps]
    err_zm = [_rel_err(sm.soft_term_gradient_zero_mean(zz, vv, T), sm.soft_term_gradient_exact(zz, vv, T))
              for T in temps]
    # Strictly decreasing over the whole grid, and small at T = 100 (O(1/T): measured 4.5% / 0.6%).
    assert all(a > b for a, b in zip(err_high, err_high[1:])), err_high
    assert all(a > b for a, b in zip(err_zm, err_zm[1:])), err_zm
    assert err_high[-1] < 0.06 and err_zm[-1] < 0.01
    # The seed's raw-logit slip does not converge at all (error stays > 100%).
    raw_slip = [_rel_err((z - v) / (N * T * T), sm.soft_term_gradient_exact(z, v, T)) for T in temps]
    assert min(raw_slip) > 1.0


def test_T_squared_keeps_gradient_scale():
    z, v = np.array(Z), np.array(V)
    temps = [5, 10, 20, 50]
    norms = np.array([np.linalg.norm(sm.soft_term_gradient_exact(z, v, T)) for T in temps])
    scaled = norms * np.array(temps, dtype=float) ** 2
    # T^2-scaled norms stay within a factor 1.1 of each other (measured spread ~1%).
    assert scaled.max() / scaled.min() < 1.1
    # Unscaled norm falls ~1/T^2: from T=5 to T=50 by ~100x (within a factor 1.1 of that).
    ratio = norms[0] / norms[-1]
    assert 100 / 1.1 < ratio < 100 * 1.1


def test_batchmean_is_mean_of_rows_and_ignores_class_count():
    torch.manual_seed(1)
    n, C, T = 5, 6, 3.0
    z = torch.randn(n, C, dtype=torch.float64)
    p = torch.softmax(torch.randn(n, C, dtype=torch.float64) * 2 / T, dim=-1)
    y = torch.full((n,), -1)
    batch = losses.kd_loss(z, p, y, T=T, alpha=1.0)
    rows = torch.stack([losses.kd_loss(z[i:i + 1], p[i:i + 1], y[i:i + 1], T=T, alpha=1.0) for i in range(n)])
    # float64; 1e-12 covers summation-order rounding.
    assert batch.item() == pytest.approx(rows.mean().item(), abs=1e-12)
    # Same value as kl_div "batchmean" and NOT "mean" (which divides by C as well).
    ref = T * T * F.kl_div(F.log_softmax(z / T, -1), p, reduction="batchmean")
    wrong = ref / C  # what reduction="mean" gives: the total over n * C entries
    assert batch.item() == pytest.approx(ref.item(), abs=1e-12)
    assert abs(batch.item() - wrong.item()) > 0.5 * batch.item()
    # Padding with C extra classes that neither model gives any mass leaves the loss unchanged
    # ("mean" would halve it). -1e4 / T underflows exp to exactly 0 in float64.
    pad = torch.full((n, C), -1e4, dtype=torch.float64)
    p_pad = torch.cat([p, torch.zeros(n, C, dtype=torch.float64)], dim=1)
    padded = losses.kd_loss(torch.cat([z, pad], dim=1), p_pad, y, T=T, alpha=1.0)
    assert padded.item() == pytest.approx(batch.item(), abs=1e-12)


def test_logit_matching_is_high_T_limit_of_kd():
    torch.manual_seed(2)
    n, C = 4, 5
    z0 = torch.randn(n, C, dtype=torch.float64)
    v = torch.randn(n, C, dtype=torch.float64) * 2
    y = torch.full((n,), -1)
    z = z0.clone().requires_grad_(True)
    (g_lm,) = torch.autograd.grad(losses.logit_matching_loss(z, v, y, alpha=1.0), z)
    target = g_lm / C  # chosen scaling: T^2 * dKD/dz -> (1/N) * d(logit matching)/dz
    errs = []
    for T in [5, 10, 20, 50, 100, 1000]:
        z = z0.clone().requires_grad_(True)
        p = torch.softmax(v / T, dim=-1)
        (g_kd,) = torch.autograd.grad(losses.kd_loss(z, p, y, T=T, alpha=1.0), z)  # includes T^2
        errs.append((torch.linalg.norm(g_kd - target) / torch.linalg.norm(target)).item())
    # Monotone O(1/T) convergence; at T = 1000 within 0.5% (logits here are O(1)).
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 5e-3


def test_logit_matching_value_and_shift_invariance():
    z = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 0.0, 3.0]], dtype=torch.float64)
    # zero-meaned: z -> [-1,0,1], v -> [-1,-1,2]; diff [0,1,-1]; 0.5 * 2 = 1 (exact).
    assert losses.logit_matching_loss(z, v, torch.tensor([-1]), alpha=1.0).item() == pytest.approx(1.0, abs=1e-12)
    shifted = losses.logit_matching_loss(z + 7, v - 3, torch.tensor([-1]), alpha=1.0)
    assert shifted.item() == pytest.approx(1.0, abs=1e-12)


def test_unlabelled_rows_are_ignored_by_hard_term():
    torch.manual_seed(3)
    z = torch.randn(4, 3, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 3, dtype=torch.float64), dim=-1)
    y = torch.tensor([2, -1, 0, -1])
    # alpha = 0: only the hard term, averaged over the 2 labelled rows (1e-12: float64 rounding).
    got = losses.kd_loss(z, p, y, T=2.0, alpha=0.0)
    assert got.item() == pytest.approx(F.cross_entropy(z[[0, 2]], y[[0, 2]]).item(), abs=1e-12)
    # Changing the logits of unlabelled rows does not change the hard term.
    z2 = z.clone()
    z2[[1, 3]] += torch.randn(2, 3, dtype=torch.float64) * 5
    assert losses.kd_loss(z2, p, y, T=2.0, alpha=0.0).item() == pytest.approx(got.item(), abs=1e-12)
    # Same for logit matching's hard term.
    assert losses.logit_matching_loss(z2, z2, y, alpha=0.0).item() == pytest.approx(got.item(), abs=1e-12)
    # No labelled row: the hard term is 0 and backward still works (zero gradient).
    zz = z.clone().requires_grad_(True)
    loss = losses.kd_loss(zz, p, torch.full((4,), -1), T=2.0, alpha=0.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(zz.grad == 0)
    # alpha = 0.5 with no labels: just half the soft term.
    half = losses.kd_loss(z, p, torch.full((4,), -1), T=2.0, alpha=0.5)
    full = losses.kd_loss(z, p, torch.full((4,), -1), T=2.0, alpha=1.0)
    assert half.item() == pytest.approx(0.5 * full.item(), abs=1e-12)


def test_alpha_zero_is_plain_cross_entropy_and_skips_soft_term():
    torch.manual_seed(4)
    z = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    garbage = torch.full((6, 4), float("nan"))  # soft term skipped entirely, so NaN cannot leak in
    got = losses.kd_loss(z, garbage, y, T=4.0, alpha=0.0)
    # float32 inputs, same ops: 1e-6 relative.
    assert got.item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    # alpha = 1 skips the hard term: out-of-range labels would make cross_entropy raise.
    p = torch.softmax(torch.randn(6, 4), dim=-1)
    losses.kd_loss(z, p, torch.full((6,), 99), T=4.0, alpha=1.0)


@pytest.mark.parametrize("T", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_temperature_raises(T):
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        losses.kd_loss(z, torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), T=T, alpha=0.5)
    with pytest.raises(ValueError):
        sm.tempered_softmax(np.zeros((2, 3)), T)
    with pytest.raises(ValueError):
        sm.combine_soft_targets(np.zeros((2, 2, 3)), T)


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan")])
def test_invalid_alpha_raises(alpha):
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        losses.kd_loss(z, torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), T=2.0, alpha=alpha)
    with pytest.raises(ValueError):
        losses.logit_matching_loss(z, z, torch.tensor([0, 1]), alpha=alpha)


def test_combine_arithmetic_differs_from_geometric():
    # One confident member, one flat: the mean of distributions is not softmax of the mean logits.
    logits = np.array([[[10.0, 0.0], [0.0, 0.0]]])
    ar = sm.combine_soft_targets(logits, 1.0, "arithmetic")
    ge = sm.combine_soft_targets(logits, 1.0, "geometric")
    a = 0.5 * (1 / (1 + math.exp(-10)) + 0.5)
    g = 1 / (1 + math.exp(-5))
    np.testing.assert_allclose(ar[0], [a, 1 - a], atol=1e-7)  # float32 output
    np.testing.assert_allclose(ge[0], [g, 1 - g], atol=1e-7)
    with pytest.raises(ValueError):
        sm.combine_soft_targets(logits, 1.0, "harmonic")


def test_as_logits_and_probability_detection():
    p = np.array([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]], dtype=np.float32)
    assert sm.looks_like_probabilities(p)
    out = sm.as_logits(p)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))  # p = 0 floored, no -inf
    logits = np.array([[1.0, -2.0, 3.0]], dtype=np.float32)
    assert not sm.looks_like_probabilities(logits)
    np.testing.assert_array_equal(sm.as_logits(logits), logits)  # non-probabilities pass through
    assert not sm.looks_like_probabilities(np.array([[0.5, 0.49]]), atol=1e-3)


def test_diagnostics_hand_example():
    # 3 rows, 2 members, 2 classes.
    logits = np.array([[[3, 0], [2, 0]], [[0, 1], [1, 0]], [[0, 3], [0, 2]]], dtype=np.float32)
    soft = sm.combine_soft_targets(logits, 1.0)
    labels = np.array([0, 0, -1])
    d = sm.diagnostics(logits, soft, labels, 1.0)
    p = soft.astype(np.float64)
    ent = -(p * np.log(p)).sum(1).mean()
    assert d["mean_entropy_nats"] == pytest.approx(ent, abs=1e-6)  # float32 soft, float64 maths
    # Row 1 is an exact tie (members [0,1] and [1,0]); argmax picks class 0 everywhere alike.
    pred = p.argmax(1)
    assert d["teacher_accuracy"] == pytest.approx(np.mean(pred[:2] == [0, 0]))
    member_pred = logits.argmax(2)
    assert d["member_disagreement"] == pytest.approx(np.mean(member_pred != pred[:, None]))
    conf = p.max(1)[:2]
    correct = (pred[:2] == [0, 0]).astype(float)
    # Reference ECE with an explicit loop over the 15 bins (lo, hi].
    ece = 0.0
    for b in range(15):
        m = (conf > b / 15) & (conf <= (b + 1) / 15)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    assert d["ece"] == pytest.approx(ece, abs=1e-6)
    none = sm.diagnostics(logits, soft, np.full(3, -1), 1.0)
    assert math.isnan(none["teacher_accuracy"]) and math.isnan(none["ece"])
    assert all(isinstance(x, float) for x in d.values())


# --------------------------------------------------------------------------- layer 2: properties

# float32 logits anywhere in the finite float32 range (|x| <= 3e38), T over six decades.
_BIG32 = float(np.float32(3e38))
_wide_logits = arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(2, 6)),
    elements=st.floats(-_BIG32, _BIG32, width=32, allow_nan=False, allow_infinity=False),
)
_temps = st.floats(1e-3, 1e3, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(_wide_logits, _temps, st.sampled_from(sm.COMBINES))
def test_soft_targets_are_distributions(logits, T, combine):
    out = sm.combine_soft_targets(logits, T, combine)
    assert out.shape == (logits.shape[0], logits.shape[2]) and out.dtype == np.float32
    assert not np.isnan(out).any()
    assert (out >= 0).all()
    # Rows sum to 1 within 1e-5 (float32 rounding of <= 6 entries is ~1e-7).
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    single = sm.tempered_softmax(logits, T)
    assert not np.isnan(single).any()
    np.testing.assert_allclose(single.sum(axis=-1), 1.0, atol=1e-5)


_moderate = st.floats(-30, 30, allow_nan=False)


@st.composite
def _kd_batch(draw):
    n = draw(st.integers(1, 5))
    C = draw(st.integers(2, 6))
    z = draw(arrays(np.float64, (n, C), elements=_moderate))
    v = draw(arrays(np.float64, (n, C), elements=_moderate))
    y = draw(arrays(np.int64, (n,), elements=st.integers(-1, C - 1)))
    return z, v, y


@settings(max_examples=80, deadline=None)
@given(_kd_batch(), st.floats(0.1, 100), st.floats(0.0, 1.0))
def test_kd_loss_nonnegative_and_zero_at_match(batch, T, alpha):
    z, v, y = (torch.from_numpy(a) for a in batch)
    p = torch.softmax(v / T, dim=-1)  # float64 soft targets
    # KL >= 0 and CE >= 0; -1e-6 allows float64 rounding times T^2 <= 1e4.
    assert losses.kd_loss(z, p, y, T=T, alpha=alpha).item() >= -1e-6
    # Soft targets equal to the student's own q_T: the soft term vanishes (< 1e-6 after T^2).
    match = torch.softmax(z / T, dim=-1)
    assert abs(losses.kd_loss(z, match, y, T=T, alpha=1.0).item()) < 1e-6


@settings(max_examples=80, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 6)), elements=st.floats(-20, 20)),
       st.floats(0.1, 100))
def test_as_logits_preserves_tempered_softmax(v, T):
    # Logits in [-20, 20]: softmax entries stay >= e^-40, far above float32's tiny, so no flooring.
    p = sm.tempered_softmax(v, 1.0)
    assert sm.looks_like_probabilities(p)
    got = sm.tempered_softmax(sm.as_logits(p), T)
    want = sm.tempered_softmax(v, T)
    # Within 1e-5: float32 rounding of p (~6e-8 relative) amplified by 1/T <= 10 in the exponent.
    np.testing.assert_allclose(got, want, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 3), st.integers(2, 6)),
              elements=st.floats(-50, 50, width=32)),
       st.floats(0.1, 20), st.data())
def test_diagnostics_ranges(logits, T, data):
    n, _, C = logits.shape
    labels = data.draw(arrays(np.int64, (n,), elements=st.integers(-1, C - 1)))
    soft = sm.combine_soft_targets(logits, T)
    d = sm.diagnostics(logits, soft, labels, T)
    # Entropy in [0, log C] exactly (the module clips float32 rounding).
    assert 0.0 <= d["mean_entropy_nats"] <= math.log(C)
    assert 0.0 <= d["member_disagreement"] <= 1.0
    if (labels >= 0).any():
        assert 0.0 <= d["ece"] <= 1.0
        assert 0.0 <= d["teacher_accuracy"] <= 1.0
    else:
        assert math.isnan(d["ece"]) and math.isnan(d["teacher_accuracy"])


# ----------------------------------------------------------------- the tail bucket (top-k caches)

def _bucket_reference(z, p, tail, T):
    """KL over the kept classes and the tail as one outcome, in float64 numpy (no torch)."""
    q = np.exp(z / T) / np.exp(z / T).sum(1, keepdims=True)
    out = 0.0
    for pr, qr, tr in zip(p, q, tail):
        kl = sum(a * math.log(a / b) for a, b in zip(pr[~tr], qr[~tr]) if a > 0)
        P, Q = pr[tr].sum(), qr[tr].sum()
        out += kl + (P * math.log(P / Q) if P > 0 else 0.0)
    return out / len(p)


def test_tail_bucket_loss_hand_computed_and_its_gradient():
    z = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.3, 0.1, 1.2, -0.4]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.25, 0.05, 0.5, 0.2]], dtype=torch.float64)
    tail = torch.tensor([[False, False, True, True], [True, False, False, True]])
    y = torch.tensor([0, 2])
    T = 2.0
    loss = losses.kd_loss(z, p, y, T=T, alpha=1.0, tail=tail)
    want = _bucket_reference(z.detach().numpy(), p.numpy(), tail.numpy(), T)
    assert abs(loss.item() - T * T * want) < 1e-12  # float64 throughout
    loss.backward()
    # d/dz_i of T^2 KL_bucket / n = (T / n) (q_i - p_i) on kept, (T / n) q_j (1 - P / Q) on the tail
    q = torch.softmax(z.detach() / T, dim=-1)
    P = (p * tail).sum(1, keepdim=True)
    Q = (q * tail).sum(1, keepdim=True)
    g = torch.where(tail, q * (1 - P / Q), q - p) * T / len(p)
    torch.testing.assert_close(z.grad, g, rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(_kd_batch(), st.floats(0.5, 20), st.data())
def test_tail_bucket_is_at_most_the_full_kl_and_equal_with_one_tail_class(batch, T, data):
    z, v, y = (torch.from_numpy(a) for a in batch)
    p = torch.softmax(v / T, dim=-1)
    n, C = p.shape
    tail = torch.from_numpy(data.draw(arrays(np.bool_, (n, C))))
    full = losses.kd_loss(z, p, y, T=T, alpha=1.0).item()
    bucket = losses.kd_loss(z, p, y, T=T, alpha=1.0, tail=tail).item()
    # merging outcomes never raises a KL (the data-processing inequality); float64 rounding x T^2 <= 400
    assert -1e-9 <= bucket <= full + 1e-9 * max(1.0, full)
    one = torch.zeros(n, C, dtype=torch.bool)
    one[:, -1] = True  # k = C - 1: the bucket is one class
    assert abs(losses.kd_loss(z, p, y, T=T, alpha=1.0, tail=one).item() - full) <= 1e-9 * max(1.0, full)
    none = torch.zeros(n, C, dtype=torch.bool)  # no tail: the full KL
    assert abs(losses.kd_loss(z, p, y, T=T, alpha=1.0, tail=none).item() - full) <= 1e-9 * max(1.0, full)
