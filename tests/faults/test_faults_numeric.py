"""Case 9: property tests (hypothesis) of the numeric core, beyond tests/test_kd.py.

test_kd.py already has: soft targets are distributions for float32 logits anywhere in the finite
range and T in [1e-3, 1e3]; kd_loss >= 0 and 0 at a match for moderate logits.  Added here:
temperatures over thirty-three decades (from the floor ``pipeline.soft.T_MIN`` up) and float64 logits
near the float64 limit; loss finiteness (neither
NaN nor inf from overflow) for huge float32 student logits; "zero *only* when student and teacher agree", as
Pinsker's inequality KL >= 1/2 ||p - q||_1^2; the same for the logit-matching loss.
"""
import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline import losses
from pipeline import soft as sm

_shape = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(2, 6))
_F32_1E30 = float(np.float32(1e30))
_T_any = st.floats(sm.T_MIN, 1e30, allow_nan=False, allow_infinity=False)


@settings(max_examples=80, deadline=None)
@given(arrays(np.float64, _shape, elements=st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)),
       _T_any, st.sampled_from(sm.COMBINES))
def test_soft_targets_are_distributions_for_any_T_and_float64_logits(logits, T, combine):
    out = sm.combine_soft_targets(logits, T, combine)
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, _shape, elements=st.floats(-_F32_1E30, _F32_1E30, width=32)), _T_any)
def test_tempered_softmax_extremes(logits, T):
    out = sm.tempered_softmax(logits, T)
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)


@st.composite
def _batch(draw, scale, dtype):
    n, C = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    scale = float(np.float32(scale)) if dtype == np.float32 else scale
    el = st.floats(-scale, scale, allow_nan=False, width=32 if dtype == np.float32 else 64)
    z = draw(arrays(dtype, (n, C), elements=el))
    v = draw(arrays(dtype, (n, C), elements=el))
    y = draw(arrays(np.int64, (n,), elements=st.integers(-1, C - 1)))
    return torch.from_numpy(z), torch.from_numpy(v), torch.from_numpy(y)


_CORNER = (torch.tensor([[_F32_1E30, -_F32_1E30, 0.0], [-_F32_1E30, _F32_1E30, 1.0]]),
           torch.tensor([[-_F32_1E30, _F32_1E30, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 2]))


@settings(max_examples=80, deadline=None)
@given(_batch(1e30, np.float32), st.floats(1e-3, 1e3), st.floats(0.0, 1.0))
@example(_CORNER, 1e-3, 0.5)  # the corners of the range, always tried: the student's softmax underflows
@example(_CORNER, 1e3, 1.0)   # to exact zeros, and T^2 * KL is then ~2e33, still a float32
@example(_CORNER, 1.0, 0.0)
def test_kd_loss_is_finite_for_huge_float32_logits(batch, T, alpha):
    z, v, y = batch
    p = torch.from_numpy(sm.combine_soft_targets(v.numpy()[:, None, :], T))
    loss = losses.kd_loss(z, p, y, T=T, alpha=alpha)
    assert torch.isfinite(loss), loss  # neither NaN nor +-inf (an overflow to inf is no loss to train on)
    assert loss.item() >= -1e-4 * max(1.0, T * T)  # float32 rounding, scaled by the T^2 factor


@settings(max_examples=80, deadline=None)
@given(_batch(50.0, np.float64), st.floats(0.05, 100))
def test_kd_soft_term_is_zero_only_when_distributions_agree(batch, T):
    z, v, y = batch
    p = torch.softmax(v / T, dim=-1)
    q = torch.softmax(z / T, dim=-1)
    kl = losses.kd_loss(z, p, y, T=T, alpha=1.0).item() / (T * T)  # batchmean KL(p || q_T)
    pinsker = 0.5 * float(((p - q).abs().sum(-1) ** 2).mean())
    assert kl >= pinsker - 1e-9  # so kl == 0 forces p == q_T, and kl > 0 whenever they differ
    hard = losses.kd_loss(z, p, y, T=T, alpha=0.0).item()
    assert hard >= 0.0


@settings(max_examples=60, deadline=None)
@given(_batch(1e3, np.float64), st.floats(-1e3, 1e3), st.floats(0.0, 1.0))
def test_logit_matching_zero_only_up_to_a_shift(batch, shift, alpha):
    z, v, y = batch
    assert losses.logit_matching_loss(z, v, y, alpha=1.0).item() >= 0
    assert abs(losses.logit_matching_loss(z, z + shift, y, alpha=1.0).item()) < 1e-9 * max(1.0, abs(shift)) ** 2
    zc, vc = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    expected = 0.5 * float(((zc - vc) ** 2).sum(-1).mean())
    assert abs(losses.logit_matching_loss(z, v, y, alpha=1.0).item() - expected) <= 1e-9 * max(1.0, expected)
