"""The seal of every HDF5 artifact, and opening such files without trusting them (docs/formats.md).

Shared by the readers and writers of :mod:`pipeline.formats` (prepared set, kd-cache, checkpoint).
A truncated or byte-flipped HDF5 file can claim a dataset of 10^12 rows, a chunk of gigabytes, an
attribute of any size, or simply decode to different numbers.  Before anything is read:

- the file is opened with a small chunk cache (``rdcc_nbytes``), so no read holds more than one chunk
  of a few MiB beyond the caller's own array;
- every dataset must have a plain numeric dtype, its chunks at most :data:`MAX_CHUNK_BYTES`, and its
  logical size at most its allocated storage and the file's size (no filters: our files are
  uncompressed) or at most :data:`MAX_BYTES` (filtered);
- every attribute at most :data:`MAX_ATTR_BYTES` of storage.

Then the content checksum written by :func:`seal` (``content_sha256``: every object's name, attributes,
dtype, shape and bytes, in sorted order) is recomputed block by block, so a flipped bit anywhere that
matters is a one-line IntegrityError (exit 4) instead of silently different data.  Float datasets must be finite.
Any error of the HDF5 library while doing so becomes a DataError naming the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import DataError, IntegrityError

DIGEST_ATTR = "content_sha256"
MAX_CHUNK_BYTES = 64 << 20
MAX_ATTR_BYTES = 1 << 20
MAX_BYTES = int(os.environ.get("DISTILL_H5_MAX_BYTES", 16 << 30))  # filtered datasets only
CACHE_BYTES = 4 << 20  # HDF5 chunk cache per open dataset
BLOCK_BYTES = 8 << 20  # rows read per step when hashing
_KINDS = "biuf"  # bool, signed, unsigned, float: nothing compound, variable-length or object
_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, OverflowError)


@contextlib.contextmanager
def open_untrusted(path: Path, what: str, rebuild: str = "") -> Iterator[h5py.File]:
    """Open ``path`` read-only with a small chunk cache; HDF5 errors become DataError(``what``).

    A file shorter than HDF5's recorded end of file is reported as truncated (a copy cut short, a
    disk that filled up), anything else HDF5 cannot open as corrupt; ``rebuild`` names the make
    target that remakes the file.
    """
    path = Path(path)
    fix = f"; rebuild with `{rebuild}`" if rebuild else ""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found" + (f"; run `{rebuild}`" if rebuild else ""))
    try:
        f = h5py.File(path, "r", rdcc_nbytes=CACHE_BYTES, rdcc_nslots=521)
    except _ERRORS as e:
        if "truncated file" in str(e):
            raise DataError(f"{path}: truncated {what} ({os.path.getsize(path)} bytes; the file was cut short)"
                            + fix) from None
        raise DataError(f"{path}: corrupt {what}: not a readable HDF5 file ({_why(e)})" + fix) from None
    try:
        yield f
    except DataError:
        raise
    except _ERRORS as e:
        raise DataError(f"{path}: corrupt {what} ({_why(e)})" + fix) from None
    finally:
        with contextlib.suppress(*_ERRORS):
            f.close()


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def check_dataset(path: Path, ds: h5py.Dataset, file_size: int) -> None:
    """Refuse a dataset whose declared dtype, shape or chunks cannot be read in bounded memory."""
    dt = ds.dtype
    if dt.kind not in _KINDS or dt.fields is not None or dt.subdtype is not None or dt.itemsize > 8:
        raise DataError(f"{path}: dataset {ds.name} has unsupported dtype {dt}")
    nbytes = int(np.prod(ds.shape, dtype=object)) * dt.itemsize if ds.shape is not None else 0
    if ds.chunks is not None and int(np.prod(ds.chunks, dtype=object)) * dt.itemsize > MAX_CHUNK_BYTES:
        raise DataError(f"{path}: dataset {ds.name} has chunks {ds.chunks} larger than {MAX_CHUNK_BYTES >> 20} MiB")
    stored = int(ds.id.get_storage_size())
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    limit = MAX_BYTES if filtered else min(stored, file_size)
    if nbytes > limit:
        raise DataError(f"{path}: dataset {ds.name} declares {ds.shape} ({nbytes} bytes) but the file "
                        f"stores {stored} bytes of it (truncated or corrupt)")


def check_attrs(path: Path, obj: Any) -> None:
    for name in obj.attrs:
        aid = h5py.h5a.open(obj.id, name.encode() if isinstance(name, str) else name)
        if aid.get_storage_size() > MAX_ATTR_BYTES:
            raise DataError(f"{path}: attribute {name!r} of {obj.name} is larger than {MAX_ATTR_BYTES >> 10} KiB")


def _objects(f: h5py.File) -> Iterator[tuple[str, Any]]:
    """The root, then every object by sorted name, each opened only while it is visited: HDF5 keeps
    memory per open dataset after a large read (8 MiB per dataset measured, after one 8 MiB block),
    so holding them all open made the seal's peak grow with the number and size of the datasets."""
    names: list[str] = []
    f.visit(names.append)
    yield "/", f
    for n in sorted(names):
        obj = f[n]
        yield n, obj
        del obj


def _attr_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b"b" + value
    a = np.asarray(value)
    if a.dtype.kind in "OUS":
        return b"o" + repr(a.tolist()).encode("utf-8", "surrogatepass")
    return b"n" + a.dtype.str.encode() + repr(a.shape).encode() + np.ascontiguousarray(a).tobytes()


def digest(path: Path, f: h5py.File, check_finite: bool = True) -> str:
    """sha256 of every object's name, attributes, dtype, shape and data (blocks of rows).

    Checks each dataset and attribute against the bounds above first, and (``check_finite``) that
    float data holds no NaN or infinity.
    """
    file_size = os.path.getsize(path) if Path(path).exists() else MAX_BYTES
    h = hashlib.sha256()
    for name, obj in _objects(f):
        check_attrs(path, obj)
        h.update(b"\0obj\0" + name.encode())
        for key in sorted(obj.attrs):
            if obj is f and key == DIGEST_ATTR:
                continue
            h.update(b"\0attr\0" + key.encode() + b"\0" + _attr_bytes(obj.attrs[key]))
        if not isinstance(obj, h5py.Dataset):
            continue
        check_dataset(path, obj, file_size)
        h.update(b"\0data\0" + obj.dtype.str.encode() + repr(obj.shape).encode())
        if obj.shape is None or obj.size == 0:
            continue
        if obj.ndim == 0:
            h.update(np.ascontiguousarray(obj[()]).tobytes())
            continue
        row = max(1, int(np.prod(obj.shape[1:], dtype=object)) * obj.dtype.itemsize)
        step = max(1, BLOCK_BYTES // row)
        for lo in range(0, obj.shape[0], step):
            block = obj[lo:lo + step]
            if check_finite and block.dtype.kind == "f" and not np.isfinite(block).all():
                raise DataError(f"{path}: dataset {name} contains NaN or infinity")
            h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def seal(f: h5py.File) -> None:
    """Record the content checksum of a file being written (call last, after every change)."""
    f.flush()
    f.attrs[DIGEST_ATTR] = digest(Path(f.filename), f, check_finite=False)
    f.flush()


def verify(path: Path, f: h5py.File, rebuild: str) -> None:
    """DataError unless ``f`` carries a content checksum and bounded structures; IntegrityError (exit 4)
    when the checksum does not match the content."""
    check_attrs(path, f)
    expected = f.attrs[DIGEST_ATTR] if DIGEST_ATTR in f.attrs else None
    if expected is None:
        raise DataError(f"{path}: no content checksum (corrupt, or written by an older version); "
                        f"rebuild with `{rebuild}`")
    actual = digest(path, f)
    if not isinstance(expected, str) or actual != expected:
        # exit 4, integrity: the file reads as a file of its kind, but not as the one that was sealed
        raise IntegrityError(f"{path}: content checksum mismatch: the content changed after it was written "
                             f"(corrupt or edited); rebuild with `{rebuild}`")


def check_schema(path: Path, f: h5py.File, expected: str, what: str, rebuild: str, oldest: int | None = None) -> int:
    """Refuse a file whose ``schema`` attribute is not ``expected`` (``name/version``), or a version from
    ``oldest`` up to it when given, saying whether it is another kind of file, an older version (rebuild
    it) or a newer one (this code cannot read it); returns the version read."""
    name, version = expected.rsplit("/", 1)
    got = f.attrs.get("schema")
    got = got.decode() if isinstance(got, bytes) else got
    if not isinstance(got, str) or got.rsplit("/", 1)[0] != name:
        raise DataError(f"{path}: not a {what} (schema {got!r}, expected {expected})")
    try:
        v = int(got.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        raise DataError(f"{path}: not a {what} (schema {got!r}, expected {expected})") from None
    if v > int(version):
        raise DataError(f"{path}: {what} of schema {got}, newer than this code reads ({expected}); "
                        f"upgrade edge-distill or rebuild with `{rebuild}`")
    if v < (int(version) if oldest is None else oldest):
        reads = expected if oldest is None else f"{name}/{oldest} to {expected}"
        raise DataError(f"{path}: {what} of an older schema ({got}, this code reads {reads}); "
                        f"rebuild with `{rebuild}`")
    return v
