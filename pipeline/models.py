"""Networks built from spec strings (:mod:`pipeline.specs`), and the ensemble exported as one ONNX graph.

Shared by the teacher, student, export and bench stages (torch).  Spec grammar:
``<kind>:<widths>[:dropout=<p>]`` with widths joined by ``-``.

- ``mlp:64`` is 784-64-10 on Fashion-MNIST (input and class count come from the data);
  ``mlp:1200-1200:dropout=0.5`` is the paper's teacher; ``mlp:800-800`` Hinton's student.
- ``cnn:32-64-128`` is conv(32) -> pool -> conv(64) -> pool -> fc(128) -> classes, 3x3 convolutions
  with 2x2 max pooling: the reference's small CNN teacher.
"""
from __future__ import annotations

import math

import numpy as np

import torch
from torch import nn

from pipeline.errors import UsageError
from pipeline.specs import parse_spec


def build(spec: str, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The network for ``spec`` taking ``[batch, *input_shape]`` float32 and returning logits."""
    kind, widths, dropout = parse_spec(spec)
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        last = math.prod(input_shape)
        for w in widths:
            layers += [nn.Linear(last, w), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            last = w
        return nn.Sequential(*layers, nn.Linear(last, classes))
    if len(input_shape) != 3:
        raise UsageError(f"cnn needs [channels, height, width] inputs, data has shape {input_shape}")
    c, h, w = input_shape
    c1, c2, fc = widths
    return nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), fc), nn.ReLU(),
        *([nn.Dropout(dropout)] if dropout else []), nn.Linear(fc, classes))


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


def load(path, role: str = "student") -> tuple[nn.Module, "Checkpoint"]:
    """The network of the checkpoint at ``path`` (read and checked by
    :func:`pipeline.formats.checkpoint.read_checkpoint`) and the checkpoint itself."""
    from pipeline.formats.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path, role=role)
    return from_checkpoint(ckpt), ckpt
