"""Helpers of the fault tests: seeded file mutations, tiny ONNX models, killing subprocesses.

Run as a module, it is the child process of the HDF5 mutation tests: it opens each mutated file the
way the stages do, under an address-space limit (a multi-GB allocation fails instead of happening),
and prints one JSON line per mutation; a segfault or hang shows up as the child dying.  With
``vmpeak`` it runs a ``distill`` command and prints the process's peak address space last, which the
memory-ceiling tests set their ``RLIMIT_AS`` from.

    python -m tests.faultkit prepared|cache ORIGINAL WORKDIR SEED COUNT
    python -m tests.faultkit vmpeak DISTILL-ARGS...
    python -m tests.faultkit publish FOLDER GENERATION KILL_AT

``publish`` publishes a set of three files and kills itself with SIGKILL at a given step of the
publication (:func:`publication_steps`); in-process, the same steps raise :class:`Killed` instead.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.cache_helpers import targets

ROOT = Path(__file__).resolve().parent.parent
HEADROOM = 1 << 30  # the child may allocate 1 GiB beyond what it has mapped after its imports


# ------------------------------------------------------------------------------------ mutations
def mutations(data: bytes, seed: int, count: int = 20) -> list[tuple[str, bytes]]:
    """``count`` seeded corruptions of ``data``: truncations, single-byte flips (anywhere, in the
    first and last 4 KiB where HDF5 keeps most metadata) and 64-byte blocks of noise."""
    rng = np.random.default_rng(seed)
    n = len(data)
    head, tail = min(n, 4096), max(0, n - 4096)
    plan = (["truncate"] * 4 + ["flip-any"] * 6 + ["flip-head"] * 6 + ["flip-tail"] * 2 + ["block-head"] * 2)
    plan = (plan * (count // len(plan) + 1))[:count]
    out = []
    for kind in plan:
        b = bytearray(data)
        if kind == "truncate":
            at = int(rng.integers(0, n))
            b = b[:at]
            label = f"truncate@{at}"
        elif kind == "block-head":
            at = int(rng.integers(0, max(1, head - 64)))
            b[at:at + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
            label = f"noise64@{at}"
        else:
            lo, hi = {"flip-any": (0, n), "flip-head": (0, head), "flip-tail": (tail, n)}[kind]
            at = int(rng.integers(lo, hi))
            b[at] ^= int(rng.integers(1, 256))
            label = f"{kind}@{at}"
        out.append((label, bytes(b)))
    return out


def _limit_memory() -> None:
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, vm + HEADROOM))


def _content(kind: str, path: Path) -> dict[str, np.ndarray]:
    """Open ``path`` as the stages do and read everything they would read."""
    if kind == "prepared":
        from pipeline.formats.prepared import open_prepared

        info = open_prepared(path)
        out = {"meta": np.array([info.scale, info.mean, info.std, *info.shape, len(info.classes)])}
        for s in ("train", "val", "test"):
            out[f"{s}/x"], out[f"{s}/y"] = info.load(s)
        return out
    from pipeline.formats.cache import open_cache

    c = open_cache(path)
    out = {"logits": c.read("logits"), "labels": c.read("labels")}
    for T in c.temperatures:
        out[f"soft/{T}"] = targets(c, T)
    return out


def child(kind: str, original: Path, workdir: Path, seed: int, count: int) -> None:
    from pipeline.errors import PipelineError

    reference = _content(kind, original)
    _limit_memory()
    for i, (label, data) in enumerate(mutations(original.read_bytes(), seed, count)):
        path = workdir / f"m{i}.h5"
        path.write_bytes(data)
        print(json.dumps({"start": label}), flush=True)
        try:
            got = _content(kind, path)
            same = got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got)
            outcome = "same" if same else "CHANGED"
        except PipelineError as e:
            outcome = f"{type(e).__name__}"
            msg = str(e)
            if str(path) not in msg or "\n" in msg:
                outcome = f"BAD-MESSAGE {msg!r}"
        except BaseException as e:  # anything else is the failure being tested for
            outcome = f"CRASH {type(e).__name__}: {str(e)[:200]}"
        print(json.dumps({"label": label, "outcome": outcome}), flush=True)
        path.unlink()


# ------------------------------------------------------------------------------------ onnx models
def linear_model(path: Path, in_shape=(28, 28), classes: int = 10, members: int | None = None,
                 dtype: int | None = None, ir_version: int = 10, batch: int | str = "batch", seed: int = 0) -> Path:
    """A small ONNX classifier: Flatten -> MatMul (seeded weights) [-> Reshape to members]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dtype = TensorProto.FLOAT if dtype is None else dtype
    features = int(np.prod(in_shape))
    width = classes * (members or 1)
    w = np.random.default_rng(seed).normal(0, 0.05, (features, width)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1)]
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["flat"], ["flatf"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", ["flatf" if dtype != TensorProto.FLOAT else "flat", "w"],
                                  ["out" if members is None else "mm"]))
    inits = [numpy_helper.from_array(w, "w")]
    out_shape = [batch, classes]
    if members is not None:
        inits.append(numpy_helper.from_array(np.array([-1, members, classes], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["mm", "shape"], ["out"]))
        out_shape = [batch, members, classes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [batch, *in_shape])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return Path(path)


def external_model(path: Path, location: str, data_file: Path | None = None) -> Path:
    """``linear_model`` whose weight lives in external data at ``location`` (raw bytes in ``data_file``)."""
    import onnx

    linear_model(path)
    model = onnx.load(str(path))
    w = model.graph.initializer[0]
    raw = w.raw_data
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        e = w.external_data.add()
        e.key, e.value = key, value
    if data_file is not None:
        Path(data_file).write_bytes(raw)
    onnx.save(model, str(path))
    return Path(path)


# ------------------------------------------------------------------------------------ publication
class Killed(BaseException):
    """In-process stand-in for SIGKILL: raised from inside a set's publication, caught by nothing in the
    code under test (a publication past its commit point runs no cleanup: a kill leaves what it leaves)."""


def publication_steps(at: int, hard: bool = False):
    """A replacement for :func:`pipeline.artifacts._apply` that stops the publication of a set of files
    just before its ``at``-th change of the filesystem (an unlink or a rename, counted from 0 after
    the journal, the commit point, is written): SIGKILL of this process (``hard``) or :class:`Killed`.
    Install it with ``monkeypatch.setattr(artifacts, "_apply", publication_steps(k))``."""
    from pipeline import artifacts

    real = artifacts._apply

    def apply(journal, recovering=False, fresh=frozenset()):
        count, replace, unlink = [0], os.replace, os.unlink

        def counted(fn):
            def step(*a, **kw):
                if count[0] == at:
                    if hard:
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise Killed(f"killed before step {at} of the publication")
                count[0] += 1
                return fn(*a, **kw)
            return step

        os.replace, os.unlink = counted(replace), counted(unlink)
        try:
            return real(journal, recovering, fresh)
        finally:
            os.replace, os.unlink = replace, unlink

    return apply


def publish_generation(folder: Path, generation: str, kill_at: int | None = None) -> None:
    """Publish files ``a.txt``, ``b.txt`` and make's target ``t.txt`` in ``folder`` as one set, each
    holding ``generation``; ``kill_at``: SIGKILL this process at that step (:func:`publication_steps`)."""
    from pipeline import artifacts

    if kill_at is not None:
        artifacts._apply = publication_steps(kill_at, hard=True)
    target = folder / "t.txt"
    artifacts.claim(target)
    with artifacts.publish_together(target) as s:
        for name in ("a.txt", "b.txt", "t.txt"):
            artifacts.write_text(folder / name, generation, into=s)


# ------------------------------------------------------------------------------------ processes
def start_cli(*args, env: dict | None = None, throttle_s: float | None = None, **kw) -> subprocess.Popen:
    """``python -m commands ARGS`` in its own process group (so the test can kill stragglers).

    ``throttle_s`` runs it through ``tests/throttled_cli.py`` instead: the cache's teachers then take
    that many extra seconds per batch, so that a poll can kill at a chosen committed row."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    head = ["commands"] if throttle_s is None else ["tests.throttled_cli", str(throttle_s)]
    return subprocess.Popen([sys.executable, "-m", *head, *map(str, args)], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120, poll: float = 0.01) -> bool:
    """SIGKILL ``proc`` (and its process group) as soon as ``ready()``; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            _reap_group(proc)
            return True
        time.sleep(poll)
    _reap_group(proc)
    proc.kill()
    raise AssertionError(f"{proc.args}: nothing to kill at after {timeout} s")


def committed_rows(partial: Path) -> int | None:
    """``committed_rows`` of a cache being written, read from outside while the writer runs (None while
    the file is unreadable or the attribute not yet written)."""
    import h5py

    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f.attrs["committed_rows"])
    except (OSError, KeyError):
        return None


def run_limited(*args, fsize: int | None = None, vmem: int | None = None, vmpeak: bool = False,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``distill ARGS`` in a subprocess under ``RLIMIT_FSIZE`` (bytes per file) and/or ``RLIMIT_AS``
    (bytes of address space), set in the child before it starts; ``vmpeak`` makes its last stderr
    line ``VmPeak <KiB> VmSize <KiB>`` (the peak, and what it holds at exit).  glibc gets two malloc
    arenas, so that the address space a run takes does not depend on which threads happened to
    allocate (measured: the same peak to 0.1 MiB)."""
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if vmem is not None:
            resource.setrlimit(resource.RLIMIT_AS, (vmem, vmem))

    cmd = [sys.executable, "-m", "tests.faultkit", "vmpeak"] if vmpeak else [sys.executable, "-m", "commands"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"}
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)


def address_space(proc: subprocess.CompletedProcess) -> tuple[int, int]:
    """Bytes of (peak, final) address space a ``run_limited(..., vmpeak=True)`` child reported."""
    words = proc.stderr.strip().splitlines()[-1].split()
    assert words[0] == "VmPeak", proc.stderr[-2000:]
    return int(words[1]) * 1024, int(words[3]) * 1024


def exit7(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one error line of a command that ended with exit 7, out of resources (log lines may precede
    it, nothing follows it, no traceback), checked to contain each of ``fragments``."""
    assert proc.returncode == 7, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def unpublished(*paths: Path) -> None:
    """Neither the artifact nor its ``.partial`` exists."""
    for path in paths:
        partial = path.with_name(path.name + ".partial")
        assert not path.exists(), f"{path} was published"
        assert not partial.exists(), f"{partial} was left behind"


def content_digest(path: Path) -> str:
    """The seal of an HDF5 artifact (``content_sha256``: every dataset and attribute)."""
    import h5py

    with h5py.File(path, "r") as f:
        return str(f.attrs["content_sha256"])


def _vmpeak(argv: list[str]) -> None:
    import atexit
    import runpy

    def report() -> None:
        vm = {line.split(":")[0]: line.split()[1] for line in open("/proc/self/status") if line.startswith("Vm")}
        print(f"VmPeak {vm['VmPeak']} VmSize {vm['VmSize']}", file=sys.stderr, flush=True)

    atexit.register(report)
    sys.argv = ["distill", *argv]
    runpy.run_module("commands", run_name="__main__")


def _reap_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children (bench workers) would otherwise outlive it
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if sys.argv[1] == "vmpeak":
        _vmpeak(sys.argv[2:])
    elif sys.argv[1] == "publish":  # python -m tests.faultkit publish FOLDER GENERATION KILL_AT
        publish_generation(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        kind, original, workdir, seed, count = sys.argv[1:6]
        child(kind, Path(original), Path(workdir), int(seed), int(count))
