"""`make smoke` end to end in a subprocess, and make's rebuild rules (what reruns when T changes)."""
import json
import os
import re
import subprocess

import h5py
import pytest

from pipeline.formats.checkpoint import read_checkpoint
from pipeline.runtime import resolve_precision
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def make(*args, check=True):
    proc = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check and proc.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    data = tmp_path_factory.mktemp("smoke")
    make("smoke", f"SMOKE_DATA={data}")
    return data


def test_smoke_writes_every_artifact(smoke):
    ds = "fashion-mnist"
    for rel in [f"prepared/{ds}.h5", f"teachers/{ds}/ensemble.onnx", f"teachers/{ds}/member0.ckpt", f"cache/{ds}.h5",
                f"students/{ds}-kd.ckpt", f"students/{ds}-kd.metrics.json", f"students/{ds}-kd.onnx",
                f"students/{ds}-kd.int8.onnx", f"students/{ds}-hard.onnx", f"students/{ds}-kd.raw.int8.onnx",
                f"bench/{ds}.json", f"bench/{ds}.md",
                f"bench/{ds}.csv"]:
        assert (smoke / rel).is_file(), rel
    assert not list(smoke.rglob("*.partial"))
    with h5py.File(smoke / f"cache/{ds}.h5") as f:
        assert f.attrs["complete"] and f.attrs["rows"] == 3000
    read_checkpoint(smoke / f"students/{ds}-kd.ckpt")
    report = json.loads((smoke / f"bench/{ds}.json").read_text())
    onnx_models = {"teacher-ensemble", "student-hard", "student-kd", "student-kd-int8", "student-kd-int8-raw",
                   "identity-floor", "identity-floor-uint8"}
    assert set(report["models"]) == onnx_models | {f"{n}-iobinding" for n in onnx_models} | {"student-kd-torch"}
    for name, entry in report["models"].items():
        for run in entry["runs"]:
            want = "torch-eager-cpu" if name.endswith("-torch") else "CPUExecutionProvider"
            assert run["providers_used"][0] == want and run["steady"]["p50"] > 0
    assert (smoke / f"bench/{ds}.accuracy.png").is_file() and (smoke / f"students/{ds}-kd.mobile/{ds}-kd.ort").is_file()
    assert "| student-kd-int8 |" in (smoke / f"bench/{ds}.md").read_text()


def test_changing_T_reruns_students_onward_only(smoke):
    assert "distill" not in make("-n", "smoke", f"SMOKE_DATA={smoke}").stdout  # up to date: nothing reruns
    dry = make("-n", "smoke", f"SMOKE_DATA={smoke}", "T=4").stdout  # the default is T=2
    assert "distill student" in dry and "distill export" in dry and "distill bench" in dry
    assert "distill prepare" not in dry and "distill teacher" not in dry and "distill cache" not in dry


def test_smoke_never_stamps_the_full_size_data(smoke, tmp_path):
    # the outer `make smoke T=4` parses the Makefile with DATA=data: it must not restamp data/'s students
    make("-n", "smoke", f"SMOKE_DATA={smoke}", f"DATA={tmp_path}", "T=4")
    make("help", f"DATA={tmp_path}")
    assert not (tmp_path / "params").exists()


def test_jitter_cache_builds_from_the_same_teacher(smoke):
    ds, args = "fashion-mnist", (f"SMOKE_DATA={smoke}", "SMOKE_GOALS=cache-jitter", "JITTER_COPIES=1")
    out = make("smoke", *args).stdout  # the smoke run's own settings, so its teacher is up to date
    assert "distill jitter" in out and "distill cache" in out and "distill teacher" not in out
    with h5py.File(smoke / f"cache/{ds}-jitter.h5") as f:
        assert f.attrs["complete"] and f.attrs["rows"] == 6000  # 3000 rows and one shifted copy
    assert "distill" not in make("-n", "smoke", *args).stdout
    dry = make("-n", "smoke", *args[:2], "JITTER_COPIES=2").stdout
    assert "distill jitter" in dry and "distill cache" in dry and "distill teacher" not in dry


def test_default_teacher_follows_the_cpu(tmp_path):
    """The default recipe is 2 members x 10 epochs with erasing where `--precision auto` trains in bfloat16 and 1 x 7
    without where it trains in float32: make's CPU test must agree with runtime.resolve_precision, or a host gets the
    other's recipe."""
    dry = make("-n", "teacher", f"DATA={tmp_path}").stdout
    line = next(x for x in dry.splitlines() if "distill teacher" in x)
    members, epochs, erase = (2, 10, 0.5) if resolve_precision("auto") == "bf16" else (1, 7, 0)
    assert re.search(rf"--members {members} .*--epochs {epochs} --erase {erase} ", line), line
    assert "--precision auto" in line


def test_make_help_lists_targets():
    out = make("help").stdout
    for target in ("all", "smoke", "test", "prepare", "teacher", "cache", "student", "export", "bench",
                   "bench-fidelity"):
        assert f"  {target} " in out
