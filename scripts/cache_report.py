"""Tables of the cache-layout measurements (docs/results.md, "Caches that scale") from the files they kept.

    python scripts/cache_report.py --runs docs/runs/2026-12-03/cache [--caches data/c23 [--caches data/c23/final]]

``--caches``: folders of the caches themselves (not kept: tens of MB; each named relative to the
first folder); when given, their sizes, rows and layouts are written to ``<runs>/sizes.json`` first,
which is kept and read afterwards.
Students are the ``<runs>/students/<name>.metrics.json`` files, named ``<arch>-<cache>-T<T>-s<seed>``
or ``pairs-<cache>-T<T>-s<seed>``; they are grouped over seeds (mean and sample std of test accuracy).
Writes ``<runs>/summary.md`` and ``<runs>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.formats.cache import open_cache

NAME = re.compile(r"^(?P<group>.+)-T(?P<T>[0-9.]+)-s(?P<seed>\d+)\.metrics\.json$")


def sizes(folders: list[Path]) -> dict:
    out = {}
    for p in sorted(p for d in folders for p in d.glob("*.h5")):
        c = open_cache(p)
        name = str(p.relative_to(folders[0]) if p.is_relative_to(folders[0]) else p)
        out[name] = {"bytes": p.stat().st_size, "rows": c.rows, "members": c.members, "classes": c.classes,
                     "layout": c.layout.layout, "top_k": c.top_k, "logits_dtype": c.logits_dtype,
                     "stored_temperatures": list(c.soft_temperatures), "views": (c.views or {}).get("count", 0),
                     "formula_bytes_per_row": c.layout.bytes_per_row(), "bytes_per_row": p.stat().st_size / c.rows}
    return out


def students(runs: Path) -> list[dict]:
    groups: dict[tuple, list] = {}
    for p in sorted((runs / "students").glob("*.metrics.json")):
        m = NAME.match(p.name)
        if not m:
            continue
        r = json.loads(p.read_text())
        groups.setdefault((m["group"], float(m["T"])), []).append(
            (int(m["seed"]), 100 * r["test_accuracy"], 100 * r["val_accuracy"], r["train_seconds"]))
    rows = []
    for (group, T), rs in groups.items():
        test = [t for _, t, _, _ in sorted(rs)]
        rows.append({"group": group, "T": T, "seeds": [s for s, *_ in sorted(rs)], "test": test,
                     "mean": statistics.fmean(test), "std": statistics.stdev(test) if len(test) > 1 else None,
                     "val_mean": statistics.fmean(v for _, _, v, _ in rs),
                     "train_seconds": [round(s, 1) for *_, s in sorted(rs)]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--caches", type=Path, action="append")
    a = ap.parse_args()
    if a.caches:
        (a.runs / "sizes.json").write_text(json.dumps(sizes(a.caches), indent=1, sort_keys=True) + "\n")
    size = json.loads((a.runs / "sizes.json").read_text()) if (a.runs / "sizes.json").exists() else {}
    rows = students(a.runs)
    md = ["| cache | rows | bytes | bytes a row (file) | bytes a row (formula) |", "|---|---:|---:|---:|---:|"]
    md += [f"| {k} | {v['rows']} | {v['bytes']} | {v['bytes_per_row']:.2f} | {v['formula_bytes_per_row']:.2f} |"
           for k, v in size.items()]
    md += ["", "| students | T | seeds | test % (each) | mean | std |", "|---|---:|---|---|---:|---:|"]
    for r in rows:
        std = "" if r["std"] is None else f"{r['std']:.2f}"
        each = ", ".join(f"{t:.2f}" for t in r["test"])
        md.append(f"| {r['group']} | {r['T']:g} | {len(r['seeds'])} | {each} | {r['mean']:.2f} | {std} |")
    (a.runs / "summary.md").write_text("\n".join(md) + "\n")
    (a.runs / "summary.json").write_text(json.dumps({"sizes": size, "students": rows}, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
