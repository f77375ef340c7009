"""Architecture spec strings, parsed without torch (settings validate them before anything loads).

Grammar: ``<kind>:<blocks>[:dropout=<p>]``, blocks joined by ``-``; the networks themselves are
built by :func:`pipeline.models.build`, with the input shape and class count taken from the data.

=========================  ==================================================================
``mlp:W1-W2-...``          Flatten -> [Linear(W) -> ReLU] per width -> Linear(classes)
``cnn:C1-C2-FC``           the teacher's CNN: [Conv3x3(C) -> ReLU -> MaxPool2] x 2 -> Linear(FC)
                           -> ReLU -> Linear(classes)
``conv:B1-B2-...``         plain blocks: Conv3x3(C, stride) -> BN -> ReLU per block, then global
                           average pool -> Linear(classes)
``dws:B1-B2-...``          B1 is a plain Conv3x3 stem as above; every later block is
                           depthwise-separable (MobileNet v1, Howard et al. 2017): depthwise
                           Conv3x3(stride) -> BN -> ReLU -> pointwise Conv1x1(C) -> BN -> ReLU;
                           then global average pool -> Linear(classes)
``res:CxN-CxN-...``        a residual network (He et al. 2016, the CIFAR family): a Conv3x3(C1)
                           -> BN -> ReLU stem, then one stage per ``CxN``: N basic blocks of width
                           C, the first block of every stage after the first with stride 2; then
                           global average pool -> Linear(classes).  ``res:16x3-32x3-64x3`` is
                           ResNet-20 (0.27M weights), the teachers' strong recipe
=========================  ==================================================================

A basic block is ``x -> Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN, + shortcut(x) -> ReLU``, the
shortcut the identity, or a Conv1x1(stride) -> BN projection where the width or size changes
(He et al.'s option B).

A block ``B`` of ``conv`` and ``dws`` is ``C`` (output channels, stride 1) or ``C/2`` (stride 2:
height and width halve, rounding up), so ``dws:16-32/2-64/2-128/2`` takes 28x28 images down to
14, 7 and 4 pixels.  Downsampling is by strided convolutions, not max pooling: a 3x3 stride-2 conv
costs a quarter of the multiply-accumulates of a stride-1 conv followed by a pool, and leaves
onnxruntime's int8 graph with nothing but QLinearConv kernels.  Batch norm trains the blocks and
is folded into the convolution before export (``stages.export``), so it costs nothing at inference.
``:dropout=p`` applies before the final Linear (and after each hidden Linear of an MLP).
"""
from __future__ import annotations

import dataclasses

from pipeline.errors import UsageError

KINDS = ("mlp", "cnn", "conv", "dws", "res")
EXAMPLES = ("mlp:800-800, cnn:32-64-128, conv:16-32/2-64/2, dws:16-32/2-64/2-128/2 or "
            "res:16x3-32x3-64x3")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed spec: ``widths[i]`` units or channels of block i, ``strides[i]`` its stride (1 or 2);
    for ``res``, ``depths[i]`` the basic blocks of stage i (empty for the other kinds)."""

    kind: str
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    dropout: float
    depths: tuple[int, ...] = ()

    @property
    def convolutional(self) -> bool:
        return self.kind != "mlp"


def parse_spec(spec: str) -> Spec:
    """``"dws:16-32/2:dropout=0.1"`` -> Spec("dws", (16, 32), (1, 2), 0.1); UsageError when malformed."""
    parts = spec.strip().split(":")
    try:
        kind = parts[0]
        blocks = parts[1].split("-") if len(parts) > 1 and parts[1] else []
        widths, strides, depths = [], [], []
        for b in blocks:
            if kind == "res":
                width, times, depth = b.partition("x")
                widths.append(int(width))
                depths.append(int(depth) if times else -1)
                strides.append(2 if len(widths) > 1 else 1)
                continue
            width, slash, stride = b.partition("/")
            widths.append(int(width))
            strides.append(int(stride) if slash else 1)
        dropout = 0.0
        for extra in parts[2:]:
            key, value = extra.split("=")
            if key != "dropout":
                raise ValueError(key)
            dropout = float(value)
    except (ValueError, IndexError):
        raise UsageError(f"bad architecture spec {spec!r}; expected e.g. {EXAMPLES}") from None
    if kind not in KINDS or any(w < 1 for w in widths) or not 0 <= dropout < 1:
        raise UsageError(f"bad architecture spec {spec!r}; kinds are {', '.join(KINDS)}, widths >= 1, "
                         f"0 <= dropout < 1")
    if any(s not in (1, 2) for s in strides) or (kind in ("mlp", "cnn") and any(s != 1 for s in strides)):
        raise UsageError(f"bad architecture spec {spec!r}; only conv and dws blocks take a stride, and it is /2")
    if kind == "cnn" and len(widths) != 3:
        raise UsageError(f"bad architecture spec {spec!r}; cnn takes three widths: conv-conv-fc")
    if kind == "res" and (not widths or any(d < 1 for d in depths)):
        raise UsageError(f"bad architecture spec {spec!r}; res takes stages CxN (width x blocks, N >= 1), "
                         f"e.g. res:16x3-32x3-64x3")
    if kind in ("conv", "dws") and len(widths) < (2 if kind == "dws" else 1):
        raise UsageError(f"bad architecture spec {spec!r}; conv takes at least one block, dws a stem and "
                         f"at least one depthwise-separable block")
    return Spec(kind, tuple(widths), tuple(strides), dropout, tuple(depths))
