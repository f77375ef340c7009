"""A 100-class task from real images: two Fashion-MNIST images side by side, of class ``10 a + b``.

    python scripts/fashion_pairs.py --out pairs.npz [--source /usr/share/datasets/fashion-mnist] \
        [--train-pairs 60000] [--test-pairs 10000] [--seed 0]
    distill prepare --npz pairs.npz --layout nchw --classes 100 --out data/prepared/fashion-pairs.h5

Image ``x = [left | right]`` is 1 x 28 x 56 pixels (uint8, one channel, channel-first), the left image of class ``a``
and the right of class ``b``, and its label is ``10 a + b``: 100 classes.  Train pairs are drawn
from the source's training images, test pairs from its test images, so no test image is ever seen
in training.  Each pair draws both images independently and uniformly (seeded), so every class
has about ``pairs / 100`` rows.

Why it is an honest many-class task: every pixel is a real image; the 100 classes have a structure
a teacher learns from the pixels alone (the class is a pair of garments, and a network must tell
both apart where they sit); and it is ambiguous in exactly the way soft targets carry -- a shirt
half that could be a T-shirt or a pullover spreads the teacher's probability over the classes
``10 a' + b`` of the other readings, a handful of the 100, while most classes get nearly nothing:
the shape of target top-k compression is meant for.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.prepare.stage import load_idx_dir


def pairs(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs of rows of ``x`` [rows, 28, 28] side by side, and their labels ``10 a + b``."""
    left, right = rng.integers(0, len(x), n), rng.integers(0, len(x), n)
    return np.concatenate([x[left], x[right]], axis=-1)[:, None], (10 * y[left] + y[right]).astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-pairs", type=int, default=60000)
    ap.add_argument("--test-pairs", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    src = load_idx_dir(a.source)
    rng = np.random.default_rng(a.seed)
    (xtr, ytr), (xte, yte) = src["train"], src["test"]
    x, y = pairs(xtr.reshape(-1, 28, 28), ytr, a.train_pairs, rng)
    x_test, y_test = pairs(xte.reshape(-1, 28, 28), yte, a.test_pairs, rng)
    np.savez(a.out, x=x, y=y, x_test=x_test, y_test=y_test)
    print(f"{a.out}: {len(x)} train and {len(x_test)} test pairs of 28 x 56, 100 classes "
          f"({np.bincount(y, minlength=100).min()} to {np.bincount(y, minlength=100).max()} train rows a class)")


if __name__ == "__main__":
    main()
