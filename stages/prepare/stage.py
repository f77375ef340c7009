"""Stage 1, prepare: a transfer set into the canonical file ``data/prepared/<ds>.h5``.

Sources: a directory of MNIST-format IDX files (Fashion-MNIST from Debian's
``dataset-fashion-mnist`` by default, real MNIST too), or an ``.npz`` with arrays ``x`` and ``y``
(``y = -1`` marks an unlabelled row; such rows stay in the train split, the transfer set).

The file is written by :class:`pipeline.formats.prepared.PreparedWriter` (schema ``kd-prepared/1``,
docs/formats.md); models see ``(x / scale - mean) / std`` as float32, with mean and std scalars
measured on the train split.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from pipeline import provenance
from pipeline.artifacts import atomic_output
from pipeline.config import to_dict
from pipeline.errors import DataError
from pipeline.formats.prepared import Normalisation, PreparedWriter
from stages.prepare.settings import PrepareConfig

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped), checking its magic number and declared size."""
    try:
        raw = gzip.open(path).read() if str(path).endswith(".gz") else Path(path).read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX body has {len(raw) - header} bytes, header declares {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(source: Path, stem: str) -> Path:
    for cand in (source / stem, source / f"{stem}.gz", source / stem.replace("-idx", ".idx")):
        if cand.is_file():
            return cand
    raise DataError(f"{source}: missing IDX file {stem}[.gz]")


def load_idx_dir(source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and test arrays from an MNIST-format directory: x [n, 1, H, W] uint8, y int64."""
    if not Path(source).is_dir():
        raise DataError(f"{source}: dataset directory not found (for Fashion-MNIST: "
                        f"apt-get install dataset-fashion-mnist)")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find_idx(source, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find_idx(source, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{source}: {prefix} images {x.shape} and labels {y.shape} do not match")
        out[split] = (x[:, None], y.astype(np.int64))
    return out


def load_npz(path: Path, seed: int, test_fraction: float = 1 / 7) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Arrays ``x`` [n, ...] and ``y`` [n] from a user's .npz; ``x_test``/``y_test`` if present,
    else a seeded 1/7 of the labelled rows becomes the test split."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read .npz ({e})") from None
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path}: .npz needs arrays 'x' and 'y', has {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"].astype(np.int64)
    if "x_test" in arrays and "y_test" in arrays:
        return {"train": (x, y), "test": (arrays["x_test"], arrays["y_test"].astype(np.int64))}
    labelled = np.flatnonzero(y >= 0)
    rng = np.random.default_rng(seed)
    test = np.sort(rng.permutation(labelled)[: max(1, int(len(labelled) * test_fraction))])
    keep = np.setdiff1d(np.arange(len(y)), test)
    return {"train": (x[keep], y[keep]), "test": (x[test], y[test])}


def _check_arrays(name: str, split: str, x: np.ndarray, y: np.ndarray, classes: int, shape: tuple) -> None:
    if len(x) == 0:
        raise DataError(f"{name}: the {split} split is empty")
    if len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{name}: {split} has {len(x)} images but {len(y)} labels")
    if x.shape[1:] != shape:
        raise DataError(f"{name}: {split} images have shape {x.shape[1:]}, train has {shape}")
    if x.dtype != np.uint8 and not np.isfinite(x).all():
        raise DataError(f"{name}: {split} images contain NaN or Inf")
    lo = -1 if split == "train" else 0
    bad = (y < lo) | (y >= classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name}: {split} label {int(y[i])} at row {i} is outside [0, {classes})")


def _split(arrays: dict, cfg: PrepareConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Carve a seeded validation split out of the labelled training rows, then sub-sample."""
    rng = np.random.default_rng(cfg.seed)
    x, y = arrays["train"]
    labelled = np.flatnonzero(y >= 0)
    if len(labelled) < cfg.val_rows:
        raise DataError(f"only {len(labelled)} labelled training rows, val_rows is {cfg.val_rows}")
    val = np.sort(rng.permutation(labelled)[: cfg.val_rows])
    train = np.setdiff1d(np.arange(len(y)), val)
    if cfg.train_rows:
        train = np.sort(rng.permutation(train)[: cfg.train_rows])
    xt, yt = arrays["test"]
    test = np.arange(len(yt))
    if cfg.test_rows:
        test = np.sort(rng.permutation(test)[: cfg.test_rows])
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (xt[test], yt[test])}


def prepare_dataset(cfg: PrepareConfig, out: Path, source: Path | None = None, npz: Path | None = None) -> Path:
    """Read ``source`` (IDX dir) or ``npz``, check it, split it and write ``out`` atomically."""
    if (source is None) == (npz is None):
        raise DataError("give exactly one of an IDX source directory or an .npz file")
    origin = Path(source if source is not None else npz)
    arrays = load_idx_dir(origin) if source is not None else load_npz(origin, cfg.seed)
    shape = arrays["train"][0].shape[1:]
    for split, (x, y) in arrays.items():
        _check_arrays(str(origin), split, x, y, cfg.classes, shape)
    splits = _split(arrays, cfg)
    scale = 255.0 if splits["train"][0].dtype == np.uint8 else 1.0
    xtr = splits["train"][0]
    mean = float(np.mean(xtr, dtype=np.float64) / scale)
    std = float(np.std(xtr, dtype=np.float64) / scale) or 1.0
    names = cfg.class_names or (FASHION_CLASSES if "fashion" in str(origin).lower() and cfg.classes == 10
                                else tuple(str(i) for i in range(cfg.classes)))
    files = sorted(origin.iterdir()) if origin.is_dir() else [origin]
    prov = provenance.record("prepare", to_dict(cfg), {f.name: f for f in files if f.is_file()},
                             source=str(origin))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp, PreparedWriter(tmp, names, Normalisation(scale, mean, std), prov) as w:
        for split, (x, y) in splits.items():
            w.put(split, x, y)
    return out
