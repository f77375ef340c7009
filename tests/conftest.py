"""Shared fixtures: a small synthetic transfer set and the artifacts built from it (session scope).

The synthetic set has 10 classes, each a fixed random 28x28 prototype plus noise, so that tiny
models learn it in an epoch or two and the whole chain runs in seconds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def synthetic_images(n: int, seed: int = 0, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, 28, 28] and labels [n]: class prototype * brightness + noise."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(1234).random((classes, 28, 28)) > 0.6
    y = rng.integers(0, classes, n)
    x = protos[y] * rng.uniform(120, 255, (n, 1, 1)) + rng.normal(0, 40, (n, 28, 28))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    x, y = synthetic_images(1400)
    xt, yt = synthetic_images(300, seed=1)
    path = tmp_path_factory.mktemp("npz") / "tiny.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_npz) -> Path:
    from stages.prepare import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "tiny.h5"
    return prepare_dataset(PrepareConfig(val_rows=200), out, npz=tiny_npz)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_prepared) -> Path:
    from stages.teacher import TeacherConfig, train_teachers

    out = tmp_path_factory.mktemp("teacher") / "ensemble.onnx"
    cfg = TeacherConfig(members=2, arch="mlp:32", epochs=2, threads=1, max_shift=1)
    return train_teachers(cfg, tiny_prepared, out, log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_teacher, tiny_prepared) -> Path:
    from stages.cache import CacheConfig, cache_soft_targets

    out = tmp_path_factory.mktemp("cache") / "tiny.h5"
    cfg = CacheConfig(temperatures=(1.0, 2.0, 4.0), batch_size=256, device="cpu", threads=1)
    return cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, out, log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tiny_cache, tiny_prepared) -> Path:
    from stages.student import StudentConfig, distill_student

    d = tmp_path_factory.mktemp("student")
    cfg = StudentConfig(arch="mlp:16", epochs=2, temperature=2.0, alpha=0.5)
    return distill_student(cfg, tiny_cache, tiny_prepared, d / "s.ckpt", d / "s.metrics.json", log=lambda m: None)


BIG_ROWS = 59800  # train rows of big_transfer (60000 - 200 for validation)


@pytest.fixture(scope="session")
def big_transfer(tmp_path_factory, tiny_teacher):
    """A 60000-row transfer set (47 MB) and its cache (12 MB, several chunks per dataset, built at batch
    1024, temperatures 1, 2, 4, float32 logits and stored targets: kd-cache/1's content, 200 bytes a
    row): big enough for a cache to commit batches before a resource limit stops it, and for the
    memory tests' allocations to stand out from the interpreter's."""
    from types import SimpleNamespace

    from stages.cache import CacheConfig, cache_soft_targets
    from stages.prepare import PrepareConfig, prepare_dataset

    d = tmp_path_factory.mktemp("big")
    x, y = synthetic_images(BIG_ROWS + 200, seed=3)
    xt, yt = synthetic_images(300, seed=4)
    np.savez(d / "big.npz", x=x, y=y, x_test=xt, y_test=yt)
    prepared = prepare_dataset(PrepareConfig(val_rows=200), d / "big.h5", npz=d / "big.npz")
    cfg = CacheConfig(temperatures=(1.0, 2.0, 4.0), batch_size=1024, device="cpu", threads=1, store_soft=True,
                      logits_dtype="float32")
    cache = cache_soft_targets(cfg, [tiny_teacher], prepared, d / "c.h5", log=lambda m: None)
    return SimpleNamespace(prepared=prepared, cache=cache)


def run_cli(*args: str, check: bool = False, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m commands ARGS`` in a subprocess from the project root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "commands", *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"distill {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


# ---- channel-first images [n, 1, 28, 28]: the convolutional students' chain --------------------------
CNN_SPECS = ("cnn:8-16-16", "conv:8/2-16/2", "dws:8-16/2-32/2",  # the teacher's kind and both student kinds
             "res:4x1-8x1")  # residual: an Add between quantised tensors


@pytest.fixture(scope="session")
def tiny_chw_prepared(tmp_path_factory) -> Path:
    from stages.prepare import PrepareConfig, prepare_dataset

    d = tmp_path_factory.mktemp("chw")
    x, y = synthetic_images(1400)
    xt, yt = synthetic_images(300, seed=1)
    np.savez(d / "chw.npz", x=x[:, None], y=y, x_test=xt[:, None], y_test=yt)
    return prepare_dataset(PrepareConfig(val_rows=200), d / "chw.h5", npz=d / "chw.npz")


@pytest.fixture(scope="session")
def tiny_chw_cache(tmp_path_factory, tiny_chw_prepared) -> tuple[Path, Path]:
    """(teacher ONNX, cache) of the channel-first set: one small MLP teacher, soft targets at T=2."""
    from stages.cache import CacheConfig, cache_soft_targets
    from stages.teacher import TeacherConfig, train_teachers

    d = tmp_path_factory.mktemp("chw-cache")
    teacher = train_teachers(TeacherConfig(members=1, arch="mlp:32", epochs=2, threads=1, max_shift=1),
                             tiny_chw_prepared,
                             d / "ensemble.onnx", log=lambda m: None)
    cfg = CacheConfig(temperatures=(2.0,), batch_size=256, device="cpu", threads=1)
    return teacher, cache_soft_targets(cfg, [teacher], tiny_chw_prepared, d / "chw.h5", log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_cnn_students(tmp_path_factory, tiny_chw_cache, tiny_chw_prepared) -> dict[str, Path]:
    """A checkpoint of each of :data:`CNN_SPECS`, distilled from the cache like any student."""
    from stages.student import StudentConfig, distill_student

    d = tmp_path_factory.mktemp("cnn-students")
    out = {}
    for i, spec in enumerate(CNN_SPECS):
        cfg = StudentConfig(arch=spec, epochs=3, lr=1e-2, temperature=2.0, alpha=0.5)
        out[spec] = distill_student(cfg, tiny_chw_cache[1], tiny_chw_prepared, d / f"s{i}.ckpt", d / f"s{i}.json",
                                    log=lambda m: None)
    return out
