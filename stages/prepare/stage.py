"""Stage 1, prepare: a transfer set into the canonical file ``data/prepared/<ds>.h5``.

Sources: a directory of MNIST-format IDX files (Fashion-MNIST from Debian's
``dataset-fashion-mnist`` by default, real MNIST too), an ``.npz`` with arrays ``x`` and ``y``
(``y = -1`` marks an unlabelled row; such rows stay in the train split, the transfer set) laid out
as :mod:`.layout` reads it, or a folder of PNG/JPEG images, one subfolder per class
(:mod:`.images`).  A source without a test split (an .npz without ``x_test``, an image folder
without ``test/``) gives a seeded 1/7 of its labelled rows to it.

The file is written by :class:`pipeline.formats.prepared.PreparedWriter` (schema ``kd-prepared/1``,
docs/formats.md); models see ``(x / scale - mean) / std`` as float32, with mean and std measured on
the train split: scalars for single-channel rows, one per channel for ``[C, H, W]`` rows, C > 1.
The provenance records the settings that apply to the kind of source (so an IDX or .npz file is
byte for byte what it was before image folders existed).
"""
from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import provenance
from pipeline.artifacts import atomic_output, check_outputs
from pipeline.config import to_dict
from pipeline.errors import DataError, UsageError
from pipeline.formats.prepared import Normalisation, PreparedWriter
from stages.prepare import layout as layouts
from stages.prepare.settings import SOURCE_ONLY, PrepareConfig, parse_size

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


def carve_test(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = 1 / 7
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A seeded ``test_fraction`` of the labelled rows becomes the test split, the rest stays train."""
    labelled = np.flatnonzero(y >= 0)
    rng = np.random.default_rng(seed)
    test = np.sort(rng.permutation(labelled)[: max(1, int(len(labelled) * test_fraction))])
    keep = np.setdiff1d(np.arange(len(y)), test)
    return {"train": (x[keep], y[keep]), "test": (x[test], y[test])}


def load_npz(path: Path, seed: int, test_fraction: float = 1 / 7, layout: str = "auto",
             log: Callable[[str], None] = lambda m: None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Arrays ``x`` [n, ...] and ``y`` [n] from a user's .npz; ``x_test``/``y_test`` if present,
    else a seeded 1/7 of the labelled rows becomes the test split.  ``x`` (and ``x_test``, read the
    same way) in the canonical layout (:func:`.layout.canonical`)."""
    return _load_npz(path, seed, test_fraction, layout, log)[0]


def _load_npz(path: Path, seed: int, test_fraction: float, layout: str, log: Callable[[str], None]
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read .npz ({e})") from None
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path}: .npz needs arrays 'x' and 'y', has {sorted(arrays)}")
    shape = arrays["x"].shape
    x, got = layouts.canonical(path, "x", arrays["x"], layout)
    layouts.describe(path, shape, got, layout == "auto", log)
    y = arrays["y"].astype(np.int64)
    if "x_test" in arrays and "y_test" in arrays:
        xt = layouts.canonical(path, "x_test", arrays["x_test"], got)[0]
        return {"train": (x, y), "test": (xt, arrays["y_test"].astype(np.int64))}, got
    return carve_test(x, y, seed, test_fraction), got


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


def statistics(x: np.ndarray, scale: float) -> tuple[float | tuple[float, ...], float | tuple[float, ...]]:
    """Mean and std of ``x / scale`` in float64: scalars, or one per channel for ``[n, C, H, W]``, C > 1
    (a constant channel gets std 1)."""
    if x.ndim == 4 and x.shape[1] > 1:
        mean = tuple(float(np.mean(x[:, c], dtype=np.float64) / scale) for c in range(x.shape[1]))
        std = tuple(float(np.std(x[:, c], dtype=np.float64) / scale) or 1.0 for c in range(x.shape[1]))
        return mean, std
    return float(np.mean(x, dtype=np.float64) / scale), float(np.std(x, dtype=np.float64) / scale) or 1.0


def _kind(source: Path | None, npz: Path | None, image_folder: Path | None) -> tuple[str, Path]:
    given = [(k, Path(p)) for k, p in (("idx", source), ("npz", npz), ("image-folder", image_folder)) if p is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of an IDX source directory, an .npz file or an image folder")
    return given[0]


def _source_files(origin: Path) -> list[Path]:
    """The files a source may be read from (a folder's, at any depth): none of them may be the output."""
    if origin.is_dir():
        return [p for p in origin.rglob("*") if p.is_file()]
    return [origin]


def _recorded(cfg: PrepareConfig, kind: str) -> dict:
    """The settings that apply to a source of ``kind``, as the provenance records them; UsageError for
    one that was changed from its default but does not apply."""
    defaults = PrepareConfig()
    drop = {k for k, only in SOURCE_ONLY.items() if only != kind}
    if kind == "image-folder":
        drop |= {"classes", "class_names"}  # the class folders are the classes
    for key in sorted(k for k in SOURCE_ONLY if k in drop):
        if getattr(cfg, key) != getattr(defaults, key):
            raise UsageError(f"--{key} applies to --{SOURCE_ONLY[key]} sources only")
    return {k: v for k, v in to_dict(cfg).items() if k not in drop}


def _image_folder(cfg: PrepareConfig, root: Path, log: Callable[[str], None]) -> tuple[dict, tuple, dict]:
    from stages.prepare import images  # Pillow only when an image folder is read

    folder = images.find_images(root)
    if cfg.class_names:
        raise UsageError("an image folder's class names are its folder names; drop --class-names")
    if cfg.classes not in (PrepareConfig().classes, len(folder.classes)):
        raise UsageError(f"--classes {cfg.classes}, but {root} has {len(folder.classes)} class folders")
    arrays, record = images.read_images(folder, parse_size(cfg.size), cfg.mode, log)
    if "test" not in arrays:
        arrays = carve_test(*arrays["train"], cfg.seed)
    return arrays, folder.classes, {"images": record}


def prepare_dataset(cfg: PrepareConfig, out: Path, source: Path | None = None, npz: Path | None = None,
                    image_folder: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Read ``source`` (IDX dir), ``npz`` or ``image_folder``, check it, split it and write ``out``
    atomically."""
    kind, origin = _kind(source, npz, image_folder)
    check_outputs({f"--{'source' if kind == 'idx' else kind}": _source_files(origin)}, {"--out": out})
    settings = _recorded(cfg, kind)
    extra: dict = {}
    if kind == "image-folder":
        arrays, names, extra = _image_folder(cfg, origin, log)
    else:
        if kind == "idx":
            arrays = load_idx_dir(origin)
        else:
            arrays, got = _load_npz(origin, cfg.seed, 1 / 7, cfg.layout, log)
            extra = {"layout": got}
        names = cfg.class_names or (FASHION_CLASSES if "fashion" in str(origin).lower() and cfg.classes == 10
                                    else tuple(str(i) for i in range(cfg.classes)))
    shape = arrays["train"][0].shape[1:]
    for split, (x, y) in arrays.items():
        _check_arrays(str(origin), split, x, y, len(names), shape)
    splits = _split(arrays, cfg)
    scale = 255.0 if splits["train"][0].dtype == np.uint8 else 1.0
    mean, std = statistics(splits["train"][0], scale)
    if kind == "image-folder":
        inputs = {}
    else:
        files = sorted(origin.iterdir()) if origin.is_dir() else [origin]
        inputs = {f.name: f for f in files if f.is_file()}
    prov = provenance.record("prepare", settings, inputs, source=str(origin), **extra)
    with atomic_output(out) as tmp, PreparedWriter(tmp, names, Normalisation(scale, mean, std), prov) as w:
        for split, (x, y) in splits.items():
            w.put(split, x, y)
    rows = " / ".join(f"{len(y)} {s}" for s, (_, y) in splits.items())
    log(f"prepare: {rows} rows of shape {list(shape)}, {len(names)} classes, "
        + (f"per-channel mean {_fmt(mean)} std {_fmt(std)}" if isinstance(mean, tuple) else
           f"mean {mean:.4f} std {std:.4f}") + f" (of x / {scale:g})")
    return out


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"
