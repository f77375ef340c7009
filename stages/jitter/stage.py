"""Stage 1b, jitter: a prepared transfer set enlarged with shifted copies of its training rows.

The cache holds the teacher's soft targets for the rows it is given and nothing else, so a student
distilled from it only ever sees the teacher's function at those rows.  Shifted copies of every
training image, run through the same teacher by the cache stage, let the student match the teacher
on inputs it was never labelled on: "function matching" on a fixed set of consistent views
(Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent"), with the
+-2 pixel jitter Hinton et al. (2015, section 3) used for their MNIST teacher.

The output is a prepared file (schema ``kd-prepared/1``) whose train split is the source's rows
followed by ``copies`` shifted copies of them (labels carried over, -1 stays -1); val and test
splits and the normalisation attributes (scale, mean, std, classes) are the source's, bit for bit,
so a teacher trained on the source normalises the new rows exactly as it was trained to.  Each
copy of each row is moved by its own (dy, dx), uniform on [-max_shift, max_shift]^2 and drawn from
``seed``, with the very function that jitters the teacher's training batches
(:func:`pipeline.jitter.jitter`): rows ``[C, H, W]`` (any number of channels) or ``[H, W]`` move along
H and W only, every channel of an image by the same shift, channels never mixed.  Pixels shifted in
are 0 in every channel: the stored rows are raw pixels, where 0 is black in each channel (the
background of Fashion-MNIST and MNIST), whatever the per-channel normalisation makes of it later.

The output grows (1 + copies)-fold, so its size is checked against the free space before any row is
written (exit 7 with both figures: ten copies of Fashion-MNIST are ~0.5 GB); a disk that fills up
anyway stops the run at the block that failed, and nothing is published.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import provenance, runtime
from pipeline.artifacts import atomic_output, check_outputs, claim
from pipeline.config import to_dict
from pipeline.errors import DataError
from pipeline.formats.prepared import PreparedWriter, open_prepared, predicted_size
from pipeline.jitter import jitter
from pipeline.resources import require_space
from stages.jitter.settings import JitterConfig

BLOCK_ROWS = 8192  # rows shifted per step: ~6 MiB of uint8 28x28 images, bounded memory at any size


def _shifted(block, max_shift: int, gen: torch.Generator):
    """Each image of ``block`` ([B, H, W] or [B, C, H, W], raw pixels) moved by its own random shift,
    black (0) shifted in."""
    return jitter(torch.from_numpy(block), max_shift, gen, 0).numpy()


def jitter_transfer_set(cfg: JitterConfig, prepared: Path, out: Path,
                        log: Callable[[str], None] = print) -> Path:
    """Write ``out``: ``prepared`` with ``cfg.copies`` shifted copies of its train rows appended."""
    check_outputs({"--prepared": prepared}, {"--out": out})
    claim(out)
    info = open_prepared(prepared)
    if len(info.shape) not in (2, 3):
        raise DataError(f"{prepared}: rows of shape {info.shape} are not [height, width] or "
                        "[channels, height, width] images")
    n = info.rows["train"]
    rows = {"train": n * (1 + cfg.copies), "val": info.rows["val"], "test": info.rows["test"]}
    require_space(out, *predicted_size(rows, info.shape, info.dtype))  # exit 7 now, not when the disk fills
    gen = torch.Generator().manual_seed(cfg.seed)
    prov = provenance.record("jitter", to_dict(cfg), {"prepared": prepared})
    with atomic_output(out) as tmp, PreparedWriter(tmp, info.classes, info.norm, prov) as w:
        w.copy(prepared, "val")
        w.copy(prepared, "test")
        x, y = w.allocate("train", n * (1 + cfg.copies), info.shape, info.dtype)
        with runtime.progress(total=n * (1 + cfg.copies), unit="row", desc="jitter", leave=False) as bar:
            for copy in range(1 + cfg.copies):
                for a, block, labels in info.blocks("train", 0, n, BLOCK_ROWS):
                    b = a + len(block)
                    x[copy * n + a: copy * n + b] = block if copy == 0 else _shifted(block, cfg.max_shift, gen)
                    y[copy * n + a: copy * n + b] = labels
                    w.check()  # a full disk stops the run at this block, not after all of them
                    bar.update(b - a)
    log(f"jitter: {n} train rows + {cfg.copies} shifted copies (<= {cfg.max_shift} px) -> {out}")
    return out
