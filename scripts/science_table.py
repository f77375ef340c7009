"""The science table of docs/results.md ("A teacher worth distilling") from its kept metrics files:
test accuracy (%) of each student, mean and sample standard deviation over the seeds found, per
teacher (hard labels, the default or the strong teacher, ...) and student architecture.

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
        m = json.loads(f.read_text())
        teacher = f.name.split("-")[0] if not f.name.startswith("strong-tta") else "strong-tta"
        arch = m["settings"]["arch"]
        out.setdefault((teacher, arch), []).append(100 * m["test_accuracy"])
    return out


def fmt(v: list[float]) -> str:
    if len(v) == 1:
        return f"{v[0]:.2f} (1 seed)"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} ({len(v)} seeds)"


def main(folder: str) -> None:
    data = rows(Path(folder))
    teachers = [t for t in ("hard", "default", "strong", "strong-tta") if any(k[0] == t for k in data)]
    archs = list(dict.fromkeys(a for _, a in sorted(data, key=lambda k: k[1])))
    print("| student | " + " | ".join(teachers) + " |")
    print("|---|" + "---:|" * len(teachers))
    for a in archs:
        print(f"| {a} | " + " | ".join(fmt(data[(t, a)]) if (t, a) in data else "-" for t in teachers) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
