"""Colour test data made by the tests: coloured shapes, and the forms a user's images come in.

:func:`coloured_shapes` draws 10 classes (5 shapes x 2 colours: telling them apart takes both the
shape and the colour channels) at random positions and sizes, with colour and background noise,
deterministic from the seed.  :func:`write_folder` writes them as an image folder, :func:`folder_order`
gives the order in which ``prepare --image-folder`` reads them back, so an .npz in that order must
prepare to the very same arrays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
