"""Settings of the teacher stage (torch-free: the CLI builds ``--help`` from it)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from pipeline.config import require, setting
from pipeline.specs import parse_spec


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Train an ensemble of teachers with different seeds and export it to one ONNX graph
    (output member_logits [batch, members, classes])."""

    FOOTPRINT: ClassVar[str] = ("the train and val splits are held in memory as float32; lower "
                                "--batch-size (now {batch_size}) or a smaller --arch to lower the rest")

    members: int = setting(3, "number of ensemble members (each trained from its own seed)")
    arch: str = setting("cnn:32-64-128", "member architecture spec, e.g. cnn:32-64-128 or mlp:1200-1200:dropout=0.5")
    epochs: int = setting(8, "training epochs per member")
    batch_size: int = setting(128, "minibatch rows")
    lr: float = setting(2e-3, "peak learning rate of the one-cycle schedule: warm-up from lr/25 over the first 15% "
                              "of the steps, then cosine annealing to lr/25e4 (Smith & Topin 2019)")
    weight_decay: float = setting(0.0, "Adam weight decay")
    max_shift: int = setting(2, "random translation of up to this many pixels per example (Hinton's jitter); 0 = off")
    seed: int = setting(0, "seed of member 0; member i uses seed + i")
    threads: int = setting(2, "torch intra-op threads for training")

    def __post_init__(self) -> None:
        require(self.members >= 1, "members must be >= 1")
        require(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        require(self.lr > 0, "lr must be > 0")
        require(0 <= self.max_shift <= 8, "max_shift must lie in [0, 8] pixels")
        parse_spec(self.arch)
