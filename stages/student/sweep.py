"""Sweeps: many students from ONE soft-target cache, in parallel processes, summarised over seeds.

The grid is student sizes x seeds x (the hard-label baseline, alpha = 0, plus every temperature x
every alpha > 0).  The baseline is always part of the grid: a distilled student means nothing
without the hard-label student of the same size and seed.  Each job is :func:`distill_student` in a
fresh *spawned* process (fork would copy h5py handles and torch's thread pool, neither fork-safe)
with one torch thread: on 2 shared cores one thread trains a small MLP fastest, and N jobs of one
thread use N cores without oversubscription.

Summaries (Hinton, Vinyals & Dean 2015 report the same for MNIST): per (size, T, alpha) the mean and
sample standard deviation over seeds of validation and test accuracy; per size the configuration
chosen on *validation* accuracy, its test accuracy, and the fraction of the teacher-vs-hard gap it
closes, ``(acc_kd - acc_hard) / (acc_teacher - acc_hard)``, when a teacher is given.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from pipeline import inference, provenance, runtime
from pipeline.artifacts import OutputSet, check_outputs, claim, output, publish_together, write_json, write_text
from pipeline.config import to_dict
from pipeline.errors import DataError, IntegrityError, Interrupted, ResourceError, UsageError
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.student.settings import StudentConfig, SweepConfig
from stages.student.stage import distill_student

FIELDS = ("arch", "temperature", "alpha", "seed", "views_used", "epochs", "val_accuracy", "test_accuracy",
          "test_accuracy_last_epoch", "best_epoch", "train_rows", "parameters", "train_seconds", "checkpoint")


def job_name(cfg: StudentConfig) -> str:
    arch = cfg.arch.replace(":", "-").replace("=", "")
    extra = "".join(part for part, on in ((f"-f{cfg.train_fraction:g}", cfg.train_fraction < 1),
                                          (f"-drop{cfg.drop_class}", cfg.drop_class >= 0),
                                          (f"-wd{cfg.weight_decay:g}", cfg.weight_decay > 0),
                                          (f"-mix{cfg.mixup:g}", cfg.mixup > 0)) if on)
    soft = "hard" if cfg.alpha == 0 else f"T{cfg.temperature:g}-a{cfg.alpha:g}"
    views = f"-k{cfg.views_used}-e{cfg.epochs}" if cfg.views_used else ""
    return f"{arch}{extra}{views}-{soft}-s{cfg.seed}"


def _init_worker() -> None:
    # Ctrl-C reaches the whole foreground process group: the parent alone answers it (one line) and
    # ends the workers; each would otherwise print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runtime.die_with_parent()  # a killed sweep must not leave students training (and writing) on
    runtime.set_torch_threads(1)


def _job(cfg: StudentConfig, cache: Path, transfer_set: Path, out: Path) -> dict:
    distill_student(cfg, cache, transfer_set, out, out.with_suffix(".metrics.json"), log=lambda m: None)
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    row = {k: m.get(k) for k in FIELDS}
    row.update(arch=cfg.arch, views_used=cfg.views_used, epochs=cfg.epochs,
               temperature=cfg.temperature if cfg.alpha > 0 else "", alpha=cfg.alpha,
               seed=cfg.seed, checkpoint=str(out))
    return row


def _same_student(settings: dict, cfg: StudentConfig) -> bool:
    """Whether a trained student's ``settings`` are ``cfg``'s; a hard-label student (alpha 0) never
    reads T, so its T may differ (each sweep stamps its own first temperature on the baseline)."""
    mine = to_dict(cfg)
    if cfg.alpha == 0:
        settings, mine = ({k: v for k, v in d.items() if k != "temperature"} for d in (settings, mine))
    return settings == mine


def run_students(configs: list[StudentConfig], cache: Path, transfer_set: Path, work_dir: Path, jobs: int,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Train every config (``jobs`` spawned processes at once) into ``work_dir``; rows in config order.

    A student already in ``work_dir`` with the same settings and cache is reused: an interrupted
    sweep resumes instead of starting over.
    """
    if work_dir.exists() and not work_dir.is_dir():
        raise UsageError(f"--work-dir {work_dir} is a file; give a folder for the students")
    outs = [work_dir / f"{job_name(cfg)}.ckpt" for cfg in configs]
    check_outputs({"--cache": cache, "--transfer-set": transfer_set},
                  {f"student {out.name}": p for out in outs for p in (out, out.with_suffix(".metrics.json"))})
    work_dir.mkdir(parents=True, exist_ok=True)
    cache_sha = provenance.sha256_file(cache)
    rows: list[dict | None] = [None] * len(configs)
    todo = []
    for i, (cfg, out) in enumerate(zip(configs, outs)):
        m = _trained(cfg, out, cache_sha, log)
        if m is not None:
            rows[i] = {**{k: m.get(k) for k in FIELDS}, "arch": cfg.arch, "alpha": cfg.alpha, "seed": cfg.seed,
                       "views_used": cfg.views_used, "epochs": cfg.epochs,
                       "temperature": cfg.temperature if cfg.alpha > 0 else "", "checkpoint": str(out)}
        else:
            todo.append((i, cfg, out))
    log(f"sweep: {len(configs)} students, {len(configs) - len(todo)} already trained, {jobs} at a time")
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker)
    done = 0
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # workers spawned now inherit "ignore"
        try:
            futures = {pool.submit(_job, cfg, cache, transfer_set, out): i for i, cfg, out in todo}
        finally:
            signal.signal(signal.SIGINT, previous)
        for fut in cf.as_completed(futures):
            try:
                rows[futures[fut]] = row = fut.result()
            except BrokenProcessPool:
                raise ResourceError(
                    f"sweep: a worker process died (killed by a signal: most often the kernel's out-of-memory "
                    f"killer); {done} of {len(todo)} students of this run finished and are kept in {work_dir}, a "
                    f"rerun resumes after them; lower --jobs (now {jobs}) so that fewer students train at once"
                ) from None
            done += 1
            log(f"  [{done}/{len(todo)}] {Path(row['checkpoint']).stem}: test {row['test_accuracy']:.4f}")
    except KeyboardInterrupt:
        _stop(pool)
        raise Interrupted(f"sweep interrupted: {done} of {len(todo)} students trained in this run are kept in "
                          f"{work_dir}; the students in training were stopped, and a rerun trains them") \
            from None
    except BaseException:  # a PipelineError, or a resource fault the command line words (exit 7)
        _stop(pool)
        raise
    pool.shutdown()
    return rows  # type: ignore[return-value]


def _stop(pool: cf.ProcessPoolExecutor) -> None:
    """End a pool now: nothing queued starts, the running workers are terminated (each leaves at most an
    empty, unlocked ``.partial``: its student is published as one set, or not at all)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API ends running jobs
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    for p in processes:
        p.join()


def _trained(cfg: StudentConfig, out: Path, cache_sha: str, log: Callable[[str], None]) -> dict | None:
    """The metrics of a student already trained at ``out`` with ``cfg`` from this cache, else None.

    Trusted only when they describe that very checkpoint (its sha256 is the metrics'
    ``checkpoint_sha256``): metrics beside another checkpoint (one killed between its two files,
    copied in, or edited) mean retraining it, which the log says.
    """
    metrics = out.with_suffix(".metrics.json")
    if not (out.is_file() and metrics.is_file()):
        return None
    try:
        m = json.loads(metrics.read_text())
        same = _same_student(m["settings"], cfg) and m["provenance"]["inputs"]["cache"]["sha256"] == cache_sha
        recorded = m.get("checkpoint_sha256")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"{metrics}: unreadable ({type(e).__name__}); retraining {out.stem}")
        return None
    if not same:
        return None
    try:
        provenance.check_lineage(out, recorded, f"the metrics {metrics.name}", "the sweep again")
    except IntegrityError as e:
        log(f"{e}; retraining {out.stem}")
        return None
    return m


def teacher_test_accuracy(teacher: Path, cache: Path, transfer_set: Path) -> float:
    """Test accuracy of the ensemble the cache was built from (argmax of the arithmetic mean at T=1)."""
    if not teacher.is_file():
        raise DataError(f"{teacher}: teacher ONNX not found (the ensemble the cache was built from)")
    c = open_cache(cache)
    if provenance.sha256_file(teacher) not in c.teacher_sha256:
        raise IntegrityError(f"{teacher}: not the teacher the cache {cache} was built from; rebuild with `make cache`")
    x, y = open_prepared(transfer_set).load("test")
    return float(np.mean(inference.predict_proba(teacher, x, threads=1).argmax(1) == y))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seeds per (arch, views used, epochs, T, alpha), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["arch"], r.get("views_used", 0), r.get("epochs"), r["temperature"], r["alpha"])
        groups.setdefault(key, []).append(r)
    out = []
    for (arch, used, epochs, T, alpha), rs in groups.items():
        s = {"arch": arch, "views_used": used, "epochs": epochs, "temperature": T, "alpha": alpha, "n": len(rs)}
        for k in ("val_accuracy", "test_accuracy", "test_accuracy_last_epoch"):
            v = np.array([r[k] for r in rs], dtype=np.float64)
            s[k] = float(v.mean())
            s[k + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(s)
    return out


def _student(s: dict) -> tuple:
    return s["arch"], s.get("views_used", 0), s.get("epochs")


def best_per_arch(summary: list[dict], teacher_acc: float | None) -> list[dict]:
    """Per student (size, views used, epochs): the hard baseline, the distilled config with the best mean
    *validation* accuracy (selection never looks at test), its test accuracy and the gap it closes."""
    out = []
    for key in dict.fromkeys(_student(s) for s in summary):
        hard = next(s for s in summary if _student(s) == key and s["alpha"] == 0)
        soft = [s for s in summary if _student(s) == key and s["alpha"] > 0]
        if not soft:
            continue
        best = max(soft, key=lambda s: s["val_accuracy"])
        gap = None if teacher_acc is None else teacher_acc - hard["test_accuracy"]
        out.append({"arch": key[0], "views_used": key[1], "epochs": key[2], "hard": hard, "best": best,
                    "gain": best["test_accuracy"] - hard["test_accuracy"],
                    "gap_closed": None if not gap else (best["test_accuracy"] - hard["test_accuracy"]) / gap})
    return out


def _name(s: dict) -> str:
    """The student as a table names it: its arch, and K' views over E epochs when from a views cache."""
    return s["arch"] + (f" (K'={s['views_used']}, {s['epochs']} ep.)" if s.get("views_used") else "")


def _pm(s: dict, k: str) -> str:
    return f"{100 * s[k]:.2f} ± {100 * s[k + '_std']:.2f}"


def markdown(summary: list[dict], best: list[dict], teacher_acc: float | None, title: str) -> str:
    lines = [f"### {title}", "", "Test accuracy (%), mean ± sample standard deviation over seeds; the epoch of "
             "each student is chosen on validation accuracy.", ""]
    if teacher_acc is not None:
        lines += [f"Teacher ensemble: {100 * teacher_acc:.2f}% test accuracy.", ""]
    lines += ["| student | T | alpha | seeds | val | test | test, last epoch |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        T = "hard" if s["alpha"] == 0 else f"{s['temperature']:g}"
        lines.append(f"| {_name(s)} | {T} | {s['alpha']:g} | {s['n']} | {_pm(s, 'val_accuracy')} | "
                     f"{_pm(s, 'test_accuracy')} | {_pm(s, 'test_accuracy_last_epoch')} |")
    lines += ["", "Best distilled configuration per size, chosen on validation accuracy:", "",
              "| student | hard labels | best (T, alpha) | its test | gain | gain / spread | gap closed |",
              "|---|---|---|---|---|---|---|"]
    for b in best:
        spread = max(b["hard"]["test_accuracy_std"], b["best"]["test_accuracy_std"])
        ratio = f"{b['gain'] / spread:.1f}" if spread > 0 else "n/a"
        closed = "n/a" if b["gap_closed"] is None else f"{100 * b['gap_closed']:.0f}%"
        lines.append(f"| {_name(b)} | {_pm(b['hard'], 'test_accuracy')} | T={b['best']['temperature']:g}, "
                     f"alpha={b['best']['alpha']:g} | {_pm(b['best'], 'test_accuracy')} | "
                     f"{100 * b['gain']:+.2f} | {ratio} | {closed} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, teacher_acc: float | None, into: OutputSet | None = None) -> None:
    """Test accuracy against T (log axis), one line per (size, alpha), the hard baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ci, arch in enumerate(dict.fromkeys(_name(s) for s in summary)):  # a student: size (and views)
        color = f"C{ci % 10}"
        hard = [s for s in summary if _name(s) == arch and s["alpha"] == 0]
        if hard:
            ax.axhline(100 * hard[0]["test_accuracy"], color=color, ls="--", lw=1, label=f"{arch} hard labels")
        for ai, alpha in enumerate(sorted({s["alpha"] for s in summary if _name(s) == arch and s["alpha"] > 0})):
            pts = sorted(((s["temperature"], s) for s in summary if _name(s) == arch and s["alpha"] == alpha),
                         key=lambda ts: ts[0])
            ax.errorbar([t for t, _ in pts], [100 * s["test_accuracy"] for _, s in pts],
                        yerr=[100 * s["test_accuracy_std"] for _, s in pts], color=color, marker="os^v"[ai % 4],
                        ls="-" if ai == 0 else ":", capsize=3, label=f"{arch} alpha={alpha:g}")
    if teacher_acc is not None:
        ax.axhline(100 * teacher_acc, color="k", lw=1, label="teacher ensemble")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with output(path, into) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path, into: OutputSet | None = None) -> None:
    with output(path, into) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)


def run_sweep(cfg: SweepConfig, cache: Path, transfer_set: Path, work_dir: Path, csv_path: Path, md_path: Path,
          png_path: Path, teacher: Path | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the grid of ``cfg`` and write the CSV, the Markdown table, the plot and ``<csv>.json``, published
    as one set (the CSV last)."""
    check_outputs({"--cache": cache, "--transfer-set": transfer_set, "--teacher": teacher},
                  {"--csv": csv_path, "--markdown": md_path, "--plot": png_path, "the summary": csv_path.with_suffix(
                      ".json")})
    claim(csv_path, md_path, png_path, csv_path.with_suffix(".json"))
    c = open_cache(cache)
    for T in cfg.temperatures:
        c.require_temperature(T)  # every temperature must be in the cache: fail before training anything
    # the teacher is scored first: a wrong --teacher fails now, not after hours of training
    teacher_acc = teacher_test_accuracy(teacher, cache, transfer_set) if teacher else None
    rows = run_students(cfg.students(), cache, transfer_set, work_dir, cfg.jobs, log)
    summary = summarise(rows)
    best = best_per_arch(summary, teacher_acc)
    inputs = {"cache": cache, "transfer_set": transfer_set, **({"teacher": teacher} if teacher else {})}
    with publish_together(csv_path) as s:
        write_text(md_path, markdown(summary, best, teacher_acc, "Sweep: temperature x alpha x student size"), into=s)
        plot(summary, png_path, teacher_acc, into=s)
        write_json(csv_path.with_suffix(".json"), {"provenance": provenance.record("sweep", to_dict(cfg), inputs),
                                                   "teacher_test_accuracy": teacher_acc, "summary": summary,
                                                   "best": best, "rows": rows}, into=s)
        write_csv(rows, csv_path, into=s)
    log(f"sweep: {len(rows)} students -> {csv_path}, {md_path}, {png_path}")
    return rows
