"""The bench stage's side of a timing: write what the worker reads, start it in a fresh process, read its JSON.

Every (model, engine, threads, batch, provider) is timed by ``python -m stages.bench.worker`` in a
process of its own (:mod:`stages.bench.worker`: a fresh allocator, no warm caches from the last
model, one JSON object on stdout).  This module runs it (:func:`run_isolated`, which turns the
worker's exit codes into the pipeline's errors) and writes its inputs: the pool of rows it cycles
(:func:`save_pool`) and the Identity model that is the floor of one ``run()``
(:func:`write_identity_model`).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from pipeline import resources, runtime
from pipeline.errors import DataError, ResourceError, RuntimeUnavailable
from pipeline.formats.onnx_model import IR_VERSION, OPSET
from stages.bench.settings import TIMING_DEFAULTS

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WORKER = "stages.bench.worker"  # run as ``python -m``, from the project root


def save_pool(path: Path, pool: np.ndarray) -> Path:
    """Write a pool of rows as .npy through Python's own file I/O: ``np.save`` to a file reports a
    full disk as "N requested and M written", without the errno that makes it exit 7."""
    buf = io.BytesIO()
    np.save(buf, pool, allow_pickle=False)
    with resources.writing(path):
        Path(path).write_bytes(buf.getbuffer())
    return Path(path)


def run_isolated(model, inputs, threads: int, batch: int, provider: str = "cpu",
                 *, timeout_s: float | None = None, engine: str = "onnxruntime", max_spread: float = 0.10,
                 **timing) -> dict:
    """Run the worker in a fresh ``python -m stages.bench.worker`` process and return its JSON.

    ``timing`` takes warmup_count, warmup_s, min_count, min_s, trials. When the worker fails, raises
    RuntimeUnavailable (its exit 5), ResourceError (its exit 7: out of memory) or DataError (any other
    exit) with its exit code and the last line of its stderr.
    """
    unknown = set(timing) - set(TIMING_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown timing options {sorted(unknown)}")
    cmd = [sys.executable, "-m", WORKER, "--model", str(Path(model).resolve()),
           "--inputs", str(Path(inputs).resolve()), "--threads", str(threads),
           "--batch", str(batch), "--provider", provider, "--engine", engine, "--max-spread", str(max_spread)]
    for key, value in timing.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout_s,
                          preexec_fn=runtime.die_with_parent)
    if proc.returncode != 0:  # a documented exit for the bench command, never a traceback
        lines = proc.stderr.strip().splitlines()
        why = f"bench worker exited {proc.returncode}: {lines[-1] if lines else '(no stderr)'}"
        if proc.returncode == ResourceError.exit_code:
            raise ResourceError(f"{model}: {why}")
        if proc.returncode == RuntimeUnavailable.exit_code:
            raise RuntimeUnavailable(why)
        raise DataError(f"{model}: {why}")
    return json.loads(proc.stdout)


def write_identity_model(path, input_shape_without_batch: tuple[int, ...],
                         dtype=np.float32) -> Path:
    """Write an ONNX Identity model (input ``x``, output ``y``, batch dim 'batch'), the floor of
    what one run() costs. Opset and IR of :mod:`pipeline.formats.onnx_model`; checked with full_check;
    written via a .partial twin."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shape = ["batch", *input_shape_without_batch]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "identity",
        [onnx.helper.make_tensor_value_info("x", elem, shape)],
        [onnx.helper.make_tensor_value_info("y", elem, shape)])
    opset = [onnx.helper.make_opsetid("", OPSET)]
    model = onnx.helper.make_model(graph, opset_imports=opset, producer_name="stages.bench.worker")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with resources.writing(partial):
        onnx.save_model(model, str(partial))
    os.replace(partial, path)
    return path
