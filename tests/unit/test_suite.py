"""The suite itself: every test asserts something (two fault tests once asserted nothing)."""
import ast

import pytest

from tests.conftest import ROOT

TEST_FILES = sorted((ROOT / "tests").rglob("test_*.py"))


def _checks(fn: ast.FunctionDef, helpers: dict[str, ast.FunctionDef], seen: set[str]) -> bool:
    """An assert, pytest.raises, a numpy/torch assert_*, or a call of a helper of the module that checks."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if "assert" in name or name in ("raises", "warns", "fail"):
                return True
            if name in helpers and name not in seen and _checks(helpers[name], helpers, seen | {name}):
                return True
    return False


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_checks_something(path):
    tree = ast.parse(path.read_text())
    helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    silent = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
              and not _checks(n, helpers, set())]
    assert not silent, f"tests that assert nothing: {silent}"
