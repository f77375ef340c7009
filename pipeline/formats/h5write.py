"""HDF5 files opened for writing so that a failed write is an OSError, never a crash.

Why: HDF5 (2.0.0 under h5py 3.16, measured) does not survive a write that fails.  Under a full disk
or ``ulimit -f``, a chunk flushed when h5py drops a temporary dataset handle fails inside the
dataset's close, which leaves the dataset half-destroyed in the library's table of open objects;
the errors cascade (``Can't decrement id ref count``, ``Unable to flush file's cached information``,
``slist already enabled?``) and the next walk over that table -- the file's close, or h5py's
dealloc of the file at interpreter exit -- segfaults in ``H5D__flush_all_cb`` (exit 139; backtrace
in gdb: ``H5F__dest`` -> ``H5D_flush_all`` -> ``H5D__flush_all_cb``).  No close order avoids it once a
write has failed inside the library.

So HDF5 must never see a write fail.  A file written here goes through h5py's ``fileobj`` driver to
:class:`GuardedFile`, which does the ``pwrite`` itself: the first failure is recorded and every
later write is dropped while HDF5 is told it succeeded.  The library's state stays consistent, the
file closes normally, and :meth:`H5Output.check` (called by the writers after each step, and by
:meth:`H5Output.close`) raises the recorded OSError naming the file.  Dropping *every* write after
the first failure keeps a partial cache honest: its committed-row counter can never reach the disk
after rows that did not.  The caller never publishes such a file (:func:`pipeline.artifacts.atomic_output`
removes it; the cache keeps its partial for a resume that trusts only committed rows).

The driver costs nothing measurable: the writes are chunk-sized (a 200k-row cache with a commit and
an fsync per batch took 5.5 +- 0.5 s through either driver, alternating runs).
"""
from __future__ import annotations

import atexit
import contextlib
import os
from pathlib import Path
from typing import Any

import h5py

_open: set[H5Output] = set()  # every output not closed yet: closed at exit if a caller did not


class GuardedFile:
    """The file object h5py's ``fileobj`` driver reads and writes: ``pread``/``pwrite`` on one
    descriptor, the first failed write recorded and every later one dropped (see the module doc).

    Opened on the existing inode (``w`` truncates it in place), so the lock that
    :func:`pipeline.artifacts.exclusive` holds on a ``.partial`` keeps covering it.
    """

    def __init__(self, path: Path, mode: str):
        if mode not in ("w", "r+"):
            raise ValueError(f"mode must be w or r+, got {mode!r}")
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if mode == "w" else 0), 0o644)
        self.pos, self.error, self.dropped_end = 0, None, 0
        if mode == "w":
            self._guard(os.ftruncate, self.fd, 0)

    def __repr__(self) -> str:  # h5py names the file by it (``File.filename``): the real path
        return str(self.path)

    def _guard(self, fn: Any, *args: Any) -> None:
        if self.error is None:
            try:
                fn(*args)
            except OSError as e:
                self.error = OSError(e.errno, e.strerror, str(self.path))

    def _pwrite_all(self, view: memoryview, at: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], at + done)

    # ---- the file-object protocol h5py's driver calls
    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == os.SEEK_END:
            offset += max(os.fstat(self.fd).st_size, self.dropped_end)
        elif whence == os.SEEK_CUR:
            offset += self.pos
        self.pos = offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], self.pos + done)
            if got == 0:
                break
            done += got
        view[done:] = bytes(len(view) - done)  # past the end of file reads as zeros, as HDF5's sec2 driver
        self.pos += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        buf = bytearray(max(0, size))
        self.readinto(buf)
        return bytes(buf)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._guard(self._pwrite_all, view, self.pos)
        if self.error is not None:
            self.dropped_end = max(self.dropped_end, self.pos + len(view))
        self.pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        self._guard(os.ftruncate, self.fd, size)
        return size

    def flush(self) -> None:
        pass

    def fsync(self) -> None:
        self._guard(os.fsync, self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class H5Output:
    """An HDF5 file being written (``f``), with the check that raises its first failed write.

    A context manager: on leaving, the file is closed; the recorded failure is raised unless an
    exception is already on its way out (it is then that failure or its consequence).
    """

    def __init__(self, path: Path, mode: str = "w"):
        self.raw = GuardedFile(path, mode)
        self._reported = False
        try:
            self.f = h5py.File(self.raw, mode, locking=False)
        except BaseException:
            self.raw.close()
            raise
        _open.add(self)
        self.check()

    @property
    def path(self) -> Path:
        return self.raw.path

    def check(self) -> None:
        """Raise the first failed write (OSError naming the file), once."""
        if self.raw.error is not None and not self._reported:
            self._reported = True
            raise self.raw.error

    def flush(self, fsync: bool = False) -> None:
        """HDF5's flush (it reaches the OS only), then ``fsync`` when asked; raises a failed write."""
        self.f.flush()
        if fsync:
            self.raw.fsync()
        self.check()

    def close(self) -> None:
        """Close the file (it cannot fail: writes after a failure were dropped), then raise the failure."""
        try:
            if self.f.id.valid:
                self.f.close()
        finally:
            self.raw.close()
            _open.discard(self)
        self.check()

    def __enter__(self) -> H5Output:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            self._reported = True  # the exception on its way out wins
        self.close()


@atexit.register
def _close_all() -> None:
    """Close what a caller left open, while Python still runs: HDF5 closes files left open from its
    own C exit handler, after the interpreter is gone, and the ``fileobj`` driver then calls into it
    (a segfault, measured when an exception skipped a writer's close)."""
    for out in list(_open):
        out._reported = True
        with contextlib.suppress(Exception):
            out.close()
