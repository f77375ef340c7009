"""Random translations of image batches: the teacher's training jitter and the transfer-set copies.

Hinton et al. (2015, section 3) trained their MNIST teacher on inputs shifted by up to 2 pixels; the
transfer-set augmentation (``distill jitter``) shifts copies of the training rows with the same
function, so the teacher's cache covers the inputs it was trained on.  Shared by the teacher and
the jitter stages (torch).

Only the two spatial axes move: every channel of an image is shifted by the same (dy, dx), and the
pixels shifted in take the fill value of their own channel, so channels never mix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def jitter(x: torch.Tensor, shift: int, gen: torch.Generator, fill: float | torch.Tensor) -> torch.Tensor:
    """Translate each image of ``x`` by its own random (dy, dx) in [-shift, shift], along H and W.

    ``x`` is ``[B, C, H, W]`` or ``[B, H, W]`` (single-channel images without a channel axis);
    anything else (rows of features) cannot be shifted: ValueError unless ``shift`` is 0.  Pixels shifted in take
    ``fill``: one number, or a tensor of one value per channel (the normalised black pixel of each
    channel).  The draws from ``gen`` are the same whatever the number of channels.
    """
    if shift == 0:
        return x
    if x.ndim == 3:
        return jitter(x[:, None], shift, gen, fill)[:, 0]
    if x.ndim != 4:
        raise ValueError(f"jitter shifts images [B, C, H, W] or [B, H, W], not a batch of shape {list(x.shape)}")
    b, c, h, w = x.shape
    fill = torch.as_tensor(fill, dtype=x.dtype).reshape(-1)
    if fill.numel() == 1:
        padded = F.pad(x, (shift, shift, shift, shift), value=fill.item())
    elif fill.numel() == c:
        padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * shift, w + 2 * shift).clone()
        padded[:, :, shift:shift + h, shift:shift + w] = x
    else:
        raise ValueError(f"fill has {fill.numel()} values for images of {c} channels")
    off = torch.randint(0, 2 * shift + 1, (2, b), generator=gen)
    rows = (torch.arange(h)[None, :] + off[0][:, None])[:, :, None]   # [B, H, 1]
    cols = (torch.arange(w)[None, :] + off[1][:, None])[:, None, :]   # [B, 1, W]
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]       # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
