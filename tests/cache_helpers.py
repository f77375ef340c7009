"""Helpers for the cache tests: small hand-built ONNX teachers and a content digest of a cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_teacher(path: Path, in_shape=("batch", 28, 28), classes: int = 10, *, softmax: bool = False,
                   sqrt: bool = False, dtype=TensorProto.FLOAT, inputs: int = 1, seed: int = 0,
                   features: int = 784) -> Path:
    """``x -> Flatten -> x W + b`` (-> Softmax | -> Sqrt, which gives NaN where a logit < 0)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.normal(0, 0.05, (features, classes))).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "b")
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1)]
    src = "f"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["f"], ["f32"], to=TensorProto.FLOAT))
        src = "f32"
    nodes += [helper.make_node("MatMul", [src, "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["z"])]
    last = "z"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["p"], axis=-1))
        last = "p"
    if sqrt:
        nodes.append(helper.make_node("Sqrt", ["z"], ["s"]))
        last = "s"
    nodes.append(helper.make_node("Identity", [last], ["out"]))
    ins = [helper.make_tensor_value_info("x", dtype, list(in_shape))]
    ins += [helper.make_tensor_value_info(f"extra{i}", TensorProto.FLOAT, ["batch", 1]) for i in range(1, inputs)]
    graph = helper.make_graph(nodes, "teacher", ins, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                    ["batch", classes])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return Path(path)


def digest(path: Path, skip_attrs: tuple[str, ...] = ()) -> str:
    """sha256 over every dataset (in row order, with its name, dtype and shape) and every attribute."""
    h = hashlib.sha256()

    def attrs(name: str, obj) -> None:
        for k in sorted(obj.attrs):
            if k in skip_attrs:
                continue
            v = obj.attrs[k]
            v = v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v
            h.update(json.dumps([name, k, v], default=str).encode())

    def visit(name: str, obj) -> None:
        attrs(name, obj)
        if isinstance(obj, h5py.Dataset):
            h.update(f"{name}|{obj.dtype}|{obj.shape}".encode())
            for lo in range(0, obj.shape[0], 65536):
                h.update(np.ascontiguousarray(obj[lo:lo + 65536]).tobytes())

    with h5py.File(path, "r") as f:
        attrs("/", f)
        f.visititems(visit)
    return h.hexdigest()


def targets(cache, T: float, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Soft targets at T of a cache's rows, as every reader derives them (pipeline.soft.targets)."""
    from pipeline import soft

    return soft.targets(cache.stored(lo, hi, T), T)


def as_kd_cache_v1(src: Path, dst: Path) -> Path:
    """A kd-cache/1 file with the content of ``src``, a kd-cache/2 cache built with --store-soft (and
    float32 logits for a faithful one): the layout docs/formats.md gives for version 1 -- a label per
    cache row (int64), soft targets at every recorded temperature, no layout attributes -- sealed as
    the version-1 writer sealed it."""
    import shutil

    from pipeline.formats import h5seal

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        assert f.attrs["schema"] == "kd-cache/2" and json.loads(f.attrs["soft_temperatures"]), "needs --store-soft"
        k = json.loads(f.attrs["views"])["count"] if "views" in f.attrs else 1
        y = f["labels"][:].astype(np.int64)
        del f["labels"]
        f.create_dataset("labels", data=np.repeat(y, k), chunks=(min(len(y) * k, 65536),))
        for name in ("layout", "top_k", "logits_dtype", "soft_temperatures"):
            del f.attrs[name]
        if "views" not in f.attrs:
            del f.attrs["source_rows"]
        f.attrs["schema"] = "kd-cache/1"
        h5seal.seal(f)
    return Path(dst)
