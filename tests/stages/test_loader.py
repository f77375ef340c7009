"""The student's loader (stages/student/loader.py): resident and streaming give the same rows, aligned, once
per epoch; a cache larger than the memory budget trains in bounded memory; subsets and unlabelled
transfer sets; both loaders (and the views cache's, stages/student/viewloader.py) offer the interface the
training loop is typed against (stages/student/batches.py)."""
import inspect
import json
import shutil
import subprocess
import sys
import typing

import h5py
import numpy as np
import pytest
import torch

from pipeline.errors import UsageError
from pipeline.formats import h5seal as h5safe
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.cache import CacheConfig, cache_soft_targets
from stages.prepare import PrepareConfig, prepare_dataset
from stages.student import StudentConfig, batches, distill_student
from stages.student.batches import StudentLoader
from stages.student.loader import TransferLoader, select_rows
from stages.student.viewloader import ViewLoader
from tests.cache_helpers import targets
from tests.conftest import ROOT, synthetic_images


def _epoch_rows(loader, seed, batch):
    """Every batch of one epoch, each row mapped back to its cache row by its x bytes."""
    info = loader.prepared
    x_all, _ = info.load(loader.split)
    index = {r.tobytes(): i for i, r in enumerate(x_all)}
    rows, sizes = [], []
    for x, t, y in loader.epoch(torch.Generator().manual_seed(seed), batch):
        sizes.append(len(y))
        for xi, ti, yi in zip(x.numpy(), t.numpy(), y.numpy()):
            rows.append((index[xi.tobytes()], ti, yi))
    return rows, sizes


@pytest.mark.parametrize("budget_mib", [1024.0, 0.5])  # resident; streaming (1200 rows x 3.2 KB > 0.5 MiB)
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 10 * 32 * 3])  # one chunk of targets; chunks of 3 batches
def test_every_selected_row_once_per_epoch_and_aligned(tiny_cache, tiny_prepared, budget_mib, chunk_bytes,
                                                       monkeypatch):
    if chunk_bytes:
        monkeypatch.setattr("stages.student.batches.CHUNK_BYTES", chunk_bytes)
        assert batches.chunk_rows(32, 10) == 96
    c, info = open_cache(tiny_cache), open_prepared(tiny_prepared)
    soft, labels = targets(c, 2.0), c.labels()
    sel = select_rows(labels, 0.5, drop_class=3, seed=1)
    loader = TransferLoader(c, info, "soft", 2.0, sel, budget_mib=budget_mib, block_rows=100)
    assert loader.resident == (budget_mib > 1)
    rows, sizes = _epoch_rows(loader, seed=0, batch=32)
    got = sorted(r for r, _, _ in rows)
    assert got == sel.tolist() and 3 not in labels[got]
    assert sizes[:-1] == [32] * (len(sizes) - 1) and len(sizes) == loader.steps(32)
    for r, t, y in rows:  # the target and label travel with their x, exactly (no arithmetic on them)
        assert np.array_equal(t, soft[r]) and y == labels[r]
    if not loader.resident:
        b = loader.block_rows
        assert loader.buffer_blocks >= 4 and loader.peak_buffer_rows <= loader.buffer_blocks * b + 32
        assert loader.peak_buffer_rows * loader.row_bytes <= 0.5 * 2**20 / 2 + 32 * loader.row_bytes
        # Shuffled across blocks: the first batch draws rows from more than one block.
        assert len({r // b for r, _, _ in rows[:32]}) > 1


def test_streaming_order_is_seeded(tiny_cache, tiny_prepared):
    c, info = open_cache(tiny_cache), open_prepared(tiny_prepared)
    loader = TransferLoader(c, info, "none", 1.0, budget_mib=0.5, block_rows=100)
    a = [r for r, _, _ in _epoch_rows(loader, 5, 64)[0]]
    b = [r for r, _, _ in _epoch_rows(loader, 5, 64)[0]]
    c_ = [r for r, _, _ in _epoch_rows(loader, 6, 64)[0]]
    assert a == b and a != c_


def test_streamed_student_matches_resident_quality(tiny_cache, tiny_prepared, tmp_path):
    cfg = StudentConfig(arch="mlp:16", epochs=2, temperature=2.0)
    out = {}
    for name, budget in (("resident", 1024.0), ("streaming", 0.5)):
        distill_student(dataclass_replace(cfg, memory_budget_mib=budget, block_rows=128), tiny_cache, tiny_prepared,
                        tmp_path / f"{name}.ckpt", tmp_path / f"{name}.json", log=lambda m: None)
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert out[name]["loader"] == name
    # Different batch orders, same data: both learn the easy synthetic classes (chance is 0.1).
    assert min(out["resident"]["test_accuracy"], out["streaming"]["test_accuracy"]) > 0.5


def dataclass_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("bars", [False, True])
def test_a_log_gets_a_line_an_epoch_where_no_bar_is_drawn(tiny_cache, tiny_prepared, tmp_path, monkeypatch, bars):
    """Under pytest stderr is no terminal: a background run's log shows each epoch, a terminal the bar."""
    if bars:
        monkeypatch.setenv("DISTILL_PROGRESS", "1")
    else:
        monkeypatch.delenv("DISTILL_PROGRESS", raising=False)
    lines = []
    distill_student(StudentConfig(arch="mlp:16", epochs=3), tiny_cache, tiny_prepared, tmp_path / "s.ckpt",
                    tmp_path / "s.json", log=lines.append)
    epochs = [m for m in lines if ": epoch " in m]
    assert len(epochs) == (0 if bars else 3), lines
    assert bars or (epochs[0].startswith("student mlp:16: epoch 1/3 val accuracy ") and "done in ~" in epochs[0])


def test_subset_settings(tiny_cache, tiny_prepared, tmp_path):
    cfg = StudentConfig(arch="mlp:16", epochs=1, temperature=2.0, train_fraction=0.25, drop_class=3)
    distill_student(cfg, tiny_cache, tiny_prepared, tmp_path / "s.ckpt", tmp_path / "s.json", log=lambda m: None)
    m = json.loads((tmp_path / "s.json").read_text())
    labels = open_cache(tiny_cache).labels()
    assert m["train_rows"] == round(0.25 * int((labels != 3).sum()))
    with pytest.raises(UsageError, match="drop_class 10"):
        distill_student(dataclass_replace(cfg, drop_class=10), tiny_cache, tiny_prepared, tmp_path / "b.ckpt",
                        tmp_path / "b.json")


@pytest.fixture(scope="module")
def unlabelled_cache(tiny_cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("unlabelled") / "cache.h5"
    shutil.copy(tiny_cache, path)
    with h5py.File(path, "r+") as f:
        f["labels"][:] = -1  # the transfer set has no labels at all
        h5safe.seal(f)
    return path


def test_unlabelled_transfer_set_trains_with_alpha_one(unlabelled_cache, tiny_prepared, tmp_path):
    cfg = StudentConfig(arch="mlp:16", epochs=2, temperature=2.0, alpha=1.0)
    distill_student(cfg, unlabelled_cache, tiny_prepared, tmp_path / "s.ckpt", tmp_path / "s.json", log=lambda m: None)
    m = json.loads((tmp_path / "s.json").read_text())
    assert m["test_accuracy"] > 0.5  # learnt from the teacher's soft targets alone
    with pytest.raises(UsageError, match="no labels; use --alpha 1"):
        distill_student(dataclass_replace(cfg, alpha=0.5), unlabelled_cache, tiny_prepared, tmp_path / "h.ckpt",
                        tmp_path / "h.json")


# ------------------------------------------------------- bounded memory: a cache larger than the budget

_RSS_SCRIPT = r"""
import json, re, sys
from pathlib import Path
from stages.student import StudentConfig, distill_student
def peak_kib():  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
cache, prepared, out, budget = sys.argv[1:5]
def run(budget):
    cfg = StudentConfig(arch="mlp:8", epochs=1, temperature=1.0, memory_budget_mib=budget, block_rows=1024)
    distill_student(cfg, Path(cache), Path(prepared), Path(out), Path(out + ".json"), log=lambda m: None)
run(8.0)  # warm-up: torch and h5py touch ~100 MiB of code and allocator pools on first use
before = peak_kib()
run(float(budget))
after = peak_kib()
print(json.dumps({"growth_mib": (after - before) / 1024, "loader": json.load(open(out + ".json"))["loader"]}))
"""


@pytest.mark.slow
def test_cache_larger_than_budget_trains_in_bounded_memory(tiny_teacher, tmp_path):
    # 60,000 rows: float32 x alone is 180 MiB resident; the budget is 8 MiB.
    x, y = synthetic_images(60_000, seed=3)
    xv, yv = synthetic_images(300, seed=4)
    np.savez(tmp_path / "big.npz", x=x, y=y, x_test=xv, y_test=yv)
    del x, y
    prepared = prepare_dataset(PrepareConfig(val_rows=200), tmp_path / "big.h5", npz=tmp_path / "big.npz")
    cache = cache_soft_targets(CacheConfig(temperatures=(1.0,), batch_size=4096, device="cpu", threads=1),
                               [tiny_teacher], prepared, tmp_path / "cache.h5", log=lambda m: None)
    res = {}
    for budget in ("8", "1024"):
        proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, cache, prepared, str(tmp_path / f"s{budget}.ckpt"),
                               budget], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        res[budget] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["8"]["loader"] == "streaming" and res["1024"]["loader"] == "resident"
    # Peak RSS growth while training, after a warm-up run that touches torch's code and pools: the
    # streamed run stays near its 8 MiB budget (24 MiB allows for the allocator and h5py's chunk
    # cache); the resident run holds the 180 MiB of float32 x.
    assert res["8"]["growth_mib"] < 24, res
    assert res["1024"]["growth_mib"] > 150, res


def _members(protocol: type) -> tuple[dict[str, type], list[str]]:
    """A protocol's data members (with their types) and its methods."""
    data = typing.get_type_hints(protocol)
    methods = [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    return data, methods


def test_both_loaders_satisfy_the_student_loader_protocol(tiny_teacher, tiny_cache, tiny_prepared, tmp_path):
    """TransferLoader and ViewLoader offer every member of StudentLoader, with its type and signature, and
    an epoch of either gives steps() batches of (float32 x, float32 target, int64 y) covering n rows."""
    views = cache_soft_targets(CacheConfig(temperatures=(2.0,), batch_size=256, device="cpu", threads=1, views=2),
                               [tiny_teacher], tiny_prepared, tmp_path / "views.h5", log=lambda m: None)
    info = open_prepared(tiny_prepared)
    loaders = [TransferLoader(open_cache(tiny_cache), info, "soft", 2.0),
               TransferLoader(open_cache(tiny_cache), info, "soft", 2.0, budget_mib=0.5),  # streaming
               ViewLoader(open_cache(views), info, "soft", 2.0)]
    data, methods = _members(StudentLoader)
    assert set(data) == {"n", "resident", "peak_buffer_rows"} and set(methods) == {"labels", "steps", "epoch"}
    assert not isinstance(object(), StudentLoader)  # the check can fail
    for loader in loaders:
        name = type(loader).__name__
        assert isinstance(loader, StudentLoader), name
        for member, tp in data.items():
            assert isinstance(getattr(loader, member), tp), (name, member)
        for method in methods:
            want = inspect.signature(getattr(StudentLoader, method), eval_str=True)
            assert inspect.signature(getattr(type(loader), method), eval_str=True) == want, (name, method)
        batches = list(loader.epoch(torch.Generator().manual_seed(0), 64))
        assert len(batches) == loader.steps(64) and sum(len(b[2]) for b in batches) == loader.n, name
        for x, t, y in batches:
            assert (x.dtype, t.dtype, y.dtype) == (torch.float32, torch.float32, torch.int64), name
            assert len(x) == len(t) == len(y) and t.shape[1] == 10, name
    assert [type(v).__name__ for v in loaders] == ["TransferLoader", "TransferLoader", "ViewLoader"]
    assert [v.resident for v in loaders] == [True, False, True]
