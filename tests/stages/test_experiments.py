"""The paper's experiments (stages/experiments.py): the exact bias fit, and both tables at tiny size."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.student.experiments import fit_bias
from tests.conftest import run_cli


def _acc(z, y, c, b):
    z = z.copy()
    z[:, c] += b
    return np.mean(z.argmax(1) == y)


def test_fit_bias_hand_example():
    # Class 0 never wins on its own rows by 1.0 and 2.0; other rows are won by 3.0 over class 0.
    z = np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 0.0]])
    y = np.array([0, 0, 1])
    b = fit_bias(z, y, 0)
    assert 2.0 < b < 3.0 and _acc(z, y, 0, b) == 1.0  # midpoint 2.5 between d=2 and d=3


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 40))
def test_fit_bias_is_the_maximum_over_a_dense_grid(seed, classes, n):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, classes))
    y = rng.integers(0, classes, n)
    b = fit_bias(z, y, 0)
    grid = np.linspace(-20, 20, 4001)  # |d| <= ~16 for these logits: the grid spans every step
    assert _acc(z, y, 0, b) >= max(_acc(z, y, 0, g) for g in grid) - 1e-12
    assert _acc(z, y, 0, b) >= _acc(z, y, 0, 0.0)  # never worse than no correction


@pytest.mark.slow
@pytest.mark.parametrize("name, extra, fragment", [
    ("small-transfer", ["--train-fraction", "0.1"], "| hard labels |"),
    ("omitted-class", ["--drop-class", "3"], "bias shift"),
])
def test_experiment_tables_at_tiny_size(tiny_cache, tiny_prepared, tmp_path, name, extra, fragment):
    md = tmp_path / f"{name}.md"
    run_cli("student", "experiment", "--name", name, "--cache", tiny_cache, "--transfer-set", tiny_prepared,
            "--work-dir", tmp_path / "w", "--markdown", md, "--arch", "mlp:16", "--temperature", "2",
            "--epochs", "2", "--seeds", "0,1", "--jobs", "2", *extra, check=True)
    text = md.read_text()
    assert fragment in text and "soft targets (T=2, alpha=0.5)" in text and "nan" not in text
    rows = json.loads(md.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 4
    if name == "small-transfer":
        assert rows[0]["train_rows"] == 120  # 10% of 1200
    else:
        labels_left = rows[0]["train_rows"]
        assert labels_left < 1200 and all(r["class_errors_after"] <= r["class_test_rows"] for r in rows)
