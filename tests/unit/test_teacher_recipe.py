"""The strong teachers' pieces: the ``res`` spec and network (ResNet, He et al. 2016), horizontal flips and
random erasing (Zhong et al. 2020), against hand-computed values and properties."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import augment, macs, models
from pipeline.errors import UsageError
from pipeline.specs import parse_spec


# ---------------------------------------------------------------- the res spec and network
def test_res_spec_grammar():
    s = parse_spec("res:16x3-32x3-64x3")
    assert (s.kind, s.widths, s.depths, s.strides, s.dropout) == ("res", (16, 32, 64), (3, 3, 3), (1, 2, 2), 0.0)
    assert parse_spec("res:8x1:dropout=0.2").depths == (1,) and parse_spec("res:8x2").convolutional
    assert parse_spec("conv:8/2-16").depths == ()  # the other kinds have no stages


@pytest.mark.parametrize("bad", ["res:", "res:16", "res:16x0", "res:16x-1", "res:16x3/2", "res:x3", "res:16x3-32",
                                 "conv:16x3", "res:16x3:depth=2"])
def test_bad_res_specs_are_one_line_usage_errors(bad):
    with pytest.raises(UsageError) as e:
        parse_spec(bad)
    assert repr(bad) in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


def _resnet20_weights() -> int:
    """ResNet-20 on one channel and 10 classes, counted by hand: 3x3 convs (no bias), BN (2 per channel),
    two 1x1 projections (16->32, 32->64) with BN, and the classifier."""
    conv = lambda cin, cout, k=3: cin * cout * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    stem = conv(1, 16) + bn(16)
    stage1 = 3 * (2 * conv(16, 16) + 2 * bn(16))
    stage2 = conv(16, 32) + conv(32, 32) + 2 * bn(32) + 2 * (2 * conv(32, 32) + 2 * bn(32)) + conv(16, 32, 1) + bn(32)
    stage3 = conv(32, 64) + conv(64, 64) + 2 * bn(64) + 2 * (2 * conv(64, 64) + 2 * bn(64)) + conv(32, 64, 1) + bn(64)
    return stem + stage1 + stage2 + stage3 + 64 * 10 + 10


def test_resnet20_has_he_et_al_s_shape():
    net = models.build("res:16x3-32x3-64x3", (1, 28, 28), 10)
    assert models.count_parameters(net) == _resnet20_weights() == 272_186
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # 28 -> 14 -> 7 pixels; 19 convs 3x3 + 2 projections: MACs of each layer by hand
    by_hand = (28 * 28 * 16 * 9 + 6 * 28 * 28 * 16 * 16 * 9 + 14 * 14 * 32 * 16 * 9 + 5 * 14 * 14 * 32 * 32 * 9
               + 14 * 14 * 32 * 16 + 7 * 7 * 64 * 32 * 9 + 5 * 7 * 7 * 64 * 64 * 9 + 7 * 7 * 64 * 32 + 640)
    assert macs.count_macs(net, (1, 28, 28)) == by_hand


def test_res_batchnorm_folds_exactly():
    torch.manual_seed(0)
    net = models.build("res:4x2-8x1", (3, 9, 9), 5)
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    net.eval()
    folded = models.fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 9, 9)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)  # float32 round-off


# ---------------------------------------------------------------- flips
def test_hflip_at_zero_and_one():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    g = torch.Generator().manual_seed(0)
    assert augment.hflip(x, 0.0, g) is x
    torch.testing.assert_close(augment.hflip(x, 1.0, g), x.flip(-1), rtol=0, atol=0)


def test_hflip_flips_a_fraction_p_of_images_and_moves_nothing_else():
    x = torch.randn(4000, 1, 3, 3)
    out = augment.hflip(x, 0.3, torch.Generator().manual_seed(1))
    flipped = (out != x).flatten(1).any(1)
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    assert abs(flipped.float().mean().item() - 0.3) < 0.03  # 4000 draws: sd 0.007


# ---------------------------------------------------------------- random erasing
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(4, 32), st.integers(4, 32), st.integers(0, 2**31 - 1))
def test_erase_fills_one_rectangle_per_image_with_values_in_range(c, h, w, seed):
    x = torch.full((16, c, h, w), 7.0)
    low, high = torch.tensor([-1.0, -2.0, 0.0][:c]), torch.tensor([1.0, 0.5, 3.0][:c])
    out = augment.erase(x, 1.0, torch.Generator().manual_seed(seed), low, high)
    for img in out:
        hit = img != 7.0
        assert torch.equal(hit, hit[:1].expand_as(hit)) or not hit.any(), "every channel erased alike"
        rows, cols = hit[0].any(1).nonzero().flatten(), hit[0].any(0).nonzero().flatten()
        if len(rows):  # one solid rectangle (a fill value equal to 7 has probability 0)
            assert hit[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
            area = len(rows) * len(cols)
            assert area <= round(0.4 * h * w * 3.4) + h + w  # clipped to the image: at most s_h * r-rounding
        vals = img[hit.expand_as(img)].view(c, -1) if hit.any() else torch.zeros(c, 0)
        assert ((vals >= low.view(c, 1)) & (vals <= high.view(c, 1))).all()


def test_erase_area_follows_zhong_et_al_s_range():
    """Unclipped rectangles (a 100x100 image leaves room for most) cover 2-40% of the image, 21% on average."""
    x = torch.zeros(3000, 1, 100, 100)
    out = augment.erase(x, 1.0, torch.Generator().manual_seed(3), -1.0, -0.5)
    frac = (out != 0).flatten(1).float().mean(1)
    assert frac.min() >= 0.015 and frac.max() <= 0.41
    assert abs(frac.mean().item() - 0.21) < 0.02


def test_erase_probability_and_determinism():
    x = torch.zeros(2000, 8, 8)  # [B, H, W] images work too
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = augment.erase(x, 0.5, g1, 1.0, 2.0), augment.erase(x, 0.5, g2, 1.0, 2.0)
    assert torch.equal(a, b) and a.shape == x.shape
    assert abs((a != 0).flatten(1).any(1).float().mean().item() - 0.5) < 0.04
    assert augment.erase(x, 0.0, g1, 1.0, 2.0) is x
