"""Settings of the prepare stage (torch-free: the CLI builds ``--help`` from it)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from pipeline.config import require, setting


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Load a transfer set (IDX directory or .npz) into the canonical HDF5 file with
    train/val/test splits, normalisation statistics and checksums."""

    FOOTPRINT: ClassVar[str] = ("prepare holds every split of the source in memory at once; no "
                                "setting lowers that: raise the memory ceiling")

    val_rows: int = setting(5000, "rows held out of the training data for model selection")
    train_rows: int = setting(0, "keep only this many training rows (0 = all); smoke runs shrink this")
    test_rows: int = setting(0, "keep only this many test rows (0 = all)")
    classes: int = setting(10, "number of classes; labels must lie in [0, classes)")
    class_names: tuple[str, ...] = setting((), "class names (comma-separated); empty = Fashion-MNIST's for "
                                                "a fashion source, else the class indices")
    seed: int = setting(0, "seed of the train/val split and of row sub-sampling")

    def __post_init__(self) -> None:
        require(self.val_rows >= 1, "val_rows must be >= 1")
        require(self.train_rows >= 0 and self.test_rows >= 0, "train_rows and test_rows must be >= 0")
        require(self.classes >= 2, "classes must be >= 2")
        require(not self.class_names or len(self.class_names) == self.classes,
                f"class_names must name all {self.classes} classes")
