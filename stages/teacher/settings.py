"""Settings of the teacher stage (torch-free: the CLI builds ``--help`` from it)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from pipeline.config import require, setting
from pipeline.runtime import PRECISIONS
from pipeline.specs import parse_spec

OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Train an ensemble of teachers with different seeds and export it to one ONNX graph
    (output member_logits [batch, members, classes]).  A killed run resumes from its last finished
    epoch (member<i>.state beside the output) to the weights an uninterrupted run gives."""

    FOOTPRINT: ClassVar[str] = ("the train and val splits are held in memory as float32; lower "
                                "--batch-size (now {batch_size}) or a smaller --arch to lower the rest")

    members: int = setting(3, "number of ensemble members (each trained from its own seed)")
    arch: str = setting("cnn:32-64-128", "member architecture spec, e.g. cnn:32-64-128, res:16x3-32x3-64x3 or "
                                         "mlp:1200-1200:dropout=0.5; several, comma-separated, are taken by the "
                                         "members in turn (member i: arch number i mod their count)")
    epochs: int = setting(8, "training epochs per member")
    batch_size: int = setting(128, "minibatch rows")
    optimizer: str = setting("adam", "adam (Adam, L2 weight decay) or sgd (SGD with Nesterov momentum 0.9, the "
                                     "one-cycle schedule cycling it between 0.85 and 0.95)")
    lr: float = setting(2e-3, "peak learning rate of the one-cycle schedule: warm-up from lr/25 over the first 15% "
                              "of the steps, then cosine annealing to lr/25e4 (Smith & Topin 2019)")
    weight_decay: float = setting(0.0, "L2 weight decay of the convolution and linear weights (not of biases or "
                                       "batch-norm parameters)")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy (Szegedy et al. 2016; 0 = off)")
    max_shift: int = setting(2, "random translation of up to this many pixels per example (Hinton's jitter); 0 = off")
    flip: float = setting(0.0, "probability of a horizontal flip of each training image (0 = off)")
    erase: float = setting(0.0, "probability of random erasing of each training image (Zhong et al. 2020: a "
                                "rectangle of 2-40% of the image filled with random pixels; 0 = off)")
    precision: str = setting("fp32", "arithmetic of training: fp32, bf16 (autocast, weights stay float32; fast "
                                     "only on CPUs with bfloat16 instructions) or auto (bf16 where the CPU has "
                                     "them, else fp32); the exported graph is float32 either way")
    seed: int = setting(0, "seed of member 0; member i uses seed + i")
    threads: int = setting(2, "torch intra-op threads for training")

    def __post_init__(self) -> None:
        require(self.members >= 1, "members must be >= 1")
        require(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        require(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0")
        require(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        require(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
        require(0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)")
        require(0 <= self.max_shift <= 8, "max_shift must lie in [0, 8] pixels")
        require(0 <= self.flip <= 1 and 0 <= self.erase <= 1, "flip and erase are probabilities in [0, 1]")
        for arch in self.archs:
            parse_spec(arch)

    @property
    def archs(self) -> tuple[str, ...]:
        """The member architectures, in turn: member i is ``archs[i % len(archs)]``."""
        return tuple(a.strip() for a in self.arch.split(","))

    def member_arch(self, index: int) -> str:
        return self.archs[index % len(self.archs)]
