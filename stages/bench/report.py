"""The bench stage's outputs: CSV of every timed run, Markdown report, PNG plots, slim JSON.

Pure functions of the report dict built by :func:`stages.bench.stage.benchmark`; nothing here measures.
Latency figures are microseconds; throughput is rows per second at the median latency.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from pipeline.artifacts import OutputSet, output, publish_together, write_text
from pipeline.formats.bench_report import write_bench_report
from pipeline.formats.onnx_model import InputContract


def publish(report: dict, out: Path, markdown: Path, csv_path: Path, accuracy_png: Path | None = None,
            throughput_png: Path | None = None) -> None:
    """Write the bench's files as one set (:func:`pipeline.artifacts.publish_together`): the ``kd-bench/1``
    JSON, the CSV of every timed run, the plots whose paths are given and the Markdown, make's target,
    renamed into place last.  A run that fails on the way (a full disk: exit 7) publishes none of them
    and leaves the previous ones whole; make then has a reason to run the bench again."""
    with publish_together(markdown) as s:
        write_csv(csv_path, report["models"], into=s)
        if accuracy_png is not None:
            plot_accuracy_latency(report, accuracy_png, into=s)
        if throughput_png is not None:
            plot_throughput(report, throughput_png, into=s)
        write_bench_report(out, strip_latencies(report), into=s)
        write_text(markdown, render_markdown(report, plots=[p for p in (accuracy_png, throughput_png) if p]), into=s)


def strip_latencies(report: dict) -> dict:
    """The JSON keeps summaries; every timed run goes to the CSV instead."""
    drop = ("latencies_s", "trial_latencies_s")
    slim = {k: v for k, v in report.items() if k != "models"}
    slim["models"] = {n: {**e, "runs": [{k: v for k, v in r.items() if k not in drop} for r in e["runs"]]}
                      for n, e in report["models"].items()}
    return slim


def write_csv(path: Path, results: dict, into: OutputSet | None = None) -> None:
    """One row per timed run of every trial: model, engine, threads, batch, trial, run, latency_us."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "engine", "threads", "batch", "trial", "run", "latency_us"])
    for name, entry in results.items():
        for r in entry["runs"]:
            trials = r.get("trial_latencies_s") or [r["latencies_s"]]
            for t, lats in enumerate(trials):
                for i, lat in enumerate(lats):
                    w.writerow([name, entry.get("engine", "onnxruntime"), r["threads"], r["batch"], t, i,
                                f"{lat * 1e6:.3f}"])
    write_text(path, buf.getvalue(), into)


def floor_name(dtype: str, engine: str) -> str:
    """The Identity floor a model of input ``dtype`` timed through ``engine`` is compared with."""
    return "identity-floor" + ("-uint8" if dtype == "uint8" else "") + ("-iobinding" if engine == "iobinding" else "")


def run_of(entry: dict, threads: int, batch: int) -> dict | None:
    return next((r for r in entry["runs"] if r["threads"] == threads and r["batch"] == batch), None)


def _fmt(x, spec: str = ".1f", missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _contract_lines(models: dict) -> list[str]:
    """The teacher's input contract, as ``--teacher`` would declare it, and where its fields came from."""
    out = []
    for name, e in models.items():
        if "input_contract" in e:
            c = e["input_contract"]
            sources = ", ".join(f"{k}: {v}" for k, v in c["sources"].items())
            out.append(f"The teacher `{name}` is fed as `{InputContract.from_dict(c['input']).spec()}` ({sources}).\n")
    return out


def render_markdown(report: dict, plots: list | None = None) -> str:
    cfg, threads = report["settings"], report["threads_resolved"]
    models, big = report["models"], max(cfg["batches"])
    lines = ["# Edge benchmark\n",
             f"Provider {cfg['provider']}; each (model, engine, threads, batch) in a fresh process; median of "
             f"{cfg['trials']} trials of at least {cfg['min_count']} runs and {cfg['min_s']} s after "
             f"{cfg['warmup_count']} runs / {cfg['warmup_s']} s of warm-up; inputs cycled from 1024 real test rows. "
             f"Times in microseconds. *x floor* is p50 over the Identity model's p50 (the cost of one `run()` "
             f"through the same call, on the same input type: uint8 for a model that takes raw pixels). "
             f"`-iobinding` rows call `run_with_iobinding` on one input and the outputs bound once, the next "
             f"row copied into the bound input before each run's clock starts (the C/C++ API's per-run cost, "
             f"as onnxruntime_perf_test measures); the others call `session.run` with numpy arrays (what a "
             f"Python caller pays). "
             f"A result is *noisy* when the trials' p50s spread more than {cfg['max_spread']:.0%}.\n",
             *_contract_lines(models),
             "## Models\n", "| model | engine | weights (rank >= 2) | MACs / image | size KiB (files) | test acc | "
             "agrees w/ teacher |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, e in models.items():
        if "size_bytes" not in e:
            continue
        files = ", ".join(f"{k} {v / 1024:.1f}" for k, v in e["files"].items())
        lines.append(f"| {name} | {e['engine']} | {e['parameters']:,} | {_fmt(e.get('macs_per_image'), ',')} | "
                     f"{e['size_bytes'] / 1024:.1f} ({files}) | "
                     f"{e['test_accuracy'] * 100:.2f}% | {e['agreement_with_teacher'] * 100:.2f}% |")
    lines += choice_section(report)
    lines += ["\n## Latency at batch 1\n",
              "| model | threads | p50 | p90 | p99 | p99.9 | max | x floor | load ms | first run us | "
              "RSS +MiB (session) | peak RSS MiB | valid |", "|---|---:|" + "---:|" * 10 + "---|"]
    notes = []
    for t in threads:
        for name, e in models.items():
            floor = models.get(floor_name(e.get("input_dtype", "float32"), e["engine"]))
            f1 = run_of(floor, t, 1) if floor else None
            r = run_of(e, t, 1)
            if r is None:
                continue
            s = r["steady"]
            ratio = s["p50"] / f1["steady"]["p50"] if f1 else None
            lines.append(f"| {name} | {t} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} | {s['p999']:.1f} | "
                         f"{s['max']:.0f} | {_fmt(ratio, '.2f')} | {r['load']['session_create_s'] * 1e3:.1f} | "
                         f"{r['first_run_s'] * 1e6:.0f} | {_fmt(r['load']['rss_added_mb'])} | "
                         f"{_fmt(r['peak_rss_mb'])} | {'yes' if s['valid'] else 'noisy'} |")
    for name, e in models.items():
        for r in e["runs"]:
            if not r["steady"]["valid"]:
                notes.append(f"- {name}, threads {r['threads']}, batch {r['batch']}: {r['steady']['reason']}")
    lines += ["\n## Throughput (rows/s) across batch sizes\n",
              "| model | threads | " + " | ".join(f"batch {b}" for b in cfg["batches"]) + " |",
              "|---|---:|" + "---:|" * len(cfg["batches"])]
    for t in threads:
        for name, e in models.items():
            if e["engine"] == "iobinding":
                continue  # timed at batch 1 only
            cells = [run_of(e, t, b) for b in cfg["batches"]]
            lines.append(f"| {name} | {t} | " + " | ".join(
                f"{r['steady']['throughput_rows_s']:,.0f}" if r else "-" for r in cells) + " |")
    if notes:
        lines += ["\n## Noisy results (reported, not dropped)\n", *notes]
    if plots:
        lines += ["\n## Plots\n", *[f"![{Path(p).stem}]({os.path.basename(p)})" for p in plots]]
    env = report["environment"]
    lines.append(f"\n## Environment\n\n{env['cpu']}, {env['cores']} cores ({env.get('affinity_cores')} usable); "
                 f"SIMD {' '.join(env.get('simd', [])) or '-'}; "
                 + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; git {env['git']}. "
                 f"Throughput is at batch {big} in the JSON summary; every timed run is in the CSV.\n")
    return "\n".join(lines) + "\n"


def _floor_p50(models: dict, dtype: str, engine: str, threads: int) -> float | None:
    floor = models.get(floor_name(dtype, "iobinding" if engine == "iobinding" else "onnxruntime"))
    r = run_of(floor, threads, 1) if floor else None
    return r["steady"]["p50"] if r else None


def choice_section(report: dict) -> list[str]:
    """Accuracy, agreement, MACs, size and batch-1 p50 (both call paths, and as a multiple of their
    Identity floors) of every scored ONNX model side by side, Pareto-optimal ones marked."""
    from pipeline.errors import UsageError
    from stages.bench import choice

    models = report["models"]
    fronts = {(f["threads"], f["engine"]): set(f["models"]) for f in report.get("pareto") or choice.fronts(report)}
    lines = ["\n## Choosing an edge model (batch 1)\n",
             "Pareto-optimal: no other model is at least as accurate (on the validation split, so that the test "
             "accuracy reported is not that of a model picked on it), as fast (p50) and as small, and strictly "
             "better in one; marked per call path. `distill bench pick --report <this JSON> --max-latency-us N "
             "--max-size-kib N` picks the most accurate model within a budget, on the same split.\n",
             "| model | threads | test acc | val acc | agrees w/ teacher | MACs / image | KiB | "
             "p50 `run` us (x floor) | p50 IOBinding us (x floor) | Pareto `run` | Pareto IOBinding |",
             "|---|---:|" + "---:|" * 7 + "---|---|"]
    for t in report["threads_resolved"]:
        per = {}
        for engine in choice.ENGINES:
            try:
                per[engine] = {c["name"]: c for c in choice.candidates(report, engine, t)}
            except UsageError:  # a call path this run did not time (--no-iobinding)
                per[engine] = {}
        for name in dict.fromkeys([*per["run"], *per["iobinding"]]):
            e = models[name]
            cells = []
            for engine in choice.ENGINES:
                c = per[engine].get(name)
                floor = _floor_p50(models, e["input_dtype"], engine, t)
                cells.append("-" if c is None
                             else f"{c['latency_us']:.1f} ({_fmt(floor and c['latency_us'] / floor, '.2f')})")
            marks = ["yes" if name in fronts.get((t, engine), ()) else "-" for engine in choice.ENGINES]
            val = "-" if e.get("val_accuracy") is None else f"{e['val_accuracy'] * 100:.2f}%"
            lines.append(f"| {name} | {t} | {e['test_accuracy'] * 100:.2f}% | {val} | "
                         f"{e['agreement_with_teacher'] * 100:.2f}% | {_fmt(e.get('macs_per_image'), ',')} | "
                         f"{e['size_bytes'] / 1024:.1f} | {cells[0]} | {cells[1]} | {marks[0]} | {marks[1]} |")
    return lines


def _save(fig, path: Path, into: OutputSet | None = None) -> None:
    with output(Path(path), into) as part:
        fig.savefig(part, format="png", dpi=120, bbox_inches="tight")


def plot_accuracy_latency(report: dict, path: Path, into: OutputSet | None = None) -> Path:
    """Test accuracy against p50 latency at batch 1 (first thread count), one point per candidate;
    the Pareto-optimal ones (``session.run``, accuracy / latency / size) ringed in black."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report["threads_resolved"][0]
    front = next((set(f["models"]) for f in report.get("pareto", []) if f["threads"] == t and f["engine"] == "run"),
                 set())
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, e) in enumerate(report["models"].items()):
        r = run_of(e, t, 1)
        if r is None or "test_accuracy" not in e:
            continue
        ax.scatter(r["steady"]["p50"], e["test_accuracy"] * 100, marker="s" if e["engine"] == "torch" else "o",
                   edgecolors="black" if name in front else "none", linewidths=1.5)  # ringed: Pareto-optimal
        ax.annotate(name, (r["steady"]["p50"], e["test_accuracy"] * 100), fontsize=8,
                    xytext=(4, 3 - 10 * (i % 3)), textcoords="offset points")  # stagger: students often coincide
    floor = report["models"].get("identity-floor")
    if floor and run_of(floor, t, 1):
        ax.axvline(run_of(floor, t, 1)["steady"]["p50"], ls=":", c="grey", label="Identity floor")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel=f"p50 latency, batch 1, {t} thread(s) (us, log)", ylabel="test accuracy (%)",
           title="Accuracy against latency (ringed: Pareto-optimal)")
    ax.grid(alpha=0.3)
    _save(fig, path, into)
    plt.close(fig)
    return Path(path)


def plot_throughput(report: dict, path: Path, into: OutputSet | None = None) -> Path:
    """Throughput (rows/s) against batch size, one line per (model, threads)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    names = [n for n, e in report["models"].items() if e["engine"] != "iobinding"]
    colours = dict(zip(names, plt.get_cmap("tab20" if len(names) > 10 else "tab10").colors))  # one per model
    styles = ["-", "--", ":", "-."]  # one per thread count
    for i, t in enumerate(report["threads_resolved"]):
        for name in names:
            runs = report["models"][name]["runs"]
            pts = sorted((r["batch"], r["steady"]["throughput_rows_s"]) for r in runs if r["threads"] == t)
            if pts:
                ax.plot(*zip(*pts), marker="o", ls=styles[i % len(styles)], color=colours[name],
                        label=f"{name} ({t}t)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="batch size", ylabel="rows / s (log)", title="Throughput against batch size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: lines stay readable
    _save(fig, path, into)
    plt.close(fig)
    return Path(path)
