"""Settings of the transfer-set augmentation (torch-free: the CLI builds ``--help`` from it)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from pipeline.config import require, setting


@dataclasses.dataclass(frozen=True)
class JitterConfig:
    """Write a prepared transfer set whose train split is the source's rows plus shifted copies of
    them (val, test and normalisation unchanged), for a cache of the teacher on more inputs."""

    FOOTPRINT: ClassVar[str] = "jitter holds 8192 rows at a time whatever --copies; raise the memory ceiling"

    copies: int = setting(9, "shifted copies of every training row (the train split grows (1 + copies)-fold)")
    max_shift: int = setting(2, "largest shift in pixels along each image axis (the teacher's default jitter)")
    seed: int = setting(0, "seed of the shifts")

    def __post_init__(self) -> None:
        require(self.copies >= 1, f"copies must be >= 1, got {self.copies}")
        require(1 <= self.max_shift <= 8, f"max_shift must lie in [1, 8] pixels, got {self.max_shift}")
