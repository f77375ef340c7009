"""Runtimes: onnxruntime sessions on an explicit provider, ONNX file checks, torch threads.

onnxruntime-gpu lists CUDA in ``get_available_providers()`` even where its libraries are missing,
and asking for CUDA then logs an error and runs on the CPU.  So the provider is always read back
from ``session.get_providers()`` and compared with what was asked: never a silent CPU run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import DataError, RuntimeUnavailable, UsageError

MAX_IR_VERSION = 13  # onnxruntime 1.31 refuses IR above 13 ("Unsupported model IR version")
DEVICES = ("auto", "cpu", "cuda")
_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def set_torch_threads(n: int) -> None:
    """Set torch's intra-op threads (on 2 shared cores one thread trains a small MLP far faster)."""
    import torch

    torch.set_num_threads(max(1, int(n)))


def die_with_parent() -> None:
    """In a worker process: SIGKILL it when its parent dies (even by SIGKILL), so a killed bench or
    sweep leaves no orphan training or timing on (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def progress(iterable: Iterable | None = None, **kw: Any):
    """A tqdm progress bar on stderr, quiet when stderr is not a terminal unless forced."""
    from tqdm.auto import tqdm

    disable = kw.pop("disable", None)
    if disable is None:
        disable = not sys.stderr.isatty() and not os.environ.get("DISTILL_PROGRESS")
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kw)


def check_onnx_file(path: Path) -> Any:
    """Load an ONNX model's graph (no weights) and refuse it before any long work starts.

    Refuses: a file that is not an ONNX protobuf, an IR version onnxruntime cannot read, and
    external-data references that leave the model's folder (``../``, absolute paths, symlinks or
    hard links), which would let a model read arbitrary files.
    """
    import onnx
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


def _tensors(model: Any) -> Iterable[Any]:
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


def _check_external_data(path: Path, model: Any) -> None:
    import onnx

    folder = path.resolve().parent
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (path.parent / loc)
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


def check_io(path: Path, sess: Any, shape: tuple[int, ...], classes: int, members: bool | None = None,
             dtype: str = "float32") -> None:
    """Refuse a model that cannot take the data's rows or gives the wrong classes, before long work.

    The single input must be ``dtype`` (float32: normalised rows; uint8: raw pixels) of
    ``[batch, *shape]`` (symbolic dimensions allowed); then one run on two rows of zeros must give
    floating ``[2, classes]`` (or ``[2, members, classes]``; ``members`` True/False requires/forbids
    the member axis, None allows both).
    """
    import numpy as np

    onnx_type = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}[dtype]
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise DataError(f"{path}: the model takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                        f"expected one image tensor")
    inp = inputs[0]
    dims = list(inp.shape)
    want = "[batch, " + ", ".join(map(str, shape)) + "]"
    if inp.type != onnx_type:
        raise DataError(f"{path}: input {inp.name!r} has type {inp.type}, the data is {onnx_type} {want}")
    if len(dims) != len(shape) + 1 or any(isinstance(d, int) and d != s for d, s in zip(dims[1:], shape)):
        raise DataError(f"{path}: input {inp.name!r} has shape {dims}, the data gives {want}")
    if isinstance(dims[0], int) and dims[0] != 2:
        raise DataError(f"{path}: input {inp.name!r} has a fixed batch size {dims[0]}; export it with a "
                        f"dynamic batch dimension")
    try:
        out = sess.run(None, {inp.name: np.zeros((2, *shape), dtype)})[0]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: the model fails on rows of shape {want}: {msg}") from None
    out = np.asarray(out)
    ranks = {True: (3,), False: (2,), None: (2, 3)}[members]
    if out.ndim not in ranks or out.shape[0] != 2:
        raise DataError(f"{path}: output of shape {list(out.shape)} for 2 rows; expected [batch, classes]"
                        + (" or [batch, members, classes]" if 3 in ranks else ""))
    if out.shape[-1] != classes:
        raise DataError(f"{path}: the model gives {out.shape[-1]} classes, the data has {classes}")
    if out.dtype.kind != "f":
        raise DataError(f"{path}: the model gives {out.dtype} output, expected floating point")
    # Non-finite outputs are judged on the real rows, where the stage can name the row and member.


def cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded (without one, trying CUDA only prints loader errors)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def _preload_cuda() -> None:
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:  # loads the CUDA/cuDNN libraries the onnxruntime-gpu wheel expects (from pip's nvidia-*)
            preload()
        except Exception:  # noqa: BLE001 - absence is reported by the provider check below
            pass


def session(path: Path, device: str = "cpu", threads: int = 1, log=None, device_id: int = 0) -> Any:
    """An InferenceSession on ``device`` (auto|cpu|cuda) with ``threads`` intra-op threads.

    ``device_id`` picks the GPU (a torchrun rank passes its LOCAL_RANK).

    ``cuda`` that cannot run is a RuntimeUnavailable error; ``auto`` tries CUDA when onnxruntime
    lists it and falls back to CPU, saying so through ``log``.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise UsageError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    check_onnx_file(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # CUDA load failures are reported by our own check, not as log noise
    ort.set_default_logger_severity(3)
    want_cuda = device == "cuda" or (device == "auto" and cuda_driver_present())
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        _preload_cuda()
        # use_tf32=0: TF32 convolutions/matmuls (10-bit mantissa) moved teacher logits by up to 2.2e-4
        # from the CPU's on an H200 (measured), above `cache verify`'s 1e-4; a cache holds fp32 outputs.
        cuda = ("CUDAExecutionProvider", {"device_id": int(device_id), "use_tf32": "0"})
        sess = _try_session(ort, path, opts, [cuda, "CPUExecutionProvider"])
        if sess is not None and sess.get_providers()[0] == "CUDAExecutionProvider":
            return sess
    if device == "cuda":
        raise RuntimeUnavailable(f"{path}: CUDA was requested but onnxruntime cannot run on CUDA here "
                                 f"(available: {ort.get_available_providers()}); use --device cpu")
    if device == "auto" and log is not None:
        why = "cannot run on CUDA here" if cuda_driver_present() else "no NVIDIA driver"
        log(f"device auto: onnxruntime {why}; running on CPUExecutionProvider")
    sess = _try_session(ort, path, opts, ["CPUExecutionProvider"], raise_errors=True)
    return sess


def _try_session(ort: Any, path: Path, opts: Any, providers: list[str], raise_errors: bool = False):
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
        if raise_errors:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path}: onnxruntime cannot load this model: {msg[:300]}") from None
        return None


def provider_name(sess: Any) -> str:
    """The execution provider that actually runs the graph (the first one the session kept)."""
    return sess.get_providers()[0]
