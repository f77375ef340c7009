"""Ctrl-C in the command line's own handler (:func:`commands.main._on_sigint`), in process: the
subprocess tests at random moments are tests/faults/test_faults_cli.py."""
from __future__ import annotations

import signal

import pytest

from commands import main as m


@pytest.fixture
def handler_state(monkeypatch):
    """A fresh first Ctrl-C, and the test process's own SIGINT handler left alone."""
    monkeypatch.setattr(m, "_interrupted", False)
    monkeypatch.setattr(m, "_held", False)
    monkeypatch.setattr(m.signal, "signal", lambda *a: None)


def test_a_ctrl_c_while_a_stage_loads_is_held_until_it_has_loaded(handler_state):
    """Raised inside an import, KeyboardInterrupt can land in Python code that a native module's
    initialisation calls (onnx's pybind11 enums) and abort the process; held, it is raised when the
    `importing` block closes, after the import has finished."""
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with m.importing("the test stage"):
            m._on_sigint(signal.SIGINT, None)  # returns: nothing raised inside the import
            steps.append("the import went on to its end")
    assert steps == ["the import went on to its end"]
    assert m._interrupted and not m._held and m._loading == 0


def test_a_ctrl_c_outside_an_import_is_raised_at_once(handler_state):
    with pytest.raises(KeyboardInterrupt):
        m._on_sigint(signal.SIGINT, None)
    assert m._interrupted and not m._held
    with m.importing("the test stage"):  # nothing held: the block closes quietly
        pass
