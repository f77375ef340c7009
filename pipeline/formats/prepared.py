"""The prepared transfer set, schema ``kd-prepared/1``: its only writer and its only reader.

Layout (docs/formats.md, "prepared set")::

    /            attrs: schema, classes (JSON list of names), scale, mean, std, provenance (JSON),
                        content_sha256 (the seal, :mod:`pipeline.formats.h5seal`)
    /<split>/x   uint8 or float32 [rows, *shape]   raw pixels, as the source gave them
    /<split>/y   int64 [rows]                       -1 where unlabelled (train only)

for the splits ``train``, ``val`` and ``test``.  Images are channel-first: ``shape`` is
``[channels, height, width]`` (``[height, width]`` for an .npz of single-channel images without a
channel axis; ``[features]`` for rows that are not images).  Models see ``(x / scale - mean) / std``
as float32 (:meth:`Prepared.normalise`); mean and std are measured on the train split, in the
units of ``x / scale``:

- ``scale``: a float64 scalar (255 for uint8 pixels, 1 for float data);
- ``mean`` and ``std``: float64 scalars for single-channel data (every Fashion-MNIST or MNIST file,
  byte for byte what it was before per-channel statistics existed), or, for rows of shape
  ``[C, H, W]`` with ``C > 1``, float64 arrays of length ``C``: channel c is normalised with
  ``mean[c]`` and ``std[c]``.  Both have the same form; every value is finite and every std > 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import DataError
from pipeline.formats import h5seal
from pipeline.formats.h5write import H5Output

SCHEMA = "kd-prepared/1"
SPLITS = ("train", "val", "test")
WHAT = "prepared dataset"
REBUILD = "make prepare"
METADATA_BYTES = 64 << 10  # headroom for HDF5's own structures, attributes and provenance


def predicted_size(rows: dict[str, int], shape: tuple[int, ...], dtype: Any) -> tuple[int, str]:
    """Bytes a prepared file with these split sizes takes (contiguous datasets: x, int64 labels, plus
    :data:`METADATA_BYTES`), and the figure as a formula a user can check."""
    row = int(np.prod(shape)) * np.dtype(dtype).itemsize
    n = sum(rows.values())
    return n * (row + 8) + METADATA_BYTES, (
        f"{' + '.join(f'{r} {s}' for s, r in rows.items())} rows x ({'x'.join(map(str, shape))} pixels x "
        f"{np.dtype(dtype).itemsize} bytes + 8 bytes of label) + {METADATA_BYTES >> 10} KiB")


Stat = float | tuple[float, ...]  # one value, or one per channel


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """``(x / scale - mean) / std``: what every model of the pipeline is fed, as float32.

    ``mean`` and ``std`` are floats, or tuples of one float per channel of ``[C, H, W]`` rows.
    """

    scale: float
    mean: Stat
    std: Stat

    @property
    def per_channel(self) -> bool:
        return isinstance(self.mean, tuple)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (per-channel statistics as lists), as checkpoints and exports record it."""
        def plain(v: Stat) -> Any:
            return list(v) if isinstance(v, tuple) else v
        return {"scale": self.scale, "mean": plain(self.mean), "std": plain(self.std)}

    def arrays(self) -> tuple[np.float32, np.ndarray, np.ndarray]:
        """scale, mean and std as float32, mean and std shaped ``[C, 1, 1]`` when per channel (they
        broadcast against ``[..., C, H, W]``), else 0-d."""
        mean, std = (np.asarray(v, np.float32) for v in (self.mean, self.std))
        if self.per_channel:
            mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        return np.float32(self.scale), mean, std


def _stat_attr(value: Stat) -> Any:
    """How a statistic is stored: a float64 scalar, or a float64 array of one value per channel."""
    return np.asarray(value, np.float64) if isinstance(value, tuple) else float(value)


def _read_stat(value: Any) -> Stat:
    a = np.asarray(value)
    if a.dtype.kind not in "fiu" or a.ndim > 1:
        raise ValueError(f"a statistic of dtype {a.dtype} and shape {a.shape}")
    return float(a) if a.ndim == 0 else tuple(float(v) for v in a)


class PreparedWriter:
    """Writes one prepared file into an open path (normally a ``.partial``), sealed on :meth:`close`.

    ``put`` writes a whole split; ``allocate`` creates a split's datasets for the caller to fill
    in blocks (a split larger than memory, as the transfer-set augmentation writes); ``copy``
    takes a split from another prepared file unchanged.  A failed write (full disk, file-size limit)
    is raised as the OSError it was (:mod:`pipeline.formats.h5write`), after each split and on close.
    """

    def __init__(self, path: Path, classes: list[str] | tuple[str, ...], norm: Normalisation,
                 provenance: dict[str, Any]):
        self.out = H5Output(path, "w")
        self.f = self.out.f
        self.f.attrs.update(schema=SCHEMA, classes=json.dumps(list(classes)), scale=float(norm.scale),
                            mean=_stat_attr(norm.mean), std=_stat_attr(norm.std), provenance=json.dumps(provenance))

    def put(self, split: str, x: np.ndarray, y: np.ndarray) -> None:
        g = self.f.create_group(split)
        g.create_dataset("x", data=x if x.dtype == np.uint8 else x.astype(np.float32))
        g.create_dataset("y", data=np.asarray(y).astype(np.int64))
        self.out.check()

    def allocate(self, split: str, rows: int, shape: tuple[int, ...], dtype: Any) -> tuple[h5py.Dataset, h5py.Dataset]:
        g = self.f.create_group(split)
        return (g.create_dataset("x", shape=(rows, *shape), dtype=np.dtype(dtype)),
                g.create_dataset("y", shape=(rows,), dtype=np.int64))

    def copy(self, source: Path, split: str) -> None:
        with h5seal.open_untrusted(source, WHAT, REBUILD) as src:
            src.copy(src[split], self.f, name=split)
        self.out.check()

    def check(self) -> None:
        """Raise a failed write now (a caller filling allocated datasets in blocks calls it per block)."""
        self.out.check()

    def close(self, seal: bool = True) -> None:
        try:
            if seal:
                self.out.flush()  # a failed write is raised here, never sealed over
                h5seal.seal(self.f)
        finally:
            self.out.close()

    def __enter__(self) -> PreparedWriter:
        return self

    def __exit__(self, kind, *_: Any) -> None:
        self.close(seal=kind is None)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked prepared file: what the later stages need besides the arrays, and readers of them."""

    path: Path
    classes: tuple[str, ...]
    scale: float
    mean: Stat
    std: Stat
    shape: tuple[int, ...]
    rows: dict[str, int]
    dtype: str = "uint8"
    provenance: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def norm(self) -> Normalisation:
        return Normalisation(self.scale, self.mean, self.std)

    @property
    def channels(self) -> int:
        """Channels of a row: ``C`` of ``[C, H, W]`` rows, else 1."""
        return self.shape[0] if len(self.shape) == 3 else 1

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Raw pixels -> model input, float32: ``(x / scale - mean) / std``, per channel when the
        statistics are (``x`` is then ``[..., C, H, W]``).

        In place on one float32 copy (never the caller's array): one batch-sized array instead of
        four temporaries, with the same float32 operations in the same order.
        """
        scale, mean, std = self.norm.arrays()
        x = x.astype(np.float32)
        x /= scale
        x -= mean
        x /= std
        return x

    def black(self) -> np.ndarray:
        """The normalised value of a black (zero) pixel, float32: one value per channel when the
        statistics are per channel, else one value (what shifted-in pixels of an image become)."""
        zero = np.zeros((1, len(self.mean), 1, 1) if self.norm.per_channel else (1,), np.float32)
        return self.normalise(zero).reshape(-1)

    def load(self, split: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Normalised x (float32) and y of rows ``[start, stop)`` of ``split``; one contiguous read."""
        x, y = self.load_raw(split, start, stop)
        return self.normalise(x), y

    def load_raw(self, split: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x as stored (the raw pixels, uint8 for image sources) and y of rows ``[start, stop)``."""
        with h5py.File(self.path, "r") as f:
            return f[split]["x"][start:stop], f[split]["y"][start:stop]

    def labels(self, split: str) -> np.ndarray:
        """Every label of ``split`` (int64; -1 marks an unlabelled row): 8 bytes a row, one read."""
        with h5py.File(self.path, "r") as f:
            return f[split]["y"][:]

    def take(self, split: str, rows: np.ndarray, block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """x as stored and y of the sorted row indices ``rows`` of ``split``, read in contiguous blocks
        of at most ``block`` rows (only the blocks that hold a wanted row), never row by row."""
        rows = np.asarray(rows, np.int64)
        xs, ys = [], []
        with h5py.File(self.path, "r") as f:
            x, y = f[split]["x"], f[split]["y"]
            for a in np.unique(rows // block) * block:
                want = rows[(rows >= a) & (rows < a + block)]
                lo, hi = int(want[0]), int(want[-1]) + 1
                xs.append(x[lo:hi][want - lo])
                ys.append(y[lo:hi][want - lo])
        if not xs:
            return np.zeros((0, *self.shape), self.dtype), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    @contextlib.contextmanager
    def rows_reader(self, split: str) -> Iterator[Callable[[int, int], tuple[np.ndarray, np.ndarray]]]:
        """``read(lo, hi) -> (raw x, y)`` of contiguous rows of ``split``, over one open handle."""
        with h5py.File(self.path, "r") as f:
            xs, ys = f[split]["x"], f[split]["y"]
            yield lambda lo, hi: (xs[lo:hi], ys[lo:hi])

    def blocks(self, split: str, lo: int, hi: int, block: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(start, raw x, y)`` of contiguous blocks of at most ``block`` rows covering ``[lo, hi)``,
        the file opened once."""
        with h5py.File(self.path, "r") as f:
            xs, ys = f[split]["x"], f[split]["y"]
            for a in range(lo, hi, block):
                b = min(hi, a + block)
                yield a, xs[a:b], ys[a:b]


def _check_normalisation(path: Path, scale: float, mean: Stat, std: Stat, shape: tuple[int, ...]) -> None:
    """Finite values, scale and every std > 0; per-channel statistics only for ``[C, H, W]`` rows with
    ``C > 1``, one value per channel, mean and std alike."""
    if isinstance(mean, tuple) or isinstance(std, tuple):
        channels = shape[0] if len(shape) == 3 else None
        if not (isinstance(mean, tuple) and isinstance(std, tuple) and len(mean) == len(std) == channels
                and channels > 1):
            raise DataError(f"{path}: bad normalisation: per-channel mean ({_n(mean)}) and std ({_n(std)}) "
                            f"for rows of shape {list(shape)} (one value per channel of [C, H, W] rows, C > 1)")
    values = np.array([scale, *np.atleast_1d(mean), *np.atleast_1d(std)], np.float64)
    if not (np.isfinite(values).all() and scale > 0 and (np.atleast_1d(std) > 0).all()):
        raise DataError(f"{path}: bad normalisation (scale {scale}, mean {mean}, std {std})")


def _n(v: Stat) -> str:
    return f"{len(v)} values" if isinstance(v, tuple) else "a scalar"


def open_prepared(path: Path) -> Prepared:
    """Open and check a prepared file; DataError (one line) when it is not one.

    Untrusted input (:mod:`pipeline.formats.h5seal`): the schema first, shapes and dtypes bounded
    before any read, the seal (content checksum) verified, then the attributes and every split's
    shapes and labels (in [-1, classes) for train, [0, classes) for val and test).
    """
    path = Path(path)
    with h5seal.open_untrusted(path, WHAT, REBUILD) as f:
        h5seal.check_schema(path, f, SCHEMA, WHAT, REBUILD)
        h5seal.verify(path, f, REBUILD)
        missing = [s for s in SPLITS if s not in f or "x" not in f[s] or "y" not in f[s]]
        if missing:
            raise DataError(f"{path}: {WHAT} without split(s) {', '.join(missing)}")
        rows = {s: int(f[s]["y"].shape[0]) for s in SPLITS}
        shape = tuple(int(d) for d in f["train"]["x"].shape[1:])
        try:
            classes = json.loads(f.attrs["classes"])
            scale = float(f.attrs["scale"])
            mean, std = (_read_stat(f.attrs[k]) for k in ("mean", "std"))
            prov = json.loads(f.attrs.get("provenance", "{}"))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: {WHAT} with missing or malformed attributes") from None
        if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
            raise DataError(f"{path}: attribute classes is not a list of at least two names")
        _check_normalisation(path, scale, mean, std, shape)
        for s in SPLITS:
            if f[s]["x"].shape != (rows[s], *shape) or f[s]["y"].ndim != 1:
                raise DataError(f"{path}: split {s} has x {f[s]['x'].shape} and {rows[s]} labels")
            if rows[s] == 0:
                raise DataError(f"{path}: the {s} split is empty")
            y = f[s]["y"][:]
            lo = -1 if s == "train" else 0
            if y.dtype.kind not in "iu" or ((y < lo) | (y >= len(classes))).any():
                raise DataError(f"{path}: split {s} has labels outside [{lo}, {len(classes)})")
        dtype = str(f["train"]["x"].dtype)
        return Prepared(path, tuple(classes), scale, mean, std, shape, rows, dtype, prov)
