"""The cache stage's teachers: one or more ONNX classifiers, each under its input contract, run as one ensemble.

Each file's contract (docs/teachers.md) is resolved by :func:`pipeline.feed.resolve`, the one
reading every stage shares: the command line, then the contract a cache recorded (``contracts``:
``verify``) or the model's metadata, then defaults; checked against the graph before any
row is read.

An output that is already a probability distribution (non-negative rows summing to 1) is taken as
``log p``: ``softmax(log p / T) = softmax(v / T)`` for ``p = softmax(v)`` (a per-row shift), so every
tempered target is unchanged.  The decision is made once per teacher, on the first batch it sees,
and stored in the cache so that a resumed run makes the same one.  With ``tta=hflip`` each batch runs
twice, on the rows and on their mirror, and the member's logits are the mean of the two
(:func:`pipeline.feed.mean_logits`, which says why logits).

The stored rows are adapted once per batch per distinct contract (:meth:`Teachers.adapt`, called in
the reader thread).  On CUDA the input and output are bound with IOBinding at a fixed batch size:
the last batch is padded with zero rows (their outputs are discarded), so every ``run`` has the same
shapes and onnxruntime reuses the same device buffers instead of allocating per call.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline import contract as ct
from pipeline import inference, soft
from pipeline.errors import DataError
from pipeline.feed import Plan, as_members, check_finite, mean_logits, resolve
from pipeline.formats.onnx_model import InputContract


def pad_rows(x: np.ndarray, rows: int, dtype: Any = np.float32) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` (C-contiguous ``dtype``, as IOBinding copies it)."""
    if len(x) > rows:
        raise ValueError(f"batch of {len(x)} rows exceeds the bound size {rows}")
    x = np.ascontiguousarray(x, dtype=dtype)
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), dtype)])


class _Member:
    """One ONNX session; ``bind`` runs it through IOBinding at a fixed, padded batch size."""

    def __init__(self, plan: Plan, sess: Any, bind: bool, batch: int, geom: ct.Geometry, device_id: int):
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
        recorded = list(contracts) if contracts is not None else [None] * len(specs)
        self.plans = [resolve(s, sess, geom, classes, c) for s, c, sess in zip(specs, recorded, sessions)]
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

    def adapt(self, x: np.ndarray) -> list[list[np.ndarray]]:
        """Stored rows -> each teacher's inputs (one per view: two with ``tta=hflip``), computed once per
        distinct contract (reader thread)."""
        done: dict[str, list[np.ndarray]] = {}
        out = []
        for c in self.contracts:
            key = c.to_json()
            if key not in done:
                done[key] = ct.views_of(x, c, self.geom)
            out.append(done[key])
        return out

    def __call__(self, xs: list[list[np.ndarray]], first_row: int) -> np.ndarray:
        """member_logits [rows, members, classes] float32 from each teacher's adapted views ``xs``
        (the mean of the views' logits); DataError on NaN/Inf or mismatches."""
        parts, offset = [], 0  # offset: ensemble index of this file's first member
        for i, (member, views) in enumerate(zip(self.members, xs)):
            outs = []
            for x in views:
                out = as_members(member(x))
                if out.ndim != 3 or out.shape[0] != len(x) or out.shape[2] != self.classes:
                    raise DataError(f"{member.path}: output shape {list(out.shape)}, expected [{len(x)}, "
                                    f"{self.classes}] or [{len(x)}, members, {self.classes}]")
                check_finite(out, member.path, first_row, offset)
                outs.append(out)
            if self.probabilities[i] is None:
                self.probabilities[i] = soft.looks_like_probabilities(outs[0])
            parts.append(mean_logits(outs, self.probabilities[i]))
            offset += outs[0].shape[1]
        return np.concatenate(parts, axis=1)
