"""How a model is fed: its input contract resolved against its graph, and the model run under it.

The one reading of what a teacher takes, for every stage that runs one (the cache, ``cache verify``,
export's agreement with the teacher, ``distill bench`` and ``distill bench-fidelity``).  A teacher's
contract (:class:`pipeline.formats.onnx_model.InputContract`, docs/teachers.md) is resolved field by
field before any row is read, from, in this order of precedence: the command line (``--teacher
PATH:input=unit,...``, :func:`pipeline.contract.parse_teacher`), the contract a cache recorded for
that file (where the stage reads a cache: ``cache verify``), the model's ``input_contract``
metadata, and the defaults: the layout that the model's declared input shape fits (the transfer
set's own first), the dtype of that input, the transfer set's normalisation for a float input (raw
for uint8), and the first float output shaped ``[batch, classes]`` or ``[batch, members, classes]``
(:func:`pipeline.inference.select_output`).  The command line wins over the metadata so that a
model whose metadata is wrong can still be declared right; a recorded contract is complete, so the
metadata is not read under it.  A mismatch (an input shape no layout fits, which includes another
spatial size; a declaration that contradicts the graph; a ZipMap or label-only output) is one line
naming the file, what the model has and what the transfer set gives (exit 3); ``tta=hflip`` on rows
that are not images is a usage error (exit 2).

:func:`run_model` runs a model under its contract and returns logits.  With ``tta=hflip`` they are
the mean of the two logit vectors, of the image and of its mirror: the mean of logits is one logit
vector, so every tempered target ``softmax(v / T)`` (and every member combination) derives from it
at any temperature, as for any teacher, and the cache's stored logits stay the whole truth of its
soft targets (a mean of the two probability vectors would be a target at T = 1 only).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import contract as ct
from pipeline import inference, soft
from pipeline.errors import DataError, UsageError
from pipeline.formats.onnx_model import InputContract, read_input_contract

ONNX_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}
FIELDS = ("range", "layout", "mean", "std", "dtype", "output", "tta")


@dataclasses.dataclass
class Plan:
    """One model file's resolved contract, where each field came from, and its input's name."""

    path: Path
    contract: InputContract
    sources: dict[str, str]
    input: str
    fits: list[str]  # the layouts the model's input shape fits (for the gate's alternatives)
    own_stats: tuple | None = None  # (mean, std) declared anywhere, even where a declared range drops them

    def declared(self, field: str) -> bool:
        """Whether the user or the model said it (command line, metadata, or a cache that recorded it)."""
        return self.sources.get(field) in ("command line", "metadata", "cache")

    def record(self) -> dict:
        """What an artifact stores of it: the contract (content) and the sources (provenance)."""
        return {"input": self.contract.as_dict(), "sources": dict(self.sources)}


def _declaration(spec: ct.TeacherSpec, recorded: InputContract | None) -> tuple[InputContract, tuple | None,
                                                                                 dict[str, str]]:
    """The declared contract (command line, then the record or else the metadata), the statistics
    declared anywhere, and each declared field's source."""
    second, where = (recorded, "cache") if recorded is not None else (read_input_contract(spec.path), "metadata")
    decl, own_stats = ct.merge(spec.declared, second)
    sources = {k: "command line" if getattr(spec.declared, k) is not None else where
               for k in FIELDS if getattr(decl, k) is not None}
    return decl, own_stats, sources


def _layout(path: Path, decl: InputContract, sources: dict, geom: ct.Geometry, name: str,
            dims: list) -> tuple[str, list[str]]:
    """The layout to feed (declared, else the first the input shape fits) and every layout that fits."""
    want = ct.describe_dims(["batch", *geom.shape])
    fits = ct.fitting_layouts(geom, dims)
    if decl.layout is not None:
        layout = geom.canonical(decl.layout)
        if layout not in geom.fits():
            raise DataError(f"{path}: layout {decl.layout} is declared ({sources['layout']}) but the transfer "
                            f"set's rows {want} cannot be laid out so")
        if layout not in fits:
            raise DataError(f"{path}: input {name!r} has shape {ct.describe_dims(dims)}, but layout "
                            f"{decl.layout} (declared, {sources['layout']}) gives "
                            f"{ct.describe_dims(['batch', *geom.fits()[layout]])}")
        return layout, fits or [layout]
    if not fits:
        raise DataError(f"{path}: input {name!r} {ct.spatial_mismatch(geom, dims)}")
    sources["layout"] = "default" if fits[0] == "same" else "input shape"
    return fits[0], fits


def resolve(spec: ct.TeacherSpec, sess: Any, geom: ct.Geometry, classes: int,
            recorded: InputContract | None = None) -> Plan:
    """The contract of one model: command line, then ``recorded`` (a cache's record) or the model's
    metadata, then defaults; DataError on a mismatch with the graph, UsageError for TTA of non-images."""
    path = spec.path
    decl, own_stats, sources = _declaration(spec, recorded)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise DataError(f"{path}: the model takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                        f"a teacher takes one, {ct.describe_dims(['batch', *geom.shape])}")
    inp, dims = inputs[0], list(inputs[0].shape)
    if inp.type not in ONNX_DTYPES:
        raise DataError(f"{path}: input {inp.name!r} has type {inp.type}; a teacher takes tensor(float) "
                        f"(the transfer set's rows as float32) or tensor(uint8) (its raw pixels)")
    dtype = ONNX_DTYPES[inp.type]
    if decl.dtype is not None and decl.dtype != dtype:
        raise DataError(f"{path}: dtype {decl.dtype} is declared ({sources['dtype']}) but input {inp.name!r} "
                        f"is {inp.type}")
    sources.setdefault("dtype", "input type")
    if dims and isinstance(dims[0], int) and dims[0] != 1:  # a fixed batch (other than 1 = any) cannot take ours
        raise DataError(f"{path}: input {inp.name!r} has a fixed batch of {dims[0]}; re-export with a dynamic batch")
    layout, fits = _layout(path, decl, sources, geom, inp.name, dims)
    if dtype == "uint8":
        if decl.range not in (None, "raw"):
            raise DataError(f"{path}: input {inp.name!r} is uint8, which takes raw pixels, but range "
                            f"{decl.range} is declared ({sources['range']})")
        if geom.dtype != "uint8":
            raise DataError(f"{path}: input {inp.name!r} takes uint8 pixels, the transfer set holds {geom.dtype}")
    range_ = decl.range or ("raw" if dtype == "uint8" else "normalised")
    sources.setdefault("range", "input type" if dtype == "uint8" else "default")
    for name in ("mean", "std"):  # a per-channel list of the wrong length, before any row
        if getattr(decl, name) is not None:
            try:
                geom.stats(getattr(decl, name), name)
            except DataError as e:
                raise DataError(f"{path}: {e} (declared, {sources[name]})") from None
    if decl.tta == "hflip" and len(geom.shape) < 2:
        raise UsageError(f"{path}: tta=hflip is declared ({sources['tta']}) but the transfer set's rows "
                         f"{list(geom.shape)} are features, not images: nothing to mirror")
    output = inference.select_output(path, sess, decl.output)
    sources.setdefault("output", "first float output")
    odims = next(o.shape for o in sess.get_outputs() if o.name == output)
    if odims and isinstance(odims[-1], int) and odims[-1] != classes:
        raise DataError(f"{path}: output {output!r} has shape {ct.describe_dims(odims)}: {odims[-1]} classes, "
                        f"the transfer set has {classes}")
    contract = ct.without_defaults(InputContract(range=range_, layout=layout, mean=decl.mean, std=decl.std,
                                                 dtype=dtype, output=output, tta=decl.tta))
    return Plan(path, contract, sources, inp.name, fits, own_stats)


def open_model(spec: Any, geom: ct.Geometry, classes: int, device: str = "cpu", threads: int = 1, log=None,
               recorded: InputContract | None = None) -> tuple[Any, Plan]:
    """A session of ``spec`` (a path, ``PATH:key=value,...`` or a TeacherSpec) and its resolved plan,
    trial-run on two rows of zeros under it (a missing or unreadable file: DataError, exit 3)."""
    spec = ct.parse_teacher(spec)
    sess = inference.session(spec.path, device, threads, log=log)
    plan = resolve(spec, sess, geom, classes, recorded)
    inference.check_io(plan.path, sess, geom.fits()[plan.contract.layout], classes, dtype=plan.contract.dtype,
                       output=plan.contract.output)
    return sess, plan


def check_finite(out: np.ndarray, path: Path, first_row: int, offset: int, rows: np.ndarray | None = None) -> None:
    """DataError naming the first row and ensemble member whose output is NaN or Inf (``rows``: the
    transfer rows of a batch that is not contiguous)."""
    bad = ~np.isfinite(out)
    if bad.any():  # nothing of this batch is written: the run stops before the writer sees it
        row, m = np.argwhere(bad)[0][:2]
        at = int(rows[row]) if rows is not None else first_row + int(row)
        raise DataError(f"{path}: non-finite output (NaN or Inf) at row {at}, member {offset + int(m)} of the "
                        f"ensemble; nothing of that batch was written")


def as_members(out: Any) -> np.ndarray:
    """A model's output as ``[rows, members, classes]`` (one classifier is one member)."""
    out = np.asarray(out)
    return out[:, None, :] if out.ndim == 2 else out


def mean_logits(outs: list[np.ndarray], probabilities: bool | None = None) -> np.ndarray:
    """float32 logits ``[rows, members, classes]`` from the outputs of each view of the same rows:
    probabilities as ``log p`` (:func:`pipeline.soft.as_logits`; ``probabilities`` None: detected),
    then the mean over the views (one view: itself)."""
    logits = [soft.as_logits(o) if probabilities in (None, True) else o.astype(np.float32, copy=False)
              for o in map(as_members, outs)]
    if len(logits) == 1:
        return logits[0]
    return ((logits[0] + logits[1]) * np.float32(0.5)).astype(np.float32, copy=False)


def run_model(sess: Any, plan: Plan, x: np.ndarray, geom: ct.Geometry, batch: int = 1024,
              contract: InputContract | None = None) -> np.ndarray:
    """float32 logits ``[rows, members, classes]`` of the model on stored rows ``x``, fed under
    ``contract`` (default: the plan's), ``batch`` rows per run, TTA views averaged as logits."""
    c = contract or plan.contract
    parts = []
    for a in range(0, len(x), batch):
        outs = [sess.run([c.output], {plan.input: v})[0] for v in ct.views_of(x[a:a + batch], c, geom)]
        parts.append(mean_logits(outs))
    return np.concatenate(parts)
