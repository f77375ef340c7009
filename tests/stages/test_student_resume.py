"""A student run killed after any epoch resumes after it and ends with the weights, metrics and history of an
uninterrupted run: the optimizer, the one-cycle schedule, the batch generator (order, views, mixing) and
torch's global one (dropout) restored, with the loader resident or streamed.  Patient schedules (hundreds of
epochs, hours of a core: docs/results.md) are what this is for."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from pipeline.errors import DataError, IntegrityError, Interrupted
from pipeline.formats.checkpoint import read_checkpoint
from stages.student import StudentConfig, distill_student
from stages.student.stage import state_path
from tests.conftest import ROOT

# Every random draw a student makes: dropout, batch order, mixing; weight decay and the schedule's state too.
RECIPE = dict(arch="mlp:32:dropout=0.2", epochs=3, temperature=4.0, alpha=0.5, mixup=0.5, weight_decay=0.01,
              batch_size=100, seed=5)
STREAMED = dict(memory_budget_mib=0.1, block_rows=128)  # 0.1 MiB holds a fraction of the 1,000 rows: streamed


class Stop(Exception):
    pass


def _train(cache, prepared, out, log, **over):
    return distill_student(StudentConfig(**{**RECIPE, **over}), cache, prepared, out,
                           out.with_suffix(".metrics.json"), log=log)


def _result(out):
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    drop = ("train_seconds", "checkpoint_sha256", "provenance")  # wall time, and what holds paths and times
    return read_checkpoint(out).state, {k: v for k, v in m.items() if k not in drop}


def _same(a, b):
    """Bit for bit: the same weights and the same metrics."""
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(np.array_equal(a[0][k], b[0][k]) for k in a[0])


def _stop_after(epoch, lines):
    def log(msg):
        lines.append(msg)
        if f"epoch {epoch}/3 val" in msg:
            raise Stop  # the epoch's line comes after its state is saved: a kill here resumes after it

    return log


@pytest.fixture(scope="module", params=[{}, STREAMED], ids=["resident", "streamed"])
def loader(request):
    return request.param


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tiny_prepared, tmp_path_factory, loader):
    out = tmp_path_factory.mktemp("whole") / "s.ckpt"
    _train(tiny_cache, tiny_prepared, out, lambda m: None, **loader)
    return _result(out)


@pytest.mark.parametrize("stop_at", [1, 2])
def test_a_run_stopped_after_any_epoch_resumes_to_the_same_result(uninterrupted, tiny_cache, tiny_prepared, tmp_path,
                                                                  loader, stop_at):
    out, lines = tmp_path / "s.ckpt", []
    with pytest.raises(Stop):
        _train(tiny_cache, tiny_prepared, out, _stop_after(stop_at, lines), **loader)
    assert state_path(out).is_file() and not out.exists()
    lines.clear()
    _train(tiny_cache, tiny_prepared, out, lines.append, **loader)
    assert f"student mlp:32:dropout=0.2: resuming after epoch {stop_at}/3 from {state_path(out)}" in lines
    assert sum("val accuracy" in m for m in lines) == 3 - stop_at  # only the epochs left
    assert _same(_result(out), uninterrupted)  # the weights; history, best epoch, val and test accuracies
    assert not state_path(out).exists()  # the checkpoint supersedes it


def test_a_state_saved_with_other_settings_is_not_resumed(tiny_cache, tiny_prepared, tmp_path):
    out, lines = tmp_path / "s.ckpt", []
    with pytest.raises(Stop):
        _train(tiny_cache, tiny_prepared, out, _stop_after(1, []))
    _train(tiny_cache, tiny_prepared, out, lines.append, alpha=0.7)
    assert f"{state_path(out)}: saved from other data or settings; training the student from the start" in lines
    assert sum("val accuracy" in m for m in lines) == 3


def test_ctrl_c_says_where_a_rerun_resumes(tiny_cache, tiny_prepared, tmp_path):
    out = tmp_path / "s.ckpt"

    def ctrl_c(msg):
        if "epoch 2/3 val" in msg:
            raise KeyboardInterrupt  # as the command line's SIGINT handler raises it

    with pytest.raises(Interrupted) as e:
        _train(tiny_cache, tiny_prepared, out, ctrl_c)
    assert str(e.value) == (f"interrupted; nothing was published, and {state_path(out)} keeps the run after "
                            "epoch 2/3: the same command resumes there")
    assert e.value.exit_code == 130 and not out.exists()


def test_ctrl_c_before_any_saved_epoch_is_the_plain_interrupt(tiny_cache, tiny_prepared, tmp_path):
    def ctrl_c(msg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the command line answers it: "interrupted; nothing was published"
        _train(tiny_cache, tiny_prepared, tmp_path / "s.ckpt", ctrl_c, epochs=1)


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_state_is_refused_not_trained_over(tiny_cache, tiny_prepared, tmp_path, damage):
    out = tmp_path / "s.ckpt"
    with pytest.raises(Stop):
        _train(tiny_cache, tiny_prepared, out, _stop_after(1, []))
    state = state_path(out)
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    else:
        with h5py.File(state, "r+") as f:  # a readable file whose content no longer matches its seal
            f["arrays/0"][...] = f["arrays/0"][...] + 1
    with pytest.raises((DataError, IntegrityError)) as e:
        _train(tiny_cache, tiny_prepared, out, lambda m: None)
    assert f"`rm {state}`" in str(e.value) and state.exists() and not out.exists()
    assert e.type is (IntegrityError if damage == "edit" else DataError)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_resumes_to_the_same_result(tiny_cache, tiny_prepared, tmp_path):
    """The command itself, SIGKILLed at a seeded moment once the first epoch's state is on disk (so mid-epoch,
    or mid-way through writing the next state), then rerun."""
    whole, out = tmp_path / "whole" / "s.ckpt", tmp_path / "s.ckpt"
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in {**RECIPE, "epochs": 8}.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def args(o):
        return [sys.executable, "-m", "commands", "student", "train", "--cache", str(tiny_cache),
                "--transfer-set", str(tiny_prepared), "--out", str(o), *opts]

    subprocess.run(args(whole), env=env, cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen(args(out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state_path(out).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(float(np.random.default_rng(21).uniform(0.0, 0.05)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "killed too late to test a resume: lengthen the run"
    done = subprocess.run(args(out), env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in done.stderr + done.stdout
    assert _same(_result(out), _result(whole))


@pytest.mark.slow
def test_sigint_to_the_command_is_one_line_and_the_rerun_resumes(tiny_cache, tiny_prepared, tmp_path):
    """Ctrl-C (SIGINT to the process group) once a state is on disk: exit 130, one line naming the state and
    its epoch, no traceback, nothing published; the same command then resumes after that epoch."""
    from tests.faultkit import start_cli

    out = tmp_path / "s.ckpt"
    args = ("student", "train", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--out", out,
            *(f"--{k.replace('_', '-')}={v}" for k, v in {**RECIPE, "epochs": 100}.items()))
    proc = start_cli(*args)
    deadline = time.monotonic() + 120
    while not state_path(out).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # past the first save (a Ctrl-C inside it is the plain line: "published <state> before it")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert last.startswith(f"distill student: interrupted; nothing was published, and {state_path(out)} "
                           "keeps the run after epoch "), last
    assert last.endswith("/100: the same command resumes there") and not out.exists()
    kept = int(last.split("after epoch ")[1].split("/")[0])
    done = subprocess.run([sys.executable, "-m", "commands", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming after epoch {kept}/100" in done.stderr and not state_path(out).exists()
