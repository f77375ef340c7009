"""The student's mixup of rows and soft targets (pipeline.augment.mix_rows): properties that hold
for any batch, and its settings' checks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import augment
from pipeline.errors import UsageError
from stages.student.settings import StudentConfig


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    t = torch.softmax(torch.randn(n, 5, generator=g), dim=1)
    return x, t


def test_p_zero_returns_the_batch_and_draws_nothing():
    x, t = _batch(8, 0)
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    xm, tm = augment.mix_rows(x, t, 0.0, g)
    assert xm is x and tm is t
    assert torch.equal(g.get_state(), before)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), p=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1))
def test_rows_and_targets_are_mixed_by_the_same_weight(n, p, seed):
    """Any linear map of the rows commutes with the mixing (one lam and one partner per row for x and
    t alike), and targets stay distributions (the weights' range: the test below)."""
    x, _ = _batch(n, seed)
    w = torch.randn(16, 5, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    x = x.double()
    t = x.reshape(n, -1) @ w  # a target linear in the row: its mix must be the mixed row's image
    xm, tm = augment.mix_rows(x, t, p, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(xm.reshape(n, -1) @ w, tm, rtol=1e-9, atol=1e-9)
    _, prob = _batch(n, seed)
    _, pm = augment.mix_rows(x, prob, p, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(pm.sum(1), torch.ones(n), rtol=0, atol=1e-6)
    assert bool((pm >= 0).all())


def test_a_fraction_p_of_rows_is_mixed_with_weights_up_to_one_half():
    n = 20000
    x = torch.zeros(n, 1)
    t = torch.zeros(n, 2)
    x[: n // 2] = 1.0  # half the rows 1, half 0: a mixed row moves by lam exactly when its partner differs
    xm, _ = augment.mix_rows(x, t, 0.3, torch.Generator().manual_seed(0))
    moved = (xm - x).abs().squeeze(1)
    lam = moved[moved > 0]
    assert abs(len(lam) / n - 0.3 * 0.5) < 0.01  # p, times the chance that the partner differs
    assert float(lam.max()) <= 0.5 and abs(float(lam.mean()) - 0.25) < 0.01  # U(0, 1/2)


def test_same_generator_same_mix():
    x, t = _batch(32, 3)
    a = augment.mix_rows(x, t, 0.5, torch.Generator().manual_seed(7))
    b = augment.mix_rows(x, t, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kw, message", [
    (dict(mixup=1.5), "mixup must lie in"),
    (dict(mixup=0.5, objective="logits"), "needs objective kd"),
    (dict(mixup=0.5, topk_tail="bucket"), "needs objective kd"),
])
def test_bad_mixup_settings_are_usage_errors(kw, message):
    with pytest.raises(UsageError, match=message):
        StudentConfig(**kw)
