"""Random translations of image batches: the teacher's training jitter and the transfer-set copies.

Hinton et al. (2015, section 3) trained their MNIST teacher on inputs shifted by up to 2 pixels; the
transfer-set augmentation (``distill jitter``) shifts copies of the training rows with the same
function, so the teacher's cache covers the inputs it was trained on.  Shared by the teacher and
the augment stages (torch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def jitter(x: torch.Tensor, shift: int, gen: torch.Generator, fill: float) -> torch.Tensor:
    """Translate each image of ``x [B, C, H, W]`` by its own random (dy, dx) in [-shift, shift].

    Pixels shifted in take ``fill`` (the normalised value of a black pixel).
    """
    if shift == 0 or x.ndim != 4:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=fill)
    off = torch.randint(0, 2 * shift + 1, (2, b), generator=gen)
    rows = (torch.arange(h)[None, :] + off[0][:, None])[:, :, None]   # [B, H, 1]
    cols = (torch.arange(w)[None, :] + off[1][:, None])[:, None, :]   # [B, 1, W]
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]       # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
