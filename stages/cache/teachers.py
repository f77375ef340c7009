"""The cache stage's teachers: one or more ONNX classifiers run as one ensemble.

Before any row runs, each model's declared graph is checked against the transfer set (one input;
float32; rank ``1 + len(shape)``; every fixed dimension equal) and its output against the others
(rank 2 ``[batch, classes]`` or 3 ``[batch, members, classes]``; one class count, equal to the
transfer set's).  A mismatch is one line naming the file, the expected and the actual shape.

An output that is already a probability distribution (non-negative rows summing to 1) is taken as
``log p``: ``softmax(log p / T) = softmax(v / T)`` for ``p = softmax(v)`` (a per-row shift), so every
tempered target is unchanged (docs/design.md, "bring your own teacher").  The decision is made once per teacher, on
the first batch it sees, and stored in the cache so that a resumed run makes the same one.

On CUDA the input and output are bound with IOBinding at a fixed batch size: the last batch is
padded with zero rows (their outputs are discarded), so every ``run`` has the same shapes and
onnxruntime reuses the same device buffers instead of allocating per call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import ort, soft
from pipeline.errors import DataError


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` (C-contiguous float32, as IOBinding copies it)."""
    if len(x) > rows:
        raise ValueError(f"batch of {len(x)} rows exceeds the bound size {rows}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), np.float32)])


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "batch" if i == 0 else str(d)
                           for i, d in enumerate(shape)) + "]"


def check_model(path: Path, sess, shape: tuple[int, ...], classes: int) -> int | None:
    """Check the declared input and output of one model; returns its static class count or None."""
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise DataError(f"{path}: the model takes {len(inputs)} inputs "
                        f"({', '.join(i.name for i in inputs)}); a teacher takes one, [batch, {', '.join(map(str, shape))}]")
    inp = inputs[0]
    want = "[batch, " + ", ".join(map(str, shape)) + "]"
    if inp.type != "tensor(float)":
        raise DataError(f"{path}: input {inp.name!r} has type {inp.type}, the transfer set is tensor(float)")
    dims = list(inp.shape)
    if len(dims) != len(shape) + 1 or any(isinstance(d, int) and d != s for d, s in zip(dims[1:], shape)):
        raise DataError(f"{path}: input {inp.name!r} has shape {_dims(dims)}, the transfer set gives {want}")
    if isinstance(dims[0], int) and dims[0] != 1:  # a fixed batch (other than 1 = any) cannot take our batches
        raise DataError(f"{path}: input {inp.name!r} has a fixed batch of {dims[0]}; re-export with a dynamic batch")
    out = sess.get_outputs()[0]
    odims = list(out.shape)
    if len(odims) not in (2, 3):
        raise DataError(f"{path}: output {out.name!r} has shape {_dims(odims)}, expected [batch, {classes}] "
                        f"or [batch, members, {classes}]")
    last = odims[-1] if isinstance(odims[-1], int) else None
    if last is not None and last != classes:
        raise DataError(f"{path}: output {out.name!r} has shape {_dims(odims)}: {last} classes, "
                        f"the transfer set has {classes}")
    return last


class _Member:
    """One ONNX session; ``bind`` runs it through IOBinding at a fixed, padded batch size."""

    def __init__(self, path: Path, sess, bind: bool, batch: int, shape: tuple[int, ...], device_id: int):
        import onnxruntime

        self.path, self.sess = path, sess
        self.input, self.output = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        self.batch, self.io = batch, None
        if bind:
            device = "cuda" if ort.provider_name(sess) == ort.PROVIDERS["cuda"] else "cpu"
            self.io = sess.io_binding()
            # One device buffer for the whole run, overwritten in place each batch.
            self.x_dev = onnxruntime.OrtValue.ortvalue_from_shape_and_type([batch, *shape], np.float32, device, device_id)
            self.io.bind_ortvalue_input(self.input, self.x_dev)
            self.io.bind_output(self.output, device, device_id)
            self.bound_out = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.io is None:
            return self.sess.run([self.output], {self.input: x})[0]
        self.x_dev.update_inplace(pad_rows(x, self.batch))
        self.sess.run_with_iobinding(self.io)
        if not self.bound_out:  # keep the first output buffer: later runs write into the same memory
            self.io.bind_ortvalue_output(self.output, self.io.get_outputs()[0])
            self.bound_out = True
        return self.io.copy_outputs_to_cpu()[0][: len(x)]


class Teachers:
    """One or more ONNX teachers run as one ensemble: outputs joined on the member axis."""

    def __init__(self, paths: list[Path], shape: tuple[int, ...], classes: int, device: str, threads: int,
                 batch: int, io_binding: str = "auto", log: Callable = print, device_id: int = 0):
        self.paths = [Path(p) for p in paths]
        sessions = [ort.session(p, device, threads, log=log, device_id=device_id) for p in self.paths]
        self.provider = ort.provider_name(sessions[0])
        for path, sess in zip(self.paths, sessions):
            check_model(path, sess, shape, classes)
        bind = io_binding == "on" or (io_binding == "auto" and self.provider == "CUDAExecutionProvider")
        self.members = [_Member(p, s, bind, batch, shape, device_id) for p, s in zip(self.paths, sessions)]
        self.io_binding = bind
        self.classes, self.shape = classes, tuple(shape)
        self.probabilities: list[bool | None] = [None] * len(self.paths)

    def member_count(self) -> int:
        """Members of the ensemble's output (what the cache will store), read from each model's
        declared output, or from one row of zeros where that axis is symbolic."""
        total = 0
        for m in self.members:
            dims = m.sess.get_outputs()[0].shape
            if len(dims) == 3 and not isinstance(dims[1], int):
                dims = np.asarray(m.sess.run([m.output], {m.input: np.zeros((1, *self.shape), np.float32)})[0]).shape
            total += 1 if len(dims) == 2 else int(dims[1])
        return total

    def __call__(self, x: np.ndarray, first_row: int) -> np.ndarray:
        """member_logits [rows, members, classes] float32; DataError on NaN/Inf or mismatches."""
        parts, offset = [], 0  # offset: ensemble index of this file's first member
        for i, member in enumerate(self.members):
            out = member(x)
            out = out[:, None, :] if out.ndim == 2 else out
            if out.ndim != 3 or out.shape[0] != len(x) or out.shape[2] != self.classes:
                raise DataError(f"{member.path}: output shape {list(out.shape)}, expected [{len(x)}, {self.classes}] "
                                f"or [{len(x)}, members, {self.classes}]")
            bad = ~np.isfinite(out)
            if bad.any():  # nothing of this batch is written: the run stops before the writer sees it
                row, m = np.argwhere(bad)[0][:2]
                raise DataError(f"{member.path}: non-finite output (NaN or Inf) at row {first_row + int(row)}, "
                                f"member {offset + int(m)} of the ensemble; nothing of that batch was written")
            if self.probabilities[i] is None:
                self.probabilities[i] = soft.looks_like_probabilities(out)
            parts.append(soft.as_logits(out) if self.probabilities[i] else out.astype(np.float32, copy=False))
            offset += out.shape[1]
        return np.concatenate(parts, axis=1)
