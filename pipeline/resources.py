"""Resource faults as one line with the figures (exit 7): failed writes, free space, memory.

Every writer reports a failed write the same way -- the file, the cause in words with its errno
name, and the free space of that file's filesystem -- whether the failure came from Python's own I/O,
from HDF5 (through :mod:`pipeline.formats.h5write`, which turns it into the OSError it was), or from a
library that only gives text (onnxruntime, torch's exporter).  Long stages whose output size is known
check free space before they start (:func:`require_space`), so a disk that cannot hold the result is
refused in a second instead of after an hour.  Memory failures (numpy's MemoryError, torch's and
onnxruntime's allocator errors, a thread that cannot start) become one line naming the setting that
lowers the footprint.

Only the standard library and :mod:`pipeline.errors`: the formats layer may import it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError, ResourceError

WRITE_ERRNOS = {  # what each means for a write, in words
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large for this process's file-size limit",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (an immutable file or folder, chattr +i?)",
    errno.ENOTDIR: "not a directory (a folder on the path is a file)",
    errno.EISDIR: "is a directory",
    errno.EIO: "input/output error (a failing disk or a lost network mount)",
}
_STRERROR = {os.strerror(n): n for n in WRITE_ERRNOS}  # how libraries that give only text say it
_ERRNO_TEXT = re.compile(r"errno\s*=\s*(\d+)|\[Errno (\d+)\]")
_HDF5_FILE = re.compile(r"filename = '([^']+)'")
_MEMORY_TEXT = ("can't allocate memory", "Cannot allocate memory", "Failed to allocate memory", "bad_alloc",
                "bad allocation", "can't start new thread", "out of memory",
                "memory allocation failed",  # HDF5's words for a failed malloc, inside h5py's OSError
                "failed to map segment from shared object")  # dlopen under an address-space limit (importing torch)
_SIZE = (re.compile(r"Unable to allocate ([\d.]+\s*\w+)"), re.compile(r"allocate (\d+) bytes"),
         re.compile(r"buffer of size (\d+)"))


def human(n: float) -> str:
    """``3.0 MiB``: bytes in binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def write_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` when it is one of :data:`WRITE_ERRNOS`, read from an OSError or, for
    libraries that wrap it in text (HDF5, onnxruntime, torch), from its message; else None."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno if exc.errno in WRITE_ERRNOS else None
    text = str(exc)
    m = _ERRNO_TEXT.search(text)
    if m:
        n = int(m.group(1) or m.group(2))
        return n if n in WRITE_ERRNOS else None
    return next((n for words, n in _STRERROR.items() if words in text), None)


def failed_file(exc: BaseException) -> str | None:
    """The file a failed write was writing: the destination of a copy or rename (``filename2``), else
    the file the OSError names, else the one HDF5's message names."""
    if isinstance(exc, OSError) and (exc.filename2 or exc.filename):
        return str(exc.filename2 or exc.filename)
    m = _HDF5_FILE.search(str(exc))
    return m.group(1) if m else None


def free_space(path: Path | str) -> tuple[int, str] | None:
    """(bytes free to this user, mount point) of the filesystem that holds (or would hold) ``path``."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    mount = p if p.is_dir() else p.parent
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return st.f_bavail * st.f_frsize, str(mount)


def cause(n: int) -> str:
    """``no space left on device (ENOSPC)``; EFBIG says the limit (``ulimit -f``) it ran into."""
    words = f"{WRITE_ERRNOS.get(n, os.strerror(n))} ({errno.errorcode.get(n, n)}"
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if n == errno.EFBIG and soft != resource.RLIM_INFINITY:
        words += f": at most {human(soft)} per file, ulimit -f"
    return words + ")"


def write_failure(path: Path | str, exc: BaseException | None, note: str = "") -> ResourceError:
    """The one-line error of a failed write of ``path``: the cause, the free space there, ``note``."""
    n = write_errno(exc) if exc is not None else None
    why = cause(n) if n is not None else "the library gave no reason (a full disk or a file-size limit?)"
    msg = f"{path}: write failed: {why}"
    free = free_space(path)
    if free is not None:
        msg += f"; {human(free[0])} free on {free[1]}"
    return ResourceError(msg + (f"; {note}" if note else ""))


def require_space(path: Path, need: int, figure: str) -> None:
    """ResourceError unless the filesystem of ``path`` has ``need`` bytes free; ``figure`` says how
    ``need`` was computed (the message shows it, so the user can check it)."""
    free = free_space(path)
    if free is not None and free[0] < need:
        raise ResourceError(f"{path}: needs {human(need)} ({figure}), only {human(free[0])} free on "
                            f"{free[1]}; free space there or write elsewhere")


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Name ``path`` (the file being written) in a failed write that names no file: ``onnx.save``,
    numpy and torch's exporter raise a bare ``OSError(errno)``."""
    try:
        yield
    except OSError as e:
        if failed_file(e) is None and write_errno(e) is not None:
            e.filename = str(path)
        raise


@contextlib.contextmanager
def temporary_folder() -> Iterator[Path]:
    """``tempfile.TemporaryDirectory`` whose failed writes are one ResourceError naming the file (the
    folder, when the library did not say which) and pointing at TMPDIR, the setting that moves it."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with writing(tmp):
                yield Path(tmp)
    except Exception as e:
        if isinstance(e, PipelineError) or write_errno(e) is None:
            raise
        moved = "" if write_errno(e) == errno.EFBIG else ": point TMPDIR at a folder with space"
        raise write_failure(failed_file(e), e, f"a temporary file{moved}; nothing was published") from None


# ---------------------------------------------------------------------------------------- memory
def is_memory_error(exc: BaseException) -> bool:
    """numpy's MemoryError, torch's and onnxruntime's allocator errors, a thread that cannot start."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno == errno.ENOMEM
    return isinstance(exc, Exception) and any(t in str(exc) for t in _MEMORY_TEXT)


_CGROUPS = (("", "", "memory.max", "memory.current", "inactive_file"),  # v2, then v1
            ("memory", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _cgroup_limit(d: Path, limit_file: str, used_file: str, inactive: str) -> tuple[int, int, str] | None:
    with contextlib.suppress(OSError, ValueError):
        top = (d / limit_file).read_text().strip()
        if top != "max" and int(top) < 1 << 62:  # v1 writes "no limit" as a page-rounded 2^63
            stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
            used = int((d / used_file).read_text()) - int(stat.get(inactive, 0))
            return int(top), used, f"the cgroup limit {limit_file} of {human(int(top))} ({d})"
    return None


def cgroup_memory(proc: str = "/proc/self/cgroup", fs: str = "/sys/fs/cgroup") -> tuple[int, int, str] | None:
    """(limit, bytes in use, description) of the tightest cgroup memory limit on this process (v2
    ``memory.max``, else v1 ``memory.limit_in_bytes``; its group's or an ancestor's), None without one.
    In use excludes inactive file pages: the kernel reclaims those before it kills anything (the
    working set, as kubelet counts it)."""
    groups = dict(line.split(":", 2)[1:] for line in Path(proc).read_text().splitlines() if line.count(":") >= 2)
    for key, sub, limit_file, used_file, inactive in _CGROUPS:
        if key not in groups:
            continue
        root = Path(fs) / sub
        d, found = root / groups[key].lstrip("/"), []
        while True:  # up to the mount's root (in a cgroup namespace, the container's own group)
            if (entry := _cgroup_limit(d, limit_file, used_file, inactive)) is not None:
                found.append(entry)
            if d == root or d == d.parent:
                break
            d = d.parent
        if found:
            return min(found, key=lambda e: e[0] - e[1])
    return None


def _ceilings() -> list[tuple[int, int, str]]:
    """(limit, bytes in use, description) of each hard memory ceiling on this process."""
    out = []
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        vm = next((int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:")), 0)
        out.append((soft, vm, f"the address-space limit of {human(soft)} (ulimit -v)"))
    with contextlib.suppress(OSError, ValueError):
        if (cgroup := cgroup_memory()) is not None:
            out.append(cgroup)
    return out


def memory_headroom() -> tuple[int, str] | None:
    """(bytes this process may still allocate, which ceiling) under the tightest hard ceiling
    (RLIMIT_AS, a cgroup v2 memory.max); None without one.  Under a cgroup an allocation never
    fails: the kernel kills the process, so a stage must check before it allocates."""
    left = [(limit - used, what) for limit, used, what in _ceilings()]
    return min(left) if left else None


def memory_failure(exc: BaseException, hint: str) -> ResourceError:
    """The one-line error of a failed allocation: its size where the library says it, the ceiling, ``hint``."""
    text = str(exc)
    size = next((m.group(1) for r in _SIZE if (m := r.search(text))), None)
    if size:  # numpy says "179. MiB", torch and onnxruntime a byte count
        size = human(int(size)) if size.isdigit() else re.sub(r"\.?\s+", " ", size)
    what = (f"could not allocate {size}" if size
            else f"{type(exc).__name__}: {text.strip().splitlines()[0][:120]}" if text.strip() else type(exc).__name__)
    ceilings = _ceilings()
    under = f" under {ceilings[0][2]}" if ceilings else ""
    return ResourceError(f"out of memory: {what}{under}" + (f"; {hint}" if hint else ""))


def as_resource_error(exc: BaseException, hint: str = "") -> ResourceError | None:
    """``exc`` as a ResourceError when it is a resource fault no stage turned into one, else None
    (the command line's last resort: better one line naming the file than a traceback)."""
    if isinstance(exc, PipelineError):
        return None
    if is_memory_error(exc):
        return memory_failure(exc, hint)
    if write_errno(exc) is None:
        return None
    return write_failure(failed_file(exc) or "(a file the library did not name)", exc)
