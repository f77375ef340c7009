"""The choice of an edge model from a bench report: the Pareto front and the pick under budgets.

Pure functions of the ``kd-bench/1`` report (:mod:`pipeline.formats.bench_report`), and
:func:`pick_model`, which reads a report, picks and tells; nothing here measures, so a choice can be
remade for any budget without rerunning the benchmark.

A *candidate* is a scored ONNX model of the report (the teacher included, the Identity floors and
PyTorch baselines not) seen through one call path (``run``: ``session.run`` from Python;
``iobinding``: bound OrtValues, the C/C++ API's per-run cost) at one thread count: its test
accuracy, agreement with the teacher, batch-1 latency (a percentile of the steady-state runs),
size on disk and multiply-accumulates.

*Accurate* here means on the validation split (``accuracy``, the candidate's ``val_accuracy``): the
pick is the best of several models, and ranking them on the test split whose accuracy the pick
then reports would bias that figure upwards (an int8 file and its fp32 often differ by a row or
two).  Reports written before bench scored the validation split rank on test, and say so
(``ranked_on``).

Pareto-optimal (on accuracy, latency and size): no other candidate is at least as accurate, at
least as fast and at most as large, and strictly better in one of the three.  The pick under a
latency and a size budget is the most accurate candidate within both (ties: the faster, then the
smaller), which is always on the front.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.artifacts import check_outputs, write_json
from pipeline.config import to_dict
from pipeline.errors import NothingFits, UsageError
from pipeline.formats.bench_report import read_bench_report

ENGINES = {"run": "onnxruntime", "iobinding": "iobinding"}
LATENCIES = ("p50", "p90", "p99", "p999")


def _run(entry: dict, threads: int) -> dict | None:
    return next((r for r in entry["runs"] if r["threads"] == threads and r["batch"] == 1), None)


def candidates(report: dict, engine: str = "iobinding", threads: int = 1, latency: str = "p50") -> list[dict]:
    """The report's candidates through ``engine`` at ``threads`` (module docstring), in report order;
    UsageError when the report holds no such timing."""
    if engine not in ENGINES or latency not in LATENCIES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)} and latency one of {', '.join(LATENCIES)}")
    models = report["models"]
    out = []
    for name, e in models.items():
        if e["engine"] != ENGINES[engine]:
            continue
        base_name = e.get("same_model_as", name)
        base = models.get(base_name, {})
        r = _run(e, threads)
        if "test_accuracy" not in base or "size_bytes" not in base or r is None:
            continue
        out.append({"name": base_name, "path": base["path"], "test_accuracy": base["test_accuracy"],
                    "val_accuracy": base.get("val_accuracy"),
                    "agreement_with_teacher": base["agreement_with_teacher"], "latency_us": r["steady"][latency],
                    "latency_valid": bool(r["steady"]["valid"]), "size_bytes": base["size_bytes"],
                    "parameters": base["parameters"], "macs_per_image": base.get("macs_per_image"),
                    "input_dtype": base["input_dtype"]})
    ranked_on = "val" if all(c["val_accuracy"] is not None for c in out) else "test"  # one split for all
    for c in out:
        c.update(ranked_on=ranked_on, accuracy=c[f"{ranked_on}_accuracy"])
    if not out:
        have = sorted({(r["threads"], e["engine"]) for e in models.values() for r in e["runs"] if r["batch"] == 1})
        raise UsageError(f"the report has no batch-1 {engine} timing of a scored model at {threads} thread(s); "
                         f"it has (threads, engine) {have}")
    return out


def dominates(a: dict, b: dict) -> bool:
    """``a`` at least as accurate, fast and small as ``b``, and strictly better in one."""
    ge = (a["accuracy"] >= b["accuracy"], a["latency_us"] <= b["latency_us"], a["size_bytes"] <= b["size_bytes"])
    gt = (a["accuracy"] > b["accuracy"], a["latency_us"] < b["latency_us"], a["size_bytes"] < b["size_bytes"])
    return all(ge) and any(gt)


def pareto(cands: list[dict]) -> list[str]:
    """Names of the Pareto-optimal candidates, fastest first."""
    front = [c for c in cands if not any(dominates(o, c) for o in cands if o is not c)]
    return [c["name"] for c in sorted(front, key=lambda c: (c["latency_us"], c["size_bytes"]))]


def fronts(report: dict, latency: str = "p50") -> list[dict]:
    """The Pareto front for every (thread count, call path) the report timed at batch 1."""
    out = []
    for threads in report["threads_resolved"]:
        for engine in ENGINES:
            try:
                cands = candidates(report, engine, threads, latency)
            except UsageError:
                continue  # e.g. a bench run with --no-iobinding
            out.append({"threads": threads, "engine": engine, "latency": latency, "models": pareto(cands)})
    return out


_SPLIT = {"val": "the validation split", "test": "the test split (a report without validation scores)"}


def _limits(max_latency_us: float, max_size_kib: float) -> str:
    parts = [f"{max_latency_us:g} us" if max_latency_us else "", f"{max_size_kib:g} KiB" if max_size_kib else ""]
    return " and ".join(p for p in parts if p) or "no budget"


def pick(report: dict, max_latency_us: float = 0.0, max_size_kib: float = 0.0, engine: str = "iobinding",
         threads: int = 1, latency: str = "p50", min_agreement: float = 0.0, allow_noisy: bool = True) -> dict:
    """The most accurate candidate within the budgets (0: no limit) and why; NothingFits (exit 8)
    naming the nearest misses when none is."""
    cands = candidates(report, engine, threads, latency)
    front = set(pareto(cands))
    fits, left_out = [], []
    for c in cands:
        why = []
        if max_latency_us and c["latency_us"] > max_latency_us:
            why.append(f"{latency} {c['latency_us']:.1f} us > {max_latency_us:g}")
        if max_size_kib and c["size_bytes"] / 1024 > max_size_kib:
            why.append(f"{c['size_bytes'] / 1024:.1f} KiB > {max_size_kib:g}")
        if c["agreement_with_teacher"] < min_agreement:
            why.append(f"agrees with the teacher on {c['agreement_with_teacher']:.2%} < {min_agreement:.2%}")
        if not allow_noisy and not c["latency_valid"]:
            why.append("noisy timing")
        (left_out if why else fits).append({**c, **({"why_not": "; ".join(why)} if why else {})})
    where = f"{engine}, {threads} thread(s), batch 1"
    if not fits:
        fastest = min(cands, key=lambda c: c["latency_us"])
        smallest = min(cands, key=lambda c: c["size_bytes"])
        raise NothingFits(f"no model fits {_limits(max_latency_us, max_size_kib)} ({where}): the fastest, "
                          f"{fastest['name']}, takes {fastest['latency_us']:.1f} us {latency} at "
                          f"{fastest['size_bytes'] / 1024:.1f} KiB; the smallest, {smallest['name']}, is "
                          f"{smallest['size_bytes'] / 1024:.1f} KiB at {smallest['latency_us']:.1f} us")
    ranked = sorted(fits, key=lambda c: (-c["accuracy"], c["latency_us"], c["size_bytes"]))
    return {"choice": {**ranked[0], "pareto_optimal": ranked[0]["name"] in front}, "runners_up": ranked[1:],
            "left_out": left_out, "budget": {"max_latency_us": max_latency_us, "max_size_kib": max_size_kib,
                                            "min_agreement": min_agreement, "allow_noisy": allow_noisy},
            "engine": engine, "threads": threads, "latency": latency, "pareto_front": pareto(cands),
            "ranked_on": ranked[0]["ranked_on"],
            "summary": f"the most accurate on {_SPLIT[ranked[0]['ranked_on']]} of {len(fits)} of {len(cands)} "
                       "models within "
                       f"{_limits(max_latency_us, max_size_kib)} ({where})"}


def describe(decision: dict) -> list[str]:
    """The decision as lines for a terminal: the choice, why, the runner-up, what was left out."""
    c, lat = decision["choice"], decision["latency"]
    macs = f", {c['macs_per_image']:,} MACs/image" if c.get("macs_per_image") is not None else ""
    lines = [f"pick: {c['name']}  ({c['path']})",
             f"  test accuracy {c['test_accuracy']:.2%}"
             + (f" (validation {c['val_accuracy']:.2%})" if c.get("val_accuracy") is not None else "")
             + f", agrees with the teacher on {c['agreement_with_teacher']:.2%}, "
             f"{lat} {c['latency_us']:.1f} us{'' if c['latency_valid'] else ' (noisy)'}, "
             f"{c['size_bytes'] / 1024:.1f} KiB, {c['parameters']:,} weights{macs}, input {c['input_dtype']}",
             f"  why: {decision['summary']}" + ("; Pareto-optimal" if c["pareto_optimal"] else "")]
    if decision["runners_up"]:
        r = decision["runners_up"][0]
        lines.append(f"  runner-up: {r['name']} {r['test_accuracy']:.2%} at {r['latency_us']:.1f} us, "
                     f"{r['size_bytes'] / 1024:.1f} KiB")
    lines += [f"  left out: {m['name']} ({m['why_not']})" for m in decision["left_out"]]
    return lines


def pick_model(cfg, report: Path, out: Path | None = None, echo: Callable[[str], None] = print) -> dict:
    """``distill bench pick``: :func:`pick` on the bench report at ``report`` under the budgets of
    ``cfg`` (a :class:`~stages.bench.settings.PickConfig`), the decision told line by line through
    ``echo`` (:func:`describe`) and, with ``out``, written there as JSON with the report's path."""
    check_outputs({"--report": report}, {"--out": out})
    decision = pick(read_bench_report(report), **to_dict(cfg))
    for line in describe(decision):
        echo(line)
    if out is not None:
        write_json(out, {"report": str(report), **decision})
    return decision
