"""Resumable training, the torch side of :mod:`pipeline.formats.train_state`: save after an epoch, restore on a rerun.

A run is restored only from a state saved with the same ``key`` (JSON: what decided the run, data and
settings), and the state holds everything that decides the rest of it: the weights, the optimizer's
and the scheduler's state, the run's batch generator and torch's global one (dropout), and the run's
own record (epochs finished, best epoch, history), so that a resumed run ends with the weights of an
uninterrupted one (``tests/stages/test_teacher_resume.py``, ``tests/stages/test_student_resume.py``).
Used by the teacher stage (``member<i>.state``) and the student stage (``<out stem>.state``).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import atomic_output
from pipeline.formats.train_state import read_train_state, write_train_state


def _to_numpy(tree):
    """A state dict (nested) with every tensor as a numpy copy (what :mod:`train_state` stores)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().contiguous().numpy().copy()
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_numpy(v) for v in tree)
    return tree


def _to_torch(tree):
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree.copy())
    if isinstance(tree, dict):
        return {k: _to_torch(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_torch(v) for v in tree)
    return tree


def save(path: Path, key: dict[str, Any], net: torch.nn.Module, opt: torch.optim.Optimizer,
         sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, run: dict[str, Any]) -> None:
    """Write the training state to ``path`` atomically (a kill mid-write leaves the previous state)."""
    with atomic_output(path) as tmp:
        write_train_state(tmp, key, {
            "net": _to_numpy(net.state_dict()), "opt": _to_numpy(opt.state_dict()),
            "sched": sched.state_dict(), "gen": _to_numpy(gen.get_state()),
            "rng": _to_numpy(torch.get_rng_state()), "run": _to_numpy(run)})


def restore(path: Path, key: dict[str, Any], net: torch.nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, log: Callable[[str], None],
            who: str) -> dict[str, Any] | None:
    """The run record saved at ``path`` with ``key``, after loading the rest of the state into ``net``,
    ``opt``, ``sched``, ``gen`` and torch's global generator; None when there is no state, or it was
    saved with another key (said in the log, naming ``who``: the run starts over).  A state that exists
    but cannot be read is DataError (exit 3; 4 when its seal fails), never silently trained over: its
    message offers ``rm <path>``, after which a rerun starts from the first epoch."""
    if not path.is_file():
        return None
    saved_key, saved = read_train_state(path)
    if saved_key != json.loads(json.dumps(key, sort_keys=True)):
        log(f"{path}: saved from other data or settings; training {who} from the start")
        return None
    net.load_state_dict(_to_torch(saved["net"]))
    opt.load_state_dict(_to_torch(saved["opt"]))
    sched.load_state_dict(saved["sched"])
    gen.set_state(_to_torch(saved["gen"]))
    torch.set_rng_state(_to_torch(saved["rng"]))
    return _to_torch(saved["run"])
