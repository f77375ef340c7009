"""A teacher run killed inside a member resumes after the member's last finished epoch and ends with the
weights of an uninterrupted run (optimizer, scheduler, generators and best epoch restored), for every part of
the strong recipe at once: a residual network, SGD with weight decay, label smoothing, shifts, flips and
random erasing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.formats.checkpoint import read_checkpoint
from pipeline.formats.prepared import open_prepared
from stages.teacher import TeacherConfig, train_teachers
from stages.teacher.train import train_member, training_data
from tests.conftest import ROOT

RECIPE = dict(members=1, arch="res:4x1-8x1", epochs=3, threads=1, max_shift=1, flip=0.5, erase=0.5, optimizer="sgd",
              lr=0.05, weight_decay=5e-4, label_smoothing=0.1)


class Stop(Exception):
    pass


def _weights(path):
    return read_checkpoint(path, role="teacher-member").state


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _member(prepared, state, log, **over):
    """Member 0 of the recipe trained by the stage's own member loop (no ONNX export: seconds, not a minute)."""
    cfg = TeacherConfig(**{**RECIPE, **over})
    info = open_prepared(prepared)
    data, pixels = training_data(cfg, info)
    data["train"] = tuple(t[:400] for t in data["train"])  # 4 steps an epoch are enough to resume mid-run
    net, _ = train_member(cfg, 0, data, info.shape, len(info.classes), pixels, log, state=state)
    return {k: v.numpy() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_chw_prepared):
    return _member(tiny_chw_prepared, None, lambda m: None)


@pytest.mark.parametrize("stop_at", [1, 2])
def test_a_run_stopped_after_any_epoch_resumes_to_the_same_weights(uninterrupted, tiny_chw_prepared, tmp_path,
                                                                   stop_at):
    state, lines = (tmp_path / "member0.state", {"run": "a"}), []

    def stop(msg):
        lines.append(msg)
        if f"epoch {stop_at + 1}/3 val" in msg:
            raise Stop  # inside epoch stop_at + 1, before its state is saved: epoch stop_at's state is on disk

    with pytest.raises(Stop):
        _member(tiny_chw_prepared, state, stop)
    assert state[0].is_file()
    lines.clear()
    resumed = _member(tiny_chw_prepared, state, lines.append)
    assert f"member 0: resuming after epoch {stop_at}/3 from {state[0]}" in lines
    assert sum("val accuracy" in m for m in lines) == 3 - stop_at  # only the epochs left
    assert _equal(resumed, uninterrupted)


def test_a_state_saved_with_another_key_is_not_resumed(tiny_chw_prepared, tmp_path):
    state, lines = tmp_path / "member0.state", []

    def stop(msg):
        if "epoch 2/3 val" in msg:
            raise Stop

    with pytest.raises(Stop):
        _member(tiny_chw_prepared, (state, {"settings": "a"}), stop)
    _member(tiny_chw_prepared, (state, {"settings": "b"}), lines.append)
    assert any("saved from other data or settings; training member 0 from the start" in m for m in lines)
    assert sum("val accuracy" in m for m in lines) == 3


def test_the_stage_removes_a_finished_members_state(tiny_chw_prepared, tmp_path):
    out = tmp_path / "ensemble.onnx"
    with pytest.raises(Stop):
        train_teachers(TeacherConfig(**RECIPE), tiny_chw_prepared, out,
                       log=lambda m: (_ for _ in ()).throw(Stop) if "epoch 2/3 val" in m else None)
    assert (tmp_path / "member0.state").is_file() and not (tmp_path / "member0.ckpt").exists()
    lines = []
    train_teachers(TeacherConfig(**RECIPE), tiny_chw_prepared, out, log=lines.append)
    assert any("resuming after epoch 1/3" in m for m in lines)
    assert (tmp_path / "member0.ckpt").is_file() and not (tmp_path / "member0.state").exists()


@pytest.mark.slow
def test_sigkill_at_a_random_moment_resumes_to_the_same_weights(tiny_chw_prepared, tmp_path):
    """The command itself, SIGKILLed at a seeded moment once the first epoch's state is on disk (so mid-epoch,
    or mid-way through writing the next state), then rerun."""
    out = tmp_path / "ensemble.onnx"
    args = [sys.executable, "-m", "commands", "teacher", "--prepared", str(tiny_chw_prepared), "--out", str(out),
            *(f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()), "--epochs", "6"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = tmp_path / "whole" / "ensemble.onnx"
    subprocess.run([*args[:7], str(whole), *args[8:]], env=env, cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "member0.state").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(float(np.random.default_rng(20).uniform(0.0, 0.5)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "member0.ckpt").exists(), "killed too late to test a resume: lengthen the run"
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in done.stderr or "resuming after epoch" in done.stdout
    assert _equal(_weights(tmp_path / "member0.ckpt"), _weights(whole.with_name("member0.ckpt")))
