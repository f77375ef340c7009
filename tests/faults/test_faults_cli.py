"""One line and a documented exit code for every way a command can end that the README covers.

- click's usage errors, a ``--config`` file that is not UTF-8, ``cache add-temperature`` with nothing
  new or a temperature given twice: exit 2;
- broken ONNX files given to ``bench`` and ``bench-fidelity`` (missing, empty, truncated, random bytes):
  exit 3 before anything is timed;
- a folder that cannot be written (immutable: EPERM), an ``--out`` whose folder is a file (ENOTDIR) or
  whose ``.partial`` is a folder (EISDIR): exit 7, nothing written;
- a memory ceiling hit while a command loads its libraries: exit 7, saying no setting helps; a network
  too large for memory names the architecture, not the batch size; an allocation HDF5 cannot make in
  the cache's reader thread is exit 7, not "invalid input data";
- a training that leaves the finite numbers (a temperature below the floor is refused first): exit 2,
  nothing published;
- Ctrl-C while the command loads, while it works, and in a sweep whose workers train: exit 130, one
  line, no worker's traceback; a sweep worker that dies: exit 7, one line.

Subprocesses where the property is about the process (exit codes, signals, stderr); the stage
functions in-process elsewhere.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import resources
from pipeline.errors import DataError, ResourceError, UsageError
from tests.conftest import run_cli
from tests.faultkit import address_space, exit7, run_limited, start_cli

QUIET = dict(log=lambda m: None)


def one_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The single stderr line of a command that ended with ``code``, containing each of ``fragments``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in proc.stderr, \
        (proc.returncode, proc.stderr[-3000:])
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ exit 2
@pytest.mark.parametrize("args, fragment", [
    (["cache", "--foo"], "distill cache build: error: No such option '--foo'"),
    (["nosuch"], "distill: error: No such command 'nosuch'"),
    (["student", "--epochs", "1"], "distill student train: error: Missing option '--cache'"),
    (["export", "--calibration-rows", "many"], "'many' is not a valid integer"),
])
def test_click_usage_errors_are_one_line(args, fragment):
    line = one_line(run_cli(*args), 2, fragment)
    assert line.endswith("--help)")  # where to read the usage, instead of printing it


def test_config_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_bytes(b'\xff\xfe{"epochs": 1}')
    one_line(run_cli("student", "--config", bad, "--cache", "c", "--transfer-set", "p", "--out", "o"), 2,
             f"{bad}: cannot read settings: not UTF-8 text")


def test_add_temperature_with_nothing_new_or_a_temperature_twice(tiny_cache, tmp_path):
    from stages.cache import AddTemperatureConfig, add_temperature

    cache = Path(shutil.copy(tiny_cache, tmp_path / "c.h5"))
    before = cache.read_bytes()
    for temps, out, match in [((2.0,), None, r"nothing to add: T=2 already recorded"),
                              ((2.0,), tmp_path / "o.h5", r"nothing to add: T=2 already recorded"),
                              ((2.0000001,), None, r"T=2.0000001 would be recorded as T=2, which the cache holds")]:
        with pytest.raises(UsageError, match=match):
            add_temperature(AddTemperatureConfig(temperatures=temps), cache, out, **QUIET)
    for temps in ((3.0, 3.0), (3.0, 3.0000001)):
        with pytest.raises(UsageError, match=r"T=3 given more than once"):
            AddTemperatureConfig(temperatures=temps)
    assert cache.read_bytes() == before and not (tmp_path / "o.h5").exists()
    one_line(run_cli("cache", "add-temperature", cache, "--temperatures", "3,3"), 2, "T=3 given more than once")


# ------------------------------------------------------------------------------------------ exit 3
def _broken(kind: str, good: Path, path: Path) -> Path:
    data = good.read_bytes()
    content = {"empty": b"", "truncated": data[: len(data) // 3],
               "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()}
    if kind != "missing":
        path.write_bytes(content[kind])
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random"])
def test_broken_candidates_are_refused_before_timing(kind, tiny_teacher, tiny_prepared, tmp_path):
    from stages.bench import BenchConfig, FidelityConfig, benchmark, check_fidelity

    bad = _broken(kind, tiny_teacher, tmp_path / "s.onnx")
    with pytest.raises(DataError, match=rf"{bad}: (no such ONNX file|not a (readable|usable) ONNX model)"):
        benchmark(BenchConfig(), tiny_teacher, {"s": bad}, tiny_prepared, tmp_path / "b.json", tmp_path / "b.md",
                  tmp_path / "b.csv", **QUIET)
    with pytest.raises(DataError, match=rf"{bad}: (no such ONNX file|not a (readable|usable) ONNX model)"):
        check_fidelity(FidelityConfig(), tiny_teacher, tiny_teacher, bad, tiny_prepared, tmp_path / "f.json",
                       **QUIET)


def test_a_broken_candidate_is_one_line(tiny_teacher, tiny_prepared, tmp_path):
    bad = _broken("truncated", tiny_teacher, tmp_path / "s.onnx")
    one_line(run_cli("bench", "--teacher", tiny_teacher, "--candidate", f"s={bad}", "--prepared", tiny_prepared,
                     "--out", tmp_path / "b.json"), 3, f"{bad}: not a readable ONNX model")


# ------------------------------------------------------------------------------------------ exit 7
@pytest.fixture
def immutable(tmp_path):
    """A folder nothing may be created in (``chattr +i``: EPERM, even for root), made mutable again after."""
    d = tmp_path / "ro"
    d.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", d], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    yield d
    subprocess.run(["chattr", "-i", d], check=True)


def test_unwritable_folder_at_every_writing_stage(immutable, tiny_npz, tiny_prepared, tiny_teacher, tiny_cache,
                                                  tiny_student):
    from stages.cache import CacheConfig, cache_soft_targets
    from stages.export import ExportConfig, export_student
    from stages.prepare import PrepareConfig, prepare_dataset
    from stages.student import StudentConfig, distill_student
    from stages.teacher import TeacherConfig, train_teachers

    d = immutable
    runs = {
        "prepare": lambda: prepare_dataset(PrepareConfig(val_rows=200), d / "p.h5", npz=tiny_npz, **QUIET),
        "teacher": lambda: train_teachers(TeacherConfig(members=1, arch="mlp:8", epochs=1), tiny_prepared,
                                          d / "t.onnx", **QUIET),
        "cache": lambda: cache_soft_targets(CacheConfig(temperatures=(2.0,), device="cpu", threads=1), [tiny_teacher],
                                            tiny_prepared, d / "c.h5", **QUIET),
        "student": lambda: distill_student(StudentConfig(arch="mlp:8", epochs=1), tiny_cache, tiny_prepared,
                                           d / "s.ckpt", d / "s.json", **QUIET),
        "export": lambda: export_student(ExportConfig(calibration_rows=100), tiny_student, tiny_prepared,
                                         d / "s.onnx", d / "s.int8.onnx", d / "s.export.json", **QUIET),
    }
    for run in runs.values():
        with pytest.raises(ResourceError, match=r"write failed: operation not permitted .*EPERM.*; nothing was "
                                                r"written"):
            run()
    assert list(d.iterdir()) == []
    one_line(run_cli("prepare", "--npz", tiny_npz, "--out", d / "p.h5", "--val-rows", "200"), 7, "(EPERM)")


def test_out_in_a_folder_that_is_a_file_or_whose_partial_is_a_folder(tiny_npz, tmp_path):
    file = tmp_path / "f"
    file.write_text("a file")
    one_line(run_cli("prepare", "--npz", tiny_npz, "--out", file / "p.h5", "--val-rows", "200"), 7, "(ENOTDIR)",
             "nothing was written")
    (tmp_path / "p.h5.partial").mkdir()
    one_line(run_cli("prepare", "--npz", tiny_npz, "--out", tmp_path / "p.h5", "--val-rows", "200"), 7, "(EISDIR)")
    assert file.read_text() == "a file" and not (tmp_path / "p.h5").exists()


def test_imports_under_a_memory_ceiling(tiny_cache, tiny_prepared, tmp_path):
    """The command line loads (``--help``: click, the settings); torch does not, 200 MiB above that."""
    help_peak = address_space(run_limited("student", "--help", vmpeak=True))[0]
    proc = run_limited("student", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--out",
                       tmp_path / "s.ckpt", vmem=help_peak + (200 << 20))
    exit7(proc, "out of memory", "while loading the student stage", "no setting lowers that")
    assert "--batch-size" not in proc.stderr and not list(tmp_path.iterdir())


def test_a_network_too_large_for_memory_names_the_architecture(tiny_cache, tiny_prepared, tmp_path):
    """mlp:200000-200000 holds 4e10 weights (149 GiB): no batch size or memory budget would help."""
    from stages.student import StudentConfig, distill_student

    with pytest.raises(ResourceError, match="mlp:200000-200000 itself does not fit: only a smaller architecture") as e:
        distill_student(StudentConfig(arch="mlp:200000-200000", epochs=1), tiny_cache, tiny_prepared,
                        tmp_path / "s.ckpt", tmp_path / "s.json", **QUIET)
    assert "--batch-size" not in str(e.value) and "--memory-budget-mib" not in str(e.value)


def test_an_allocation_that_fails_in_the_cache_reader_is_out_of_memory(tiny_teacher, tiny_prepared, tmp_path,
                                                                       monkeypatch):
    """HDF5 words a failed malloc "memory allocation failed" inside h5py's OSError: the command line makes it
    exit 7, not the "invalid input data" (exit 3) of a reader-thread error; the partial goes with it."""
    from stages.cache import CacheConfig, cache_soft_targets, viewsource

    def read(self, lo, hi):
        raise OSError("Can't synchronously read data (memory allocation failed for raw data chunk)")

    monkeypatch.setattr(viewsource.RowSource, "read", read)
    cfg = CacheConfig(temperatures=(2.0,), device="cpu", threads=1, views=2, gate=False)
    with pytest.raises(OSError) as e:
        cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, tmp_path / "c.h5", **QUIET)
    err = resources.as_resource_error(e.value)
    assert err is not None and err.exit_code == 7 and "out of memory" in str(err)
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()


# ------------------------------------------------------------------------------------------ numerics
def test_a_training_that_diverges_stops_with_nothing_published(tiny_cache, tiny_prepared, tmp_path):
    from stages.student import StudentConfig, distill_student

    with pytest.raises(UsageError, match=r"temperature must be >= 0.001"):
        StudentConfig(temperature=1e-38)  # finite, > 0, and a NaN loss in float32: refused first
    with pytest.raises(UsageError, match=r"the loss is nan at step \d+ .*training diverged .*lower --lr .*nothing "
                                         r"was published"):
        distill_student(StudentConfig(arch="mlp:16", epochs=2, lr=1e30), tiny_cache, tiny_prepared,
                        tmp_path / "s.ckpt", tmp_path / "s.json", **QUIET)
    assert not [p for p in tmp_path.iterdir() if p.stat().st_size]


# ------------------------------------------------------------------------------------------ Ctrl-C
INTERRUPTED = (130, -signal.SIGINT)  # a shell reports both as 130: CPython dies by SIGINT instead of exiting 130
#                                     when a KeyboardInterrupt once escaped code it evaluated for a C library
#                                     (pybind11's eval, in torch's import), however the program handled it


def _interrupted(proc: subprocess.Popen | subprocess.CompletedProcess, *fragments: str) -> str:
    err = proc.communicate(timeout=120)[1] if isinstance(proc, subprocess.Popen) else proc.stderr
    lines = err.strip().splitlines()
    assert proc.returncode in INTERRUPTED and "Traceback" not in err, (proc.returncode, err[-3000:])
    assert len([x for x in lines if "interrupt" in x]) == 1, err[-3000:]
    assert "interrupted" in lines[-1] and all(f in lines[-1] for f in fragments), lines[-1]
    return lines[-1]


def test_ctrl_c_while_the_command_line_loads_is_one_line():
    """Before ``main`` answers Ctrl-C (Python loading click and the settings, a fraction of a second), the
    package's own handler does: in the ``distill`` process only (``python -m commands``, the console
    script), read from the command line as typed, not in a program that imports the package."""
    probe = ("import signal, sys; sys.orig_argv = {argv!r}; import commands; "
             "print(signal.getsignal(signal.SIGINT) is commands._interrupted_while_loading, flush=True); "
             "commands._interrupted_while_loading(signal.SIGINT, None)")
    for argv, ours in ((["python", "-m", "commands", "cache"], True), (["python", "/v/bin/distill", "cache"], True),
                       (["python", "-m", "pytest"], False)):
        proc = run_cli_python("-c", probe.format(argv=argv))
        assert proc.stdout.strip() == str(ours), (argv, proc.stderr)
        assert proc.returncode == 130 and proc.stderr == "distill: interrupted; nothing was published\n"


def run_cli_python(*args: str) -> subprocess.CompletedProcess:
    from tests.conftest import ROOT

    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_ctrl_c_at_random_moments_of_a_cache(tiny_teacher, tiny_prepared, tmp_path):
    """Twelve seeded moments over the whole run (imports, the prepared file and the cache opened through
    h5py, batches, publication): each run ends either complete (exit 0, the cache published) or
    interrupted (one line, nothing published), never with a traceback."""
    from pipeline.formats.cache import open_cache

    rng = np.random.default_rng(25)
    outcomes = []
    for i, after in enumerate(rng.uniform(0.3, 2.5, 12)):
        out = tmp_path / f"c{i}.h5"
        proc = start_cli("cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", out,
                         "--device", "cpu", "--threads", "1", "--batch-size", "64")
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err[-3000:]
        if proc.returncode == 0:  # it had finished: its cache is whole
            open_cache(out)
            outcomes.append("complete")
        else:
            _interrupted(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "nothing was published")
            assert not out.exists()
            outcomes.append("interrupted")
    assert "interrupted" in outcomes, outcomes  # the moments do reach into the run


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
            except OSError:
                pass
    return out


def _sweep(tiny_cache, tiny_prepared, tmp_path, epochs: int) -> subprocess.Popen:
    return start_cli("student", "sweep", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--work-dir",
                     tmp_path / "w", "--csv", tmp_path / "s.csv", "--archs", "mlp:8", "--temperatures", "2",
                     "--alphas", "0.5", "--seeds", "0", "--epochs", str(epochs), "--jobs", "2")


def _workers_training(proc: subprocess.Popen, work: Path, timeout: float = 120) -> list[int]:
    """The sweep's worker processes, once both have claimed their student's outputs (training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if len(list(work.glob("*.ckpt.partial"))) >= 2:
            return [c for c in _children(proc.pid) if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        time.sleep(0.05)
    raise AssertionError("the sweep's workers never started training")


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_is_one_line_workers_included(tiny_cache, tiny_prepared, tmp_path):
    proc = _sweep(tiny_cache, tiny_prepared, tmp_path, epochs=2000)
    workers = _workers_training(proc, tmp_path / "w")
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGINT)  # the workers get it too, as from a terminal
    _interrupted(proc, "sweep interrupted: 0 of 2 students", "a rerun trains them")
    assert not any(Path(f"/proc/{w}").exists() for w in workers)  # stopped, not orphaned
    assert not list((tmp_path / "w").glob("*.ckpt"))


@pytest.mark.slow
def test_a_sweep_worker_that_dies_is_one_line(tiny_cache, tiny_prepared, tmp_path):
    proc = _sweep(tiny_cache, tiny_prepared, tmp_path, epochs=2000)
    workers = _workers_training(proc, tmp_path / "w")
    os.kill(workers[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    _, err = proc.communicate(timeout=120)
    exit7(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "a worker process died",
          "lower --jobs (now 2)")
