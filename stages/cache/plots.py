"""The cache's diagnostics drawn: mean entropy and teacher accuracy against T (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import atomic_output
from pipeline.errors import DataError


def plot_diagnostics(diags: dict[float, dict], path: Path) -> Path:
    """Mean entropy (nats) and teacher accuracy against T (log scale), written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    if not diags:
        raise DataError(f"{path}: no diagnostics to plot (a shard part has none; merge the parts first)")
    ts = sorted(diags)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(ts, [diags[T]["mean_entropy_nats"] for T in ts], "o-", color="tab:blue", label="mean entropy (nats)")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("mean entropy of p_T (nats)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(ts, [diags[T]["teacher_accuracy"] for T in ts], "s--", color="tab:red", label="teacher accuracy")
    ax2.set_ylabel("teacher accuracy", color="tab:red")
    ax.set_title("soft targets against temperature")
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
