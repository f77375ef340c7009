"""onnxruntime, in one place: provider names, session creation, batched inference, I/O checks,
the choice of a classifier's output.

onnxruntime-gpu lists CUDA in ``get_available_providers()`` even where its libraries are missing,
and asking for CUDA then logs an error and runs on the CPU.  So the provider is always read back
from ``session.get_providers()`` and compared with what was asked: never a silent CPU run.
onnxruntime is imported inside the functions, so importing this module costs nothing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import resources
from pipeline.errors import DataError, RuntimeUnavailable, UsageError

DEVICES = ("auto", "cpu", "cuda")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def run_batched(sess: Any, x: np.ndarray, batch: int = 1024, output: str | None = None) -> np.ndarray:
    """The output ``output`` (default: the first) of ``sess`` over the rows of ``x``, ``batch`` rows per
    run, concatenated along the rows, as the model returns it (2-D or 3-D, its own dtype)."""
    name = sess.get_inputs()[0].name
    names = None if output is None else [output]
    return np.concatenate([np.asarray(sess.run(names, {name: x[i:i + batch]})[0]) for i in range(0, len(x), batch)])


def predict_proba(path: Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Class probabilities at T = 1 of the model at ``path`` on ``x`` (CPU): an ensemble's members are
    averaged (arithmetic, Hinton's ensemble), a probability output taken as it is."""
    from pipeline.soft import model_soft_targets

    sess = session(path, "cpu", threads=threads or os.cpu_count() or 1)
    return model_soft_targets(run_batched(sess, x))


def require_provider(sess: Any, device: str, path: Path) -> None:
    """RuntimeUnavailable unless ``sess`` runs on ``device`` (cpu or cuda) first."""
    used = sess.get_providers()
    if not used or used[0] != PROVIDERS[device]:
        raise RuntimeUnavailable(f"{path}: provider {device!r} requested but onnxruntime runs {used}: "
                                 f"{PROVIDERS[device]} is not available here")


FLOAT_TENSORS = ("tensor(float)", "tensor(double)", "tensor(float16)")


def _describe(o: Any) -> str:
    dims = "?" if o.shape is None else "[" + ", ".join(str(d) for d in o.shape) + "]"
    return f"{o.name} ({o.type} {dims})"


def _fits_classifier(o: Any) -> bool:
    return o.type in FLOAT_TENSORS and (o.shape is None or len(o.shape) in (2, 3))


def select_output(path: Path, sess: Any, name: str | None = None) -> str:
    """The output to read class scores from: ``name`` when given, else the first float output shaped
    ``[batch, classes]`` or ``[batch, members, classes]``; DataError (one line) otherwise.

    A ZipMap output (a sequence of maps, skl2onnx's default for classifiers; onnxruntime returns a
    list of dicts, one per row) is refused, naming skl2onnx's option that gives a tensor instead;
    a label-only model is refused naming the outputs it has.
    """
    outs = sess.get_outputs()
    have = ", ".join(map(_describe, outs))
    zipmap = ("is a ZipMap (a sequence of maps, skl2onnx's default for classifiers); convert the model "
              "with skl2onnx's options={id(model): {'zipmap': False}} to get a [batch, classes] tensor")
    if name is not None:
        o = next((o for o in outs if o.name == name), None)
        if o is None:
            raise DataError(f"{path}: no output named {name!r}; the model has {have}")
        if o.type.startswith("seq(map("):
            raise DataError(f"{path}: output {name!r} {zipmap}")
        if not _fits_classifier(o):
            raise DataError(f"{path}: output {_describe(o)} is not a float [batch, classes] or "
                            f"[batch, members, classes] tensor; the model has {have}")
        return name
    for o in outs:
        if _fits_classifier(o):
            return o.name
    for o in outs:
        if o.type.startswith("seq(map("):
            raise DataError(f"{path}: output {o.name!r} {zipmap}")
    raise DataError(f"{path}: no float [batch, classes] or [batch, members, classes] output (a label-only "
                    f"model?); the model has {have}")


def check_io(path: Path, sess: Any, shape: tuple[int, ...], classes: int, members: bool | None = None,
             dtype: str = "float32", output: str | None = None) -> tuple[int, ...]:
    """Refuse a model that cannot take the data's rows or gives the wrong classes, before long work.

    The single input must be ``dtype`` (float32: normalised rows; uint8: raw pixels) of
    ``[batch, *shape]`` (symbolic dimensions allowed); then one run on two rows of zeros must give,
    at ``output`` (default: the first), floating ``[2, classes]`` (or ``[2, members, classes]``;
    ``members`` True/False requires/forbids the member axis, None allows both).  Returns the trial
    output's shape.
    """
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
        out = sess.run(None if output is None else [output], {inp.name: np.zeros((2, *shape), dtype)})[0]
    except Exception as e:  # onnxruntime raises several unrelated types
        if resources.is_memory_error(e):
            raise  # out of memory is not the model's fault: exit 7 from the command line
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
    return tuple(out.shape)


def cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded (without one, trying CUDA only prints loader errors)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def _preload_cuda() -> None:
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:  # loads the CUDA/cuDNN libraries the onnxruntime-gpu wheel expects (from pip's nvidia-*)
            preload()
        except Exception:  # absence is reported by the provider check below
            pass


def session(path: Path, device: str = "cpu", threads: int = 1, log=None, device_id: int = 0, *,
            check: bool = True, profile_prefix: str | None = None) -> Any:
    """An InferenceSession on ``device`` (auto|cpu|cuda) with ``threads`` intra-op threads: the one
    place sessions are made (sequential execution, one inter-op thread, full graph optimisation,
    CUDA without TF32, the provider read back).

    ``device_id`` picks the GPU (a torchrun rank passes its LOCAL_RANK).  ``check`` first loads the
    graph with :func:`pipeline.formats.onnx_model.check_onnx_file` (the bench worker, timing session
    creation of files already checked, turns it off).  ``profile_prefix`` turns onnxruntime's
    profiler on.

    ``cuda`` that cannot run is a RuntimeUnavailable error; ``auto`` tries CUDA when onnxruntime
    lists it and falls back to CPU, saying so through ``log``.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise UsageError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if check:
        from pipeline.formats.onnx_model import check_onnx_file

        check_onnx_file(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    opts.log_severity_level = 3  # CUDA load failures are reported by our own check, not as log noise
    ort.set_default_logger_severity(3)
    want_cuda = device == "cuda" or (device == "auto" and cuda_driver_present())
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        _preload_cuda()
        # use_tf32=0: TF32 convolutions/matmuls (10-bit mantissa) moved teacher logits by up to 2.2e-4
        # from the CPU's on an H200 (measured), above `cache verify`'s 1e-4; a cache holds fp32 outputs.
        cuda = (PROVIDERS["cuda"], {"device_id": int(device_id), "use_tf32": "0"})
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
    except Exception as e:  # onnxruntime raises several unrelated types
        if resources.is_memory_error(e):
            raise  # a thread pool that cannot start is out of memory, not a bad model: exit 7
        if raise_errors:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path}: onnxruntime cannot load this model: {msg[:300]}") from None
        return None


def provider_name(sess: Any) -> str:
    """The execution provider that actually runs the graph (the first one the session kept)."""
    return sess.get_providers()[0]


def optimised_ops(path: Path) -> list[str]:
    """Operator types, in order, of the graph onnxruntime's CPU provider actually runs for ``path``:
    the graph after its fusions (a ``DequantizeLinear -> op -> QuantizeLinear`` group becomes one
    integer kernel; a float op left in an int8 graph runs between a stray pair)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        so.log_severity_level = 3  # it warns that the saved graph is specific to this machine
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
