"""ONNX models as artifacts: the versions written, the checks before one is run, and their metadata.

The teacher stage writes the ensemble (output ``member_logits`` [batch, members, classes]); the
export stage writes students (output ``logits``) and their variants.  Both carry ``metadata_props``
(docs/formats.md, "ONNX metadata"):

- ensemble: ``provenance`` (JSON), ``classes`` (JSON list), ``input_contract``;
- student: :data:`STUDENT_KEYS` (class names, normalisation, whether it is in the graph, input
  dtype, T, alpha, checkpoint and cache sha256, arch, precision), ``input_contract``.

``input_contract`` (:data:`INPUT_KEY`, :class:`InputContract`) says what the model takes and which
output to read, so that the cache stage can feed any model, ours or another exporter's, without
flags (docs/teachers.md).  Its JSON::

    {"layout": "same" | "nchw" | "nhwc" | "flat" | "flat-nhwc",
     "range": "raw" | "unit" | "normalised",
     "mean": null | number | [number, ...],      # normalised only; null: the transfer set's
     "std": null | number | [number, ...],       # (one value, or one per channel)
     "dtype": "float32" | "uint8",
     "output": null | "<output name>",           # null: the first float [batch, C] / [batch, M, C]
     "tta": "none" | "hflip"}                    # test-time augmentation: hflip = mean logits of x and its mirror

Every key is optional (a missing one is not declared).  With ``x`` the transfer set's stored
pixels and ``scale`` its scale (255 for uint8 images), the model is fed ``x`` (raw), ``x / scale``
(unit, [0, 1]) or ``(x / scale - mean) / std`` (normalised, per channel when lists), as ``dtype``,
laid out as the transfer set (same), ``[C, H, W]``, ``[H, W, C]``, or flattened in ``C, H, W`` or
``H, W, C`` order; ``tta`` ``hflip`` runs the model on each image and on its horizontal mirror and
takes the mean of the two logit vectors (images only).

Before any long work a model is loaded without its weights and refused when it is not an ONNX
protobuf, has an IR version onnxruntime cannot read, or references external data outside its
folder (``../``, absolute paths, symbolic or hard links), which would let a model read any file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.errors import DataError

OPSET = 18  # the torch.export-based exporter's lowest native opset; lower ones go through a converter
IR_VERSION = 10  # what exports write: opset 18 needs IR >= 8
MAX_IR_VERSION = 13  # onnxruntime 1.31 refuses IR above 13 ("Unsupported model IR version"); onnx 1.23 writes 14
STUDENT_KEYS = ("class_names", "normalisation", "normalisation_in_graph", "input_dtype", "temperature", "alpha",
                "checkpoint_sha256", "cache_sha256", "arch", "precision")
TRANSFER_KEY = "transfer_sha256"  # a student export's transfer set (optional: exports before it lack it)
SOURCE_KEY = "transfer_source_sha256"  # the file a jittered transfer set copies its val/test splits from
ENSEMBLE_KEYS = ("provenance", "classes", "input_contract")
INPUT_KEY = "input_contract"
LAYOUTS = ("same", "nchw", "nhwc", "flat", "flat-nhwc")
RANGES = ("raw", "unit", "normalised")
INPUT_DTYPES = ("float32", "uint8")
TTAS = ("none", "hflip")
CONTRACT_FIELDS = ("range", "layout", "mean", "std", "dtype", "output", "tta")
#: Characters that make a value quoted in the command-line syntax (``output="Identity:0"``).
QUOTED_CHARS = frozenset(':,"= \t')


def quote_value(text: str) -> str:
    """A declaration's value as the command line writes it: as is, or in double quotes (a ``"`` inside
    doubled) when it holds ``:``, ``,``, ``"``, ``=`` or white space (docs/teachers.md, quoting)."""
    if not text or QUOTED_CHARS.isdisjoint(text):
        return text
    return '"' + text.replace('"', '""') + '"'


def _stats(name: str, value: Any) -> float | tuple[float, ...] | None:
    """A mean or std: None, one number or a non-empty list of numbers, all finite."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):  # a prepared file's per-channel stats
        value = value.tolist()
    vals = value if isinstance(value, (list, tuple)) else [value]
    if not vals or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be a finite number or a list of them, got {value!r}")
    out = tuple(float(v) for v in vals)
    return out if isinstance(value, (list, tuple)) else out[0]


@dataclasses.dataclass(frozen=True)
class InputContract:
    """A model's input contract and output choice (metadata ``input_contract``); every field may be
    None, meaning "not declared" (the cache stage then infers or defaults it)."""

    range: str | None = None
    layout: str | None = None
    mean: float | tuple[float, ...] | None = None
    std: float | tuple[float, ...] | None = None
    dtype: str | None = None
    output: str | None = None
    tta: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("range", RANGES), ("layout", LAYOUTS), ("dtype", INPUT_DTYPES), ("tta", TTAS)):
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
        object.__setattr__(self, "mean", _stats("mean", self.mean))
        object.__setattr__(self, "std", _stats("std", self.std))
        if self.std is not None and min(self.std if isinstance(self.std, tuple) else (self.std,)) <= 0:
            raise ValueError(f"std must be > 0, got {self.std!r}")
        if (self.mean is not None or self.std is not None) and self.range not in (None, "normalised"):
            raise ValueError(f"mean and std go with range normalised, not {self.range}")
        if self.dtype == "uint8" and self.range not in (None, "raw"):
            raise ValueError(f"a uint8 input takes raw pixels, not range {self.range}")
        if self.output is not None and (not isinstance(self.output, str) or not self.output):
            raise ValueError(f"output must be an output's name, got {self.output!r}")

    def as_dict(self) -> dict[str, Any]:
        """The declared fields as JSON-ready values (tuples become lists; undeclared ones left out)."""
        return {k: list(v) if isinstance(v, tuple) else v for k in CONTRACT_FIELDS
                if (v := getattr(self, k)) is not None}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    def spec(self) -> str:
        """The declared fields in the command-line syntax: ``input=unit,layout=flat`` (lists as a/b/c,
        an output name quoted where it must be: ``output="Identity:0"``)."""
        names = {"range": "input"}
        parts = []
        for k, v in self.as_dict().items():
            text = "/".join(f"{x:g}" for x in v) if isinstance(v, list) else quote_value(str(v))
            parts.append(f"{names.get(k, k)}={text}")
        return ",".join(parts)

    @classmethod
    def from_dict(cls, d: Any) -> InputContract:
        """ValueError unless ``d`` is a dict of known fields with valid values."""
        if not isinstance(d, dict):
            raise ValueError("the input contract must be a JSON object")
        unknown = sorted(set(d) - set(CONTRACT_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(CONTRACT_FIELDS)})")
        return cls(**d)


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


def read_input_contract(path: Path) -> InputContract | None:
    """The ``input_contract`` a model declares in its metadata, or None; DataError when malformed."""
    text = read_metadata(path).get(INPUT_KEY)
    if text is None:
        return None
    try:
        return InputContract.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: malformed {INPUT_KEY} metadata: {e}") from None


def input_contract_metadata(contract: InputContract) -> dict[str, str]:
    """The ``metadata_props`` entry declaring ``contract``."""
    return {INPUT_KEY: contract.to_json()}


def student_metadata(class_names: list[str], norm: dict[str, float], raw_input: bool, temperature: float,
                     alpha: float, checkpoint_sha256: str, cache_sha256: str, arch: str,
                     transfer_sha256: str | None = None, transfer_source_sha256: str | None = None) -> dict[str, str]:
    """``metadata_props`` of every exported student file (values are strings; JSON where structured);
    its input contract is the transfer set's normalisation (float32) or, ``raw_input``, raw uint8.
    ``transfer_sha256``: the transfer set the checkpoint was trained on (its normalisation is in the
    graph's input contract, its test split scores the model), checked by the bench;
    ``transfer_source_sha256``: the file it was jittered from, whose splits and normalisation it copies."""
    contract = (InputContract(range="raw", layout="same", dtype="uint8", output="logits") if raw_input else
                InputContract(range="normalised", layout="same", mean=norm["mean"], std=norm["std"],
                              dtype="float32", output="logits"))
    return {**input_contract_metadata(contract), "class_names": json.dumps(list(class_names)),
            "normalisation": json.dumps({**norm, "formula": "(x / scale - mean) / std"}),
            "normalisation_in_graph": str(raw_input).lower(),
            "input_dtype": "uint8" if raw_input else "float32",
            "temperature": str(temperature), "alpha": str(alpha),
            "checkpoint_sha256": checkpoint_sha256, "cache_sha256": cache_sha256, "arch": arch,
            **({TRANSFER_KEY: transfer_sha256} if transfer_sha256 else {}),
            **({SOURCE_KEY: transfer_source_sha256} if transfer_source_sha256 else {})}


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
    """``uint8`` for a model that takes raw pixels (normalisation in its graph), else ``float32``; a
    missing or unreadable file is a DataError (:func:`check_onnx_file`)."""
    model = check_onnx_file(path)
    return "uint8" if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8 else "float32"
