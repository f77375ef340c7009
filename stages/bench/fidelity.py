"""``distill bench-fidelity``: is the benchmark itself telling the truth?  Three ratios, one run.

1. Harness against a bare loop: the worker's p50 for the student (fresh process, per-run clock
   reads, pool cycling, trials) against ``timeit`` over ``session.run`` on the same batches, also in
   a fresh process.  Target: within ``max_harness_gap`` (10%).  A p50 and a timeit mean differ in
   definition; for a steady loop of microsecond runs they agree to a few percent, so a larger gap
   means the harness is measuring itself.
2. int8 student against the teacher ensemble, p50 at batch 1: target >= ``min_speedup`` (50x; a
   plain reference script got 126x against an MLP ensemble on this kind of machine, docs/design.md).
3. fp32 student against the Identity floor (the cost of one ``run()`` on the same input shape):
   target <= ``max_floor_ratio`` (2x).  Whatever the outcome, onnxruntime's own profiler
   (``SessionOptions.enable_profiling``) says where the student's time goes: the ``model_run`` span
   against the sum of kernel times per operator type; the rest of a Python-side p50 is the binding
   (feeds, output allocation, the GIL), which the floor measures.

All timings at batch 1 and ``threads`` threads, each configuration in a fresh process
(:func:`stages.bench.launcher.run_isolated`), the whole set repeated ``rounds`` times interleaved and
each p50 the median round's; ratios come from the same run, never across runs.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import contract as ct
from pipeline import feed, inference, provenance, resources
from pipeline.artifacts import check_outputs, claim, write_json
from pipeline.config import to_dict
from pipeline.formats.onnx_model import SOURCE_KEY, TRANSFER_KEY, check_onnx_file, input_dtype, read_metadata
from pipeline.formats.prepared import open_prepared
from stages.bench import launcher
from stages.bench.settings import FidelityConfig
from stages.bench.stage import environment


def profile(model: Path, pool: np.ndarray, threads: int, runs: int) -> dict:
    """onnxruntime's profiler over ``runs`` batch-1 runs: median ``model_run`` span and, per operator
    type, the sum over its nodes of each node's median kernel time, in microseconds (the trace's
    ``dur`` unit); the first tenth of the runs is left out."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = inference.session(model, "cpu", threads, profile_prefix=os.path.join(tmp, "prof"))
        name = sess.get_inputs()[0].name
        feeds = [{name: pool[i % len(pool)][None]} for i in range(min(runs, len(pool)))]
        for i in range(runs):
            sess.run(None, feeds[i % len(feeds)])
        events = json.loads(Path(sess.end_profiling()).read_text())
    skip = runs // 10  # the first runs allocate and page in: not the steady state
    spans = [e["dur"] for e in events if e.get("name") == "model_run"][skip:]
    per_node: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node[(e["name"], e["args"].get("op_name", "?"))].append(e["dur"])
    kernels: dict[str, float] = defaultdict(float)
    for (_, op), durs in per_node.items():  # median per node over the steady runs, summed per op type
        kernels[op] += float(statistics.median(durs[skip:] or durs))
    per_run = dict(sorted(kernels.items(), key=lambda kv: -kv[1]))
    run_us = float(statistics.median(spans)) if spans else float("nan")
    return {"model_run_p50_us": run_us, "kernel_us_per_run": per_run,
            "kernels_total_us": float(sum(per_run.values())),
            "inside_run_not_kernels_us": run_us - float(sum(per_run.values()))}


def _p50(cfg: FidelityConfig, model: Path, pool: Path, engine: str = "onnxruntime") -> dict:
    return launcher.run_isolated(model, pool, cfg.threads, 1, "cpu", engine=engine,
                                 warmup_count=cfg.warmup_count, warmup_s=cfg.warmup_s,
                                 min_count=cfg.min_count, min_s=cfg.min_s, trials=cfg.trials)


CALLS = {"run": ("onnxruntime", "timeit"), "iobinding": ("iobinding", "timeit-iobinding")}


def _ratios(p: dict[str, float], cfg: FidelityConfig) -> dict:
    """The three ratios of one call path from its p50s (microseconds), with verdicts."""
    gap = p["student"] / p["student-timeit"] - 1.0
    speedup = p["teacher"] / p["student-int8"]
    floor_ratio = p["student"] / p["identity-floor"]
    return {"harness_vs_timeit": {"gap": gap, "target": cfg.max_harness_gap, "ok": abs(gap) <= cfg.max_harness_gap},
            # no student can beat the floor: teacher / floor bounds any speedup measured through this call
            "int8_vs_teacher": {"speedup": speedup, "target": cfg.min_speedup, "ok": speedup >= cfg.min_speedup,
                                "ceiling_teacher_over_floor": p["teacher"] / p["identity-floor"]},
            "fp32_vs_floor": {"ratio": floor_ratio, "target": cfg.max_floor_ratio,
                              "ok": floor_ratio <= cfg.max_floor_ratio}}


def explain(pc: dict[str, float], prof: dict, student: Path, call: str) -> str:
    """Where the fp32 student's p50 goes beyond the floor of call path ``call`` (p50s ``pc``, us)."""
    import onnx

    sp, fp = prof["student"], prof["identity-floor"]
    weight_kib = sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(student)).graph.initializer) / 1024
    what = ("Python binding, feed and output handling" if call == "run"
            else "run_with_iobinding on bound OrtValues: the C API's per-run cost")
    return (f"fp32 student p50 {pc['student']:.2f} us = Identity floor {pc['identity-floor']:.2f} us "
            f"(one {call} call of the same input: {what}) + {pc['student'] - pc['identity-floor']:.2f} us. "
            f"onnxruntime's profiler puts the student's run at {sp['model_run_p50_us']:.1f} us (floor "
            f"{fp['model_run_p50_us']:.1f} us), of which kernels {sp['kernels_total_us']:.2f} us: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sp["kernel_us_per_run"].items())
            + f". The kernels stream {weight_kib:.0f} KiB of weights per batch-1 run (a matrix-vector "
            "product is bound by memory bandwidth, not arithmetic; int8 weights are a quarter of it)"
            " (the profiler records whole microseconds and adds its own overhead to the run span: "
            "read it as attribution, not as timing).")


def check_fidelity(cfg: FidelityConfig, teacher: str | Path, student: Path, student_int8: Path, prepared: Path,
                   out: Path, log: Callable[[str], None] = print) -> Path:
    """Measure the three ratios of the module docstring, through each call path of CALLS, and write
    them, verdicts included, to ``out``.  ``teacher`` is an ONNX file, optionally ``PATH:key=value,...``
    declaring its input contract (:mod:`pipeline.feed`): its timed rows are the test rows as it takes
    them (only their shape and type matter to a time, so no gate judges the contract here).  Every ONNX
    file is checked readable (exit 3) and each student's recorded transfer set must be ``prepared``
    (exit 4) before anything is timed."""
    check_outputs({"--teacher": ct.parse_teacher(teacher).path, "--student": student, "--student-int8": student_int8,
                   "--prepared": prepared}, {"--out": out})
    claim(out)
    info = open_prepared(prepared)
    xtest = info.load("test")[0][:1024]
    for path in (student, student_int8):  # a missing or unreadable file: one line, before any work
        check_onnx_file(Path(path))
        if TRANSFER_KEY in (meta := read_metadata(path)):
            provenance.check_lineage(prepared, [meta[TRANSFER_KEY], meta.get(SOURCE_KEY)],
                                     f"the student {path} (the transfer set of its checkpoint)", "make export")
    geom = ct.Geometry.of(info)
    raw = info.load_raw("test", 0, 1024)[0]
    plan = feed.open_model(teacher, geom, len(info.classes), "cpu")[1]
    teacher = plan.path
    with resources.temporary_folder() as tmp:  # a full TMPDIR is one line naming it (exit 7)
        pools = {"float32": Path(tmp) / "pool.npy", "uint8": Path(tmp) / "pixels.npy",
                 "teacher": Path(tmp) / "teacher.npy"}
        launcher.save_pool(pools["float32"], xtest)
        launcher.save_pool(pools["uint8"], raw)  # for a model taking raw pixels
        launcher.save_pool(pools["teacher"], ct.adapt(raw, plan.contract, geom))
        floor = launcher.write_identity_model(Path(tmp) / "identity.onnx", info.shape)
        rounds: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for i in range(cfg.rounds):
            for call, (engine, reference) in CALLS.items():
                for name, path, eng in [("student", student, engine), ("student-timeit", student, reference),
                                        ("student-int8", student_int8, engine), ("teacher", teacher, engine),
                                        ("identity-floor", floor, engine)]:
                    log(f"fidelity: round {i + 1}/{cfg.rounds}, timing {name} through {call}")
                    r = _p50(cfg, path, pools["teacher" if name == "teacher" else input_dtype(path)], eng)
                    rounds[call, name].append({k: v for k, v in r.items()
                                               if k not in ("latencies_s", "trial_latencies_s")})
        runs: dict[str, dict] = {call: {} for call in CALLS}
        for (call, name), results in rounds.items():  # the median round, with every round's p50
            p50s = [r["steady"]["p50"] for r in results]
            runs[call][name] = {**results[int(np.argsort(p50s)[(len(p50s) - 1) // 2])], "round_p50s": p50s}
        prof = {"student": profile(student, xtest, cfg.threads, cfg.profile_runs),
                "identity-floor": profile(floor, xtest, cfg.threads, cfg.profile_runs)}
    p = {call: {k: v["steady"]["p50"] for k, v in r.items()} for call, r in runs.items()}
    verdicts = {call: _ratios(pc, cfg) for call, pc in p.items()}
    for call, v in verdicts.items():
        v["fp32_vs_floor"]["explanation"] = explain(p[call], prof, student, call)
    result = {
        "settings": to_dict(cfg), "p50_us": p, "runs": runs, "profile": prof, "calls": verdicts,
        "student_int8_input": input_dtype(student_int8),  # uint8: the raw-pixel edge export
        "teacher_input_contract": plan.record(),
        "environment": environment(),
        "provenance": provenance.record("bench-fidelity", to_dict(cfg), {
            "teacher": teacher, "student": student, "student_int8": student_int8, "prepared": prepared}),
    }
    write_json(out, result)
    for call, v in verdicts.items():
        log(f"fidelity ({call}): harness {p[call]['student']:.2f} us vs timeit {p[call]['student-timeit']:.2f} us "
            f"({v['harness_vs_timeit']['gap']:+.1%}); int8 {v['int8_vs_teacher']['speedup']:.1f}x faster than "
            f"the teacher; fp32 {v['fp32_vs_floor']['ratio']:.2f}x the Identity floor")
    log(f"fidelity -> {out}")
    return out
