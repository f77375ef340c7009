"""The views experiment's table and plot (make exp-views): accuracy against K' views and epochs.

    python scripts/views_report.py shift=SWEEP.json mix=SWEEP.json --markdown views.md --plot views.png

Each SWEEP.json is a ``distill student sweep`` summary over one view family's cache, with students
drawing from K' views of every row (``views_used``) for a number of epochs that grows with K'.  Per
(family, student size, K'): the hard-label twin trained on the same views, the distilled student,
the gain and the fraction of the gap to the teacher it closes, against that twin and against the
plain hard-label student (K' = 1, the rows themselves).  The plot shows test accuracy against K'
and, for the distilled students, validation accuracy against the epoch (from each student's
metrics JSON), mean over seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load(spec: str) -> tuple[str, dict]:
    family, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"expected FAMILY=SWEEP.json, got {spec!r}")
    return family, json.loads(Path(path).read_text())


def table(sweeps: dict[str, dict]) -> list[str]:
    teacher = next(iter(sweeps.values()))["teacher_test_accuracy"]
    lines = [f"Teacher ensemble: {100 * teacher:.2f}% test accuracy.  Test accuracy (%), mean ± sample standard "
             "deviation over seeds, the epoch of each student chosen on validation.  Gap closed: (kd - hard) / "
             "(teacher - hard), against the hard twin on the same views and against the plain hard student.", "",
             "| family | student | K' | epochs | hard (same views) | distilled (T) | gain | gap closed | "
             "gap closed vs plain hard |", "|---|---|---:|---:|---|---|---:|---:|---:|"]
    # K' = 1 is view 0 alone, the rows themselves, in every family: the plain hard student of any of them
    plain = {b["arch"]: b["hard"] for sw in sweeps.values() for b in sw["best"] if b["views_used"] == 1}

    def pm(s: dict) -> str:
        return f"{100 * s['test_accuracy']:.2f}" + (f" ± {100 * s['test_accuracy_std']:.2f}" if s["n"] > 1 else
                                                     " (1 seed)")

    for family, sw in sweeps.items():
        for b in sw["best"]:
            h, k = b["hard"], b["best"]
            base = plain.get(b["arch"])
            vs_plain = "-" if base is None else \
                f"{100 * (k['test_accuracy'] - base['test_accuracy']) / (teacher - base['test_accuracy']):.0f}%"
            lines.append(f"| {family} | {b['arch']} | {b['views_used']} | {b['epochs']} | {pm(h)} | {pm(k)} "
                         f"(T={k['temperature']:g}) | {100 * b['gain']:+.2f} | {100 * b['gap_closed']:.0f}% | "
                         f"{vs_plain} |")
    return lines


def histories(sweep: dict) -> dict[tuple, np.ndarray]:
    """Mean validation accuracy per epoch of the distilled students, per (arch, K')."""
    out: dict[tuple, list] = {}
    for r in sweep["rows"]:
        if r["alpha"] == 0:
            continue
        m = json.loads(Path(r["checkpoint"]).with_suffix(".metrics.json").read_text())
        out.setdefault((r["arch"], r["views_used"]), []).append([h["val_accuracy"] for h in m["history"]])
    return {k: np.mean(np.array(v), axis=0) for k, v in out.items()}


def plot(sweeps: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = next(iter(sweeps.values()))["teacher_test_accuracy"]
    archs = list(dict.fromkeys(b["arch"] for sw in sweeps.values() for b in sw["best"]))
    fig, axes = plt.subplots(2, len(archs), figsize=(5.5 * len(archs), 8), squeeze=False)
    for j, arch in enumerate(archs):
        ax, hx = axes[0, j], axes[1, j]
        for fi, (family, sw) in enumerate(sweeps.items()):
            bs = sorted((b for b in sw["best"] if b["arch"] == arch), key=lambda b: b["views_used"])
            ks = [b["views_used"] for b in bs]
            for kind, ls in (("hard", "--"), ("best", "-")):
                ax.errorbar(ks, [100 * b[kind]["test_accuracy"] for b in bs],
                            yerr=[100 * b[kind]["test_accuracy_std"] for b in bs], ls=ls, marker="o", capsize=3,
                            color=f"C{fi}", label=f"{family}, {'hard labels' if kind == 'hard' else 'distilled'}")
            for (a, k), h in sorted(histories(sw).items()):
                if a == arch:
                    hx.plot(np.arange(1, len(h) + 1), 100 * h, color=f"C{fi}", alpha=0.35 + 0.65 * (k / max(ks)),
                            label=f"{family}, K'={k}")
        ax.axhline(100 * teacher, color="k", lw=1, label="teacher ensemble")
        ax.set(xscale="log", xlabel="K' views per row", ylabel="test accuracy (%)", title=arch)
        ax.set_xticks(ks, [str(k) for k in ks])
        hx.set(xlabel="epoch", ylabel="validation accuracy (%), distilled, mean over seeds", title=f"{arch}: patience")
        for a in (ax, hx):
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweeps", nargs="+", help="FAMILY=SWEEP.json")
    p.add_argument("--markdown", type=Path, required=True)
    p.add_argument("--plot", type=Path, required=True)
    args = p.parse_args(argv)
    sweeps = dict(load(s) for s in args.sweeps)
    args.markdown.write_text("### Views: K' views of every row, shift only and stronger families\n\n"
                             + "\n".join(table(sweeps)) + f"\n\n![accuracy against K' and epochs]({args.plot.name})\n")
    plot(sweeps, args.plot)
    print(f"views report -> {args.markdown}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
