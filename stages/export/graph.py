"""The module that is exported: the trained network rewritten, exactly, into the form an edge runtime
runs fastest, and the raw-pixel front end (torch).

Every rewrite here computes the same function as the checkpoint's network to float32 round-off;
the export stage checks that claim on real rows (onnxruntime against the *unrewritten* PyTorch
module, :func:`pipeline.onnxio.validate`).

- **batch norm** folded into the convolution before it (:func:`pipeline.models.fold_batchnorm`).
- **channels-last flatten** (:func:`channels_last_flatten`): onnxruntime runs int8 convolutions in
  NHWC and transposes back to NCHW before a ``Flatten``; flattening in ``(h, w, c)`` order instead,
  with the next Linear's columns permuted to match, lets that Transpose cancel (fp32 loses nothing:
  its NCHWc reorder writes channels-last directly).
- **raw uint8 input** (``raw_input``): the normalisation ``x = (p / scale - mean) / std``
  (per channel ``c`` when mean and std are arrays) goes into the graph.

  * MLP (:func:`fold_normalisation`): with ``a = 1 / (scale std)`` and ``d = -mean / std`` per input
    feature, ``W x + b = (W diag(a)) p + (b + W d)``: the whole normalisation folds into the first
    Linear, and the graph is ``Cast -> Gemm``.
  * CNN (:func:`fold_pixel_scale`): zero padding does not commute with the mean shift (a padded
    zero of ``x`` is the pixel ``mean * scale``, not ``0``), so the mean cannot go into the bias
    exactly; the scale can: ``conv_W(x) = conv_{W'}(p - mean * scale)`` with
    ``W'[:, c] = W[:, c] / (scale std_c)``, padding included.  The graph is ``Cast -> Sub -> Conv``,
    one elementwise op instead of the three of :class:`RawInput`.  In int8 the Sub disappears too
    (:func:`stages.export.quantize.pixels_in`).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from pipeline import models


def channel_values(v, input_shape: tuple[int, ...]) -> np.ndarray:
    """A normalisation statistic (a scalar, or one value per channel) as float32 broadcasting over
    one row of ``input_shape`` (channels first): shape () or (C, 1, ..., 1)."""
    a = np.asarray(v, np.float32)
    if a.size == 1:
        return a.reshape(())
    if len(input_shape) < 2 or a.size != input_shape[0]:
        raise ValueError(f"{a.size} normalisation values for input shape {input_shape}")
    return a.reshape((a.size,) + (1,) * (len(input_shape) - 1))


class RawInput(nn.Module):
    """``net`` behind the prepared set's normalisation: uint8 pixels in, logits out."""

    def __init__(self, net: nn.Module, scale: float, mean, std, input_shape: tuple[int, ...] = ()):
        super().__init__()
        self.net = net
        # as in Prepared.normalise, in float32, so the graph computes what training saw bit for bit
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("mean", torch.from_numpy(channel_values(mean, input_shape)))
        self.register_buffer("std", torch.from_numpy(channel_values(std, input_shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.to(torch.float32) / self.scale - self.mean) / self.std)


class _FloatPixels(nn.Module):
    """uint8 pixels -> float32 -> ``net`` (whose first layer expects un-normalised pixels)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(torch.float32))


class _ShiftedPixels(nn.Module):
    """uint8 pixels -> float32 -> minus ``shift`` (mean * scale, per channel) -> ``net``."""

    def __init__(self, net: nn.Module, shift: np.ndarray):
        super().__init__()
        self.net = net
        self.register_buffer("shift", torch.from_numpy(np.asarray(shift, np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(torch.float32) - self.shift)


def _per_feature(v, input_shape: tuple[int, ...]) -> np.ndarray:
    """A statistic broadcast to every input feature of a row, flattened (float64)."""
    return np.broadcast_to(channel_values(v, input_shape).astype(np.float64), input_shape).reshape(-1)


def fold_normalisation(net: nn.Module, scale: float, mean, std, input_shape: tuple[int, ...] = ()) -> nn.Module | None:
    """``net`` with the normalisation folded into its first Linear layer, taking uint8 pixels; None
    unless ``net`` is Flatten -> Linear -> ... (a convolution's zero padding would not fold exactly).

    ``W' = W diag(a)`` and ``b' = b + W d`` with ``a = 1 / (scale std)`` and ``d = -mean / std`` per
    input feature (one value for all features when mean and std are scalars), in float64.
    """
    layers = list(net.children()) if isinstance(net, nn.Sequential) else []
    if len(layers) < 2 or not isinstance(layers[0], nn.Flatten) or not isinstance(layers[1], nn.Linear):
        return None
    folded = copy.deepcopy(net).eval()
    first = folded[1]
    features = first.in_features
    shape = tuple(input_shape) if input_shape and math.prod(input_shape) == features else (features,)
    a = 1.0 / (float(scale) * _per_feature(std, shape))
    d = -_per_feature(mean, shape) / _per_feature(std, shape)
    with torch.no_grad():
        w = first.weight.double()
        first.bias.copy_((first.bias.double() + w @ torch.from_numpy(d)).float())
        first.weight.copy_((w * torch.from_numpy(a)).float())
    return _FloatPixels(folded)


def fold_pixel_scale(net: nn.Module, scale: float, mean, std, input_shape: tuple[int, ...]) -> nn.Module | None:
    """``net`` (a Sequential starting with a plain Conv2d) taking uint8 pixels: the scale folded into
    the first convolution's filters per input channel, the mean subtracted in pixel units before
    it (exact, padding included; module docstring).  None for any other network."""
    first = net[0] if isinstance(net, nn.Sequential) and len(net) else None
    if not isinstance(first, nn.Conv2d) or first.groups != 1 or len(input_shape) != 3:
        return None
    folded = copy.deepcopy(net).eval()
    conv = folded[0]
    inv = 1.0 / (float(scale) * np.broadcast_to(np.asarray(std, np.float64).reshape(-1), (conv.in_channels,)))
    shift = channel_values(np.asarray(mean, np.float64) * float(scale), input_shape)
    with torch.no_grad():
        conv.weight.copy_((conv.weight.double() * torch.from_numpy(inv).view(1, -1, 1, 1)).float())
    return _ShiftedPixels(folded, shift)


class _ChannelsLastFlatten(nn.Module):
    """``[N, C, H, W] -> [N, H * W * C]``: the flatten of an NHWC runtime."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


def channels_last_flatten(net: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """A copy of ``net`` whose ``Flatten`` after convolutions flattens channels-last, the next
    Linear's columns permuted from ``(c, h, w)`` to ``(h, w, c)`` order to match (a permutation:
    exact).  ``net`` itself when it has no convolution before a Flatten -> Linear."""
    if not isinstance(net, nn.Sequential) or not any(isinstance(m, nn.Conv2d) for m in net):
        return net
    out = copy.deepcopy(net).eval()
    x = torch.zeros(1, *input_shape)
    with torch.no_grad():
        for i, m in enumerate(out):
            nxt = next((n for n in list(out)[i + 1:] if not isinstance(n, (nn.Dropout, nn.Identity))), None)
            if isinstance(m, nn.Flatten) and x.dim() == 4 and isinstance(nxt, nn.Linear):
                c, h, w = x.shape[1:]
                nxt.weight.copy_(nxt.weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(nxt.out_features, -1))
                out[i] = _ChannelsLastFlatten()
            x = m(x)
    return out


def edge_module(net: nn.Module, input_shape: tuple[int, ...], raw_input: bool, scale: float = 1.0, mean=0.0,
                std=1.0) -> tuple[nn.Module, str]:
    """The module to export for ``net`` and how its input is handled: ``float`` (normalised rows),
    ``folded`` (uint8, MLP normalisation in the first Linear), ``shifted`` (uint8, CNN: scale in the
    first conv, Cast -> Sub before it) or ``explicit`` (uint8, :class:`RawInput`'s three ops)."""
    body = channels_last_flatten(models.fold_batchnorm(net), input_shape)
    if not raw_input:
        return body, "float"
    if (m := fold_normalisation(body, scale, mean, std, input_shape)) is not None:
        return m, "folded"
    if (m := fold_pixel_scale(body, scale, mean, std, input_shape)) is not None:
        return m, "shifted"
    return RawInput(body, scale, mean, std, input_shape).eval(), "explicit"
