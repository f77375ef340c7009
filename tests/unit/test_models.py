"""Spec grammar, networks built from specs, multiply-accumulates against hand-computed values, and the
exact rewrites the export applies to a network (batch norm, channels-last flatten, raw pixels)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import macs, models
from pipeline.errors import UsageError
from pipeline.jitter import jitter
from pipeline.specs import parse_spec
from stages.export import graph


# ---------------------------------------------------------------- grammar
def test_spec_grammar():
    s = parse_spec("dws:16-32/2-64/2:dropout=0.1")
    assert (s.kind, s.widths, s.strides, s.dropout) == ("dws", (16, 32, 64), (1, 2, 2), 0.1)
    assert parse_spec("mlp:800-800").strides == (1, 1) and not parse_spec("mlp:64").convolutional
    assert parse_spec("conv:24/2").widths == (24,) and parse_spec("cnn:32-64-128").convolutional


@pytest.mark.parametrize("bad", ["dws:16", "mlp:16/2", "cnn:8-16/2-32", "conv:16/3", "conv:", "conv:0",
                                 "conv:16/", "dws:16-32:drop=0.1", "resnet:18", "cnn:8-16"])
def test_bad_specs_are_one_line_usage_errors(bad):
    with pytest.raises(UsageError) as e:
        parse_spec(bad)
    assert bad in str(e.value) and "\n" not in str(e.value)


def test_any_channel_count_and_odd_sizes():
    net = models.build("dws:8-16/2-32/2", (3, 9, 9), 4)
    assert net(torch.zeros(2, 3, 9, 9)).shape == (2, 4)  # 9 -> 5 -> 3 pixels, pooled over 3x3
    assert models.build("cnn:4-8-8", (3, 12, 12), 5)(torch.zeros(1, 3, 12, 12)).shape == (1, 5)
    with pytest.raises(UsageError, match="at least 4x4"):
        models.build("cnn:4-8-8", (1, 3, 3), 5)
    with pytest.raises(UsageError, match=r"\[channels, height, width\]"):
        models.build("conv:8", (28, 28), 10)


# ---------------------------------------------------------------- multiply-accumulates
@pytest.mark.parametrize("spec, shape, expected", [
    # 784*64 + 64*10
    ("mlp:64", (1, 28, 28), 50_816),
    # conv 28*28*16*1*9 + conv 14*14*32*16*9 + fc 1568*32 + 32*10
    ("cnn:16-32-32", (1, 28, 28), 112_896 + 903_168 + 50_176 + 320),
    # stem 28*28*16*9; dw 14*14*16*9 + pw 14*14*32*16; dw 7*7*32*9 + pw 7*7*64*32; dw 4*4*64*9 + pw 4*4*128*64; fc
    ("dws:16-32/2-64/2-128/2", (1, 28, 28),
     112_896 + 28_224 + 100_352 + 14_112 + 100_352 + 9_216 + 131_072 + 1_280),
    # 9x9x3 -> 5x5x8 (5*5*8*3*9) -> 3x3x16 (3*3*16*8*9) -> fc 16*10
    ("conv:8/2-16/2", (3, 9, 9), 5_400 + 10_368 + 160),
])
def test_macs_by_hand(spec, shape, expected):
    assert macs.count_macs(models.build(spec, shape, 10), shape) == expected


def test_depthwise_costs_one_filter_per_channel():
    layers = dict(macs.layer_macs(models.build("dws:4-8", (2, 5, 5), 3), (2, 5, 5)))
    assert layers["3"] == 5 * 5 * 4 * 9 and layers["6"] == 5 * 5 * 8 * 4  # depthwise, then pointwise


# ---------------------------------------------------------------- exact rewrites of the exported network
def _with_bn_statistics(spec: str, shape, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = models.build(spec, shape, 5)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics far from the identity
            m.running_mean.normal_()
            m.running_var.uniform_(0.2, 3.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.eval()


@pytest.mark.parametrize("spec", ["conv:8-16/2", "dws:8-16/2-16/2", "cnn:4-8-8"])
def test_batchnorm_folds_into_the_convolution(spec):
    net = _with_bn_statistics(spec, (3, 12, 12), 0)
    folded = models.fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    assert bns == {"conv": 2, "dws": 5, "cnn": 0}[spec.split(":")[0]]


def test_channels_last_flatten_is_a_permutation():
    net = _with_bn_statistics("cnn:4-8-8", (2, 12, 12), 1)
    nhwc = graph.channels_last_flatten(net, (2, 12, 12))
    assert isinstance(nhwc[6], graph._ChannelsLastFlatten)
    x = torch.randn(4, 2, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), net(x), rtol=1e-5, atol=1e-6)
    mlp = models.build("mlp:8", (1, 4, 4), 3)
    assert graph.channels_last_flatten(mlp, (1, 4, 4)) is mlp  # nothing to permute


@given(scale=st.floats(1.0, 255.0), seed=st.integers(0, 99), per_channel=st.booleans())
@settings(max_examples=20, deadline=None)
def test_pixel_scale_folds_into_the_first_conv_padding_included(scale, seed, per_channel):
    """conv_W((p / scale - mean) / std) == conv_W'(p - mean * scale), zero padding included, for a
    scalar or a per-channel normalisation of three channels."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(-1, 1, 3 if per_channel else 1).astype(np.float32)
    std = rng.uniform(0.05, 2, 3 if per_channel else 1).astype(np.float32)
    net = _with_bn_statistics("conv:4-8/2", (3, 7, 7), seed)
    explicit = graph.RawInput(net, scale, mean, std, (3, 7, 7))
    shifted, how = graph.edge_module(net, (3, 7, 7), True, scale, mean, std)
    assert how == "shifted"
    pixels = torch.randint(0, 256, (16, 3, 7, 7), dtype=torch.uint8)
    with torch.no_grad():
        ref = explicit(pixels)
        torch.testing.assert_close(shifted(pixels), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_per_channel_normalisation_folds_into_an_mlp():
    torch.manual_seed(0)
    net = models.build("mlp:6", (3, 2, 2), 4).eval()
    mean, std = np.array([0.1, 0.5, -0.2], np.float32), np.array([0.3, 1.5, 0.7], np.float32)
    folded = graph.fold_normalisation(net, 255.0, mean, std, (3, 2, 2))
    pixels = torch.randint(0, 256, (8, 3, 2, 2), dtype=torch.uint8)
    with torch.no_grad():
        ref = graph.RawInput(net, 255.0, mean, std, (3, 2, 2))(pixels)
        torch.testing.assert_close(folded(pixels), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---------------------------------------------------------------- training layout
@pytest.mark.parametrize("spec, safe", [
    ("res:4x1-8x1", False),           # its shortcut: 1x1 stride 2 over 4 channels, the crashing kernel
    ("res:2x1-6x1", False),
    ("res:8x1-16x1", True),           # 8 input channels ran
    ("res:16x1-32x1-64x1", True),     # the edge ResNet-8
    ("res:16x3-32x3-64x3", True),     # the teachers' ResNet-20
    ("conv:4/2-8/2", True),           # strided 3x3 convolutions only
    ("dws:4-8/2-16/2", True),         # its 1x1 (pointwise) convolutions have stride 1
    ("cnn:8-16-16", True),
    ("mlp:64", False),                # no convolution: nothing to lay out
])
def test_channels_last_except_the_narrow_strided_1x1(spec, safe):
    """PyTorch 2.13.0 corrupts the heap in the weight gradient of a 1x1 stride-2 convolution over 2-7
    channels in channels-last float32 on AVX2 CPUs (models.trains_channels_last); such a network
    trains in the default layout, as does one without convolutions."""
    assert models.trains_channels_last(models.build(spec, (1, 28, 28), 10)) is safe


def test_training_batch_fixes_the_layout_by_strides():
    """A one-channel batch with channels-last strides (what the jitter returns) counts as contiguous to
    Tensor.contiguous; a network that trains in the default layout must get default strides, or oneDNN
    takes the channels-last path that crashes on AVX2 (models.training_batch)."""
    x = jitter(torch.randn(8, 1, 28, 28), 2, torch.Generator().manual_seed(0), 0.0)
    assert x.is_contiguous() and x.stride()[1] == 1  # the ambiguous case: contiguous() would keep it
    default = models.training_batch(x, channels_last=False)
    assert default.stride() == (784, 784, 28, 1) and torch.equal(default, x)
    last = models.training_batch(torch.randn(8, 3, 28, 28), channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    flat, plain = torch.randn(8, 784), torch.randn(8, 1, 28, 28)
    assert models.training_batch(flat, channels_last=False) is flat
    assert models.training_batch(plain, channels_last=False) is plain  # already default-strided: no copy
