"""The science table of docs/results.md ("A teacher worth distilling") from its kept metrics files:
test accuracy (%) of each student, mean and sample standard deviation over the seeds found, per
teacher (hard labels, the default or the strong teacher, ...) and student architecture; then the
recipe search, one line per ``recipe-<name>-s<seed>`` group.

    python scripts/science_table.py docs/runs/2026-12-03/science
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(folder: Path) -> dict[tuple[str, str], list[float]]:
    """(teacher, arch) -> test accuracies in %, from files named <teacher>-<arch>-s<seed>.metrics.json."""
    out: dict[tuple[str, str], list[float]] = {}
    for f in sorted(folder.glob("*.metrics.json")):
        if f.name.startswith("recipe-"):
            continue
        m = json.loads(f.read_text())
        teacher = next((t for t in ("strong-tta", "strong-compact") if f.name.startswith(t + "-")),
                       f.name.split("-")[0])
        arch = m["settings"]["arch"]
        out.setdefault((teacher, arch), []).append(100 * m["test_accuracy"])
    return out


def fmt(v: list[float]) -> str:
    if len(v) == 1:
        return f"{v[0]:.2f} (1 seed)"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} ({len(v)} seeds)"


def main(folder: str) -> None:
    data = rows(Path(folder))
    known = ("hard", "default", "strong", "strong-tta", "strong-compact")
    teachers = [t for t in known if any(k[0] == t for k in data)]
    archs = list(dict.fromkeys(a for _, a in sorted(data, key=lambda k: k[1])))
    print("| student | " + " | ".join(teachers) + " |")
    print("|---|" + "---:|" * len(teachers))
    for a in archs:
        print(f"| {a} | " + " | ".join(fmt(data[(t, a)]) if (t, a) in data else "-" for t in teachers) + " |")
    recipes: dict[str, list[float]] = {}
    for f in sorted(Path(folder).glob("recipe-*.metrics.json")):
        name = f.name[len("recipe-"):-len(".metrics.json")].rsplit("-s", 1)[0]
        recipes.setdefault(name, []).append(100 * json.loads(f.read_text())["test_accuracy"])
    if recipes:
        print("\n| recipe (recipe-<name>-s<seed>) | test |")
        print("|---|---:|")
        for name, v in recipes.items():
            print(f"| {name} | {fmt(v)} |")


if __name__ == "__main__":
    main(sys.argv[1])
