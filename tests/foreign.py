"""Teachers "from another exporter", built with onnx.helper and fitted in numpy, for the contract tests.

Each is a small random-features classifier: ``h = relu(x W1 + b1)``, ``logits = h W2 + b2``, with
``W1`` random, ``b1`` the negated median of ``x W1`` over the fitting rows (so the ReLU thresholds sit
in the middle of the inputs it was fitted on: fed another value range or layout it computes other
features, which is what the sanity gate must notice) and ``W2, b2`` ridge least squares on one-hot
labels.  The fitting rows are prepared here by hand, in plain numpy, never by the code under test,
so an adapter bug cannot fit the teacher to itself.

The graph mimics what the exporters write: skl2onnx (flat input; ``label`` int64 first, then
``probabilities`` as a tensor, or as a ZipMap), tf2onnx (channel-last), a uint8-input model, a
torchvision-style per-channel normalised one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.formats.prepared import Normalisation, PreparedWriter


# ------------------------------------------------------------------------------------- inputs by hand
def by_hand(x: np.ndarray, range_: str, layout: str, scale: float = 255.0, mean=None, std=None) -> np.ndarray:
    """Stored rows ``x`` [n, C, H, W] or [n, H, W] as a model takes them, in float64 then float32:
    written out case by case, independently of :func:`pipeline.contract.adapt`."""
    v = x.astype(np.float64)
    if range_ in ("unit", "normalised"):
        v = v / scale
    if range_ == "normalised":
        m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        if m.ndim == 1 and len(m) > 1:  # per channel, on axis 1 of [n, C, H, W]
            m, s = m[None, :, None, None], s[None, :, None, None]
        v = (v - m) / s
    if v.ndim == 3:  # [n, H, W]: one channel without its axis
        v = v[:, None]
    n = len(v)
    if layout == "flat":
        v = v.reshape(n, -1)
    elif layout == "nhwc":
        v = np.stack([v[:, c] for c in range(v.shape[1])], axis=-1)  # channel last, built channel by channel
    elif layout == "flat-nhwc":
        v = np.stack([v[:, c] for c in range(v.shape[1])], axis=-1).reshape(n, -1)
    elif layout == "same" and x.ndim == 3:
        v = v[:, 0]
    return v.astype(np.float32)


def fit(x_model: np.ndarray, y: np.ndarray, classes: int = 10, hidden: int = 256, seed: int = 0,
        thresholds: bool = True) -> dict:
    """Random ReLU features on ``x_model`` (flattened as the graph's Flatten does) + ridge head.
    ``thresholds`` False: no first-layer bias, so the features scale with the input (``relu(c x W1) =
    c relu(x W1)`` for ``c > 0``), like a ReLU MLP whose biases are small next to ``x W1``: fed 255
    times its inputs it keeps most of its argmax while its logits grow 255-fold (targets one-hot)."""
    f = x_model.reshape(len(x_model), -1).astype(np.float64)
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1, (f.shape[1], hidden)) / np.sqrt(f.shape[1])
    z = f @ w1
    b1 = -np.median(z, axis=0) if thresholds else np.zeros(hidden)
    h = np.c_[np.maximum(z + b1, 0), np.ones(len(z))]
    t = np.eye(classes)[y]
    w2 = np.linalg.solve(h.T @ h + 1e-3 * np.eye(h.shape[1]) * len(h), h.T @ t)
    return {"w1": w1.astype(np.float32), "b1": b1.astype(np.float32), "w2": w2[:-1].astype(np.float32) * 8,
            "b2": w2[-1].astype(np.float32) * 8}  # x8: confident logits, as a trained classifier gives


# ------------------------------------------------------------------------------------- graphs
def teacher(path: Path, params: dict, in_shape: tuple, *, dtype: int = TensorProto.FLOAT, outputs: str = "logits",
            contract: dict | None = None, classes: int = 10) -> Path:
    """Write the classifier as ONNX.  ``outputs``: ``logits`` (one float output), ``skl`` (``label``
    int64 [N] then ``probabilities`` float [N, C], skl2onnx with zipmap=False), ``zipmap`` (``label``
    then ``output_probability`` as a ZipMap, skl2onnx's default), ``label`` (the label alone), ``tf``
    (tf2onnx's names: ``Identity:0``, the logits doubled, then ``dense/BiasAdd:0``, the logits).
    ``contract``: written as the ``input_contract`` metadata."""
    inits = [numpy_helper.from_array(params[k], k) for k in ("w1", "b1", "w2", "b2")]
    nodes = []
    src = "x"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        src = "xf"
    nodes += [helper.make_node("Flatten", [src], ["f"], axis=1), helper.make_node("MatMul", ["f", "w1"], ["z"]),
              helper.make_node("Add", ["z", "b1"], ["zb"]), helper.make_node("Relu", ["zb"], ["h"]),
              helper.make_node("MatMul", ["h", "w2"], ["o"]), helper.make_node("Add", ["o", "b2"], ["logits"])]
    float_out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", classes])  # noqa: E731
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    opsets = [helper.make_opsetid("", 17)]
    if outputs == "logits":
        outs = [float_out("logits")]
    elif outputs == "tf":  # the first output is not the one to read: only a declaration reaches the second
        nodes += [helper.make_node("Add", ["logits", "logits"], ["Identity:0"]),
                  helper.make_node("Identity", ["logits"], ["dense/BiasAdd:0"])]
        outs = [float_out("Identity:0"), float_out("dense/BiasAdd:0")]
    else:
        nodes += [helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
                  helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)]
        if outputs == "skl":
            outs = [label, float_out("probabilities")]
        elif outputs == "label":
            outs = [label]
        else:
            nodes.append(helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                                          classlabels_int64s=list(range(classes))))
            seq = helper.make_sequence_type_proto(helper.make_map_type_proto(
                TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
            outs = [label, helper.make_value_info("output_probability", seq)]
            opsets.append(helper.make_opsetid("ai.onnx.ml", 1))
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("x", dtype, ["N", *in_shape])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=opsets, producer_name="another-exporter")
    model.ir_version = 9
    if contract is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "input_contract", json.dumps(contract)
    onnx.save(model, str(path))
    return Path(path)


# ------------------------------------------------------------------------------------- transfer sets
def grey_images(n: int, seed: int = 0, classes: int = 10, size: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, size, size]: one shared background, each class a sparse +-60 change of 10% of its
    pixels, noise of sd 50: hard enough (~85% for the teachers here) that feeding a teacher another
    range costs it tens of points, as with real data (87.6% -> 65.9%, docs/teachers.md)."""
    rng, g = np.random.default_rng(seed), np.random.default_rng(1234)
    base = g.uniform(40, 200, (size, size))
    delta = (g.random((classes, size, size)) < 0.1) * g.choice([-60, 60], (classes, size, size))
    y = rng.integers(0, classes, n)
    x = base + delta[y] + rng.normal(0, 50, (n, size, size))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_prepared(path: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]], per_channel: bool = False) -> Path:
    """A prepared file of ``parts`` (split -> (x, y)), normalised by its train split's mean and std
    (``per_channel``: one of each per channel of [n, C, H, W] rows, as prepare writes for colour images)."""
    x = parts["train"][0] / 255.0
    if per_channel:
        axes = (0, 2, 3)
        norm = Normalisation(255.0, tuple(map(float, x.mean(axis=axes))), tuple(map(float, x.std(axis=axes))))
    else:
        norm = Normalisation(255.0, float(x.mean()), float(x.std()))
    with PreparedWriter(path, [f"c{i}" for i in range(10)], norm, {"stage": "test"}) as w:
        for split, (xs, ys) in parts.items():
            w.put(split, xs, ys)
    return Path(path)


def grey_prepared(path: Path) -> Path:
    """A prepared set of one-channel 14x14 images without a channel axis (train 1200, val/test 200)."""
    return write_prepared(path, {s: grey_images(n, seed=i) for i, (s, n) in
                                 enumerate((("train", 1200), ("val", 200), ("test", 200)))})



def semi_supervised_prepared(path: Path, unlabelled: int = 2048, train: int = 3000) -> Path:
    """The grey 14x14 images with ``train`` training rows whose first ``unlabelled`` labels are -1 (a
    semi-supervised transfer set: labelled rows only after them), val/test 200 labelled rows."""
    x, y = grey_images(train, seed=0)
    y = y.copy()
    y[:unlabelled] = -1
    return write_prepared(path, {"train": (x, y), "val": grey_images(200, seed=1), "test": grey_images(200, seed=2)})


def mirror_teacher(path: Path, in_shape: tuple, classes: int = 10, seed: int = 7) -> tuple[Path, np.ndarray]:
    """An asymmetric linear teacher (``logits = flatten(x) W``, ``W`` random, no symmetry between the
    left and right halves of an image), float input of ``in_shape``; returns the file and ``W``."""
    w = np.random.default_rng(seed).normal(0, 0.05, (int(np.prod(in_shape)), classes)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["logits"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])
    graph = helper.make_graph(nodes, "mirror", [x], [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                   ["N", classes])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="another-exporter")
    model.ir_version = 9
    onnx.save(model, str(path))
    return Path(path), w


def colour_images(n: int, seed: int = 0, classes: int = 10, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 3, size, size]: as :func:`grey_images`, one background per channel (each its own
    brightness), each class a sparse +-60 change of 15% of the pixels of every channel, noise sd 50."""
    rng, g = np.random.default_rng(seed), np.random.default_rng(4321)
    base = g.uniform(40, 200, (3, size, size)) * np.array([1.0, 0.7, 0.4])[:, None, None]
    delta = (g.random((classes, 3, size, size)) < 0.15) * g.choice([-60, 60], (classes, 3, size, size))
    y = rng.integers(0, classes, n)
    x = base + delta[y] + rng.normal(0, 50, (n, 3, size, size))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def colour_prepared(path: Path, per_channel: bool = False) -> Path:
    """A prepared set of 3-channel 8x8 images [3, 8, 8] (train 1200, val/test 200; scalar normalisation,
    or per channel)."""
    return write_prepared(path, {s: colour_images(n, seed=i) for i, (s, n) in
                                 enumerate((("train", 1200), ("val", 200), ("test", 200)))}, per_channel)
