"""Case 11 (b): memory ceilings and a full disk; what the writers guarantee, checked in process.

Memory: the cache and the student in a subprocess under ``RLIMIT_AS``, set from the address space a
run of the same command measured (``tests.faultkit`` vmpeak): exit 7, one line naming the setting that
lowers the footprint.  Where this machine lets the test mount a tmpfs (root), a true ENOSPC: the cache
refused by its free-space check, then a disk filled by another writer mid-run, and the resume.  In
process: a failed write never lets a cache's committed rows advance, resource faults are worded from
what the libraries raise, cgroup limits are read.
"""
from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.artifacts import partial_path
from tests.conftest import BIG_ROWS
from tests.faultkit import address_space, content_digest, exit7, run_limited, start_cli, unpublished

BIG_CACHE = ["--temperatures", "1,2,4", "--batch-size", "1024", "--device", "cpu", "--threads", "1", "--store-soft",
             "--logits-dtype", "float32"]  # as big_transfer


# ---------------------------------------------------------------------------------------- in process
def test_a_failed_write_never_lets_committed_rows_advance(tmp_path, monkeypatch):
    """The HDF5 writer sees no failure (so it cannot crash); the caller gets the OSError at the commit,
    before the counter, and every write after it is dropped: the file on disk keeps the batches
    committed before the fault, readable, which is what a resume trusts."""
    from pipeline.formats import h5write
    from pipeline.formats.cache import CacheLayout
    from pipeline.formats.cache_writer import CacheWriter

    path = tmp_path / "c.h5.partial"
    rng = np.random.default_rng(0)
    batch = [(rng.standard_normal((10000, 2, 10), dtype=np.float32), rng.random((10000, 10), dtype=np.float32),
              rng.integers(0, 10, 10000)) for _ in range(2)]
    w = CacheWriter.create(path, {"test": 1}, CacheLayout(40000, 2, 10, "float32", soft_temperatures=(1.0,)))
    w.put(0, {"logits": batch[0][0], "soft/1": batch[0][1]}, batch[0][2])
    w.commit(10000)

    def disk_full(self, view, at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(h5write.GuardedFile, "_pwrite_all", disk_full)
    with pytest.raises(OSError) as failed:
        w.put(10000, {"logits": batch[1][0], "soft/1": batch[1][1]}, batch[1][2])
        w.commit(20000)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(path)
    w.close()  # no second exception: HDF5 closed a file whose every write "succeeded"
    monkeypatch.undo()
    with h5py.File(path, "r") as f:
        assert int(f.attrs["committed_rows"]) == 10000
        assert np.array_equal(f["logits"][:10000], batch[0][0]) and np.array_equal(f["labels"][:10000], batch[0][2])


@pytest.mark.parametrize("exc, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/d/c.h5"),
     "/d/c.h5: write failed: no space left on device (ENOSPC)"),
    (OSError(errno.EFBIG, "File too large", "/s.onnx", None, "/d/o.onnx"), "/d/o.onnx: write failed: file too large"),
    (RuntimeError("Can't decrement id ref count (file write failed: time = x, filename = '/d/p.h5', file "
                  "descriptor = 8, errno = 28, error message = 'No space left on device')"),
     "/d/p.h5: write failed: no space"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 4000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory: could not allocate 3.7 GiB; HINT"),
    (RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bfc_arena.cc:360 Failed to allocate memory for requested buffer "
                  "of size 313600000"), "out of memory: could not allocate 299.1 MiB; HINT"),
    (MemoryError("Unable to allocate 179. MiB for an array with shape (59800, 784) and data type float32"),
     "out of memory: could not allocate 179 MiB; HINT"),
    (RuntimeError("can't start new thread"), "out of memory: RuntimeError: can't start new thread; HINT"),
])
def test_resource_faults_are_worded_from_what_libraries_raise(exc, words):
    from pipeline import resources

    assert str(resources.as_resource_error(exc, "HINT")).startswith(words)
    assert resources.as_resource_error(ValueError("bad value"), "HINT") is None
    assert resources.as_resource_error(OSError(errno.ENOENT, "No such file or directory", "/x"), "HINT") is None


def test_cgroup_memory_limits_are_read_v2_and_v1(tmp_path):
    """The tightest limit of the group and its ancestors, used = usage - inactive file pages; none
    when every level says max (v2) or 2^63 (v1)."""
    from pipeline.resources import cgroup_memory

    def tree(files: dict) -> None:
        for rel, text in files.items():
            (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "fs" / rel).write_text(text)

    proc = tmp_path / "cgroup"
    proc.write_text("0::/user/job\n")
    tree({"user/memory.max": "1000000000\n", "user/memory.current": "600000000\n",
          "user/memory.stat": "anon 1\ninactive_file 100000000\n",
          "user/job/memory.max": "max\n", "user/job/memory.current": "1\n", "user/job/memory.stat": "anon 1\n"})
    limit, used, what = cgroup_memory(str(proc), str(tmp_path / "fs"))
    assert (limit, used) == (1_000_000_000, 500_000_000) and "memory.max" in what and "user" in what
    proc.write_text("4:memory:/job\n0::/\n")
    tree({"memory/job/memory.limit_in_bytes": "9223372036854771712\n", "memory/job/memory.usage_in_bytes": "5\n",
          "memory/job/memory.stat": "total_inactive_file 1\n"})
    assert cgroup_memory(str(proc), str(tmp_path / "fs")) is None
    tree({"memory/job/memory.limit_in_bytes": "2147483648\n", "memory/job/memory.usage_in_bytes": "1073741824\n",
          "memory/job/memory.stat": "cache 9\ntotal_inactive_file 73741824\n"})
    assert cgroup_memory(str(proc), str(tmp_path / "fs"))[:2] == (2147483648, 1_000_000_000)


# ---------------------------------------------------------------------------------------- RLIMIT_AS
@pytest.mark.slow
def test_cache_out_of_memory_names_the_batch_size(big_transfer, tiny_teacher, tmp_path):
    base = ["cache", "--teacher", tiny_teacher, "--transfer-set", big_transfer.prepared, *BIG_CACHE[:2],
            *BIG_CACHE[4:]]
    pilot = run_limited(*base, "--batch-size", "1024", "--out", tmp_path / "pilot.h5", vmpeak=True)
    assert pilot.returncode == 0, pilot.stderr
    ceiling = address_space(pilot)[0] + (100 << 20)  # one batch of every row needs 180 MiB more, as float32
    out = tmp_path / "c.h5"
    proc = run_limited(*base, "--batch-size", str(BIG_ROWS), "--out", out, vmem=ceiling)
    exit7(proc, "out of memory: could not allocate ", "(ulimit -v); lower --batch-size (now 59800)")
    assert not out.exists()
    proc = run_limited(*base, "--batch-size", "1024", "--out", out, vmem=ceiling)  # what the line said, same ceiling
    assert proc.returncode == 0, proc.stderr
    assert content_digest(out) == content_digest(big_transfer.cache)


@pytest.mark.slow
def test_student_out_of_memory_names_the_memory_budget(big_transfer, tmp_path):
    """The ceiling leaves half of what the resident rows need (181 MiB) beyond the address space the
    command holds when it loads them, measured by a run that stops right there (a class the cache does
    not have: exit 2).
    Not from a run's peak: later peaks are elastic (thread arenas and stacks that fail to map are
    done without), so a resident run completes under a ceiling of its streamed twin's peak + 64 MiB."""
    base = ["student", "--cache", big_transfer.cache, "--transfer-set", big_transfer.prepared, "--arch", "mlp:16",
            "--epochs", "1"]
    pilot = run_limited(*base, "--drop-class", "10", "--out", tmp_path / "a.ckpt", vmpeak=True)
    assert pilot.returncode == 2 and "drop_class 10 is not a class" in pilot.stderr, pilot.stderr
    ceiling = address_space(pilot)[1] + (90 << 20)
    out = tmp_path / "s.ckpt"
    exit7(run_limited(*base, "--out", out, vmem=ceiling), "out of memory: the 59800 training rows need 181.",
           "(ulimit -v); lower --memory-budget-mib below ")
    unpublished(out, out.with_suffix(".metrics.json"))


# ---------------------------------------------------------------------------------------- ENOSPC
@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs, where this machine allows mounting one (root); skipped otherwise."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or 'mount failed'}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fill(disk: Path, leave: int = 0) -> Path:
    """Take all but ``leave`` bytes of ``disk``'s free space with one file (what another writer does)."""
    filler = disk / "filler"
    with open(filler, "ab") as f:
        st = os.statvfs(disk)
        room = st.f_bavail * st.f_frsize - leave
        while room >= 4096:  # a cache writing meanwhile takes some: then take what is left, in halves
            try:
                os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, room)
                if leave:
                    break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                room //= 2
    return filler


@pytest.mark.slow
def test_cache_on_a_full_disk_is_refused_then_resumed(big_transfer, tiny_teacher, small_disk):
    out = small_disk / "c.h5"
    args = ["cache", "--teacher", tiny_teacher, "--transfer-set", big_transfer.prepared, "--out", out, *BIG_CACHE]
    filler = _fill(small_disk, leave=4 << 20)
    line = exit7(run_limited(*args), f"{out}: needs ", f"only 4.0 MiB free on {small_disk}")
    assert re.search(r"needs 1\d\.\d MiB \(59800 rows x \(80 \(logits\) \+ 3 x 10 x 4 \(soft targets\)\)", line), line
    unpublished(out)  # refused before the partial file was created
    filler.unlink()
    proc = start_cli(*args)  # a disk with room, filled by another writer once the first batch is committed
    deadline = time.monotonic() + 120
    while proc.poll() is None and _size(partial_path(out)) < 1 << 20:  # the first commit writes 2.6 MB of chunks
        assert time.monotonic() < deadline, "the cache committed nothing in 120 s"
        time.sleep(0.01)
    filler = _fill(small_disk)
    _, stderr = proc.communicate(timeout=300)
    # the two writers race for the last blocks: the one that fails may leave a page free ("4.0 KiB free")
    line = exit7(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr),
                  f"{out}.partial: write failed: no space left on device (ENOSPC); ", f" free on {small_disk}")
    committed = int(re.search(rf"; (\d+) of {BIG_ROWS} rows are committed in it", line).group(1))
    filler.unlink()
    proc = run_limited(*args)
    assert proc.returncode == 0, proc.stderr
    # what a full disk leaves is resumed when it reads back, else restarted; the log says which
    resumed = f" at row {committed} (its last committed batch)" in proc.stderr
    assert resumed or "restarting from row 0" in proc.stderr, proc.stderr
    assert content_digest(out) == content_digest(big_transfer.cache)
