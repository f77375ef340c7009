"""Settings of the prepare stage (torch-free: the CLI builds ``--help`` from it)."""
from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from pipeline.config import require, setting

MODES = ("auto", "L", "RGB")
LAYOUTS = ("auto", "nchw", "nhwc", "nhw", "flat")
# the settings that only one kind of source reads; any other kind refuses them unless left at the default
SOURCE_ONLY = {"size": "image-folder", "mode": "image-folder", "layout": "npz"}


def parse_size(text: str) -> tuple[int, int] | None:
    """``"HxW"`` (or ``"N"`` for N x N) -> (height, width); ``""`` -> None (keep the images' size)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    require(m is not None, f"size must be HEIGHTxWIDTH (e.g. 32x32) or one number, got {text!r}")
    h, w = int(m.group(1)), int(m.group(2) or m.group(1))
    require(1 <= h <= 4096 and 1 <= w <= 4096, f"size {h}x{w}: each side must lie in [1, 4096] pixels")
    return h, w


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Load a transfer set (IDX directory, .npz arrays or a folder of PNG/JPEG images) into the
    canonical HDF5 file with train/val/test splits, normalisation statistics (per channel for colour
    images) and checksums."""

    FOOTPRINT: ClassVar[str] = ("prepare holds every split of the source in memory at once; no "
                                "setting lowers that: raise the memory ceiling")

    val_rows: int = setting(5000, "rows held out of the training data for model selection")
    train_rows: int = setting(0, "keep only this many training rows (0 = all); smoke runs shrink this")
    test_rows: int = setting(0, "keep only this many test rows (0 = all)")
    classes: int = setting(10, "number of classes of an IDX or .npz source; labels must lie in [0, classes) "
                               "(an image folder's classes are its class folders)")
    class_names: tuple[str, ...] = setting((), "class names (comma-separated); empty = Fashion-MNIST's for "
                                                "a fashion source, else the class indices (an image folder: "
                                                "the folder names)")
    seed: int = setting(0, "seed of the train/val split, of the test split carved from a source "
                           "without one (1/7 of the labelled rows), and of row sub-sampling")
    size: str = setting("", "image folder: resize every image to HEIGHTxWIDTH (e.g. 32x32), Pillow's "
                            "antialiased bilinear filter, aspect ratio not kept; empty = keep the size, "
                            "which must then be the same for every image")
    mode: str = setting("auto", "image folder: L (8-bit grey, 1 channel) or RGB (3 channels; alpha is "
                                "dropped); auto = L when every image is grey, else RGB")
    layout: str = setting("auto", "npz: how x is laid out: nchw, nhwc (stored as channel-first nchw), nhw, "
                                  "flat ([N, features]); auto = inferred where unambiguous (4-D with 1, 3 "
                                  "or 4 channels on exactly one of axes 1 and 3)")

    def __post_init__(self) -> None:
        require(self.val_rows >= 1, "val_rows must be >= 1")
        require(self.train_rows >= 0 and self.test_rows >= 0, "train_rows and test_rows must be >= 0")
        require(self.classes >= 2, "classes must be >= 2")
        require(not self.class_names or len(self.class_names) == self.classes,
                f"class_names must name all {self.classes} classes")
        parse_size(self.size)
        require(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        require(self.layout in LAYOUTS, f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
