"""Make sees every line a target runs: for every file a stage or its command imports (scripts/code_deps.py
reads the import graph), ``make -n -W FILE`` reruns the first stage that imports it and what follows, and
nothing before it.  No artifact is built: a tree of empty, correctly ordered files stands in for the
pipeline's outputs, and ``-W`` pretends the one code file is newer than everything."""
import functools
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import code_deps

pytestmark = pytest.mark.slow  # ~60 make -n runs in subprocesses (a few seconds in all)

CHAIN = ["prepare", "teacher", "cache", "student", "export", "bench"]  # the stages of `make all`, in order
DS = "fashion-mnist"
OUTPUTS = [f"prepared/{DS}.h5", f"teachers/{DS}/ensemble.onnx", f"cache/{DS}.h5", f"students/{DS}-hard.ckpt",
           f"students/{DS}-kd.ckpt", f"students/{DS}-kd.onnx", f"students/{DS}-hard.onnx",
           f"students/{DS}-kd.raw.onnx", f"bench/{DS}.md"]


def make_n(data, *args, regenerate=False):
    """The stages ``make -n`` would run.  Under ``-W FILE`` make would first rewrite the code prerequisites
    (.make/code.mk: scripts/code_deps.py reads every module's imports) and restart, about a second each
    time; ``-o`` keeps the ones the fixture wrote, which ``-W`` cannot change (it edits no file), unless
    ``regenerate`` asks for the full path a real edit takes."""
    if "-W" in args and not regenerate:
        args = ("-o", ".make/code.mk", *args)
    proc = subprocess.run(["make", "-n", "--no-print-directory", f"DATA={data}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {s for s in CHAIN if any(f"distill {s} " in line for line in proc.stdout.splitlines())}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data tree whose every artifact is newer than all code and every parameter stamp."""
    d = tmp_path_factory.mktemp("make-deps")
    make_n(d, "all")  # parsing writes the parameter stamps
    later = time.time() + 1000
    for i, rel in enumerate(OUTPUTS):
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (later + i, later + i))
    assert make_n(d, "all") == set(), "with nothing changed, nothing reruns"
    return d


@functools.cache
def code_of(stage: str) -> frozenset[str]:
    """The files ``stage`` runs, from the import graph (read once per stage: each read parses every module)."""
    return frozenset(str(p.relative_to(ROOT)) for p in code_deps.stage_code(stage))


def expected(path: str) -> set[str]:
    importers = [s for s in CHAIN if path in code_of(s)]
    return set(CHAIN[CHAIN.index(importers[0]):]) if importers else set()


def files_of_the_chain() -> list[str]:
    return sorted({p for s in CHAIN for p in code_of(s)})


@pytest.mark.parametrize("path", files_of_the_chain())
def test_touching_a_stage_file_reruns_that_stage_and_what_follows(data, path):
    want = expected(path)
    assert want, path
    assert make_n(data, "-W", path, "all") == want, path


def test_the_command_line_reruns_everything_its_own_command_only_what_follows(data):
    """``commands/main.py`` runs under every stage; a stage's command module only under that stage: editing
    the student's help reruns the students and what follows, never the cache."""
    assert make_n(data, "-W", "commands/main.py", "all") == set(CHAIN)
    assert make_n(data, "-W", "commands/student.py", "all") == {"student", "export", "bench"}
    assert make_n(data, "-W", "commands/cache.py", "all") == {"cache", "student", "export", "bench"}


def test_a_student_only_module_spares_the_cache(data):
    """The case that motivated the per-stage prerequisites: code only the student runs must not rebuild the cache."""
    assert "pipeline/losses.py" not in code_of("cache")
    assert make_n(data, "-W", "pipeline/losses.py", "all") == {"student", "export", "bench"}
    assert make_n(data, "-W", "stages/cache/stream.py", "all") == {"cache", "student", "export", "bench"}
    # the same through make's own path for an edited file: code.mk regenerated, make restarted
    assert make_n(data, "-W", "pipeline/losses.py", "all", regenerate=True) == {"student", "export", "bench"}
