"""Publishing artifacts so that no later stage (or make) ever sees half a file.

Every artifact is written to ``<name>.partial`` beside its final path and moved into place only when
complete: fsync the file, ``os.replace`` (atomic on POSIX), then fsync the directory so the rename
itself survives a power cut.  A second writer on the same output fails at once (``flock`` on a
the partial file) instead of corrupting the first.  A write that fails for want of resources (full
disk, file-size limit, quota, read-only folder, I/O error) removes the partial and becomes one
ResourceError naming the file, the cause and the free space (exit 7, :mod:`pipeline.resources`).

Outputs never alias inputs (:func:`check_outputs`, exit 2 before any work).  A stage that writes
several files publishes them as one (:func:`publish_together`): each is written to its own locked
``.partial`` beside its final path (the staging area: same folder, same filesystem, so every rename is
atomic); a journal ``<target>.publishing`` naming every staged file, its sha256 and the files of the
previous generation to remove is the commit point; then the previous generation goes (make's target
first), the staged files are renamed into place (make's target last) and the journal is removed.  A
kill anywhere leaves either the previous set untouched, or a subset of one generation without make's
target, never two generations side by side; the next :func:`claim` of the target rolls a committed
journal forward.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline import resources
from pipeline.errors import BusyError, PipelineError, UsageError


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (h5py's flush only reaches the OS, not the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_published: list[Path] = []  # every artifact this process published, in order (for the command's last line)


def published() -> list[Path]:
    """The artifacts this process has published so far (what an interrupted command says it left)."""
    return list(_published)


def publish(partial: Path, final: Path) -> Path:
    """fsync ``partial``, rename it onto ``final``, fsync the directory; returns ``final``."""
    fsync_path(partial)
    os.replace(partial, final)
    _published.append(Path(final))
    fsync_path(final.parent)
    return final


# ------------------------------------------------------------------------------- outputs and inputs
def _paths(value: Path | Iterable[Path] | None) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once links are resolved, or one inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: not the same file
        return False


def check_outputs(inputs: Mapping[str, Path | Iterable[Path] | None], outputs: Mapping[str, Path | None]) -> None:
    """Refuse (UsageError, exit 2), before any work, outputs that would destroy an input or cannot be files.

    ``inputs`` and ``outputs`` map what the user calls each path (``--transfer-set``) to it (an input
    may be several files).  An output is refused when it, or its ``.partial``, is an input file (the
    same path once symbolic links are resolved, or a hard link to it), when it is the same file as
    another output, or when it is an existing directory; the message names both paths.
    """
    ins = [(name, p) for name, v in inputs.items() for p in _paths(v)]
    seen: dict[str, tuple[str, Path]] = {}
    for name, out in ((n, Path(p)) for n, p in outputs.items() if p is not None):
        if out.is_dir():
            raise UsageError(f"{name} {out} is an existing directory; give the path of a file to write")
        for staged in (out, partial_path(out)):
            for iname, inp in ins:
                if _same_file(staged, inp):
                    what = "is" if staged == out else f"would be staged as {staged}, which is"
                    raise UsageError(f"{name} {out} {what} the input {iname} {inp}; an output never overwrites "
                                     "an input: write it elsewhere")
        key = os.path.realpath(out)
        if key in seen:
            raise UsageError(f"{name} {out} and {seen[key][0]} {seen[key][1]} are the same file; give each "
                             "output its own path")
        seen[key] = (name, out)


def _folder(path: Path) -> None:
    """Create ``path``'s folder; a folder on the way that is a file is ENOTDIR (mkdir says only EEXIST)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None


def _open_partial(path: Path) -> int:
    """An fd on ``path``'s ``.partial`` (created if missing), its folder made; a folder that cannot be
    written (EPERM, EACCES, EROFS, ENOTDIR, ...) is one ResourceError naming ``path`` (exit 7)."""
    try:
        _folder(path)
        return os.open(partial_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if resources.write_errno(e) is None:
            raise
        raise resources.write_failure(path, e, "nothing was written") from None


_claimed: dict[str, int] = {}  # final path -> fd holding the lock on its .partial, taken by claim()


def claim(*paths: Path) -> None:
    """Take the write lock of each output now, for the whole run, not only while it is written.

    A stage that works for minutes before it writes calls this first, so that a second writer on
    the same output fails at once (BusyError) instead of after its own minutes of work.  The lock is
    handed to :func:`exclusive`/:func:`atomic_output` when the output is written and released there;
    otherwise by the kernel when the process ends (SIGKILL included).  An empty ``.partial`` created
    here and never written is removed at a normal exit.
    """
    taken, created = [], set()
    try:
        for path in map(Path, paths):
            key = str(path.absolute())
            if key in _claimed:
                continue
            if not partial_path(path).exists():
                created.add(partial_path(path))  # empty, made by this claim: staged by no one
            fd = _open_partial(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BusyError(f"{path}: another process is writing this file") from None
            _claimed[key] = fd
            taken.append(key)
        for path in map(Path, paths):  # a set of files killed while being published: finish it first
            if journal_path(path).exists():
                _apply(journal_path(path), recovering=True, fresh=created)
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
    tmp = partial_path(path)
    fd = _take_claim(path, tmp)
    if fd is None:
        fd = _open_partial(path)
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


def output(path: Path, into: OutputSet | None = None) -> contextlib.AbstractContextManager[Path]:
    """Where to write ``path``: its place in the set ``into`` (published with the set), else its own
    atomic output (published alone)."""
    return into.file(Path(path)) if into is not None else atomic_output(Path(path))


def write_json(path: Path, obj: Any, into: OutputSet | None = None) -> Path:
    """Write JSON atomically (alone, or as part of the set ``into``): a kill mid-write leaves the
    previous valid file in place."""
    with output(path, into) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
    return Path(path)


def write_text(path: Path, text: str, into: OutputSet | None = None) -> Path:
    with output(path, into) as tmp:
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


# ------------------------------------------------------------------------------- sets of files
def journal_path(target: Path) -> Path:
    """The journal of a set whose make target is ``target``: present only between the commit point of
    its publication and its end (or, after a kill, until the next claim of ``target`` finishes it)."""
    return Path(target).with_name(Path(target).name + ".publishing")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class OutputSet:
    """Files published as one (see :func:`publish_together`): each written to its own locked ``.partial``."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.staged: dict[Path, Path] = {}  # final -> its .partial, in the order added
        self.stale: list[Path] = []  # files of the previous generation that this one does not replace
        self._fds: list[int] = []
        self.committed = False

    def add(self, final: Path) -> Path:
        """Add ``final`` to the set; returns its ``.partial``, locked (exit 6 if another process has it), empty."""
        final = Path(final)
        if final in self.staged:
            return self.staged[final]
        tmp = partial_path(final)
        fd = _take_claim(final, tmp)
        if fd is None:
            fd = _open_partial(final)
        self._fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{final}: another process is writing this file") from None
        os.truncate(tmp, 0)
        self.staged[final] = tmp
        return tmp

    @contextlib.contextmanager
    def file(self, final: Path) -> Iterator[Path]:
        """``add(final)`` as a context: yields the partial to write, naming it in a bare failed write."""
        tmp = self.add(final)
        with resources.writing(tmp):
            yield tmp

    def remove(self, path: Path) -> None:
        """``path`` belongs to the previous generation and has no successor in this one (a variant that
        failed its gate, a file no longer made): it is removed when the set is published."""
        if Path(path) not in self.stale:
            self.stale.append(Path(path))

    def _order(self) -> list[Path]:
        """The finals in publication order: make's target last."""
        return [p for p in self.staged if p != self.target] + ([self.target] if self.target in self.staged else [])

    def commit(self) -> Path:
        """The commit point: every staged file synced, then the journal naming them (and their sha256)
        written and synced; from here on the set is published, now or by the next claim of the target."""
        if self.target not in self.staged:
            raise AssertionError(f"{self.target}: the target of a set of outputs must be part of it")
        files = []
        for final in self._order():
            fsync_path(self.staged[final])
            files.append([str(self.staged[final]), str(final), _sha256(self.staged[final])])
        journal = journal_path(self.target)
        tmp = journal.with_name(journal.name + ".partial")
        try:
            with open(tmp, "w") as f:
                json.dump({"files": files, "remove": [str(p) for p in self.stale if p not in self.staged]}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, journal)
        except BaseException:  # no journal, no commit: the caller removes the staged files
            tmp.unlink(missing_ok=True)
            raise
        self.committed = True  # the journal exists: from here on only forward
        fsync_path(journal.parent)
        return journal

    def discard(self) -> None:
        """Remove every staged file: nothing of the set is published."""
        for tmp in self.staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _apply(journal: Path, recovering: bool = False, fresh: set[Path] = frozenset()) -> list[Path]:
    """Publish the set a journal names: the previous generation removed (make's target first), every
    staged file renamed into place (make's target last), each folder synced, the journal removed.

    Idempotent, so a kill at any step is finished by running it again: a file whose staged copy is gone
    was renamed already.  ``recovering`` (a journal left by a killed run; ``fresh``: partials the
    recovering claim has just created, empty, staged by no one): a staged copy another process holds
    is BusyError, and one whose sha256 is not the journal's (rewritten since) publishes nothing more:
    the journal is dropped.
    """
    try:
        plan = json.loads(journal.read_text())
        staged = [(Path(p), Path(f), sha) for p, f, sha in plan["files"] if Path(p).exists() and Path(p) not in fresh]
        removed = [Path(r) for r in plan["remove"]]
    except (ValueError, KeyError, TypeError):  # written atomically, so never half: edited by hand
        if not recovering:
            raise
        journal.unlink()
        return []
    pending = [(p, f) for p, f, _ in staged]
    if recovering:
        for p, f, _ in staged:
            _not_busy(p, f)
        if any(_sha256(p) != sha for p, _, sha in staged):
            journal.unlink()
            return []
    folders = {f.parent for _, f in pending} | {r.parent for r in removed}
    for _, final in reversed(pending):  # make's target (listed last) goes first
        final.unlink(missing_ok=True)
    for old in removed:
        old.unlink(missing_ok=True)
    for folder in folders:
        fsync_path(folder)
    done = []
    for tmp, final in pending:
        os.replace(tmp, final)
        _published.append(final)
        done.append(final)
    for folder in folders:
        fsync_path(folder)
    journal.unlink()
    fsync_path(journal.parent)
    return done


def _not_busy(tmp: Path, final: Path) -> None:
    """BusyError if another process holds the lock of staged file ``tmp`` (this process's claims aside)."""
    if str(final.absolute()) in _claimed:
        return
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BusyError(f"{final}: another process is writing this file") from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def publish_together(target: Path) -> Iterator[OutputSet]:
    """Yield an :class:`OutputSet` to write several files into; publish them as one on success.

    ``target`` (make's target, added to the set by the caller like any other file) is removed first
    and renamed into place last.  A failure before the commit point (a failed write, a refused input,
    Ctrl-C) removes every staged file: nothing is published and the previous files are untouched; a
    failed write is one ResourceError saying so.  A failure after it (a kill, a rename refused) leaves
    the journal, and the next :func:`claim` of ``target`` finishes the publication; the error says what
    was and was not published.
    """
    s = OutputSet(target)
    before = len(_published)
    try:
        yield s
        s.commit()
        _apply(journal_path(s.target))
    except BaseException as e:
        if not s.committed:
            s.discard()
            if isinstance(e, PipelineError) or resources.write_errno(e) is None:
                raise
            raise resources.write_failure(resources.failed_file(e) or target, e, (
                f"nothing was published: {target} and the files published with it are as they were")) from None
        if isinstance(e, PipelineError) or resources.write_errno(e) is None:
            raise
        done = set(_published[before:])
        left = [str(p) for p in s._order() if p not in done]
        raise resources.write_failure(resources.failed_file(e) or target, e, (
            f"published {', '.join(str(p) for p in s._order() if p in done) or 'none of the set'}; not yet "
            f"{', '.join(left)} (staged beside them; rerun the command to finish)")) from None
    finally:
        s.close()
