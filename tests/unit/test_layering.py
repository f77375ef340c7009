"""The layers hold (docs/design.md, "Layers"), with no exception: the command line (``commands/``) sits on
top and nothing else imports it; stages never import each other; the shared layer (``pipeline/``) never
imports a stage; the formats layer never imports torch, onnxruntime or a stage.

Imports are read from the source with ``ast`` (module level and inside functions), so a lazy import
counts as much as a top-level one.
"""
import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

STAGES = sorted(p.parent.name for p in (ROOT / "stages").glob("*/__init__.py"))
FORMATS_MAY_IMPORT = {"pipeline.errors", "pipeline.artifacts", "pipeline.formats"}


def imported(path: Path) -> set[str]:
    """Every module name ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use absolute ones, the layering test reads them)"
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_stage_packages_exist():
    assert STAGES == ["bench", "cache", "export", "jitter", "prepare", "student", "teacher"]
    assert [p.name for p in (ROOT / "stages").glob("*.py")] == ["__init__.py"], "stage code lives in packages"
    for stage in STAGES:  # entry modules named alike: the stage's function in stage.py, its settings beside it
        assert {"stage.py", "settings.py"} <= {p.name for p in (ROOT / "stages" / stage).glob("*.py")}, stage


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    for path in sorted((ROOT / "stages" / stage).rglob("*.py")):
        for mod in imported(path):
            parts = mod.split(".")
            if parts[0] == "stages" and len(parts) > 1:
                assert parts[1] == stage, f"{path.relative_to(ROOT)} imports {mod}: stages talk through files"


def test_shared_layers_import_no_stage_and_no_command():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        bad = [m for m in imported(path) if m.split(".")[0] in ("stages", "commands")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_nothing_but_the_command_line_imports_it():
    """``commands`` is the top: no stage, shared module or script imports it (tests may, to run it)."""
    tops = [d for d in ROOT.iterdir() if d.is_dir() and d.name not in ("commands", "tests", "data")
            and not d.name.startswith(".")]
    for path in sorted(p for d in tops for p in d.rglob("*.py")):
        rel = path.relative_to(ROOT)
        bad = [m for m in imported(path) if m.split(".")[0] == "commands"]
        assert not bad, f"{rel} imports {bad}: only the command line imports itself"


def module_names_run(path: Path) -> set[str]:
    """String constants that name a project command module (``"commands"``, ``"commands.main"``): what a
    ``python -m`` subprocess would run, a dependency on the command line that no import shows."""
    return {node.value for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and (node.value == "commands" or node.value.startswith("commands."))}


def test_no_stage_or_shared_module_runs_the_command_line():
    """A stage that measures itself runs its stage function in a child process, not ``python -m commands``."""
    for path in sorted(p for d in ("stages", "pipeline") for p in (ROOT / d).rglob("*.py")):
        assert not module_names_run(path), f"{path.relative_to(ROOT)} runs the command line: {module_names_run(path)}"
    p = ROOT / "tests" / "conftest.py"  # control: the tests' helper does run it
    assert module_names_run(p) == {"commands"}


def test_formats_import_numpy_h5py_onnx_only():
    for path in sorted((ROOT / "pipeline" / "formats").glob("*.py")):
        for mod in imported(path):
            top = mod.split(".")[0]
            assert top not in ("torch", "onnxruntime", "stages"), f"{path.name} imports {mod}"
            if top == "pipeline":
                assert any(mod == m or mod.startswith(m + ".") for m in FORMATS_MAY_IMPORT), \
                    f"{path.name} imports {mod}: formats depend on errors, artifacts and each other only"


def test_the_checker_catches_a_planted_violation(tmp_path):
    """The parser sees a lazy import inside a function (what a stage would sneak in)."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from stages.cache.stage import build_cache\n    import torch\n")
    assert {"stages.cache.stage", "stages.cache.stage.build_cache", "torch"} <= imported(p)


def test_the_command_group_imports_no_command_module():
    """``commands/main.py`` names the command modules and imports one when its command runs: were it to import
    them all, every stage's command would be code of every stage, and make would rerun everything on a help edit."""
    assert not [m for m in imported(ROOT / "commands" / "main.py") if m.startswith("commands.")]


def test_the_command_line_is_one_module_per_stage():
    names = sorted(p.stem for p in (ROOT / "commands").glob("*.py"))
    assert names == sorted(["__init__", "__main__", "main", *STAGES]), names
