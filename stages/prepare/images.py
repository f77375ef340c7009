"""A folder of PNG and JPEG images, one subfolder per class, read through Pillow.

Two shapes of folder::

    DIR/<class>/<image>                    every image; the test split is carved from them
    DIR/train/<class>/<image>              and DIR/test/<class>/<image>, the same classes in both

Class names are the folder names, sorted (``sorted()`` of the names: "10" sorts before "2"); the
label of a class is its index in that order.  Files are read in a fixed order (split, class, file
name), so the same folder always gives the same arrays.  Names starting with "." are skipped
everywhere (.DS_Store, editor files); other files beside the class folders are skipped and counted;
every other file inside a class folder must be a PNG or JPEG image.

Every image is decoded to 8-bit grey (``L``, 1 channel) or ``RGB`` (3 channels; an alpha channel is
dropped, a palette expanded, grey replicated; colour to grey is Pillow's ITU-R 601-2 luma), after
the EXIF orientation of a JPEG is applied; with ``size`` it is then resized to exactly H x W with
Pillow's antialiased bilinear filter (``Image.Resampling.BILINEAR``: every source pixel contributes
when shrinking; the aspect ratio is not kept).  Rows are channel-first uint8 ``[C, H, W]``.

Two passes: the headers first (cheap: format, size, mode), so a non-image file, mixed sizes without
``size`` or a 16-bit image is reported before anything is decoded; then every file is read once,
hashed (the provenance records one sha256 of every file's path and bytes) and decoded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import runtime
from pipeline.errors import DataError

FORMATS = ("PNG", "JPEG")
GREY = {"1", "L", "LA", "La"}  # modes whose pixels are grey levels
SPLIT_DIRS = ("train", "test")
RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking, as torchvision's Resize
_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Folder:
    """What a scan of the folder found: class names and each split's (file, label) pairs in order."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, list[tuple[Path, int]]]
    skipped: int  # files beside the class folders


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, files) of ``folder``, sorted by name, hidden names left out."""
    items = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    return [p for p in items if p.is_dir()], [p for p in items if not p.is_dir()]


def _classes(split_dir: Path) -> tuple[dict[str, list[Path]], int]:
    """Class name -> its image files (sorted), and the number of files beside the class folders."""
    dirs, files = _entries(split_dir)
    out = {}
    for d in dirs:
        sub, images = _entries(d)
        if sub:
            raise DataError(f"{sub[0]}: a folder inside class folder {d.name}; class folders hold image files only")
        if not images:
            raise DataError(f"{d}: empty class folder (no image files)")
        out[d.name] = images
    return out, len(files)


def find_images(root: Path) -> Folder:
    """The class folders and files under ``root``; DataError (one line naming the folder) when it is not
    an image folder of either shape."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    dirs, _ = _entries(root)
    names = [d.name for d in dirs]
    split = [n for n in names if n in SPLIT_DIRS]
    if split and names not in (["test", "train"], ["train"]):
        what = (f"beside other folders ({', '.join(n for n in names if n not in SPLIT_DIRS)})"
                if "train" in names else "but no train/")
        raise DataError(f"{root}: holds {'/ and '.join(split)}/ {what}; give either one folder per class, "
                        "or train/ and test/ each with one folder per class")
    base = root / "train" if split else root
    train, skipped = _classes(base)
    if len(train) < 2:
        raise DataError(f"{base}: {len(train)} class folder(s); an image folder needs one folder per class, "
                        "at least two")
    classes = tuple(train)
    splits = {"train": [(f, i) for i, c in enumerate(classes) for f in train[c]]}
    if "test" in names:
        test, more = _classes(root / "test")
        skipped += more
        missing = [c for c in classes if c not in test]
        if missing:
            raise DataError(f"{root / 'test'}: no folder for class {missing[0]!r} (train/{missing[0]} has "
                            f"{len(train[missing[0]])} images); test/ needs a folder for every class of train/")
        extra = [c for c in test if c not in train]
        if extra:
            raise DataError(f"{root / 'test' / extra[0]}: class {extra[0]!r} has no folder in train/")
        splits["test"] = [(f, i) for i, c in enumerate(classes) for f in test[c]]
    return Folder(root, classes, splits, skipped)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data) if data is not None else path, formats=FORMATS)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a PNG or JPEG image") from None
    except _ERRORS as e:
        raise DataError(f"{path}: corrupt image ({_why(e)})") from None


def _header(path: Path) -> tuple[int, int, str]:
    """(height, width, mode) as the image will be decoded (JPEG EXIF orientation applied)."""
    with _open(path) as im:
        try:
            w, h = im.size
            if im.format == "JPEG" and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # turned by 90 degrees
                w, h = h, w
        except _ERRORS as e:
            raise DataError(f"{path}: corrupt image ({_why(e)})") from None
        if im.mode[0] in "IF":
            raise DataError(f"{path}: {im.mode} image (16 or 32 bits per pixel); convert it to 8-bit PNG or JPEG")
        return h, w, im.mode


def scan(files: list[Path], size: tuple[int, int] | None, mode: str) -> tuple[int, int, str]:
    """Check every header: the (height, width) and mode the rows will have."""
    first, shape, modes = None, None, set()
    for path in runtime.progress(files, total=len(files), desc="prepare: headers", unit="image", leave=False):
        h, w, m = _header(path)
        modes.add(m)
        if first is None:
            first, shape = path, (h, w)
        elif size is None and (h, w) != shape:
            raise DataError(f"{path}: {h}x{w} pixels, but {first} is {shape[0]}x{shape[1]}; give --size "
                            "HEIGHTxWIDTH to resize every image")
    if mode == "auto":
        mode = "L" if modes <= GREY else "RGB"
    return *(size or shape), mode


def _decode(path: Path, data: bytes, h: int, w: int, mode: str) -> np.ndarray:
    with _open(path, data) as im:
        try:
            img = ImageOps.exif_transpose(im) if im.format == "JPEG" else im
            img = img.convert(mode)
            if img.size != (w, h):
                img = img.resize((w, h), RESAMPLE)
            return np.asarray(img)
        except _ERRORS as e:
            raise DataError(f"{path}: corrupt image ({_why(e)})") from None


def read_images(folder: Folder, size: tuple[int, int] | None, mode: str, log: Callable[[str], None]
                ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Every split's uint8 rows ``[n, C, H, W]`` and int64 labels, and what the provenance records."""
    files = [f for pairs in folder.splits.values() for f, _ in pairs]
    h, w, mode = scan(files, size, mode)
    channels = 1 if mode == "L" else 3
    digest = hashlib.sha256()
    out = {}
    with runtime.progress(total=len(files), desc="prepare: images", unit="image", leave=False) as bar:
        for split, pairs in folder.splits.items():
            x = np.empty((len(pairs), channels, h, w), np.uint8)
            for i, (path, _) in enumerate(pairs):
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise DataError(f"{path}: cannot read ({_why(e)})") from None
                digest.update(path.relative_to(folder.root).as_posix().encode() + b"\0"
                              + len(data).to_bytes(8, "little") + data)
                pixels = _decode(path, data, h, w, mode)
                x[i] = pixels if mode == "L" else pixels.transpose(2, 0, 1)
                bar.update()
            out[split] = (x, np.array([label for _, label in pairs], np.int64))
    counts = " / ".join(f"{len(p)} {s}" for s, p in folder.splits.items())
    log(f"prepare: {folder.root}: {len(folder.classes)} classes, {counts} images -> mode {mode}, {h}x{w}"
        + (f" (--size: {RESAMPLE.name.lower()} resize)" if size else "")
        + (f"; {folder.skipped} file(s) beside the class folders skipped" if folder.skipped else ""))
    record = {"files": len(files), "sha256": digest.hexdigest(), "mode": mode, "size": [h, w]}
    return out, record
