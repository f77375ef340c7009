"""Networks built from spec strings (:mod:`pipeline.specs`), and the ensemble exported as one ONNX graph.

Shared by the teacher, student, export and bench stages (torch).  Spec grammar in
:mod:`pipeline.specs`; the input shape ``[C, H, W]`` (any channel count) and the class count come
from the data.

- ``mlp:64`` is 784-64-10 on Fashion-MNIST; ``mlp:1200-1200:dropout=0.5`` is the paper's teacher;
  ``mlp:800-800`` Hinton's student.
- ``cnn:32-64-128`` is conv(32) -> pool -> conv(64) -> pool -> fc(128) -> classes, 3x3 convolutions
  with 2x2 max pooling: the reference's small CNN teacher.
- ``conv:16-32/2-64/2`` and ``dws:16-32/2-64/2-128/2``: plain and depthwise-separable students
  for microcontroller- and phone-class devices (batch norm, strided downsampling, global average
  pooling), one flat ``nn.Sequential`` so that :func:`fold_batchnorm` can fold every BN into the
  convolution before it.
- ``res:16x3-32x3-64x3``: ResNet-20 (He et al. 2016), the strong teachers' member; every conv -> BN
  pair sits in an ``nn.Sequential`` too, so it folds like the students.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline import resources
from pipeline.errors import UsageError
from pipeline.specs import parse_spec

if TYPE_CHECKING:
    from pipeline.formats.checkpoint import Checkpoint


def build(spec: str, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The network for ``spec`` taking ``[batch, *input_shape]`` float32 and returning logits.  A network
    whose weights alone do not fit in memory is one ResourceError (exit 7) saying that only a smaller
    architecture helps: no batch size or memory budget shrinks it."""
    try:
        return _build(spec, input_shape, classes)
    except Exception as e:
        if not resources.is_memory_error(e):
            raise
        raise resources.memory_failure(e, f"the network {spec} itself does not fit: only a smaller architecture "
                                          "helps (no batch size or memory budget shrinks its weights)") from None


def _build(spec: str, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    parsed = parse_spec(spec)
    kind, widths, dropout = parsed.kind, parsed.widths, parsed.dropout
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        last = math.prod(input_shape)
        for w in widths:
            layers += [nn.Linear(last, w), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            last = w
        return nn.Sequential(*layers, nn.Linear(last, classes))
    if len(input_shape) != 3:
        raise UsageError(f"{kind} needs [channels, height, width] inputs, data has shape {input_shape}")
    c, h, w = input_shape
    if kind in ("conv", "dws"):
        return _blocks(parsed, (c, h, w), classes)
    if kind == "res":
        return _resnet(parsed, (c, h, w), classes)
    if h < 4 or w < 4:
        raise UsageError(f"cnn pools twice by 2: it needs images of at least 4x4, data has {h}x{w}")
    c1, c2, fc = widths
    return nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), fc), nn.ReLU(),
        *([nn.Dropout(dropout)] if dropout else []), nn.Linear(fc, classes))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


def _blocks(spec, input_shape: tuple[int, int, int], classes: int) -> nn.Sequential:
    """``conv`` / ``dws`` students: blocks of :mod:`pipeline.specs`, global average pool, Linear.

    The global average pool is an ``AvgPool2d`` over the whole final feature map (a 3x3 conv with
    padding 1 and stride 2 maps ``h`` to ``ceil(h / 2)``): it exports as ``AveragePool``, which
    onnxruntime runs in int8 (QLinearAveragePool); ``AdaptiveAvgPool2d`` exports as ``ReduceMean``,
    which it does not, leaving a DequantizeLinear / QuantizeLinear pair around a float kernel.
    """
    layers: list[nn.Module] = []
    last, h, w = input_shape
    for i, (width, stride) in enumerate(zip(spec.widths, spec.strides)):
        h, w = -(-h // stride), -(-w // stride)
        if spec.kind == "conv" or i == 0:
            layers += _conv_bn_relu(last, width, 3, stride)
        else:  # depthwise 3x3 on each channel, then pointwise 1x1 across channels
            layers += _conv_bn_relu(last, last, 3, stride, groups=last) + _conv_bn_relu(last, width, 1, 1)
        last = width
    return nn.Sequential(*layers, nn.AvgPool2d((h, w)), nn.Flatten(),
                         *([nn.Dropout(spec.dropout)] if spec.dropout else []), nn.Linear(last, classes))


class BasicBlock(nn.Module):
    """He et al. (2016)'s basic block: ``relu(body(x) + shortcut(x))`` with ``body`` Conv3x3(stride)
    -> BN -> ReLU -> Conv3x3 -> BN and ``shortcut`` the identity, or Conv1x1(stride) -> BN where the
    width or the size changes (their option B)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(cin, cout, 3, stride), *_conv_bn_relu(cout, cout, 3, 1)[:2])
        self.shortcut = (nn.Sequential() if cin == cout and stride == 1 else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _resnet(spec, input_shape: tuple[int, int, int], classes: int) -> nn.Sequential:
    """``res`` networks: a Conv3x3 stem, ``depths[i]`` basic blocks of width ``widths[i]`` per stage (the
    first of each later stage with stride 2), global average pool (``AvgPool2d``, as :func:`_blocks`),
    Linear."""
    c, h, w = input_shape
    layers: list[nn.Module] = _conv_bn_relu(c, spec.widths[0], 3, 1)
    last = spec.widths[0]
    for width, depth, stride in zip(spec.widths, spec.depths, spec.strides):
        for j in range(depth):
            s = stride if j == 0 else 1
            h, w = -(-h // s), -(-w // s)
            layers.append(BasicBlock(last, width, s))
            last = width
    return nn.Sequential(*layers, nn.AvgPool2d((h, w)), nn.Flatten(),
                         *([nn.Dropout(spec.dropout)] if spec.dropout else []), nn.Linear(last, classes))


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (eval mode) with every ``BatchNorm2d`` that follows a ``Conv2d`` in an
    ``nn.Sequential`` folded into that convolution and replaced by ``nn.Identity``.

    In eval mode BN is the affine map ``y = gamma (z - mu) / sqrt(var + eps) + beta`` per channel;
    with ``k = gamma / sqrt(var + eps)`` the convolution ``z = W * x + b`` becomes
    ``W' = k W`` (each output channel's filter scaled) and ``b' = k (b - mu) + beta``
    (Ioffe & Szegedy 2015; the usual inference-time fusion), computed in float64.  The network
    computes the same function to float32 round-off; the export checks it against the unfolded one.
    """
    import copy

    folded = copy.deepcopy(net).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            conv, bn = seq[i - 1], seq[i]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            with torch.no_grad():
                k = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(k)
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
                fused.weight.copy_((conv.weight.double() * k.view(-1, 1, 1, 1)).float())
                fused.bias.copy_((k * (bias - bn.running_mean.double()) + bn.bias.double()).float())
            seq[i - 1], seq[i] = fused.eval(), nn.Identity()
    return folded


def trains_channels_last(net: nn.Module) -> bool:
    """Whether ``net`` trains in the channels-last memory layout (oneDNN's fast layout for convolutions
    on CPUs; the values are the same, the order of memory differs): a network with convolutions does,
    unless it holds a 1x1 convolution of stride > 1 over 2 to 7 input channels (a narrow ResNet
    shortcut, as in ``res:4x1-8x1``).

    PyTorch 2.13.0's CPU kernel for that convolution's weight gradient in channels-last float32
    corrupts the heap on an AVX2-only CPU and the process dies (segmentation fault, bus error, "double
    free or corruption"; with 2 threads it hangs). Measured 2026-12-05 on an AMD EPYC (Zen 2) by
    docs/runs/2026-12-05/avx2/conv1x1_crash.py: 1 or >= 8 input channels, stride 1, a 3x3 kernel, the
    default layout and bfloat16 autocast all ran. Such a network trains in the default layout on every
    CPU, so that its layout (and its rounding) does not depend on the host.
    """
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and not any(m.kernel_size == (1, 1) and max(m.stride) > 1 and 2 <= m.in_channels <= 7
                                   for m in convs)


def training_batch(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch of images ``x`` [N, C, H, W] in the memory layout its network trains in
    (:func:`trains_channels_last`), fixed by its strides; other tensors unchanged.

    ``Tensor.contiguous`` alone does not do it for one channel: a [N, 1, H, W] tensor with
    channels-last strides (the shifts of :func:`pipeline.jitter.jitter` return one) counts as
    contiguous in both layouts and is returned as it is, and oneDNN then takes the channels-last path
    from its strides.  A network kept out of that layout because of the crash above took it anyway
    when no later augmentation copied the batch (``--erase 0``), and the smoke teacher hung or died
    (2026-12-05, AVX2-only host).  So a batch whose strides are not the default layout's is copied
    into it (a batch already in it, as most are, is returned as it is).
    """
    if x.ndim != 4:
        return x
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    default = torch.empty(x.shape, device="meta").stride()  # the row-major strides, nothing allocated
    return x if x.stride() == default else x.clone(memory_format=torch.contiguous_format)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Ensemble(nn.Module):
    """M members side by side: ``x [batch, ...] -> member_logits [batch, members, classes]``."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=1)


@torch.no_grad()
def predict(module: nn.Module, x, batch: int = 2048) -> torch.Tensor:
    """Logits of ``module`` (eval mode) for float32 numpy or tensor rows, in batches."""
    module.eval()
    xs = torch.as_tensor(x)
    return torch.cat([module(xs[i:i + batch]) for i in range(0, len(xs), batch)])


def accuracy(logits: torch.Tensor, y) -> float:
    """Top-1 accuracy against labels (rows labelled -1 excluded)."""
    y = torch.as_tensor(y)
    keep = y >= 0
    return float((logits.argmax(-1)[keep] == y[keep]).float().mean()) if keep.any() else float("nan")


def state_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    """A module's state dict as numpy arrays (copies), in its order: what a checkpoint stores."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def from_checkpoint(ckpt) -> nn.Module:
    """The network of a :class:`pipeline.formats.checkpoint.Checkpoint`, weights loaded, in eval mode;
    UsageError/DataError when the arch or the weights do not fit."""
    from pipeline.errors import DataError

    net = build(ckpt.arch, tuple(ckpt.input_shape), len(ckpt.class_names))
    try:
        net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in ckpt.state.items()})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise DataError(f"the checkpoint's weights do not fit {ckpt.arch} ({first})") from None
    return net.eval()


def load(path, role: str = "student") -> tuple[nn.Module, Checkpoint]:
    """The network of the checkpoint at ``path`` (read and checked by
    :func:`pipeline.formats.checkpoint.read_checkpoint`) and the checkpoint itself."""
    from pipeline.formats.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path, role=role)
    return from_checkpoint(ckpt), ckpt
