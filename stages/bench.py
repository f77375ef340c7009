"""Stage 6, bench: edge inference of the students against the teacher ensemble.

Method (DESIGN.md section 5, after onnxruntime_perf_test and MLPerf LoadGen): every (model, engine,
threads, batch, provider) is timed in a fresh process by :mod:`stages.bench_worker` (session creation
and first run timed apart, warm-up by count and time, several trials of a minimum count and
duration, inputs cycled from real test rows, threads explicit, the provider that ran asserted, a
validity flag when the trials' p50s spread more than ``max_spread``).  An Identity model of the same
input shape is the floor of what one ``run()`` costs; PyTorch eager on the student checkpoints is the
baseline the ONNX files are compared with.  Accuracy and top-1 agreement with the teacher ensemble
are measured in this process on the whole test split.  Reports: :mod:`stages.benchreport`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from pipeline import provenance, runtime
from pipeline.artifacts import claim, write_json, write_text
from pipeline.config import require, setting, to_dict
from pipeline.errors import DataError
from stages import bench_worker, benchreport, kd
from stages.prepare import open_prepared

TEACHER = "teacher-ensemble"
TORCH_SUFFIX = "-torch"
IOBINDING_SUFFIX = "-iobinding"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark edge inference (latency percentiles, throughput across batch sizes, start-up, memory,
    size, accuracy) of student ONNX models (and PyTorch eager baselines) against the teacher
    ensemble, each configuration in a fresh process."""

    threads: tuple[int, ...] = setting((1, 0), "intra-op thread counts to time; 0 = all cores (os.cpu_count())")
    batches: tuple[int, ...] = setting((1, 16, 256), "batch sizes to time (1 = latency; larger = throughput)")
    warmup_count: int = setting(50, "warm-up runs (at least) before timing")
    warmup_s: float = setting(0.5, "warm-up seconds (at least) before timing")
    min_count: int = setting(200, "timed runs (at least) per trial at batch 1; batched runs need 1/10 of it")
    min_s: float = setting(0.5, "seconds (at least) per trial")
    trials: int = setting(5, "trials; the median is reported and their spread flags a noisy result")
    max_spread: float = setting(0.10, "a result is flagged invalid when (max - min) / median of the trials' "
                                      "p50s exceeds this")
    provider: str = setting("cpu", "execution provider: cpu or cuda (asserted, never a silent fallback)")
    iobinding: bool = setting(True, "also time every ONNX model at batch 1 through IOBinding (input and output "
                                    "OrtValues bound once: the per-run cost of the C/C++ API), as <model>-iobinding")

    def __post_init__(self) -> None:
        require(all(t >= 0 for t in self.threads) and self.threads, "threads must be >= 0 (0 = all cores)")
        require(all(b >= 1 for b in self.batches) and self.batches, "batches must be >= 1")
        require(self.trials >= 1 and self.min_count >= 1, "trials and min_count must be >= 1")
        require(self.warmup_count >= 0 and self.warmup_s >= 0 and self.min_s >= 0, "warm-up and min_s must be >= 0")
        require(self.max_spread > 0, "max_spread must be > 0")
        require(self.provider in ("cpu", "cuda"), "provider must be cpu or cuda")

    def thread_counts(self) -> list[int]:
        """The thread counts with 0 resolved to this machine's cores, duplicates dropped, in order."""
        return list(dict.fromkeys(t or (os.cpu_count() or 1) for t in self.threads))


def model_files(path: Path) -> dict[str, int]:
    """Bytes on disk of each file a model needs: the file and every external-data file it references."""
    path = Path(path)
    files = {path.name: os.path.getsize(path)}
    if path.suffix == ".onnx":
        model = runtime.check_onnx_file(path)
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        for t in _get_all_tensors(model):
            if uses_external_data(t):
                loc = dict((e.key, e.value) for e in t.external_data)["location"]
                files[loc] = os.path.getsize(path.parent / loc)
    return files


def model_size(path: Path) -> int:
    """Bytes on disk of an ONNX model and every external-data file it references."""
    return sum(model_files(path).values())


def parameter_count(path: Path) -> int:
    """Weights in an ONNX file: elements of its float / fp16 / int8 initialisers of rank >= 2 (weight
    matrices and kernels; biases and quantisation scales are left out so that fp32, int8 and PyTorch
    count the same thing)."""
    model = onnx.load(str(path))
    return int(sum(np.prod(t.dims) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16)
                   and len(t.dims) >= 2))


def input_dtype(path: Path) -> str:
    """``uint8`` for a model that takes raw pixels (normalisation in its graph), else ``float32``."""
    model = onnx.load(str(path), load_external_data=False)
    return "uint8" if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8 else "float32"


def predictions(path: Path, x: np.ndarray) -> np.ndarray:
    """Class probabilities of a model on ``x``; an ensemble's members are averaged (arithmetic)."""
    sess = runtime.session(path, "cpu", threads=os.cpu_count() or 1)
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + 1024]})[0] for i in range(0, len(x), 1024)])
    if out.ndim == 3:
        return kd.combine_soft_targets(out, 1.0, "arithmetic")
    return kd.tempered_softmax(kd.as_logits(out), 1.0)


def _torch_scores(checkpoint: Path, x: np.ndarray) -> tuple[np.ndarray, int]:
    from stages.models import predict
    from stages.student import load_checkpoint

    net, _ = load_checkpoint(checkpoint)
    weights = sum(p.numel() for p in net.parameters() if p.dim() >= 2)  # as parameter_count counts
    return predict(net, x).numpy(), int(weights)


def _time(cfg: BenchConfig, path: Path, pool: Path, log: Callable, engine: str = "onnxruntime") -> list[dict]:
    runs = []
    for threads in cfg.thread_counts():
        for batch in ((1,) if engine == "iobinding" else cfg.batches):  # binding is a per-run cost: batch 1
            log(f"timing {path.name} ({engine}): threads {threads}, batch {batch}")
            runs.append(bench_worker.run_isolated(
                path, pool, threads, batch, cfg.provider if engine == "onnxruntime" else "cpu", engine=engine,
                max_spread=cfg.max_spread, warmup_count=cfg.warmup_count, warmup_s=cfg.warmup_s,
                min_count=cfg.min_count if batch == 1 else max(1, cfg.min_count // 10),
                min_s=cfg.min_s, trials=cfg.trials))
    return runs


def benchmark(cfg: BenchConfig, teacher: Path, candidates: dict[str, Path], prepared: Path, out: Path,
              markdown: Path, csv_path: Path, log: Callable[[str], None] = print, *,
              torch_models: dict[str, Path] | None = None, plot_accuracy: Path | None = None,
              plot_throughput: Path | None = None) -> Path:
    """Time and score ``teacher``, each ONNX candidate and each PyTorch checkpoint of ``torch_models``
    (reported as ``<name>-torch``); write ``out`` (JSON), ``markdown``, ``csv_path`` and the plots
    whose paths are given."""
    claim(out, markdown, csv_path, *(p for p in (plot_accuracy, plot_throughput) if p is not None))
    info = open_prepared(prepared)
    xtest, ytest = info.load("test")
    models = {TEACHER: Path(teacher), **{k: Path(v) for k, v in candidates.items()}}
    dtypes = {name: input_dtype(path) for name, path in models.items()}
    rows = {"float32": xtest}
    if "uint8" in dtypes.values():  # a raw-pixel model takes the stored pixels, not normalised rows
        rows["uint8"] = info.load_raw("test")[0]
        if rows["uint8"].dtype != np.uint8:
            raise DataError(f"{prepared}: a candidate takes uint8 pixels, the prepared test split holds "
                            f"{rows['uint8'].dtype}")
    for name, path in models.items():  # shape, dtype and class count, before any timing
        runtime.check_io(path, runtime.session(path, "cpu"), info.shape, len(info.classes), dtype=dtypes[name])
    torch_models = {f"{k}{TORCH_SUFFIX}": Path(v) for k, v in (torch_models or {}).items()}
    teacher_pred = predictions(teacher, xtest).argmax(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pools, floors = {}, {}
        for dtype, x in rows.items():
            pools[dtype] = Path(tmp) / f"pool-{dtype}.npy"
            np.save(pools[dtype], x[:1024])  # a pool of real rows, cycled; 1024 rows is ~3 MiB of MNIST
            floors[benchreport.floor_name(dtype, "onnxruntime")] = bench_worker.write_identity_model(
                Path(tmp) / f"identity-{dtype}.onnx", info.shape, dtype)
            dtypes[benchreport.floor_name(dtype, "onnxruntime")] = dtype
        todo = [(n, p, "onnxruntime") for n, p in [*models.items(), *floors.items()]]
        todo += [(f"{n}{IOBINDING_SUFFIX}", p, "iobinding") for n, p, _ in (todo if cfg.iobinding else [])]
        todo += [(n, p, "torch") for n, p in torch_models.items()]
        for name, path, engine in runtime.progress(todo, desc="bench", unit="model"):
            dtype = dtypes.get(name.removesuffix(IOBINDING_SUFFIX), "float32")
            entry = {"path": str(path), "engine": engine, "input_dtype": dtype,
                     "runs": _time(cfg, path, pools[dtype], log, engine)}
            floor = path in floors.values()
            if floor:
                entry["path"] = f"(Identity of input [batch, {', '.join(map(str, info.shape))}] {dtype})"
            if engine == "iobinding":
                entry["same_model_as"] = name.removesuffix(IOBINDING_SUFFIX)  # scored under that name
            elif engine == "torch":
                scores, params = _torch_scores(path, xtest)
                pred = scores.argmax(1)
                entry.update(files=model_files(path), size_bytes=model_size(path), parameters=params,
                             size_note="checkpoint: weights plus optimiser state and provenance")
            elif not floor:
                pred = predictions(path, rows[dtype]).argmax(1)
                entry.update(files=model_files(path), size_bytes=model_size(path), parameters=parameter_count(path))
            if not floor and engine != "iobinding":
                entry.update(test_accuracy=float(np.mean(pred == ytest)),
                             agreement_with_teacher=float(np.mean(pred == teacher_pred)),
                             sha256=provenance.sha256_file(path))
            results[name] = entry
    want = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[cfg.provider]
    for name, entry in results.items():
        for r in entry["runs"]:
            expected = bench_worker.TORCH_PROVIDER if entry["engine"] == "torch" else want
            if r["providers_used"][0] != expected:
                raise DataError(f"{entry['path']}: ran on {r['providers_used'][0]}, not {expected}")
    report = {"settings": to_dict(cfg), "threads_resolved": cfg.thread_counts(), "models": results,
              "environment": environment(),
              "provenance": provenance.record("bench", to_dict(cfg), {"prepared": prepared, **models,
                                                                     **torch_models})}
    benchreport.write_csv(csv_path, results)
    if plot_accuracy is not None:
        benchreport.plot_accuracy_latency(report, plot_accuracy)
    if plot_throughput is not None:
        benchreport.plot_throughput(report, plot_throughput)
    write_text(markdown, benchreport.render_markdown(report, plots=[p for p in (plot_accuracy, plot_throughput) if p]))
    write_json(out, benchreport.strip_latencies(report))
    log(f"bench: {len(results)} models -> {out}, {markdown}")
    return out


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
              "amx_int8", "amx_bf16")


def environment() -> dict:
    """CPU model and flags, cores, package versions and git revision of the measuring machine."""
    cpu, flags = "", []
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "")
        flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0)),
            "cpu_flags": flags, "simd": [f for f in SIMD_FLAGS if f in flags],
            "versions": provenance.versions(), "git": provenance.git_revision()}
