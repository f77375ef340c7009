"""Stage 6, bench: edge inference of the students against the teacher ensemble.

Method (docs/design.md, "measuring", after onnxruntime_perf_test and MLPerf LoadGen): every (model,
engine, threads, batch, provider) is timed in a fresh process by :mod:`stages.bench.worker` (session creation
and first run timed apart, warm-up by count and time, several trials of a minimum count and
duration, inputs cycled from real test rows, threads explicit, the provider that ran asserted, a
validity flag when the trials' p50s spread more than ``max_spread``).  An Identity model of the same
input shape is the floor of what one ``run()`` costs; PyTorch eager on the student checkpoints is the
baseline the ONNX files are compared with.  Accuracy and top-1 agreement with the teacher ensemble
are measured in this process on the whole test split, multiply-accumulates per image from each
file's graph (:func:`pipeline.formats.onnx_model.onnx_macs`).  The teacher is fed under its input
contract (``--teacher PATH[:key=value,...]``, else its metadata, else defaults, a guessed contract
judged by the sanity gate: :mod:`pipeline.feed`, :func:`pipeline.sanity_gate.judge_guess`), for its
scores and for its timed rows alike, and the report records the contract (``input_contract``);
with ``tta=hflip`` its scores average the image and its mirror, while its time is of one run.  The
report is the ``kd-bench/1`` JSON (:mod:`pipeline.formats.bench_report`), rendered by
:mod:`stages.bench.report`, with the Pareto front of accuracy, latency and size per thread count
and call path (:mod:`stages.bench.choice`, which also picks a model under budgets: ``distill bench
pick``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import contract as ct
from pipeline import feed, inference, provenance, resources, runtime, sanity_gate, soft
from pipeline.artifacts import claim, write_text
from pipeline.config import to_dict
from pipeline.errors import DataError
from pipeline.formats.bench_report import write_bench_report
from pipeline.formats.onnx_model import (
    check_onnx_file,
    input_dtype,
    model_files,
    model_size,
    onnx_macs,
    parameter_count,
)
from pipeline.formats.prepared import open_prepared
from stages.bench import choice
from stages.bench import report as benchreport
from stages.bench import worker as bench_worker
from stages.bench.settings import BenchConfig

TEACHER = "teacher-ensemble"
TORCH_SUFFIX = "-torch"
IOBINDING_SUFFIX = "-iobinding"


def _torch_scores(checkpoint: Path, x: np.ndarray) -> tuple[np.ndarray, int, int]:
    from pipeline import macs, models

    net, ckpt = models.load(checkpoint)
    weights = sum(p.numel() for p in net.parameters() if p.dim() >= 2)  # as parameter_count counts
    return models.predict(net, x).numpy(), int(weights), macs.count_macs(net, tuple(ckpt.input_shape))


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


def score_teacher(teacher: str | Path, info, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The teacher's soft targets at T = 1 on the whole test split and its first 1024 rows as it takes
    them (the timing pool), fed under its resolved contract; and the contract's record."""
    geom = ct.Geometry.of(info)
    sess, plan = feed.open_model(teacher, geom, len(info.classes), "cpu", threads=os.cpu_count() or 1)
    gate = sanity_gate.judge_guess(sess, plan, info, "test", log, "bench")
    x = info.load_raw("test")[0]
    probs = soft.combine_soft_targets(feed.run_model(sess, plan, x, geom), 1.0)
    return probs, ct.adapt(x[:1024], plan.contract, geom), {**plan.record(), "gate": gate}


def benchmark(cfg: BenchConfig, teacher: str | Path, candidates: dict[str, Path], prepared: Path, out: Path,
              markdown: Path, csv_path: Path, log: Callable[[str], None] = print, *,
              torch_models: dict[str, Path] | None = None, plot_accuracy: Path | None = None,
              plot_throughput: Path | None = None) -> Path:
    """Time and score ``teacher`` (an ONNX file, optionally ``PATH:key=value,...`` declaring its input
    contract), each ONNX candidate and each PyTorch checkpoint of ``torch_models``
    (reported as ``<name>-torch``); write ``out`` (JSON), ``markdown``, ``csv_path`` and the plots
    whose paths are given."""
    claim(out, markdown, csv_path, *(p for p in (plot_accuracy, plot_throughput) if p is not None))
    info = open_prepared(prepared)
    xtest, ytest = info.load("test")
    for path in [*candidates.values()]:  # a missing or unreadable file: one line, before any work
        check_onnx_file(Path(path))
    teacher_probs, teacher_pool, contract = score_teacher(teacher, info, log)
    models = {TEACHER: ct.parse_teacher(teacher).path, **{k: Path(v) for k, v in candidates.items()}}
    dtypes = {name: input_dtype(path) for name, path in models.items()}
    rows = {"float32": xtest}
    if "uint8" in dtypes.values():  # a raw-pixel model takes the stored pixels, not normalised rows
        rows["uint8"] = info.load_raw("test")[0]
        if rows["uint8"].dtype != np.uint8:
            raise DataError(f"{prepared}: a candidate takes uint8 pixels, the prepared test split holds "
                            f"{rows['uint8'].dtype}")
    for name, path in list(models.items())[1:]:  # shape, dtype and class count, before any timing
        inference.check_io(path, inference.session(path, "cpu"), info.shape, len(info.classes), dtype=dtypes[name])
    torch_models = {f"{k}{TORCH_SUFFIX}": Path(v) for k, v in (torch_models or {}).items()}
    teacher_pred = teacher_probs.argmax(1)
    results = {}
    with resources.temporary_folder() as tmp:  # a full TMPDIR is one line naming it (exit 7)
        pools, floors = {}, {}
        for dtype, x in rows.items():
            pools[dtype] = Path(tmp) / f"pool-{dtype}.npy"
            bench_worker.save_pool(pools[dtype], x[:1024])  # a pool of real rows, cycled; 1024 rows is ~3 MiB of MNIST
            floors[benchreport.floor_name(dtype, "onnxruntime")] = bench_worker.write_identity_model(
                Path(tmp) / f"identity-{dtype}.onnx", info.shape, dtype)
            dtypes[benchreport.floor_name(dtype, "onnxruntime")] = dtype
        pools[TEACHER] = bench_worker.save_pool(Path(tmp) / "pool-teacher.npy", teacher_pool)  # as it takes them
        todo = [(n, p, "onnxruntime") for n, p in [*models.items(), *floors.items()]]
        todo += [(f"{n}{IOBINDING_SUFFIX}", p, "iobinding") for n, p, _ in (todo if cfg.iobinding else [])]
        todo += [(n, p, "torch") for n, p in torch_models.items()]
        for name, path, engine in runtime.progress(todo, desc="bench", unit="model"):
            base = name.removesuffix(IOBINDING_SUFFIX)
            dtype = dtypes.get(base, "float32")
            entry = {"path": str(path), "engine": engine, "input_dtype": dtype,
                     "runs": _time(cfg, path, pools[TEACHER if base == TEACHER else dtype], log, engine)}
            if name == TEACHER:
                entry["input_contract"] = contract
            floor = path in floors.values()
            if floor:
                entry["path"] = f"(Identity of input [batch, {', '.join(map(str, info.shape))}] {dtype})"
            if engine == "iobinding":
                entry["same_model_as"] = name.removesuffix(IOBINDING_SUFFIX)  # scored under that name
            elif engine == "torch":
                scores, params, macs = _torch_scores(path, xtest)
                pred = scores.argmax(1)
                entry.update(files=model_files(path), size_bytes=model_size(path), parameters=params,
                             macs_per_image=macs,
                             size_note="checkpoint: weights, metadata and provenance (kd-checkpoint/1)")
            elif not floor:
                pred = teacher_pred if name == TEACHER else inference.predict_proba(path, rows[dtype]).argmax(1)
                entry.update(files=model_files(path), size_bytes=model_size(path), parameters=parameter_count(path),
                             macs_per_image=onnx_macs(path))
            if not floor and engine != "iobinding":
                entry.update(test_accuracy=float(np.mean(pred == ytest)),
                             agreement_with_teacher=float(np.mean(pred == teacher_pred)),
                             sha256=provenance.sha256_file(path))
            results[name] = entry
    want = inference.PROVIDERS[cfg.provider]
    for entry in results.values():
        for r in entry["runs"]:
            expected = bench_worker.TORCH_PROVIDER if entry["engine"] == "torch" else want
            if r["providers_used"][0] != expected:
                raise DataError(f"{entry['path']}: ran on {r['providers_used'][0]}, not {expected}")
    report = {"settings": to_dict(cfg), "threads_resolved": cfg.thread_counts(), "models": results,
              "environment": environment(),
              "provenance": provenance.record("bench", to_dict(cfg), {"prepared": prepared, **models,
                                                                     **torch_models})}
    report["pareto"] = choice.fronts(report)
    # Each file is published atomically; the Markdown, make's target, goes last, so a run that fails
    # on the way (a full disk: exit 7) leaves make with a reason to run the bench again.
    benchreport.write_csv(csv_path, results)
    if plot_accuracy is not None:
        benchreport.plot_accuracy_latency(report, plot_accuracy)
    if plot_throughput is not None:
        benchreport.plot_throughput(report, plot_throughput)
    write_bench_report(out, benchreport.strip_latencies(report))
    write_text(markdown, benchreport.render_markdown(report, plots=[p for p in (plot_accuracy, plot_throughput) if p]))
    log(f"bench: {len(results)} models -> {out}, {markdown}")
    return out


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
              "amx_int8", "amx_bf16")


def environment() -> dict:
    """CPU model and flags, cores, package versions and git revision of the measuring machine."""
    cpu, flags = "", []
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0)),
            "cpu_flags": flags, "simd": [f for f in SIMD_FLAGS if f in flags],
            "versions": provenance.versions(), "git": provenance.git_revision()}
