"""ONNX models as artifacts: the versions written, the checks before one is run, and their metadata.

The teacher stage writes the ensemble (output ``member_logits`` [batch, members, classes]); the
export stage writes students (output ``logits``) and their variants.  Both carry ``metadata_props``
(docs/formats.md, "ONNX metadata"):

- ensemble: ``provenance`` (JSON), ``classes`` (JSON list);
- student: :data:`STUDENT_KEYS` (class names, normalisation, whether it is in the graph, input
  dtype, T, alpha, checkpoint and cache sha256, arch, precision).

Before any long work a model is loaded without its weights and refused when it is not an ONNX
protobuf, has an IR version onnxruntime cannot read, or references external data outside its
folder (``../``, absolute paths, symbolic or hard links), which would let a model read any file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from pipeline.errors import DataError

OPSET = 18  # the torch.export-based exporter's lowest native opset; lower ones go through a converter
IR_VERSION = 10  # what exports write: opset 18 needs IR >= 8
MAX_IR_VERSION = 13  # onnxruntime 1.31 refuses IR above 13 ("Unsupported model IR version"); onnx 1.23 writes 14
STUDENT_KEYS = ("class_names", "normalisation", "normalisation_in_graph", "input_dtype", "temperature", "alpha",
                "checkpoint_sha256", "cache_sha256", "arch", "precision")
ENSEMBLE_KEYS = ("provenance", "classes")


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """Load an ONNX model's graph (no weights) and refuse it before any long work starts."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise DataError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.output or not model.graph.input:
        raise DataError(f"{path}: not a usable ONNX model (no graph inputs or outputs)")
    if model.ir_version > MAX_IR_VERSION:
        raise DataError(f"{path}: ONNX IR version {model.ir_version} is newer than onnxruntime reads "
                        f"(at most {MAX_IR_VERSION}); re-export with ir_version <= {MAX_IR_VERSION}")
    _check_external_data(path, model)
    return model


def tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    """Every TensorProto that may hold weights: initialisers, attributes and sparse tensors, in every
    graph, subgraph and function (onnx's own helper skips the sparse ones)."""
    def graph_tensors(g: Any) -> Iterable[Any]:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield from (sp.values, sp.indices)
        yield from nodes_tensors(g.node)

    def nodes_tensors(nodes: Iterable[Any]) -> Iterable[Any]:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                    yield from (sp.values, sp.indices)
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    for fn in model.functions:
        yield from nodes_tensors(fn.node)


def _location(tensor: onnx.TensorProto) -> str:
    return {e.key: e.value for e in tensor.external_data}.get("location", "")


def _check_external_data(path: Path, model: onnx.ModelProto) -> None:
    folder = path.resolve().parent
    for tensor in tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = _location(tensor)
        target = path.parent / loc
        if os.path.isabs(loc) or ".." in Path(loc).parts:
            raise DataError(f"{path}: external data {loc!r} points outside the model's folder")
        if target.is_symlink():
            raise DataError(f"{path}: external data {loc!r} is a symbolic link")
        if not target.is_file():
            raise DataError(f"{path}: external data file {loc!r} is missing")
        if target.resolve().parent != folder and folder not in target.resolve().parents:
            raise DataError(f"{path}: external data {loc!r} points outside the model's folder")
        if os.stat(target).st_nlink > 1:
            raise DataError(f"{path}: external data {loc!r} is a hard link")


def set_metadata(model: onnx.ModelProto, meta: dict[str, str], replace: bool = False) -> onnx.ModelProto:
    """Add ``meta`` to ``model.metadata_props`` (``replace``: drop what was there first)."""
    if replace:
        del model.metadata_props[:]
    for key, value in meta.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata {key!r} must be a string, got {type(value).__name__}")
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of a checked ONNX file, as a dict."""
    return {p.key: p.value for p in check_onnx_file(path).metadata_props}


def student_metadata(class_names: list[str], norm: dict[str, float], raw_input: bool, temperature: float,
                     alpha: float, checkpoint_sha256: str, cache_sha256: str, arch: str) -> dict[str, str]:
    """``metadata_props`` of every exported student file (values are strings; JSON where structured)."""
    return {"class_names": json.dumps(list(class_names)),
            "normalisation": json.dumps({**norm, "formula": "(x / scale - mean) / std"}),
            "normalisation_in_graph": str(raw_input).lower(),
            "input_dtype": "uint8" if raw_input else "float32",
            "temperature": str(temperature), "alpha": str(alpha),
            "checkpoint_sha256": checkpoint_sha256, "cache_sha256": cache_sha256, "arch": arch}


def read_student_metadata(path: Path) -> dict[str, Any]:
    """A student export's metadata, parsed; DataError naming the missing keys otherwise."""
    meta = read_metadata(path)
    missing = [k for k in STUDENT_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path}: not a student export of this pipeline (metadata lacks {', '.join(missing)})")
    try:
        return {**meta, "class_names": json.loads(meta["class_names"]),
                "normalisation": json.loads(meta["normalisation"]),
                "normalisation_in_graph": meta["normalisation_in_graph"] == "true",
                "temperature": float(meta["temperature"]), "alpha": float(meta["alpha"])}
    except (TypeError, ValueError):
        raise DataError(f"{path}: malformed student metadata") from None


def model_files(path: Path) -> dict[str, int]:
    """Bytes on disk of each file a model needs: the file and every external-data file it references."""
    path = Path(path)
    files = {path.name: os.path.getsize(path)}
    if path.suffix == ".onnx":
        for t in tensors(check_onnx_file(path)):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                files[_location(t)] = os.path.getsize(path.parent / _location(t))
    return files


def model_size(path: Path) -> int:
    """Bytes on disk of an ONNX model and every external-data file it references."""
    return sum(model_files(path).values())


def parameter_count(path: Path) -> int:
    """Weights in an ONNX file: elements of its float / fp16 / int8 initialisers of rank >= 2 (weight
    matrices and kernels; biases and quantisation scales are left out so that fp32, int8 and PyTorch
    count the same thing)."""
    model = onnx.load(str(path))
    return int(sum(np.prod(t.dims) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16)
                   and len(t.dims) >= 2))


MAC_OPS = ("Conv", "ConvInteger", "Gemm", "MatMul", "MatMulInteger")


def onnx_macs(path: Path) -> int:
    """Multiply-accumulates per image (batch row) of the Conv / Gemm / MatMul nodes of an ONNX file,
    as :func:`pipeline.macs.count_macs` counts them for a torch module: a Conv costs
    ``prod(output[1:]) * prod(weight[1:])`` (output channels and positions times the
    ``C_in / groups * k_h * k_w`` products each), a Gemm or MatMul ``K * N`` per row.  Shapes come
    from onnx's shape inference, so the same count comes out of an fp32, QDQ int8, dynamic int8 or
    fp16 file (the weight read through its DequantizeLinear or Cast); an ensemble sums its members."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    for v in [*g.value_info, *g.input, *g.output]:
        shape = v.type.tensor_type.shape
        dims.setdefault(v.name, [d.dim_value if d.HasField("dim_value") else None for d in shape.dim])
    total = 0
    for n in g.node:
        if n.op_type not in MAC_OPS:
            continue
        w, out = dims.get(n.input[1]), dims.get(n.output[0])
        if not w or not out or None in w or None in out[1:]:
            raise DataError(f"{path}: cannot infer the shapes of {n.op_type} node {n.name!r} to count its MACs")
        if n.op_type.startswith("Conv"):
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        else:
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            k = w[1] if trans_b else w[0]
            total += int(np.prod(out[1:])) * int(k)
    return total


def input_dtype(path: Path) -> str:
    """``uint8`` for a model that takes raw pixels (normalisation in its graph), else ``float32``."""
    model = onnx.load(str(path), load_external_data=False)
    return "uint8" if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8 else "float32"
