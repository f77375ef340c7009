"""PyTorch -> ONNX export and its numerical check (after optimum's validate_model_outputs); torch.

Used by the teacher (the ensemble) and the export stage (students).  The versions written and the
metadata layout are the ONNX artifact's contract, :mod:`pipeline.formats.onnx_model`.

An export is not done until onnxruntime reproduces PyTorch on real inputs: every batch is compared,
all failures are collected, and the message reports the largest difference.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline import resources
from pipeline.errors import IntegrityError
from pipeline.formats.onnx_model import IR_VERSION, OPSET, set_metadata


def export(module: torch.nn.Module, example: torch.Tensor, out: Path, output_name: str,
           metadata: dict[str, str] | None = None) -> Path:
    """Write ``module`` to ``out`` as one self-contained ONNX file (no ``.onnx.data``).

    Input ``x`` with a dynamic batch dimension, output ``output_name``, opset 18, IR version 10,
    optional ``metadata_props``; checked with ``onnx.checker`` (full check).  ``out`` is the path
    the caller publishes (normally a ``.partial``).

    The exporter annotates every node with debugging metadata: the Python module path of the class
    and a stack trace with the absolute path of the source file and its line numbers.  They are
    removed (:func:`strip_node_metadata`): with them, the same weights exported from two checkouts,
    or after a module moved, are different files, and a cache built from them a different cache.
    """
    module = module.eval()
    with resources.writing(out), quiet():  # torch and onnx.save raise a failed write naming no file
        torch.onnx.export(module, (example,), str(out), input_names=["x"], output_names=[output_name],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                          external_data=False, dynamo=True, verbose=False)
    model = strip_node_metadata(onnx.load(str(out)))
    model.ir_version = IR_VERSION
    set_metadata(model, metadata or {})
    onnx.checker.check_model(model, full_check=True)
    with resources.writing(out), open(out, "wb") as f:  # an explicit handle: onnx.save on a .partial is fine too
        f.write(model.SerializeToString())
    return Path(out)


def strip_node_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without per-node ``metadata_props`` (in every graph, subgraph and function)."""
    def graph(g: onnx.GraphProto) -> None:
        for node in g.node:
            del node.metadata_props[:]
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    graph(sub)

    graph(model.graph)
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]
    return model


@contextlib.contextmanager
def quiet():
    """The exporter prints progress and harmless warnings (torchvision ops missing); hide them."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def validate(module: torch.nn.Module, session, batches: Sequence[np.ndarray], rtol: float = 1e-5,
             what: str = "model") -> float:
    """Compare onnxruntime against PyTorch on each batch; returns the largest absolute difference.

    Tolerance: ``|ort - torch| <= rtol * max(1, max|torch|)`` per batch (1e-5 scaled to the logits),
    and identical argmax over the last axis.  All failing batches are collected into one
    IntegrityError naming the largest difference.
    """
    failures, worst = [], 0.0
    name = session.get_inputs()[0].name
    module = module.eval()
    for x in batches:
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        got = session.run(None, {name: x})[0]
        if got.shape != ref.shape:
            failures.append(f"batch {len(x)}: shape {got.shape} != {ref.shape}")
            continue
        diff = float(np.max(np.abs(got - ref)))
        worst = max(worst, diff)
        tol = rtol * max(1.0, float(np.max(np.abs(ref))))
        if diff > tol:
            failures.append(f"batch {len(x)}: max |diff| {diff:.3g} > {tol:.3g}")
        mismatched = int(np.sum(got.argmax(-1) != ref.argmax(-1)))
        if mismatched:
            failures.append(f"batch {len(x)}: argmax differs on {mismatched} rows")
    if failures:
        raise IntegrityError(f"{what}: onnxruntime disagrees with PyTorch (largest |diff| {worst:.3g}): "
                             + "; ".join(failures))
    return worst
