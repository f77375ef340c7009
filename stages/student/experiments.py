"""The paper's transfer-set experiments, from one cache (Hinton, Vinyals & Dean 2015, sections 3, 4.3).

``small-transfer`` (soft targets as a regulariser): students trained on a seeded ``train_fraction``
(3%) of the transfer rows, hard labels against soft targets, each scored with the epoch chosen on
validation (early stopping) and with the last epoch's weights (none).  Hinton: with 3% of the data
hard targets overfit while soft targets reach nearly the full-data result.

``omitted-class``: the rows of one class (``drop_class``; Hinton left out the digit 3) are removed
from the transfer set; the student's errors on that class's test rows are counted before and after
adding one scalar ``b`` to that class's output bias, ``b`` fitted on the validation split (which
keeps the class).  :func:`fit_bias` finds the exact maximiser of validation accuracy over b.

The T-against-size experiment is a sweep (:mod:`stages.student.sweep`) over temperatures and sizes.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline import models, provenance
from pipeline.artifacts import check_outputs, claim, publish_together, write_json, write_text
from pipeline.config import to_dict
from pipeline.formats.prepared import open_prepared
from stages.student.settings import ExperimentConfig
from stages.student.sweep import run_students, summarise


def fit_bias(logits: np.ndarray, y: np.ndarray, c: int) -> float:
    """The shift b of class ``c``'s logit that maximises accuracy on (logits, y); ties -> smallest |b|.

    With d_i = max_{j != c} z_ij - z_ic, row i is predicted c iff b > d_i.  A row of class c is then
    right iff b > d_i; any other row is right iff its best non-c class is its label and b < d_i.
    Accuracy is a step function of b that changes only at the d_i, so trying b = 0 and every
    midpoint between consecutive distinct d_i (and just past the ends) finds the exact maximum.
    """
    z = np.asarray(logits, dtype=np.float64)
    others = np.delete(z, c, axis=1)
    best_other = np.delete(np.arange(z.shape[1]), c)[others.argmax(1)]
    d = others.max(1) - z[:, c]
    d_pos = np.sort(d[y == c])
    d_neg = np.sort(d[(y != c) & (best_other == y)])
    u = np.unique(d)
    cand = np.concatenate([[0.0, u[0] - 1.0, u[-1] + 1.0], (u[1:] + u[:-1]) / 2])
    acc = np.searchsorted(d_pos, cand, "left") + (len(d_neg) - np.searchsorted(d_neg, cand, "right"))
    top = cand[acc == acc.max()]
    return float(top[np.argmin(np.abs(top))])


def _class_report(ckpt: Path, transfer_set: Path, c: int) -> dict:
    net, _ = models.load(ckpt)
    info = open_prepared(transfer_set)
    (xv, yv), (xt, yt) = info.load("val"), info.load("test")
    zv, zt = models.predict(net, xv).numpy(), models.predict(net, xt).numpy()
    b = fit_bias(zv, yv, c)
    zt_after = zt.copy()
    zt_after[:, c] += b
    out = {"bias_shift": b, "class_test_rows": int((yt == c).sum())}
    for k, z in (("before", zt), ("after", zt_after)):
        pred = z.argmax(1)
        out[f"class_errors_{k}"] = int(((pred != yt) & (yt == c)).sum())
        out[f"test_accuracy_{k}"] = float((pred == yt).mean())
    return out


def _mean_sd(v: list[float], pct: bool = True) -> str:
    a = np.asarray(v, dtype=np.float64) * (100 if pct else 1)
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.2f} ± {sd:.2f}" if pct else f"{a.mean():.1f} ± {sd:.1f}"


def run_experiment(cfg: ExperimentConfig, cache: Path, transfer_set: Path, work_dir: Path, md_path: Path,
                   log: Callable[[str], None] = print) -> Path:
    """Train the experiment's students into ``work_dir``; write ``md_path`` and ``<md stem>.json`` (one set)."""
    check_outputs({"--cache": cache, "--transfer-set": transfer_set},
                  {"--markdown": md_path, "the summary": md_path.with_suffix(".json")})
    claim(md_path, md_path.with_suffix(".json"))
    torch.set_num_threads(1)
    rows = run_students(cfg.students(), cache, transfer_set, work_dir, cfg.jobs, log)
    label = {0.0: "hard labels", cfg.alpha: f"soft targets (T={cfg.temperature:g}, alpha={cfg.alpha:g})"}
    if cfg.name == "small-transfer":
        lines = [f"### Soft targets as a regulariser: {100 * cfg.train_fraction:g}% of the transfer set "
                 f"({rows[0]['train_rows']} rows), {cfg.arch}", "",
                 "Test accuracy (%), mean ± sample standard deviation over seeds.", "",
                 "| targets | early stopping (epoch chosen on validation) | no early stopping (last epoch) | "
                 "chosen epoch |", "|---|---|---|---|"]
        for s in summarise(rows):
            epochs = [r["best_epoch"] for r in rows if r["alpha"] == s["alpha"]]
            lines.append(f"| {label[s['alpha']]} | {100 * s['test_accuracy']:.2f} ± {100 * s['test_accuracy_std']:.2f} "
                         f"| {100 * s['test_accuracy_last_epoch']:.2f} ± {100 * s['test_accuracy_last_epoch_std']:.2f} "
                         f"| {_mean_sd(epochs, pct=False)} |")
    else:
        for r in rows:
            r.update(_class_report(Path(r["checkpoint"]), transfer_set, cfg.drop_class))
        n = rows[0]["class_test_rows"]
        lines = [f"### Class {cfg.drop_class} left out of the transfer set ({rows[0]['train_rows']} rows), {cfg.arch}",
                 "",
                 f"Errors on the {n} test rows of class {cfg.drop_class}, and overall test accuracy (%), before and "
                 "after adding a bias shift to that class's logit, fitted on the validation split; mean ± sample "
                 "standard deviation over seeds.", "",
                 "| targets | class errors before | after | test acc. before | after | bias shift |",
                 "|---|---|---|---|---|---|"]
        for a in (0.0, cfg.alpha):
            rs = [r for r in rows if r["alpha"] == a]
            col = lambda k, pct=False, rs=rs: _mean_sd([r[k] for r in rs], pct)  # noqa: E731
            lines.append(f"| {label[a]} | {col('class_errors_before')} | {col('class_errors_after')} | "
                         f"{col('test_accuracy_before', True)} | {col('test_accuracy_after', True)} | "
                         f"{col('bias_shift')} |")
    with publish_together(md_path) as out:
        write_json(md_path.with_suffix(".json"), {
            "provenance": provenance.record(f"experiment {cfg.name}", to_dict(cfg),
                                            {"cache": cache, "transfer_set": transfer_set}), "rows": rows}, into=out)
        write_text(md_path, "\n".join(lines) + "\n", into=out)
    log(f"experiment {cfg.name}: {len(rows)} students -> {md_path}")
    return md_path
