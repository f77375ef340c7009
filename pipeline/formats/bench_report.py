"""The edge benchmark's report, schema ``kd-bench/1`` (JSON): its only writer and its only reader.

The Markdown report, the CSV and the plots are rendered from this dict, and a user's own tooling
reads the JSON, so its keys are declared here and checked both ways (docs/formats.md, "bench report")::

    schema            "kd-bench/1"
    settings          the bench settings: provider, threads, batches, trials, min_count, min_s,
                      warmup_count, warmup_s, max_spread, ...
    threads_resolved  [int]: the thread counts timed (0 resolved to the cores)
    environment       cpu, cores, affinity_cores, cpu_flags, simd, versions, git
    provenance        stage, settings, inputs (path, sha256), versions
    models            {name: MODEL}
    pareto            (optional) [FRONT]: the Pareto-optimal models per thread count and call path

    MODEL   path, engine ("onnxruntime" | "iobinding" | "torch"), input_dtype, runs: [RUN];
            scored models add test_accuracy, agreement_with_teacher, sha256 and (optional)
            val_accuracy (the validation split's, which choices rank on); files models add
            files {name: bytes}, size_bytes, parameters and (optional) macs_per_image;
            IOBinding rows add same_model_as; the teacher adds input_contract (CONTRACT)
    CONTRACT input {range, layout, mean, std, dtype, output, tta: the resolved input contract,
            docs/teachers.md}, sources {field: command line | metadata | default | input shape |
            input type | first float output | gate}, gate (null, or the sanity gate's record where
            the contract was a guess: rows, seed, labelled, split, accuracy, nll_nats, entropy_nats,
            alternatives)
    FRONT   threads, engine ("run" | "iobinding"), latency ("p50", ...), models [names, fastest first]:
            no other scored ONNX model is at least as accurate, as fast at batch 1 and as small, and
            strictly better in one (stages.bench.choice)
    RUN     threads, batch, providers_used, load {session_create_s, rss_added_mb, ...},
            first_run_s, peak_rss_mb, steady {count, min, mean, p50, p90, p95, p99, p999, max (us),
            valid, reason, spread, throughput_rows_s, ...}

Latencies of every timed run are not kept here (they go to the CSV).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.artifacts import OutputSet, write_json
from pipeline.errors import DataError

SCHEMA = "kd-bench/1"
TOP = {"settings": dict, "threads_resolved": list, "environment": dict, "provenance": dict, "models": dict}
MODEL = {"path": str, "engine": str, "input_dtype": str, "runs": list}
SCORED = {"test_accuracy": float, "agreement_with_teacher": float, "sha256": str}
OPTIONAL_SCORED = {"val_accuracy": float}  # reports written before it was added lack it
SIZED = {"files": dict, "size_bytes": int, "parameters": int}
OPTIONAL_SIZED = {"macs_per_image": int}  # reports written before it was added lack it
CONTRACT = {"input": dict, "sources": dict}  # the teacher's; reports written before it was added lack it
FRONT = {"threads": int, "engine": str, "latency": str, "models": list}
RUN = {"threads": int, "batch": int, "providers_used": list, "load": dict, "first_run_s": float, "steady": dict}
STEADY = {"p50": float, "p90": float, "p99": float, "p999": float, "max": float, "valid": bool,
          "throughput_rows_s": float}
SETTINGS = ("provider", "threads", "batches", "trials", "min_count", "min_s", "warmup_count", "warmup_s",
            "max_spread")
ENGINES = ("onnxruntime", "iobinding", "torch")


def _need(obj: Any, keys: dict[str, type], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not an object")
    for key, tp in keys.items():
        if key not in obj:
            raise ValueError(f"{where} lacks {key!r}")
        value = obj[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else \
            isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if not ok:
            raise ValueError(f"{where}.{key} is {type(value).__name__}, expected {tp.__name__}")


def check(report: dict) -> None:
    """ValueError naming the first key that is missing or of the wrong type."""
    if report.get("schema") != SCHEMA:
        raise ValueError(f"schema is {report.get('schema')!r}, expected {SCHEMA}")
    _need(report, TOP, "report")
    for key in SETTINGS:
        if key not in report["settings"]:
            raise ValueError(f"report.settings lacks {key!r}")
    if "pareto" in report:
        if not isinstance(report["pareto"], list):
            raise ValueError("report.pareto is not a list")
        for i, front in enumerate(report["pareto"]):
            _need(front, FRONT, f"report.pareto[{i}]")
            unknown = [n for n in front["models"] if n not in report["models"]]
            if unknown:
                raise ValueError(f"report.pareto[{i}] names models the report lacks: {unknown}")
    for name, m in report["models"].items():
        where = f"models[{name!r}]"
        _need(m, MODEL, where)
        if m["engine"] not in ENGINES:
            raise ValueError(f"{where}.engine is {m['engine']!r}, expected one of {ENGINES}")
        if "test_accuracy" in m:
            _need(m, SCORED, where)
            _need(m, {k: t for k, t in OPTIONAL_SCORED.items() if k in m}, where)
        if "input_contract" in m:
            _need(m["input_contract"], CONTRACT, f"{where}.input_contract")
        if "size_bytes" in m:
            _need(m, SIZED, where)
            _need(m, {k: t for k, t in OPTIONAL_SIZED.items() if k in m}, where)
        for i, r in enumerate(m["runs"]):
            _need(r, RUN, f"{where}.runs[{i}]")
            _need(r["steady"], STEADY, f"{where}.runs[{i}].steady")


def write_bench_report(path: Path, report: dict, into: OutputSet | None = None) -> Path:
    """Check ``report`` against the schema (adding the schema tag) and write it atomically (alone, or
    as part of the set ``into``)."""
    report = {"schema": SCHEMA, **report}
    try:
        check(report)
    except ValueError as e:
        raise AssertionError(f"bench report does not follow {SCHEMA}: {e}") from None  # a bug, not bad input
    return write_json(Path(path), report, into)


def read_bench_report(path: Path) -> dict:
    """Read and check a bench report; DataError (one line) naming what is wrong."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: bench report not found; run `make bench`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable bench report ({type(e).__name__})") from None
    if not isinstance(report, dict):
        raise DataError(f"{path}: not a bench report (not a JSON object)")
    try:
        check(report)
    except ValueError as e:
        raise DataError(f"{path}: not a {SCHEMA} bench report: {e}") from None
    return report
