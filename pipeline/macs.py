"""Multiply-accumulates per image of a network, from its modules and the input shape (torch).

The cost model of edge inference papers (MobileNet, Howard et al. 2017, section 3.1): only the
products of weights with activations count.

- ``Conv2d``: ``H_out * W_out * C_out * (C_in / groups) * k_h * k_w``; a depthwise 3x3 conv
  (``groups = C_in = C_out``) costs ``H_out W_out C 9``, a pointwise 1x1 ``H W C_in C_out``;
- ``Linear``: ``in * out``;
- nothing else: batch norm folds into the convolution before export, and biases, ReLU, pooling
  and the input normalisation are additions or comparisons, not multiply-accumulates.

The output sizes are those the module actually produces: hooks record them during one forward
pass of a zero image ``[1, *input_shape]``, so strides, padding and rounding need no formula of
their own.  :func:`pipeline.formats.onnx_model.onnx_macs` counts the same thing from an ONNX graph.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def layer_macs(module: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """``(layer name, MACs per image)`` of every Conv2d and Linear of ``module``, in call order."""
    found: list[tuple[str, int]] = []
    hooks = []

    def hook(name: str):
        def record(mod: nn.Module, _inputs, output: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                per_output = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
                found.append((name, math.prod(output.shape[1:]) * per_output))
            else:
                found.append((name, math.prod(output.shape[1:]) * mod.in_features))
        return record

    for name, mod in module.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(hook(name)))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    return found


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image of shape ``input_shape`` through ``module``."""
    return sum(m for _, m in layer_macs(module, input_shape))
