"""Case 11: resource faults -- a file-size limit, a full disk, a memory ceiling -- at every writing stage.

Each writing stage runs in a subprocess under ``RLIMIT_FSIZE`` (no root needed: a write past the
limit fails with EFBIG), at a size that lets it start and fails it mid-write.  It must exit 7 with one
error line naming the file and the cause, publish nothing (no final file, no partial left, except
the cache's, kept to resume), and -- the limit lifted, the command run again -- give the result of a
run that never failed: the same bytes, or for a resumed cache the same content digest (the seal).
Memory: the cache and the student under ``RLIMIT_AS``, set from the peak address space of a run of the
same command with the setting the error names.  Where this machine lets the test mount a tmpfs
(root), a true ENOSPC: the cache refused by its free-space check, then a disk filled by another
writer mid-run, and the resume.

A subprocess that imports torch takes seconds to start on this machine, so the reruns of the torch
stages (jitter, teacher, student, export) call the stage's function here, with the settings the
command line gave: what is being tested is that the failed run left nothing in the way.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from pipeline.artifacts import partial_path
from pipeline.formats.bench_report import read_bench_report
from tests.conftest import synthetic_images
from tests.faultkit import address_space, linear_model, run_limited, start_cli

EFBIG = "file too large for this process's file-size limit (EFBIG"
BIG_ROWS = 59800  # train rows of the big transfer set (60000 - 200 for validation)
BIG_CACHE = ["--temperatures", "1,2,4", "--batch-size", "1024", "--device", "cpu", "--threads", "1"]
TEACHER = ["--members", "2", "--arch", "mlp:32", "--epochs", "2", "--threads", "1", "--shift", "1"]  # tiny_teacher's


def quiet(_: str) -> None:
    pass


def _digest(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return str(f.attrs["content_sha256"])


def _exit7(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one error line of a command that ended with exit 7 (log lines may precede it, nothing follows)."""
    assert proc.returncode == 7, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _unpublished(*paths: Path) -> None:
    for path in paths:
        assert not path.exists(), f"{path} was published"
        assert not partial_path(path).exists(), f"{partial_path(path)} was left behind"


@pytest.fixture(scope="module")
def big(tmp_path_factory, tiny_teacher):
    """A 60000-row transfer set (47 MB) and its cache (13 MB, several chunks per dataset): big enough for
    a cache to commit batches before a limit stops it, and for the memory tests' allocations to stand
    out from the interpreter's."""
    from stages.cache import CacheConfig, cache_soft_targets
    from stages.prepare import PrepareConfig, prepare_dataset

    d = tmp_path_factory.mktemp("big")
    x, y = synthetic_images(BIG_ROWS + 200, seed=3)
    xt, yt = synthetic_images(300, seed=4)
    np.savez(d / "big.npz", x=x, y=y, x_test=xt, y_test=yt)
    prepared = prepare_dataset(PrepareConfig(val_rows=200), d / "big.h5", npz=d / "big.npz")
    cfg = CacheConfig(temperatures=(1.0, 2.0, 4.0), batch_size=1024, device="cpu", threads=1)
    return SimpleNamespace(prepared=prepared, cache=cache_soft_targets(cfg, [tiny_teacher], prepared, d / "c.h5",
                                                                       log=quiet))


# ---------------------------------------------------------------------------------------- in process
def test_a_failed_write_never_lets_committed_rows_advance(tmp_path, monkeypatch):
    """The HDF5 writer sees no failure (so it cannot crash); the caller gets the OSError at the commit,
    before the counter, and every write after it is dropped: the file on disk keeps the batches
    committed before the fault, readable, which is what a resume trusts."""
    from pipeline.formats import h5write
    from pipeline.formats.cache import CacheWriter

    path = tmp_path / "c.h5.partial"
    rng = np.random.default_rng(0)
    batch = [(rng.standard_normal((10000, 2, 10), dtype=np.float32), rng.random((10000, 10), dtype=np.float32),
              rng.integers(0, 10, 10000)) for _ in range(2)]
    w = CacheWriter.create(path, {"test": 1}, 40000, 2, 10, (1.0,))
    w.put(0, batch[0][0], {1.0: batch[0][1]}, batch[0][2])
    w.commit(10000)

    def disk_full(self, view, at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(h5write.GuardedFile, "_pwrite_all", disk_full)
    with pytest.raises(OSError) as failed:
        w.put(10000, batch[1][0], {1.0: batch[1][1]}, batch[1][2])
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


# ---------------------------------------------------------------------------------------- RLIMIT_FSIZE
def test_prepare_under_file_size_limit(tiny_npz, tiny_prepared, tmp_path):
    out = tmp_path / "p.h5"
    args = ["prepare", "--npz", tiny_npz, "--out", out, "--val-rows", "200"]  # tiny_prepared's settings
    _exit7(run_limited(*args, fsize=600_000), str(out), EFBIG, "nothing was published")  # the file is 1.4 MB
    _unpublished(out)
    assert run_limited(*args).returncode == 0
    assert out.read_bytes() == tiny_prepared.read_bytes()


@pytest.mark.slow
def test_jitter_under_file_size_limit(tiny_prepared, tmp_path):
    from stages.augment import JitterConfig, jitter_transfer_set

    out = tmp_path / "pj.h5"
    proc = run_limited("jitter", "--prepared", tiny_prepared, "--out", out, "--copies", "2", fsize=1_500_000)
    _exit7(proc, str(out), EFBIG, "nothing was published")  # 3600 train rows: 3.2 MB
    _unpublished(out)
    cfg = JitterConfig(copies=2)
    jitter_transfer_set(cfg, tiny_prepared, out, log=quiet)
    assert out.read_bytes() == jitter_transfer_set(cfg, tiny_prepared, tmp_path / "ref.h5", log=quiet).read_bytes()


@pytest.mark.slow
def test_teacher_member_and_ensemble_under_file_size_limit(tiny_prepared, tiny_teacher, tmp_path):
    from stages.teacher import TeacherConfig, train_teachers

    out = tmp_path / "t" / "ensemble.onnx"
    members = [out.with_name(f"member{i}.ckpt") for i in range(2)]
    proc = run_limited("teacher", "--prepared", tiny_prepared, "--out", out, "--members", "1", "--arch", "mlp:32",
                       "--epochs", "1", "--threads", "1", fsize=50_000)  # a member checkpoint is 110 KB
    _exit7(proc, str(members[0]), EFBIG, "nothing was published")
    _unpublished(members[0], out)
    # both members fit under 150 KB; the ensemble graph (217 KB) does not
    _exit7(run_limited("teacher", "--prepared", tiny_prepared, "--out", out, *TEACHER, fsize=150_000), str(out), EFBIG)
    _unpublished(out)
    assert all(m.is_file() for m in members)  # finished members stay: the rerun starts from them
    log = []
    cfg = TeacherConfig(members=2, arch="mlp:32", epochs=2, threads=1, shift=1)  # tiny_teacher's, as TEACHER
    train_teachers(cfg, tiny_prepared, out, log.append)
    assert sum("reusing" in line for line in log) == 2
    assert out.read_bytes() == tiny_teacher.read_bytes()


@pytest.mark.slow
def test_cache_under_file_size_limit_resumes_after_committed_rows(big, tiny_teacher, tmp_path):
    out = tmp_path / "c.h5"
    args = ["cache", "--teacher", tiny_teacher, "--transfer-set", big.prepared, "--out", out, *BIG_CACHE]
    line = _exit7(run_limited(*args, fsize=5 << 20), f"{out}.partial: write failed: ", EFBIG)
    committed = int(re.search(rf"; (\d+) of {BIG_ROWS} rows are committed in it: .* resume", line).group(1))
    assert 0 < committed < BIG_ROWS and not out.exists()
    proc = run_limited(*args)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming at row {committed} " in proc.stderr
    assert _digest(out) == _digest(big.cache)


def test_add_temperature_under_file_size_limit(tiny_cache, tmp_path):
    from stages.cache import AddTemperatureConfig, add_temperature

    out = tmp_path / "c3.h5"
    args = ["cache", "add-temperature", tiny_cache, "--out", out, "--temperatures", "3"]
    assert 250_000 < tiny_cache.stat().st_size < 300_000  # the copy fits; the new soft targets do not
    _exit7(run_limited(*args, fsize=300_000), str(out), EFBIG, "nothing was published")
    _unpublished(out)
    assert run_limited(*args).returncode == 0
    ref = add_temperature(AddTemperatureConfig(temperatures=(3.0,)), tiny_cache, tmp_path / "ref.h5", log=quiet)
    assert _digest(out) == _digest(ref)


def test_merge_under_file_size_limit(tiny_teacher, tiny_prepared, tmp_path):
    from stages.cache import CacheConfig, MergeConfig, cache_soft_targets, merge

    cfg = CacheConfig(temperatures=(1.0, 2.0, 4.0), batch_size=256, device="cpu", threads=1)
    parts = [cache_soft_targets(dataclasses.replace(cfg, shard=f"{i}/2"), [tiny_teacher], tiny_prepared,
                                tmp_path / "c.h5", log=quiet) for i in range(2)]
    out = tmp_path / "m.h5"
    args = ["cache", "merge", "--part", parts[0], "--part", parts[1], "--out", out]
    _exit7(run_limited(*args, fsize=150_000), str(out), EFBIG, "nothing was published")  # the merge is 276 KB
    _unpublished(out)
    assert run_limited(*args).returncode == 0
    assert _digest(out) == _digest(merge(MergeConfig(), parts, tmp_path / "ref.h5", log=quiet))


@pytest.mark.slow
def test_student_under_file_size_limit(tiny_cache, tiny_prepared, tiny_student, tmp_path):
    from stages.student import StudentConfig, distill_student

    out, metrics = tmp_path / "s.ckpt", tmp_path / "s.metrics.json"
    proc = run_limited("student", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--out", out,
                       "--metrics", metrics, "--arch", "mlp:16", "--epochs", "2", "--temperature", "2",
                       "--alpha", "0.5", fsize=30_000)  # the checkpoint is 59 KB
    _exit7(proc, str(out), EFBIG, "nothing was published")
    _unpublished(out, metrics)
    cfg = StudentConfig(arch="mlp:16", epochs=2, temperature=2.0, alpha=0.5)  # tiny_student's
    distill_student(cfg, tiny_cache, tiny_prepared, out, metrics, log=quiet)
    assert out.read_bytes() == tiny_student.read_bytes()


@pytest.mark.slow
def test_export_under_file_size_limit(tiny_student, tiny_prepared, tmp_path):
    from stages.export import ExportConfig, export_student

    out = tmp_path / "e" / "s.onnx"
    outs = (out, out.with_suffix(".int8.onnx"), out.with_suffix(".export.json"))
    proc = run_limited("export", "--checkpoint", tiny_student, "--transfer-set", tiny_prepared, "--out", out,
                       "--calibration-rows", "100", "--max-accuracy-drop", "100", "--no-mobile",
                       fsize=40_000)  # the fp32 graph, written to a temporary folder first, is 56 KB
    _exit7(proc, "fp32.onnx: write failed: ", EFBIG, "a temporary file; nothing was published")
    _unpublished(*outs)
    cfg = ExportConfig(calibration_rows=100, max_accuracy_drop=100, mobile=False)
    export_student(cfg, tiny_student, tiny_prepared, *outs, log=quiet)
    ref = tmp_path / "ref" / "s.onnx"
    export_student(cfg, tiny_student, tiny_prepared, ref, ref.with_suffix(".int8.onnx"),
                   ref.with_suffix(".export.json"), log=quiet)
    for mine, theirs in ((out, ref), (outs[1], ref.with_suffix(".int8.onnx"))):
        assert mine.read_bytes() == theirs.read_bytes()


@pytest.mark.slow
def test_bench_reports_under_file_size_limit(tmp_path):
    """4x4 images, so that the bench's pools (5 KB) and its CSV fit under the limit and a report does not."""
    from stages.prepare import PrepareConfig, prepare_dataset

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", x=rng.integers(0, 256, (600, 4, 4), dtype=np.uint8), y=rng.integers(0, 10, 600))
    prepared = prepare_dataset(PrepareConfig(val_rows=100), tmp_path / "small.h5", npz=tmp_path / "small.npz")
    teacher = linear_model(tmp_path / "t.onnx", in_shape=(4, 4), members=2)
    student = linear_model(tmp_path / "s.onnx", in_shape=(4, 4), seed=1)
    d = tmp_path / "bench"
    reports = {"out": d / "b.json", "plot-accuracy": d / "acc.png", "plot-throughput": d / "tp.png"}
    args = ["bench", "--teacher", teacher, "--candidate", f"s={student}", "--prepared", prepared, "--threads", "1",
            "--batches", "1", "--warmup-count", "2", "--warmup-s", "0", "--min-count", "10", "--min-s", "0",
            "--trials", "2", "--no-iobinding", *[a for k, p in reports.items() for a in (f"--{k}", p)]]
    _exit7(run_limited(*args, fsize=20_000), str(reports["plot-accuracy"]), EFBIG, "nothing was published")
    _unpublished(*reports.values(), d / "b.md")  # make's target is written last; the complete CSV may stay
    proc = run_limited(*args)
    assert proc.returncode == 0, proc.stderr
    assert set(read_bench_report(reports["out"])["models"]) == {"teacher-ensemble", "s", "identity-floor"}
    assert (d / "b.md").read_text().startswith("# Edge benchmark")


# ---------------------------------------------------------------------------------------- RLIMIT_AS
@pytest.mark.slow
def test_cache_out_of_memory_names_the_batch_size(big, tiny_teacher, tmp_path):
    base = ["cache", "--teacher", tiny_teacher, "--transfer-set", big.prepared, *BIG_CACHE[:2], *BIG_CACHE[4:]]
    pilot = run_limited(*base, "--batch-size", "1024", "--out", tmp_path / "pilot.h5", vmpeak=True)
    assert pilot.returncode == 0, pilot.stderr
    ceiling = address_space(pilot)[0] + (100 << 20)  # one batch of every row needs 180 MiB more, as float32
    out = tmp_path / "c.h5"
    proc = run_limited(*base, "--batch-size", str(BIG_ROWS), "--out", out, vmem=ceiling)
    _exit7(proc, "out of memory: could not allocate ", "(ulimit -v); lower --batch-size (now 59800)")
    assert not out.exists()
    proc = run_limited(*base, "--batch-size", "1024", "--out", out, vmem=ceiling)  # what the line said, same ceiling
    assert proc.returncode == 0, proc.stderr
    assert _digest(out) == _digest(big.cache)


@pytest.mark.slow
def test_student_out_of_memory_names_the_memory_budget(big, tmp_path):
    """The ceiling leaves half of what the resident rows need (181 MiB) beyond the address space the
    command holds when it loads them, measured by a run that stops right there (T absent: exit 2).
    Not from a run's peak: later peaks are elastic (thread arenas and stacks that fail to map are
    done without), so a resident run completes under a ceiling of its streamed twin's peak + 64 MiB."""
    base = ["student", "--cache", big.cache, "--transfer-set", big.prepared, "--arch", "mlp:16", "--epochs", "1"]
    pilot = run_limited(*base, "--temperature", "3", "--out", tmp_path / "a.ckpt", vmpeak=True)
    assert pilot.returncode == 2 and "no soft targets at T=3" in pilot.stderr, pilot.stderr
    ceiling = address_space(pilot)[1] + (90 << 20)
    out = tmp_path / "s.ckpt"
    _exit7(run_limited(*base, "--out", out, vmem=ceiling), "out of memory: the 59800 training rows need 181.",
           "(ulimit -v); lower --memory-budget-mib below ")
    _unpublished(out, out.with_suffix(".metrics.json"))


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
def test_cache_on_a_full_disk_is_refused_then_resumed(big, tiny_teacher, small_disk):
    out = small_disk / "c.h5"
    args = ["cache", "--teacher", tiny_teacher, "--transfer-set", big.prepared, "--out", out, *BIG_CACHE]
    filler = _fill(small_disk, leave=4 << 20)
    line = _exit7(run_limited(*args), f"{out}: needs ", f"only 4.0 MiB free on {small_disk}")
    assert re.search(r"needs 1\d\.\d MiB \(\(59800 rows x 2 members x 10 classes", line), line
    _unpublished(out)  # refused before the partial file was created
    filler.unlink()
    proc = start_cli(*args)  # a disk with room, filled by another writer once the first batch is committed
    deadline = time.monotonic() + 120
    while proc.poll() is None and _size(partial_path(out)) < 1 << 20:  # the first commit writes 2.6 MB of chunks
        assert time.monotonic() < deadline, "the cache committed nothing in 120 s"
        time.sleep(0.01)
    filler = _fill(small_disk)
    _, stderr = proc.communicate(timeout=300)
    line = _exit7(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr),
                  f"{out}.partial: write failed: no space left on device (ENOSPC); 0 B free on {small_disk}")
    committed = int(re.search(rf"; (\d+) of {BIG_ROWS} rows are committed in it", line).group(1))
    filler.unlink()
    proc = run_limited(*args)
    assert proc.returncode == 0, proc.stderr
    # what a full disk leaves is resumed when it reads back, else restarted; the log says which
    assert f"resuming at row {committed} " in proc.stderr or "restarting from row 0" in proc.stderr, proc.stderr
    assert _digest(out) == _digest(big.cache)
