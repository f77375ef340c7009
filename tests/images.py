"""Colour test data made by the tests: coloured shapes, and the forms a user's images come in.

:func:`coloured_shapes` draws 10 classes (5 shapes x 2 colours: telling them apart takes both the
shape and the colour channels) at random positions and sizes, with colour and background noise,
deterministic from the seed.  :func:`write_folder` writes them as an image folder, :func:`folder_order`
gives the order in which ``prepare --image-folder`` reads them back, so an .npz in that order must
prepare to the very same arrays.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

from pipeline.formats.prepared import open_prepared

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {"red": (220, 50, 40), "blue": (40, 90, 230)}
CLASSES = tuple(sorted(f"{c}-{s}" for c in COLOURS for s in SHAPES))  # as the folder names sort


def _draw(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        t = max(1.5, r / 3)
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    else:
        d.ellipse(box, outline=colour, width=max(2, int(r / 3)))


def coloured_shapes(n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, size, size, 3] (channel-last, as Pillow and most users hold them) and int64
    labels [n], indices into :data:`CLASSES`."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    x = np.empty((n, size, size, 3), np.uint8)
    for i, label in enumerate(y):
        colour_name, shape = CLASSES[label].split("-")
        base = rng.integers(0, 70)
        img = Image.fromarray(np.full((size, size, 3), base, np.uint8))
        r = rng.uniform(size * 0.22, size * 0.36)
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in COLOURS[colour_name])
        _draw(ImageDraw.Draw(img), shape, cx, cy, r, colour)
        noisy = np.asarray(img, np.int16) + rng.integers(-12, 13, (size, size, 3))
        x[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


def folder_order(y: np.ndarray) -> np.ndarray:
    """The order in which an image folder written by :func:`write_folder` is read: by class, then by
    file name (the row index, zero-padded)."""
    return np.argsort(y, kind="stable")


def write_folder(root: Path, x: np.ndarray, y: np.ndarray, names=CLASSES, suffix: str = ".png",
                 **save: object) -> Path:
    """``x`` ([n, H, W, 3] or [n, H, W]) as ``root/<class name>/<row index>.png``, a folder for each
    class that has rows; ``save``: Pillow's save options (``quality=95`` for JPEG)."""
    root = Path(root)
    for label in np.unique(y):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(x, y)):
        Image.fromarray(img).save(root / names[label] / f"{i:05d}{suffix}", **save)
    return root


def assert_same_content(a: Path, b: Path) -> None:
    """Two prepared files hold the same content: classes, statistics, shapes, every split's arrays
    (their provenance, which names the source, may differ)."""
    ia, ib = open_prepared(a), open_prepared(b)
    assert (ia.classes, ia.scale, ia.mean, ia.std, ia.shape, ia.rows) == \
        (ib.classes, ib.scale, ib.mean, ib.std, ib.shape, ib.rows)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for split in ("train", "val", "test"):
            for k in ("x", "y"):
                np.testing.assert_array_equal(fa[split][k][:], fb[split][k][:], err_msg=f"{split}/{k}")


def channel_distinct(n: int, channels: int, h: int, w: int, seed: int = 0, step: int = 10) -> np.ndarray:
    """uint8 images [n, channels, h, w] whose channel c holds ``c * step + p``, p a random pattern in
    [1, step - 1] shared by every channel: a value tells which channel it came from."""
    pattern = np.random.default_rng(seed).integers(1, step, (n, 1, h, w))
    return (pattern + step * np.arange(channels)[None, :, None, None]).astype(np.uint8)


def moved(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """Image ``a`` [C, H, W] translated by (dy, dx) with channel c's ``fill[c]`` shifted in."""
    c, h, w = a.shape
    out = np.empty_like(a)
    out[...] = np.broadcast_to(np.asarray(fill, a.dtype).reshape(-1, 1, 1), a.shape)
    out[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
        a[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def spatial_shift(a: np.ndarray, b: np.ndarray, fill, max_shift: int) -> tuple[int, int] | None:
    """The one (dy, dx) that moves every channel of ``a`` [C, H, W] onto ``b`` with each channel's
    fill shifted in, if there is one (None when a channel moved otherwise, or mixed with another)."""
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            if np.array_equal(moved(a, dy, dx, fill), b):
                return dy, dx
    return None
