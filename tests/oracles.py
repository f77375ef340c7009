"""Independent oracles: plain re-implementations of what the cache stores, written from the
definitions in docs/design.md ("The maths", "Diagnostics") with loops and the math module, sharing
no code with ``pipeline/soft.py``.  A test that compares the stage's output with these fails when
the shared formula is wrong, which a comparison with ``pipeline.soft`` itself never can.

Slow by design (Python loops): use them on a few hundred rows.
"""
from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15  # docs/design.md: 15 equal-width confidence bins (Guo et al. 2017)


def softmax_row(v, T: float) -> list[float]:
    """softmax(v / T) of one row, with the math module (max subtracted first)."""
    m = max(float(a) for a in v)
    e = [math.exp((float(a) - m) / T) for a in v]
    s = sum(e)
    return [a / s for a in e]


def soft_targets(member_logits: np.ndarray, T: float, combine: str = "arithmetic") -> np.ndarray:
    """``[n, members, classes]`` -> ``[n, classes]``: arithmetic = mean over members of the tempered
    softmaxes; geometric = softmax of the members' mean logits."""
    n, members, classes = member_logits.shape
    out = np.empty((n, classes))
    for i in range(n):
        if combine == "arithmetic":
            rows = [softmax_row(member_logits[i, m], T) for m in range(members)]
            out[i] = [sum(r[c] for r in rows) / members for c in range(classes)]
        elif combine == "geometric":
            mean = [sum(float(member_logits[i, m, c]) for m in range(members)) / members for c in range(classes)]
            out[i] = softmax_row(mean, T)
        else:
            raise ValueError(combine)
    return out


def _argmax(row) -> int:
    best = 0
    for c in range(1, len(row)):
        if row[c] > row[best]:
            best = c
    return best


def diagnostics(member_logits: np.ndarray, soft: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """mean_entropy_nats, teacher_accuracy, member_disagreement and ece, row by row.

    ECE: a labelled row of confidence c = max_i p_i falls in bin k when k/15 < c <= (k+1)/15; the
    error is sum over bins of (n_k / n) |accuracy_k - mean confidence_k|, over labelled rows."""
    n, members, _ = member_logits.shape
    entropy = disagree = 0.0
    correct = labelled = 0
    bins: dict[int, list[tuple[float, float]]] = {}
    for i in range(n):
        p = [float(a) for a in soft[i]]
        s = sum(p)
        p = [a / s for a in p]  # stored float32 rows are renormalised, as the stage does
        entropy += -sum(a * math.log(a) for a in p if a > 0)
        pred = _argmax(p)
        disagree += sum(_argmax(member_logits[i, m]) != pred for m in range(members))
        if labels[i] >= 0:
            labelled += 1
            ok = float(pred == labels[i])
            correct += ok
            conf = max(p)
            k = next(k for k in range(ECE_BINS) if k / ECE_BINS < conf <= (k + 1) / ECE_BINS)
            bins.setdefault(k, []).append((ok, conf))
    ece = sum(abs(sum(o for o, _ in b) - sum(c for _,
                                             c in b)) for b in bins.values()) / labelled if labelled else math.nan
    return {"mean_entropy_nats": entropy / n, "teacher_accuracy": correct / labelled if labelled else math.nan,
            "member_disagreement": disagree / (n * members), "ece": ece}


def median(values) -> float:
    """The median of a list: the middle value, or the mean of the two middle ones."""
    v = sorted(values)
    k = len(v) // 2
    return v[k] if len(v) % 2 else (v[k - 1] + v[k]) / 2
