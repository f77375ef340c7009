"""ONNX graph rewrites of a static QDQ int8 export (onnx only; no torch, no onnxruntime).

onnxruntime fuses ``DequantizeLinear -> op -> QuantizeLinear`` into one integer kernel (QGemm,
QLinearConv, QLinearAveragePool); what it cannot fuse runs as a float kernel between a stray
Dequantize / Quantize pair.  These rewrites remove the pairs that serve no consumer, each exact,
and leave no initializer behind that no node reads (onnxruntime warns about every one at load).

- :func:`float_logits`: the logits are not rounded to 8 bits and back.
- :func:`pixels_in`: raw uint8 pixels go straight into the first integer kernel.
"""
from __future__ import annotations

import numpy as np
import onnx

PIXEL_PATH_OPS = ("Cast", "Reshape", "Flatten")  # ops that change neither a pixel's value nor its order
FIRST_LAYERS = ("Gemm", "MatMul", "Conv")


def _users(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if tensor in n.input]


def constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a Constant node's output, else None."""
    for t in graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute and n.attribute[0].name == "value":
            return onnx.numpy_helper.to_array(n.attribute[0].t)
    return None


def pixel_path(graph: onnx.GraphProto, ends: tuple[str, ...] = FIRST_LAYERS) -> tuple[list[onnx.NodeProto], np.ndarray]:
    """The chain from a uint8 graph input to a node of type ``ends``: single-consumer Cast / Reshape /
    Flatten nodes, optionally ending with the ``Sub`` of a constant (a CNN's mean shift in pixel
    units, ``stages.export.graph``), and the constant subtracted (0 without a Sub).  ``([], 0)`` for
    any other graph: only a first layer may take the pixels as they are, anything else would need
    them normalised."""
    inp = graph.input[0]
    none = ([], np.zeros((), np.float32))
    if inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        return none
    path, tensor, shift = [], inp.name, np.zeros((), np.float32)
    while len(users := _users(graph, tensor)) == 1 and users[0].op_type in PIXEL_PATH_OPS:
        path.append(users[0])
        tensor = users[0].output[0]
    if len(users) == 1 and users[0].op_type == "Sub" and users[0].input[0] == tensor:
        value = constant(graph, users[0].input[1])
        if value is None:
            return none
        path.append(users[0])
        shift, tensor = value, users[0].output[0]
        users = _users(graph, tensor)
    return (path, shift) if len(users) == 1 and users[0].op_type in ends else none


def pixel_zero_point(shift: np.ndarray) -> int | None:
    """The uint8 zero point ``z`` with which quantising ``p - shift`` at scale 1 gives back every
    pixel ``p`` in 0..255 unchanged (``clip(rint(p - s) + z, 0, 255) == p`` for every value ``s`` of
    the shift, rint rounding half to even as QuantizeLinear does), or None: a per-channel shift whose
    channels round to different pixel values (QLinearConv takes one input zero point), or a shift of
    exactly half a pixel."""
    p = np.arange(256, dtype=np.float32)
    zeros = set()
    for s in np.unique(np.asarray(shift, np.float32)):
        z = int(np.rint(s))
        if not (0 <= z <= 255 and np.array_equal(np.clip(np.rint(p - s) + z, 0, 255), p)):
            return None
        zeros.add(z)
    return zeros.pop() if len(zeros) == 1 else None


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        n.input[:] = [new if t == old else t for t in n.input]


def prune_initializers(graph: onnx.GraphProto) -> list[str]:
    """Remove the initializers no node reads and no graph output names; returns their names."""
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    unused = [t.name for t in graph.initializer if t.name not in used]
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return unused


def pixels_in(model: onnx.ModelProto) -> onnx.ModelProto:
    """Feed raw uint8 pixels straight to the first quantised layer.

    A raw-input export computes ``layer(Cast(p) - s)`` (``s = 0`` for an MLP, whose normalisation
    is folded into its first Linear; ``s = mean * scale`` for a CNN, ``stages.export.graph``).
    Quantised at scale 1 with the uint8 zero point ``z = rint(s)`` (:func:`pixel_zero_point`, set
    by :func:`stages.export.quantize.static_int8`), ``Q(Cast(p) - s) = p`` for every pixel, so the
    Cast, the Sub and the QuantizeLinear are removed and the DequantizeLinear reads the pixels
    themselves: onnxruntime then fuses the first layer into a QGemm / QLinearConv on the input as
    given.  (The dequantized pixel is ``p - z``: the shift rounded to a whole pixel value, the
    quantisation's own rounding, checked by the quality gate like the rest of the int8 model.)
    A model not of that form is returned unchanged.
    """
    g = model.graph
    path, shift = pixel_path(g, ends=("QuantizeLinear",))
    if not path:
        return model
    q = _users(g, path[-1].output[0])[0]
    scale, zero = constant(g, q.input[1]), constant(g, q.input[2]) if len(q.input) > 2 else None
    if scale is None or zero is None or zero.dtype != np.uint8 or scale.size != 1 or float(scale) != 1.0 \
            or zero.size != 1 or pixel_zero_point(shift) != int(zero):
        return model
    for n in [*(n for n in path if n.op_type in ("Cast", "Sub")), q]:
        _rewire(g, n.output[0], n.input[0])
        g.node.remove(n)
    stale = {o for n in path for o in n.output}  # their recorded float type no longer holds
    kept = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(kept)
    prune_initializers(g)  # the shift, once the Sub is gone
    return model


def float_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop a QuantizeLinear -> DequantizeLinear pair between a final Gemm / MatMul and a graph output.

    Rounding the logits to 8 bits and back serves no consumer: without the pair onnxruntime fuses the
    last layer into a QGemm with float32 output, one kernel (and one rounding) fewer per run.  The
    pair's scale and zero point, read by no other node, go with it.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    uses = lambda t: sum(t in n.input for n in g.node)  # noqa: E731
    for out in g.output:
        dq = producer.get(out.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or uses(q.output[0]) != 1:
            continue
        last = producer.get(q.input[0])
        if last is None or last.op_type not in ("Gemm", "MatMul") or uses(q.input[0]) != 1:
            continue
        last.output[list(last.output).index(q.input[0])] = out.name
        g.node.remove(q)
        g.node.remove(dq)
    prune_initializers(g)
    return model
