"""Publishing artifacts so that no later stage (or make) ever sees half a file.

Every artifact is written to ``<name>.partial`` beside its final path and moved into place only when
complete: fsync the file, ``os.replace`` (atomic on POSIX), then fsync the directory so the rename
itself survives a power cut.  A second writer on the same output fails at once (``flock`` on a
the partial file) instead of corrupting the first.  A write that fails for want of resources (full
disk, file-size limit, quota, read-only folder, I/O error) removes the partial and becomes one
ResourceError naming the file, the cause and the free space (exit 7, :mod:`pipeline.resources`).
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import resources
from pipeline.errors import BusyError, PipelineError


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (h5py's flush only reaches the OS, not the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: Path, final: Path) -> Path:
    """fsync ``partial``, rename it onto ``final``, fsync the directory; returns ``final``."""
    fsync_path(partial)
    os.replace(partial, final)
    fsync_path(final.parent)
    return final


_claimed: dict[str, int] = {}  # final path -> fd holding the lock on its .partial, taken by claim()


def claim(*paths: Path) -> None:
    """Take the write lock of each output now, for the whole run, not only while it is written.

    A stage that works for minutes before it writes calls this first, so that a second writer on
    the same output fails at once (BusyError) instead of after its own minutes of work.  The lock is
    handed to :func:`exclusive`/:func:`atomic_output` when the output is written and released there;
    otherwise by the kernel when the process ends (SIGKILL included).  An empty ``.partial`` created
    here and never written is removed at a normal exit.
    """
    taken = []
    try:
        for path in map(Path, paths):
            key = str(path.absolute())
            if key in _claimed:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial_path(path), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BusyError(f"{path}: another process is writing this file") from None
            _claimed[key] = fd
            taken.append(key)
    except BaseException:
        for key in taken:
            _release(key, unlink_empty=True)
        raise


def release(*paths: Path) -> None:
    """Give up this process's claims on ``paths`` that no writer took over (a stage that refused its
    input after claiming), removing a ``.partial`` that the claim created empty."""
    for path in map(Path, paths):
        _release(str(path.absolute()), unlink_empty=True)


def _release(key: str, unlink_empty: bool = False) -> None:
    fd = _claimed.pop(key, None)
    if fd is None:
        return
    try:
        tmp = partial_path(Path(key))
        with contextlib.suppress(OSError):
            st, fst = os.stat(tmp), os.fstat(fd)
            if unlink_empty and (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev) and st.st_size == 0:
                tmp.unlink()
    finally:
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_claimed):
        _release(key, unlink_empty=True)


def _take_claim(path: Path, tmp: Path) -> int | None:
    """The fd of this process's claim on ``path`` if it still locks ``tmp``, else None."""
    fd = _claimed.pop(str(path.absolute()), None)
    if fd is None:
        return None
    try:
        st, fst = os.stat(tmp), os.fstat(fd)
        if (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev):
            return fd
    except OSError:
        pass
    os.close(fd)  # the claimed partial was removed or replaced: lock afresh
    return None


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[Path]:
    """Lock ``path``'s ``.partial`` twin for writing and yield it; BusyError if another process has it.

    The lock (``flock``, released by the kernel even on SIGKILL) sits on the partial file itself, so
    no lock files are left beside the artifacts.  The partial is created empty if missing and is
    never truncated here: a resuming writer decides what its content is worth.  Writers must keep
    its inode (open for writing, not unlink-and-create; HDF5 files with ``locking=False``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    fd = _take_claim(path, tmp)
    if fd is None:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a no-op on a claim this process holds
        except BlockingIOError:
            raise BusyError(f"{path}: another process is writing this file") from None
        yield tmp
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield an empty, locked ``.partial`` path to write; publish it on success, delete it on failure.

    A failed write of the partial (or of its fsync, where a network filesystem reports a full disk)
    is raised as a ResourceError naming ``path``: nothing was published, and any previous ``path``
    is untouched.
    """
    path = Path(path)
    with exclusive(path) as tmp:
        os.truncate(tmp, 0)
        try:
            yield tmp
            publish(tmp, path)
        except BaseException as e:
            published = not tmp.exists()  # the rename happened; syncing the folder failed
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(e, PipelineError) or resources.write_errno(e) is None:
                raise
            raise resources.write_failure(path, e, "published, but its folder could not be synced" if published
                                          else "nothing was published") from None


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON atomically: a kill mid-write leaves the previous valid file in place."""
    with atomic_output(Path(path)) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
