"""Stage 6, bench: edge inference of the students against the teacher ensemble.

Method (docs/design.md, "measuring", after onnxruntime_perf_test and MLPerf LoadGen): every (model,
engine, threads, batch, provider) is timed in a fresh process by :mod:`stages.bench.worker` (session creation
and first run timed apart, warm-up by count and time, several trials of a minimum count and
duration, inputs cycled from real test rows, threads explicit, the provider that ran asserted, a
validity flag when the trials' p50s spread more than ``max_spread``).  An Identity model of the same
input shape is the floor of what one ``run()`` costs; PyTorch eager on the student checkpoints is the
baseline the ONNX files are compared with.  Accuracy and top-1 agreement with the teacher ensemble
are measured in this process on the whole test split (and accuracy on the validation split, on which
``distill bench pick`` and the Pareto fronts rank, so the test figures they report are not those of a
model picked on them), multiply-accumulates per image from each
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
from typing import NamedTuple

import numpy as np

from pipeline import contract as ct
from pipeline import feed, inference, provenance, resources, runtime, sanity_gate, soft
from pipeline.artifacts import check_outputs, claim
from pipeline.config import to_dict
from pipeline.errors import DataError
from pipeline.formats.checkpoint import read_checkpoint
from pipeline.formats.onnx_model import (
    SOURCE_KEY,
    TRANSFER_KEY,
    check_onnx_file,
    input_dtype,
    model_files,
    model_size,
    onnx_macs,
    parameter_count,
    read_metadata,
)
from pipeline.formats.prepared import Prepared, open_prepared
from stages.bench import choice, launcher
from stages.bench import report as benchreport
from stages.bench.runners import TORCH_PROVIDER
from stages.bench.settings import BenchConfig

TEACHER = "teacher-ensemble"
SPLITS = ("test", "val")  # scored on both: test reported, val ranked on (stages.bench.choice)
TORCH_SUFFIX = "-torch"
IOBINDING_SUFFIX = "-iobinding"


def _torch_scores(checkpoint: Path, xs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, int]:
    from pipeline import macs, models

    net, ckpt = models.load(checkpoint)
    weights = sum(p.numel() for p in net.parameters() if p.dim() >= 2)  # as parameter_count counts
    return ({split: models.predict(net, x).numpy() for split, x in xs.items()}, int(weights),
            macs.count_macs(net, tuple(ckpt.input_shape)))


def _time(cfg: BenchConfig, path: Path, pool: Path, log: Callable, engine: str = "onnxruntime") -> list[dict]:
    runs = []
    for threads in cfg.thread_counts():
        for batch in ((1,) if engine == "iobinding" else cfg.batches):  # binding is a per-run cost: batch 1
            log(f"timing {path.name} ({engine}): threads {threads}, batch {batch}")
            runs.append(launcher.run_isolated(
                path, pool, threads, batch, cfg.provider if engine == "onnxruntime" else "cpu", engine=engine,
                max_spread=cfg.max_spread, warmup_count=cfg.warmup_count, warmup_s=cfg.warmup_s,
                min_count=cfg.min_count if batch == 1 else max(1, cfg.min_count // 10),
                min_s=cfg.min_s, trials=cfg.trials))
    return runs


def score_teacher(teacher: str | Path, info, log: Callable[[str], None]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                                                 dict]:
    """The teacher's soft targets at T = 1 on the whole test and validation splits (``{split: probs}``)
    and its first 1024 test rows as it takes them (the timing pool), fed under its resolved contract;
    and the contract's record."""
    geom = ct.Geometry.of(info)
    sess, plan = feed.open_model(teacher, geom, len(info.classes), "cpu", threads=os.cpu_count() or 1)
    gate = sanity_gate.judge_guess(sess, plan, info, "test", log, "bench")
    xs = {split: info.load_raw(split)[0] for split in SPLITS}
    probs = {split: soft.combine_soft_targets(feed.run_model(sess, plan, x, geom), 1.0) for split, x in xs.items()}
    return probs, ct.adapt(xs["test"][:1024], plan.contract, geom), {**plan.record(), "gate": gate}


class _Scoring(NamedTuple):
    """What every model is scored against, per split (``SPLITS``): the rows in each input dtype the
    models take (``rows[split][dtype]``), the labels and the teacher ensemble's predictions."""
    rows: dict[str, dict[str, np.ndarray]]
    labels: dict[str, np.ndarray]
    teacher_pred: dict[str, np.ndarray]


def benchmark(cfg: BenchConfig, teacher: str | Path, candidates: dict[str, Path], prepared: Path, out: Path,
              markdown: Path, csv_path: Path, log: Callable[[str], None] = print, *,
              torch_models: dict[str, Path] | None = None, plot_accuracy: Path | None = None,
              plot_throughput: Path | None = None) -> Path:
    """Time and score ``teacher`` (an ONNX file, optionally ``PATH:key=value,...`` declaring its input
    contract), each ONNX candidate and each PyTorch checkpoint of ``torch_models``
    (reported as ``<name>-torch``); write ``out`` (JSON), ``markdown``, ``csv_path`` and the plots
    whose paths are given, published as one set (the Markdown, make's target, last).

    Before anything is timed: every ONNX file and checkpoint is checked readable (exit 3), and each
    student's recorded transfer set (a checkpoint's provenance, an export's ``transfer_sha256``) must
    be ``prepared`` (exit 4): its test split scores the student, its normalisation feeds it."""
    reports = {"--out": out, "--markdown": markdown, "--csv": csv_path, "--plot-accuracy": plot_accuracy,
               "--plot-throughput": plot_throughput}
    check_outputs({"--teacher": ct.parse_teacher(teacher).path, "--candidate": candidates.values(),
                   "--torch": (torch_models or {}).values(), "--prepared": prepared}, reports)
    claim(*(p for p in reports.values() if p is not None))
    info = open_prepared(prepared)
    for path in [*candidates.values()]:  # a missing or unreadable file: one line, before any work
        check_onnx_file(Path(path))
    teacher_probs, teacher_pool, contract = score_teacher(teacher, info, log)
    models = {TEACHER: ct.parse_teacher(teacher).path, **{k: Path(v) for k, v in candidates.items()}}
    dtypes = {name: input_dtype(path) for name, path in models.items()}
    _check_lineage(models, torch_models or {}, prepared)
    rows = {split: _rows(info, prepared, split, set(dtypes.values())) for split in SPLITS}
    for name, path in list(models.items())[1:]:  # shape, dtype and class count, before any timing
        inference.check_io(path, inference.session(path, "cpu"), info.shape, len(info.classes), dtype=dtypes[name])
    torch_models = {f"{k}{TORCH_SUFFIX}": Path(v) for k, v in (torch_models or {}).items()}
    scoring = _Scoring(rows, {split: info.labels(split) for split in SPLITS},
                       {split: p.argmax(1) for split, p in teacher_probs.items()})
    results = {}
    with resources.temporary_folder() as tmp:  # a full TMPDIR is one line naming it (exit 7)
        pools, floors = _pools_and_floors(Path(tmp), rows["test"], info.shape)
        dtypes.update({name: dtype for dtype, name in zip(rows["test"], floors)})
        pools[TEACHER] = launcher.save_pool(Path(tmp) / "pool-teacher.npy", teacher_pool)  # as it takes them
        for name, path, engine in runtime.progress(_todo(cfg, models, floors, torch_models), desc="bench",
                                                   unit="model"):
            base = name.removesuffix(IOBINDING_SUFFIX)
            dtype = dtypes.get(base, "float32")
            entry = {"path": str(path), "engine": engine, "input_dtype": dtype,
                     "runs": _time(cfg, path, pools[TEACHER if base == TEACHER else dtype], log, engine)}
            if name == TEACHER:
                entry["input_contract"] = contract
            results[name] = _scored(entry, name, path in floors.values(), info.shape, scoring)
    _check_providers(cfg, results)
    report = {"settings": to_dict(cfg), "threads_resolved": cfg.thread_counts(), "models": results,
              "environment": environment(),
              "provenance": provenance.record("bench", to_dict(cfg), {"prepared": prepared, **models,
                                                                     **torch_models})}
    report["pareto"] = choice.fronts(report)
    benchreport.publish(report, out, markdown, csv_path, plot_accuracy, plot_throughput)
    log(f"bench: {len(results)} models -> {out}, {markdown}")
    return out


def _check_lineage(models: dict[str, Path], torch_models: dict[str, Path], prepared: Path) -> None:
    """IntegrityError (exit 4) unless every student was trained on ``prepared`` (or on a transfer set
    jittered from it, with its val and test splits): an export's recorded ``transfer_sha256`` (exports
    made before it lack it and are not judged), a checkpoint's provenance."""
    for name, path in models.items():
        meta = read_metadata(path) if name != TEACHER else {}
        if TRANSFER_KEY in meta:
            provenance.check_lineage(prepared, [meta[TRANSFER_KEY], meta.get(SOURCE_KEY)],
                                     f"the student {path} (the transfer set of its checkpoint)", "make export")
    for path in torch_models.values():
        ckpt = read_checkpoint(Path(path), role="student")
        provenance.check_lineage(prepared, provenance.trained_on(ckpt.provenance), f"the checkpoint {path}",
                                 "make student")


def _rows(info: Prepared, prepared: Path, split: str, dtypes: set[str]) -> dict[str, np.ndarray]:
    """The rows of ``split`` per input dtype: normalised float32, and the stored pixels for a raw-pixel model."""
    raw = info.load_raw(split)[0]  # one read of the split; normalised here for float models
    rows = {"float32": info.normalise(raw)}
    if "uint8" in dtypes:  # a raw-pixel model takes the stored pixels, not normalised rows
        rows["uint8"] = raw
        if rows["uint8"].dtype != np.uint8:
            raise DataError(f"{prepared}: a candidate takes uint8 pixels, the prepared {split} split holds "
                            f"{rows['uint8'].dtype}")
    return rows


def _pools_and_floors(tmp: Path, rows: dict[str, np.ndarray],
                      shape: tuple[int, ...]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Per input dtype, the pool of rows the worker cycles (``{dtype: .npy}``) and the Identity model of
    that input, the floor of one ``run()`` (``{floor name: .onnx}``, in the order of ``rows``)."""
    pools, floors = {}, {}
    for dtype, x in rows.items():
        pools[dtype] = launcher.save_pool(tmp / f"pool-{dtype}.npy", x[:1024])  # real rows; 1024 is ~3 MiB of MNIST
        floors[benchreport.floor_name(dtype, "onnxruntime")] = launcher.write_identity_model(
            tmp / f"identity-{dtype}.onnx", shape, dtype)
    return pools, floors


def _todo(cfg: BenchConfig, models: dict[str, Path], floors: dict[str, Path],
          torch_models: dict[str, Path]) -> list[tuple[str, Path, str]]:
    """(name, path, engine) of every timing: each model and floor through ``session.run``, again
    through IOBinding when ``cfg.iobinding``, and each checkpoint in PyTorch eager."""
    todo = [(n, p, "onnxruntime") for n, p in [*models.items(), *floors.items()]]
    todo += [(f"{n}{IOBINDING_SUFFIX}", p, "iobinding") for n, p, _ in (todo if cfg.iobinding else [])]
    return todo + [(n, p, "torch") for n, p in torch_models.items()]


def _scored(entry: dict, name: str, floor: bool, shape: tuple[int, ...], scoring: _Scoring) -> dict:
    """``entry`` (a timed model) with what it is: a floor's input, the model an IOBinding timing belongs to
    (scored under that name), or the model's files, size, parameters, MACs, test scores and validation
    accuracy."""
    path, engine, dtype = Path(entry["path"]), entry["engine"], entry["input_dtype"]
    if floor:
        entry["path"] = f"(Identity of input [batch, {', '.join(map(str, shape))}] {dtype})"
    if engine == "iobinding":
        entry["same_model_as"] = name.removesuffix(IOBINDING_SUFFIX)
        return entry
    if floor:
        return entry
    if engine == "torch":
        scores, params, macs = _torch_scores(path, {split: scoring.rows[split]["float32"] for split in SPLITS})
        pred = {split: s.argmax(1) for split, s in scores.items()}
        entry.update(files=model_files(path), size_bytes=model_size(path), parameters=params, macs_per_image=macs,
                     size_note="checkpoint: weights, metadata and provenance (kd-checkpoint/1)")
    else:  # the teacher was scored under its input contract (score_teacher)
        pred = (scoring.teacher_pred if name == TEACHER
                else {split: inference.predict_proba(path, scoring.rows[split][dtype]).argmax(1) for split in SPLITS})
        entry.update(files=model_files(path), size_bytes=model_size(path), parameters=parameter_count(path),
                     macs_per_image=onnx_macs(path))
    entry.update(test_accuracy=float(np.mean(pred["test"] == scoring.labels["test"])),
                 val_accuracy=float(np.mean(pred["val"] == scoring.labels["val"])),
                 agreement_with_teacher=float(np.mean(pred["test"] == scoring.teacher_pred["test"])),
                 sha256=provenance.sha256_file(path))
    return entry


def _check_providers(cfg: BenchConfig, results: dict[str, dict]) -> None:
    """DataError when any run ran on another execution provider than asked (never a silent fallback)."""
    want = inference.PROVIDERS[cfg.provider]
    for entry in results.values():
        for r in entry["runs"]:
            expected = TORCH_PROVIDER if entry["engine"] == "torch" else want
            if r["providers_used"][0] != expected:
                raise DataError(f"{entry['path']}: ran on {r['providers_used'][0]}, not {expected}")


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
