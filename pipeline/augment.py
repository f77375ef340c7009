"""Training-time augmentation of batches (torch): flips and random erasing for the teacher, mixing for the student.

Random translations are :func:`pipeline.jitter.jitter`; this module adds the two other parts of the
strong teachers' recipe, both drawn from the caller's ``torch.Generator`` so that a resumed run
draws exactly what an uninterrupted one would:

- :func:`hflip`: a horizontal flip (mirror of the W axis) of each image with probability ``p``;
  the standard augmentation of the Fashion-MNIST benchmark's strong models (ResNet-18 94.9%,
  WRN-28-10 95.9%), whose classes (shirts, shoes, bags) are left-right symmetric.
- :func:`erase`: random erasing (Zhong et al., AAAI 2020, "Random Erasing Data Augmentation",
  algorithm 1): with probability ``p`` a rectangle of area ``S_e ~ U(s_l, s_h) * H * W`` and aspect
  ratio ``r_e`` (``log r_e ~ U(log r_1, log r_2)``) at a uniform position is filled with uniform
  random pixel values.  Their Fashion-MNIST defaults: ``s_l = 0.02``, ``s_h = 0.4``, ``r_1 = 0.3``,
  ``r_2 = 1 / 0.3``; it took WRN-28-10 from 4.01% to 3.65% test error.  A rectangle that would not
  fit is clipped to the image (their algorithm redraws it; clipping keeps the draw count fixed, so
  one batch always consumes the same random numbers).

Both work on ``[B, C, H, W]`` (or ``[B, H, W]``) batches, every channel moved or erased alike.

- :func:`mix_rows`: the student's mixup of a batch's rows *and their soft targets* (Zhang et al., ICLR
  2018, "mixup"), an approximation of a views cache's mixed views (:mod:`pipeline.views`) that runs no
  teacher: the mixed row's target is the same mix of the two rows' targets, not the teacher's output
  for the mixed image.
"""
from __future__ import annotations

import math

import torch

ERASE_AREA = (0.02, 0.4)       # s_l, s_h: fraction of the image erased (Zhong et al.)
ERASE_RATIO = (0.3, 1 / 0.3)   # r_1, r_2: aspect ratio height / width of the rectangle


def hflip(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``x`` along its last (W) axis with probability ``p``."""
    if p <= 0:
        return x
    flip = torch.rand(x.shape[0], generator=gen) < p
    return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


def erase(x: torch.Tensor, p: float, gen: torch.Generator, low: float | torch.Tensor,
          high: float | torch.Tensor) -> torch.Tensor:
    """Random erasing: a rectangle of each image (with probability ``p``) filled with values drawn
    uniformly from ``[low, high]`` (one number, or one per channel: the normalised black and white
    pixel, so that the filling is made of pixels the data could hold)."""
    if p <= 0:
        return x
    squeeze = x.ndim == 3
    if squeeze:
        x = x[:, None]
    b, c, h, w = x.shape
    do = torch.rand(b, generator=gen) < p
    area = h * w * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * torch.rand(b, generator=gen))
    lo_r, hi_r = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    ratio = torch.exp(lo_r + (hi_r - lo_r) * torch.rand(b, generator=gen))
    eh = torch.sqrt(area * ratio).round().clamp(1, h)
    ew = torch.sqrt(area / ratio).round().clamp(1, w)
    y0 = (torch.rand(b, generator=gen) * (h - eh + 1)).floor()
    x0 = (torch.rand(b, generator=gen) * (w - ew + 1)).floor()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = (do.view(b, 1, 1) & (rows >= y0.view(b, 1, 1)) & (rows < (y0 + eh).view(b, 1, 1))
              & (cols >= x0.view(b, 1, 1)) & (cols < (x0 + ew).view(b, 1, 1)))      # [B, H, W]
    low_t = torch.as_tensor(low, dtype=x.dtype).reshape(1, -1, 1, 1)
    high_t = torch.as_tensor(high, dtype=x.dtype).reshape(1, -1, 1, 1)
    fill = low_t + (high_t - low_t) * torch.rand(x.shape, generator=gen, dtype=x.dtype)
    out = torch.where(inside[:, None], fill, x)
    return out[:, 0] if squeeze else out


def mix_rows(x: torch.Tensor, t: torch.Tensor, p: float,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each row of a batch, with probability ``p``, with a partner row of the same batch::

        x_i' = (1 - lam_i) x_i + lam_i x_j,   t_i' = (1 - lam_i) t_i + lam_i t_j,   j = perm(i)

    ``lam_i = min(b, 1 - b)``, ``b ~ U(0, 1)`` (Beta(1, 1) folded to <= 1/2, as a views cache's
    ``--view-mixup`` draws it: the row stays the larger part, so its label stays its own), ``perm`` a
    random permutation of the batch (a row may draw itself: no change).  ``x`` is any ``[B, ...]``
    batch (normalised pixels: normalising is affine, so mixing them mixes the raw images), ``t`` the
    ``[B, classes]`` soft targets; a convex mix of distributions is one.  The teacher's output for the
    mixed image is not known here (that is what a views cache stores): ``t_i'`` is its linear
    interpolation, exact only where the teacher is linear between the two rows.  ``p = 0`` returns the
    inputs and draws nothing, so a schedule without mixing is unchanged.
    """
    if p <= 0:
        return x, t
    n = x.shape[0]
    partner = torch.randperm(n, generator=gen)
    b = torch.rand(n, generator=gen)
    lam = torch.where(torch.rand(n, generator=gen) < p, torch.minimum(b, 1 - b), torch.zeros(()))
    lx = lam.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    lt = lam.view(-1, 1).to(t.dtype)
    return (1 - lx) * x + lx * x[partner], (1 - lt) * t + lt * t[partner]
