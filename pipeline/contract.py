"""Teacher input contracts: the command-line declaration, the layouts a model's input fits, and the
adapter that turns the transfer set's stored rows into what a model takes (numpy only).

A contract (:class:`pipeline.formats.onnx_model.InputContract`, docs/teachers.md) names a value
range, a layout, a dtype and an output.  With ``x`` the stored pixels of a row of shape ``S``
(``[C, H, W]``, ``[H, W]`` for one channel without its axis, or ``[D]`` features), ``scale`` the
transfer set's scale (255 for uint8 images) and ``mean``/``std`` one value or one per channel::

    raw:        x                                   (as stored; the only range a uint8 input takes)
    unit:       x / scale                           ([0, 1] for images)
    normalised: (x / scale - mean) / std            (mean, std: the teacher's own or the transfer set's)

    same: S    nchw: [C, H, W]    nhwc: [H, W, C]    flat: C*H*W in C, H, W order    flat-nhwc: H, W, C order

computed in float32, in place, in that order (so the default contract, the transfer set's own
normalisation, gives the bytes :meth:`pipeline.formats.prepared.Prepared.normalise` gives).  The
adapter runs on a whole batch with a handful of numpy calls (no per-row Python).  Resizing is not
its job: a model whose spatial size differs from the transfer set's is refused (the prepare stage
resizes).

On the command line a teacher is ``PATH[:key=value,...]`` (:func:`parse_teacher`): the declaration
is the text after the last ``:`` that is not inside a quoted value, when that text is empty or made
of ``key=value`` pairs, so a path with colons stays a path, and a trailing ``:`` ends any path
whatever it contains.  A value holding ``:``, ``,``, ``=``, ``"`` or white space (tf2onnx's output
names ``Identity:0``, ``dense/BiasAdd:0``) is written in double quotes, a ``"`` inside doubled:
``model.onnx:output="Identity:0"`` (:func:`pipeline.formats.onnx_model.quote_value` writes it).
A quote opens a value only right after its ``=``, so quotes elsewhere in a path are plain characters.

``tta=hflip`` (test-time augmentation) runs the model on every stored image and on its horizontal
mirror, the W axis flipped before the layout change (:func:`views_of`); the caller takes the mean
of the two logit vectors.  Images only.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, UsageError
from pipeline.formats.onnx_model import CONTRACT_FIELDS, LAYOUTS, InputContract

#: The command line's key for each contract field (``input=unit`` declares the range).
SPEC_KEYS = {"input": "range", "layout": "layout", "mean": "mean", "std": "std", "dtype": "dtype", "output": "output",
             "tta": "tta"}


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """One ``--teacher``: the ONNX file and what the command line declares about it."""

    path: Path
    declared: InputContract = InputContract()


def _value(key: str, text: str) -> Any:
    if key in ("mean", "std"):
        try:
            vals = [float(v) for v in text.split("/")]
        except ValueError:
            raise UsageError(f"{key} must be a number or numbers separated by '/', got {text!r}") from None
        return vals[0] if len(vals) == 1 else vals
    return text


def _scan(text: str, quoting: bool = True) -> tuple[list[int], int | None]:
    """Positions of the ``:`` outside quoted values, and where an unterminated quoted value opens (None)."""
    colons, opened, i = [], None, 0
    while i < len(text):
        ch = text[i]
        if opened is not None:
            if ch == '"' and text[i + 1:i + 2] == '"':  # a doubled quote inside a quoted value
                i += 1
            elif ch == '"':
                opened = None
        elif quoting and ch == '"' and text[i - 1:i] == "=":
            opened = i
        elif ch == ":":
            colons.append(i)
        i += 1
    return colons, opened


def _pairs(tail: str) -> list[str]:
    """``tail`` cut at the commas outside quoted values (quoted as :func:`_scan` reads them)."""
    out, start, quoted, i = [], 0, False, 0
    while i < len(tail):
        ch = tail[i]
        if quoted and ch == '"' and tail[i + 1:i + 2] == '"':  # a doubled quote: still inside
            i += 1
        elif ch == '"' and (quoted or tail[i - 1:i] == "="):
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append(tail[start:i])
            start = i + 1
        i += 1
    return [*out, tail[start:]]


def _unquote(text: str, whole: str) -> str:
    if not text.startswith('"'):
        return text
    if len(text) < 2 or not text.endswith('"') or '"' in text[1:-1].replace('""', ""):
        raise UsageError(f"--teacher {whole}: bad quoted value {text} (a quoted value is \"...\" with a \" "
                         f"inside doubled)")
    return text[1:-1].replace('""', '"')


def parse_teacher(text: str | Path | TeacherSpec) -> TeacherSpec:
    """``PATH`` or ``PATH:input=unit,layout=flat,output=probabilities`` -> TeacherSpec (UsageError).

    A :class:`~pathlib.Path` is taken whole (no declaration); a string is split at its last ``:``
    outside a quoted value when the tail is empty or ``key=value`` pairs (keys: input, layout, mean,
    std, dtype, output, tta); a value may be quoted: ``output="Identity:0"``.
    """
    if isinstance(text, TeacherSpec):
        return text
    if isinstance(text, Path):
        return TeacherSpec(text)
    colons, opened = _scan(text)
    if opened is not None:  # a quote that never closes: an error in a declaration, else part of a path
        if re.search(r"[:,](" + "|".join(SPEC_KEYS) + r")=$", text[:opened]):
            raise UsageError(f"--teacher {text}: the quoted value that starts at {text[opened:opened + 12]!r} "
                             f"has no closing \"")
        colons, _ = _scan(text, quoting=False)
    if not colons:
        return TeacherSpec(Path(text))
    head, tail = text[:colons[-1]], text[colons[-1] + 1:]
    pairs = _pairs(tail) if tail else []
    if not head or (tail and not all("=" in p for p in pairs)):
        return TeacherSpec(Path(text))
    values: dict[str, Any] = {}
    for pair in pairs:
        key, _, val = pair.partition("=")
        if key not in SPEC_KEYS:
            raise UsageError(f"--teacher {text}: unknown key {key!r} (known: {', '.join(SPEC_KEYS)}; "
                             f"end a path that contains ':' with one more ':')")
        if SPEC_KEYS[key] in values:
            raise UsageError(f"--teacher {text}: {key} given twice")
        values[SPEC_KEYS[key]] = _value(key, _unquote(val, text))
    try:
        return TeacherSpec(Path(head), InputContract(**values))
    except ValueError as e:
        raise UsageError(f"--teacher {text}: {e}") from None


def merge(*contracts: InputContract | None) -> tuple[InputContract, tuple | None]:
    """Field by field, the first declared value (``merge(command_line, metadata)``), and the (mean, std)
    declared anywhere.  A range other than normalised drops the statistics from the merged contract
    (``input=unit`` on the command line over metadata that normalises), not from the second value,
    which the sanity gate still tries."""
    out = {}
    for k in CONTRACT_FIELDS:
        out[k] = next((getattr(c, k) for c in contracts if c is not None and getattr(c, k) is not None), None)
    own = (out["mean"], out["std"]) if out["mean"] is not None or out["std"] is not None else None
    if out["range"] not in (None, "normalised"):
        out["mean"] = out["std"] = None
    return InputContract(**out), own


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The transfer set's rows as stored: shape (one row), dtype, scale and normalisation."""

    shape: tuple[int, ...]
    dtype: str
    scale: float
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]

    @classmethod
    def of(cls, info: Any) -> Geometry:
        """From a :class:`pipeline.formats.prepared.Prepared` (scalar or per-channel mean/std)."""
        def as_stat(v: Any) -> float | tuple[float, ...]:
            return tuple(float(a) for a in v) if np.ndim(v) else float(v)

        return cls(tuple(info.shape), str(info.dtype), float(info.scale), as_stat(info.mean), as_stat(info.std))

    @property
    def channels(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def fits(self) -> dict[str, tuple[int, ...]]:
        """Each layout this transfer set can be given in (canonical names only) and its row shape."""
        s, c = self.shape, self.channels
        if len(s) == 1:
            return {"same": s}
        hw = s[-2:]
        out = {"same": s}
        if len(s) == 2:
            out["nchw"] = (1, *hw)
        out["nhwc"] = (*hw, c)
        out["flat"] = (int(np.prod(s)),)
        if c > 1:
            out["flat-nhwc"] = (int(np.prod(s)),)
        return out

    def canonical(self, layout: str) -> str:
        """The name :meth:`fits` uses for the same arrangement (``nchw`` of a [C, H, W] set is ``same``)."""
        if len(self.shape) == 1 and layout in ("flat", "flat-nhwc"):
            return "same"
        if layout == "nchw" and len(self.shape) == 3:
            return "same"
        if layout == "flat-nhwc" and self.channels == 1:
            return "flat"
        return layout

    def stats(self, value: Any, name: str) -> np.ndarray:
        """``value`` as float32, shaped to broadcast over a row of the stored layout (one value, or one
        per channel); DataError when a per-channel list does not match the channel count."""
        v = np.asarray(value, dtype=np.float32)
        if v.ndim == 0:
            return v
        if v.ndim != 1 or len(v) not in (1, self.channels) or len(self.shape) == 1 and len(v) != 1:
            raise DataError(f"{name} has {v.size} values, the transfer set's rows {list(self.shape)} have "
                            f"{self.channels} channel(s)")
        if len(v) == 1:
            return v.reshape(())
        return v.reshape(-1, 1, 1)


def resolved(contract: InputContract) -> bool:
    """Whether every field the adapter needs is set (range, layout, dtype)."""
    return None not in (contract.range, contract.layout, contract.dtype)


def adapt(x: np.ndarray, contract: InputContract, geom: Geometry) -> np.ndarray:
    """A batch of stored rows ``x`` [n, *shape] as ``contract`` says the model takes them (C-contiguous).

    The arithmetic is float32 and in place on one copy, in the order of the module docstring, so the
    transfer set's own normalisation gives exactly :meth:`Prepared.normalise`'s bytes.
    """
    if contract.dtype == "uint8":
        y = np.asarray(x)
        if y.dtype != np.uint8:
            raise DataError(f"a uint8 input takes the stored pixels, but the transfer set holds {y.dtype}")
    else:
        y = x.astype(np.float32)
        if contract.range in ("unit", "normalised"):
            y /= np.float32(geom.scale)
        if contract.range == "normalised":
            y -= geom.stats(geom.mean if contract.mean is None else contract.mean, "mean")
            y /= geom.stats(geom.std if contract.std is None else contract.std, "std")
    n, layout = len(y), geom.canonical(contract.layout)
    if layout in ("nhwc", "flat-nhwc"):
        y = y.reshape(n, geom.channels, *geom.shape[-2:]).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(y.reshape(n, *geom.fits()[layout]))


def without_defaults(contract: InputContract) -> InputContract:
    """``contract`` with ``tta=none`` written as undeclared (the same feeding, one record of it)."""
    return dataclasses.replace(contract, tta=None) if contract.tta == "none" else contract


def views_of(x: np.ndarray, contract: InputContract, geom: Geometry) -> list[np.ndarray]:
    """The model inputs of a batch of stored rows ``x``: ``[adapt(x)]``, and with ``tta=hflip`` also
    the adapted horizontal mirror (the last, W, axis of each stored ``[C, H, W]`` or ``[H, W]`` image
    reversed before the layout change), whose outputs the caller averages as logits."""
    if contract.tta != "hflip":
        return [adapt(x, contract, geom)]
    if len(geom.shape) < 2:
        raise UsageError(f"tta=hflip mirrors images, but the transfer set's rows are {list(geom.shape)} features")
    return [adapt(x, contract, geom), adapt(x[..., ::-1], contract, geom)]


def describe_dims(dims: Sequence[Any]) -> str:
    """``[batch, 28, 28]`` from an onnxruntime shape (symbolic batch shown as ``batch``)."""
    return "[" + ", ".join(str(d) if isinstance(d, int) else "batch" if i == 0 else str(d)
                           for i, d in enumerate(dims)) + "]"


def fitting_layouts(geom: Geometry, dims: Sequence[Any]) -> list[str]:
    """The canonical layouts whose row shape fits a model input ``[batch, *dims[1:]]`` (symbolic
    dimensions fit anything), in the order of :data:`LAYOUTS`."""
    out = []
    for layout, shape in geom.fits().items():
        if len(dims) == len(shape) + 1 and all(not isinstance(d, int) or d == s for d, s in zip(dims[1:], shape)):
            out.append(layout)
    return sorted(out, key=LAYOUTS.index)


def spatial_mismatch(geom: Geometry, dims: Sequence[Any]) -> str:
    """Why no layout fits: the model's and the transfer set's shapes, and who resizes."""
    forms = " or ".join(describe_dims(["batch", *s]) for s in dict.fromkeys(geom.fits().values()))
    return (f"has shape {describe_dims(dims)}, the transfer set gives {describe_dims(['batch', *geom.shape])} "
            f"(as {forms}); resizing is the prepare stage's job")
