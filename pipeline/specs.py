"""Architecture spec strings, parsed without torch (settings validate them before anything loads).

Grammar: ``<kind>:<widths>[:dropout=<p>]`` with widths joined by ``-``; the networks themselves are
built by :func:`pipeline.models.build`.
"""
from __future__ import annotations

from pipeline.errors import UsageError


def parse_spec(spec: str) -> tuple[str, list[int], float]:
    """``"mlp:800-800:dropout=0.2"`` -> ("mlp", [800, 800], 0.2); UsageError when malformed."""
    parts = spec.strip().split(":")
    try:
        kind, widths = parts[0], [int(w) for w in parts[1].split("-")] if len(parts) > 1 and parts[1] else []
        dropout = 0.0
        for extra in parts[2:]:
            key, value = extra.split("=")
            if key != "dropout":
                raise ValueError(key)
            dropout = float(value)
    except (ValueError, IndexError):
        raise UsageError(f"bad architecture spec {spec!r}; expected e.g. mlp:800-800 or cnn:32-64-128") from None
    if kind not in ("mlp", "cnn") or any(w < 1 for w in widths) or not 0 <= dropout < 1:
        raise UsageError(f"bad architecture spec {spec!r}; kinds are mlp and cnn, widths >= 1, 0 <= dropout < 1")
    if kind == "cnn" and len(widths) != 3:
        raise UsageError(f"bad architecture spec {spec!r}; cnn takes three widths: conv-conv-fc")
    return kind, widths, dropout
