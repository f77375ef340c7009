"""Stage 6, bench: edge inference of the students against the teacher ensemble.

Method (DESIGN.md section 5, after onnxruntime_perf_test and MLPerf LoadGen): every (model, threads,
batch) is timed in a fresh process by :mod:`stages.bench_worker` (session creation and first run
timed apart, warm-up by count and time, several trials of a minimum count and duration, inputs
cycled from real test rows, threads explicit, the provider that ran asserted).  An Identity model of
the same input shape is the floor of what one ``run()`` costs.  Accuracy and top-1 agreement with
the teacher ensemble are measured in this process on the whole test split.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from pipeline import provenance, runtime
from pipeline.artifacts import atomic_output, claim, write_json, write_text
from pipeline.config import require, setting, to_dict
from pipeline.errors import DataError
from stages import bench_worker, kd
from stages.prepare import open_prepared

TEACHER = "teacher-ensemble"
FLOOR = "identity-floor"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark edge inference (latency percentiles, throughput, start-up, memory, size,
    accuracy) of student ONNX models against the teacher ensemble, each in a fresh process."""

    threads: tuple[int, ...] = setting((1,), "onnxruntime intra-op thread counts to time")
    batches: tuple[int, ...] = setting((1, 256), "batch sizes to time (1 = latency; larger = throughput)")
    warmup_count: int = setting(50, "warm-up runs (at least) before timing")
    warmup_s: float = setting(0.5, "warm-up seconds (at least) before timing")
    min_count: int = setting(200, "timed runs (at least) per trial at batch 1; batched runs need 1/10 of it")
    min_s: float = setting(1.0, "seconds (at least) per trial")
    trials: int = setting(5, "trials; the median is reported and their spread flags a noisy result")
    provider: str = setting("cpu", "execution provider: cpu or cuda (asserted, never a silent fallback)")

    def __post_init__(self) -> None:
        require(all(t >= 1 for t in self.threads) and self.threads, "threads must be >= 1")
        require(all(b >= 1 for b in self.batches) and self.batches, "batches must be >= 1")
        require(self.trials >= 1 and self.min_count >= 1, "trials and min_count must be >= 1")
        require(self.warmup_count >= 0 and self.warmup_s >= 0 and self.min_s >= 0, "warm-up and min_s must be >= 0")
        require(self.provider in ("cpu", "cuda"), "provider must be cpu or cuda")


def model_size(path: Path) -> int:
    """Bytes on disk of an ONNX model and every external-data file it references."""
    model = runtime.check_onnx_file(path)
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    extra = {dict((e.key, e.value) for e in t.external_data)["location"]
             for t in _get_all_tensors(model) if uses_external_data(t)}
    return os.path.getsize(path) + sum(os.path.getsize(Path(path).parent / loc) for loc in extra)


def parameter_count(path: Path) -> int:
    """Weights in an ONNX file: elements of its float initialisers (int8 weights count once)."""
    model = onnx.load(str(path))
    return int(sum(np.prod(t.dims) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16)
                   and len(t.dims) >= 2))


def predictions(path: Path, x: np.ndarray) -> np.ndarray:
    """Class probabilities of a model on ``x``; an ensemble's members are averaged (arithmetic)."""
    sess = runtime.session(path, "cpu", threads=os.cpu_count() or 1)
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + 1024]})[0] for i in range(0, len(x), 1024)])
    if out.ndim == 3:
        return kd.combine_soft_targets(out, 1.0, "arithmetic")
    return kd.tempered_softmax(kd.as_logits(out), 1.0)


def _time(cfg: BenchConfig, path: Path, pool: Path, log: Callable) -> list[dict]:
    runs = []
    for threads in cfg.threads:
        for batch in cfg.batches:
            log(f"timing {path.name}: threads {threads}, batch {batch}")
            r = bench_worker.run_isolated(
                path, pool, threads, batch, cfg.provider, warmup_count=cfg.warmup_count, warmup_s=cfg.warmup_s,
                min_count=cfg.min_count if batch == 1 else max(1, cfg.min_count // 10),
                min_s=cfg.min_s, trials=cfg.trials)
            runs.append(r)
    return runs


def benchmark(cfg: BenchConfig, teacher: Path, candidates: dict[str, Path], prepared: Path, out: Path,
              markdown: Path, csv_path: Path, log: Callable[[str], None] = print) -> Path:
    """Time and score ``teacher`` and each candidate; write ``out`` (JSON), ``markdown`` and ``csv_path``."""
    claim(out, markdown, csv_path)
    info = open_prepared(prepared)
    xtest, ytest = info.load("test")
    models = {TEACHER: Path(teacher), **{k: Path(v) for k, v in candidates.items()}}
    for name, path in models.items():  # shape, dtype and class count, before any timing
        runtime.check_io(path, runtime.session(path, "cpu"), info.shape, len(info.classes))
    teacher_pred = predictions(teacher, xtest).argmax(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.npy"
        np.save(pool, xtest[:1024])  # a pool of real rows, cycled; 1024 rows is ~3 MiB of MNIST
        floor = bench_worker.write_identity_model(Path(tmp) / "identity.onnx", info.shape)
        for name, path in runtime.progress(list(models.items()) + [(FLOOR, floor)], desc="bench", unit="model"):
            entry = {"path": str(path), "runs": _time(cfg, path, pool, log)}
            if name != FLOOR:
                pred = predictions(path, xtest).argmax(1)
                entry.update(size_bytes=model_size(path), parameters=parameter_count(path),
                             test_accuracy=float(np.mean(pred == ytest)),
                             agreement_with_teacher=float(np.mean(pred == teacher_pred)),
                             sha256=provenance.sha256_file(path))
            results[name] = entry
    for name, entry in results.items():
        for r in entry["runs"]:
            if r["providers_used"][0] != {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[cfg.provider]:
                raise DataError(f"{entry['path']}: ran on {r['providers_used'][0]}, not {cfg.provider}")
    report = {"settings": to_dict(cfg), "models": results, "environment": environment(),
              "provenance": provenance.record("bench", to_dict(cfg), {"prepared": prepared, **models})}
    write_csv(csv_path, results)
    write_text(markdown, render_markdown(report))
    write_json(out, _strip_latencies(report))
    log(f"bench: {len(results)} models -> {out}, {markdown}")
    return out


def _strip_latencies(report: dict) -> dict:
    """The JSON keeps summaries; every timed run goes to the CSV instead."""
    slim = {k: v for k, v in report.items() if k != "models"}
    slim["models"] = {n: {**e, "runs": [{k: v for k, v in r.items() if k != "latencies_s"} for r in e["runs"]]}
                      for n, e in report["models"].items()}
    return slim


def write_csv(path: Path, results: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "threads", "batch", "run", "latency_us"])
    for name, entry in results.items():
        for r in entry["runs"]:
            for i, lat in enumerate(r["latencies_s"]):
                w.writerow([name, r["threads"], r["batch"], i, f"{lat * 1e6:.3f}"])
    write_text(path, buf.getvalue())


def environment() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": provenance.versions(), "git": provenance.git_revision()}


def _run(entry: dict, threads: int, batch: int) -> dict | None:
    return next((r for r in entry["runs"] if r["threads"] == threads and r["batch"] == batch), None)


def render_markdown(report: dict) -> str:
    cfg = report["settings"]
    t1 = cfg["threads"][0]
    big = max(cfg["batches"])
    lines = [f"# Edge benchmark\n",
             f"onnxruntime {cfg['provider']}, latency at batch 1 with {t1} thread(s); throughput at batch {big}. "
             f"Median of {cfg['trials']} trials, each in a fresh process; times in microseconds.\n",
             "| model | params | size (KiB) | test acc | agrees w/ teacher | p50 us | p90 us | p99 us | "
             f"rows/s @{big} | load ms | valid |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, e in report["models"].items():
        r1, rb = _run(e, t1, 1), _run(e, t1, big)
        s = r1["steady"] if r1 else {}
        size = f"{e['size_bytes'] / 1024:.1f}" if "size_bytes" in e else "-"
        acc = f"{e['test_accuracy'] * 100:.2f}%" if "test_accuracy" in e else "-"
        agree = f"{e['agreement_with_teacher'] * 100:.2f}%" if "agreement_with_teacher" in e else "-"
        valid = all(r["steady"]["valid"] for r in e["runs"])
        lines.append(f"| {name} | {e.get('parameters', '-')} | {size} | {acc} | {agree} | "
                     f"{s.get('p50', 0):.1f} | {s.get('p90', 0):.1f} | {s.get('p99', 0):.1f} | "
                     f"{rb['steady']['throughput_rows_s'] if rb else 0:,.0f} | "
                     f"{r1['load']['session_create_s'] * 1e3 if r1 else 0:.1f} | {'yes' if valid else 'noisy'} |")
    env = report["environment"]
    lines.append(f"\n{env['cpu']}, {env['cores']} cores; onnxruntime "
                 f"{env['versions'].get('onnxruntime-gpu', env['versions'].get('onnxruntime'))}; git {env['git']}.\n")
    return "\n".join(lines) + "\n"
