"""The cache stage's teachers: one or more ONNX classifiers, each under its input contract, run as one ensemble.

Each file's contract (docs/teachers.md; :class:`pipeline.formats.onnx_model.InputContract`) is
resolved field by field before any row is read, from, in this order of precedence: the command
line (``--teacher PATH:input=unit,...``), the model's ``input_contract`` metadata, and the
defaults: the layout that the model's declared input shape fits (the transfer set's own first),
the dtype of that input, the transfer set's normalisation for a float input (raw for uint8), and
the first float output shaped ``[batch, classes]`` or ``[batch, members, classes]``
(:func:`pipeline.inference.select_output`).  The command line wins over the metadata so that a model whose
metadata is wrong can still be declared right.  A mismatch (an input shape no layout fits, which
includes another spatial size; a declaration that contradicts the graph; a ZipMap or label-only
output) is one line naming the file, what the model has and what the transfer set gives.

An output that is already a probability distribution (non-negative rows summing to 1) is taken as
``log p``: ``softmax(log p / T) = softmax(v / T)`` for ``p = softmax(v)`` (a per-row shift), so every
tempered target is unchanged.  The decision is made once per teacher, on the first batch it sees,
and stored in the cache so that a resumed run makes the same one.

The stored rows are adapted once per batch per distinct contract (:meth:`Teachers.adapt`, called in
the reader thread).  On CUDA the input and output are bound with IOBinding at a fixed batch size:
the last batch is padded with zero rows (their outputs are discarded), so every ``run`` has the same
shapes and onnxruntime reuses the same device buffers instead of allocating per call.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import contract as ct
from pipeline import inference, soft
from pipeline.errors import DataError
from pipeline.formats.onnx_model import InputContract, read_input_contract

_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}


def pad_rows(x: np.ndarray, rows: int, dtype: Any = np.float32) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` (C-contiguous ``dtype``, as IOBinding copies it)."""
    if len(x) > rows:
        raise ValueError(f"batch of {len(x)} rows exceeds the bound size {rows}")
    x = np.ascontiguousarray(x, dtype=dtype)
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), dtype)])


@dataclasses.dataclass
class Plan:
    """One teacher file's resolved contract, where each field came from, and its input's name."""

    path: Path
    contract: InputContract
    sources: dict[str, str]
    input: str
    fits: list[str]  # the layouts the model's input shape fits (for the gate's alternatives)
    own_stats: tuple | None = None  # (mean, std) declared anywhere, even where a declared range drops them

    def declared(self, field: str) -> bool:
        return self.sources.get(field) in ("command line", "metadata")

    def record(self) -> dict:
        """What the cache stores of it: the contract (content) and the sources (provenance)."""
        return {"input": self.contract.as_dict(), "sources": dict(self.sources)}


def resolve(spec: ct.TeacherSpec, sess: Any, geom: ct.Geometry, classes: int) -> Plan:
    """The contract of one teacher: command line, then metadata, then defaults; DataError on mismatch."""
    path = spec.path
    meta = read_input_contract(path)
    decl, own_stats = ct.merge(spec.declared, meta)
    sources = {k: "command line" if getattr(spec.declared, k) is not None else "metadata"
               for k in ("range", "layout", "mean", "std", "dtype", "output") if getattr(decl, k) is not None}
    inputs = sess.get_inputs()
    want = ct.describe_dims(["batch", *geom.shape])
    if len(inputs) != 1:
        raise DataError(f"{path}: the model takes {len(inputs)} inputs "
                        f"({', '.join(i.name for i in inputs)}); a teacher takes one, {want}")
    inp, dims = inputs[0], list(inputs[0].shape)
    if inp.type not in _ONNX_DTYPES:
        raise DataError(f"{path}: input {inp.name!r} has type {inp.type}; a teacher takes tensor(float) "
                        f"(the transfer set's rows as float32) or tensor(uint8) (its raw pixels)")
    dtype = _ONNX_DTYPES[inp.type]
    if decl.dtype is not None and decl.dtype != dtype:
        raise DataError(f"{path}: dtype {decl.dtype} is declared ({sources['dtype']}) but input {inp.name!r} "
                        f"is {inp.type}")
    sources.setdefault("dtype", "input type")
    if dims and isinstance(dims[0], int) and dims[0] != 1:  # a fixed batch (other than 1 = any) cannot take ours
        raise DataError(f"{path}: input {inp.name!r} has a fixed batch of {dims[0]}; re-export with a dynamic batch")
    fits = ct.fitting_layouts(geom, dims)
    if decl.layout is not None:
        layout = geom.canonical(decl.layout)
        if layout not in geom.fits():
            raise DataError(f"{path}: layout {decl.layout} is declared ({sources['layout']}) but the transfer "
                            f"set's rows {want} cannot be laid out so")
        if layout not in fits:
            raise DataError(f"{path}: input {inp.name!r} has shape {ct.describe_dims(dims)}, but layout "
                            f"{decl.layout} (declared, {sources['layout']}) gives "
                            f"{ct.describe_dims(['batch', *geom.fits()[layout]])}")
    elif not fits:
        raise DataError(f"{path}: input {inp.name!r} {ct.spatial_mismatch(geom, dims)}")
    else:
        layout = fits[0]
        sources["layout"] = "default" if layout == "same" else "input shape"
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
    output = inference.select_output(path, sess, decl.output)
    sources.setdefault("output", "first float output")
    odims = next(o.shape for o in sess.get_outputs() if o.name == output)
    if odims and isinstance(odims[-1], int) and odims[-1] != classes:
        raise DataError(f"{path}: output {output!r} has shape {ct.describe_dims(odims)}: {odims[-1]} classes, "
                        f"the transfer set has {classes}")
    contract = InputContract(range=range_, layout=layout, mean=decl.mean, std=decl.std, dtype=dtype, output=output)
    return Plan(path, contract, sources, inp.name, fits or [layout], own_stats)


class _Member:
    """One ONNX session; ``bind`` runs it through IOBinding at a fixed, padded batch size."""

    def __init__(self, plan: Plan, sess, bind: bool, batch: int, geom: ct.Geometry, device_id: int):
        import onnxruntime

        self.path, self.sess, self.plan = plan.path, sess, plan
        self.input, self.output = plan.input, plan.contract.output
        self.dtype = np.dtype(plan.contract.dtype)
        self.batch, self.io = batch, None
        if bind:
            device = "cuda" if inference.provider_name(sess) == inference.PROVIDERS["cuda"] else "cpu"
            shape = geom.fits()[plan.contract.layout]
            self.io = sess.io_binding()
            # One device buffer for the whole run, overwritten in place each batch.
            self.x_dev = onnxruntime.OrtValue.ortvalue_from_shape_and_type([batch, *shape], self.dtype, device,
                                                                          device_id)
            self.io.bind_ortvalue_input(self.input, self.x_dev)
            self.io.bind_output(self.output, device, device_id)
            self.bound_out = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.io is None:
            return np.asarray(self.sess.run([self.output], {self.input: x})[0])
        self.x_dev.update_inplace(pad_rows(x, self.batch, self.dtype))
        self.sess.run_with_iobinding(self.io)
        if not self.bound_out:  # keep the first output buffer: later runs write into the same memory
            self.io.bind_ortvalue_output(self.output, self.io.get_outputs()[0])
            self.bound_out = True
        return self.io.copy_outputs_to_cpu()[0][: len(x)]


def check_finite(out: np.ndarray, path: Path, first_row: int, offset: int) -> None:
    """DataError naming the first row and ensemble member whose output is NaN or Inf."""
    bad = ~np.isfinite(out)
    if bad.any():  # nothing of this batch is written: the run stops before the writer sees it
        row, m = np.argwhere(bad)[0][:2]
        raise DataError(f"{path}: non-finite output (NaN or Inf) at row {first_row + int(row)}, "
                        f"member {offset + int(m)} of the ensemble; nothing of that batch was written")


class Teachers:
    """One or more ONNX teachers run as one ensemble: outputs joined on the member axis.

    ``teachers`` are paths or :class:`pipeline.contract.TeacherSpec`; ``contracts`` (resolved ones,
    as a cache records them) replace resolution, so that verify and resume feed the very same input.
    """

    def __init__(self, teachers: Sequence[Any], geom: ct.Geometry, classes: int, device: str, threads: int,
                 batch: int, io_binding: str = "auto", log: Callable = print, device_id: int = 0,
                 contracts: Sequence[InputContract] | None = None):
        specs = [ct.parse_teacher(t) for t in teachers]
        self.paths = [s.path for s in specs]
        self.geom, self.classes, self.batch = geom, classes, batch
        sessions = [inference.session(p, device, threads, log=log, device_id=device_id) for p in self.paths]
        self.provider = inference.provider_name(sessions[0])
        if contracts is None:
            self.plans = [resolve(s, sess, geom, classes) for s, sess in zip(specs, sessions)]
        else:
            self.plans = [resolve(ct.TeacherSpec(s.path, c), sess, geom, classes)
                          for s, c, sess in zip(specs, contracts, sessions)]
        self.sessions = sessions
        self.bind = io_binding == "on" or (io_binding == "auto" and self.provider == "CUDAExecutionProvider")
        self.io_binding = self.bind
        self._device_id = device_id
        self.members: list[_Member] = []
        self.probabilities: list[bool | None] = [None] * len(self.paths)

    def check(self) -> None:
        """Trial-run each teacher on two rows of zeros under its contract (output, classes, dtype)."""
        self.shapes = [inference.check_io(plan.path, sess, self.geom.fits()[plan.contract.layout], self.classes,
                                    dtype=plan.contract.dtype, output=plan.contract.output)
                       for plan, sess in zip(self.plans, self.sessions)]

    @property
    def member_count(self) -> int:
        """Members of the whole ensemble (after :meth:`check`): one per [batch, classes] output."""
        return sum(s[1] if len(s) == 3 else 1 for s in self.shapes)

    def start(self) -> None:
        """Trial-run each teacher under its (final) contract, then make the members (bound if asked)."""
        self.check()
        self.members = [_Member(p, s, self.bind, self.batch, self.geom, self._device_id)
                        for p, s in zip(self.plans, self.sessions)]

    @property
    def contracts(self) -> list[InputContract]:
        return [p.contract for p in self.plans]

    def adapt(self, x: np.ndarray) -> list[np.ndarray]:
        """Stored rows -> each teacher's input, computed once per distinct contract (reader thread)."""
        done: dict[str, np.ndarray] = {}
        out = []
        for c in self.contracts:
            key = c.to_json()
            if key not in done:
                done[key] = ct.adapt(x, c, self.geom)
            out.append(done[key])
        return out

    def __call__(self, xs: list[np.ndarray], first_row: int) -> np.ndarray:
        """member_logits [rows, members, classes] float32 from each teacher's adapted rows ``xs``;
        DataError on NaN/Inf or mismatches."""
        parts, offset = [], 0  # offset: ensemble index of this file's first member
        for i, (member, x) in enumerate(zip(self.members, xs)):
            out = member(x)
            out = out[:, None, :] if out.ndim == 2 else out
            if out.ndim != 3 or out.shape[0] != len(x) or out.shape[2] != self.classes:
                raise DataError(f"{member.path}: output shape {list(out.shape)}, expected [{len(x)}, {self.classes}] "
                                f"or [{len(x)}, members, {self.classes}]")
            check_finite(out, member.path, first_row, offset)
            if self.probabilities[i] is None:
                self.probabilities[i] = soft.looks_like_probabilities(out)
            parts.append(soft.as_logits(out) if self.probabilities[i] else out.astype(np.float32, copy=False))
            offset += out.shape[1]
        return np.concatenate(parts, axis=1)
