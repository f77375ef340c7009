"""The sanity gate: a teacher's contract judged on labelled rows before its outputs are used.

A teacher fed the wrong range or layout still runs and still gives confident, wrong soft targets
(a classifier trained on [0, 1] pixels and fed ``(x / 255 - mean) / std`` scored 65.9% where it
really scores 87.6%; docs/teachers.md).  And a wrong range can keep the argmax while it destroys
the soft targets: an MLP trained on [0, 1] pixels and fed raw 0-255 pixels scored 91.3% against
92.1%, but its targets at T = 1 were one-hot (mean entropy 0.0009 nats against 0.22).  For
distillation the soft targets are the product, so the gate judges them.

**Rows.**  ``rows`` labelled rows drawn without replacement, seeded, from the labelled rows anywhere
in the split (:func:`draw`; a semi-supervised set whose first rows are unlabelled is judged like
any other), the seed and the count it drew from recorded.

**Candidates** (:func:`candidates`): the resolved contract first, then the common conventions in
every layout the model's input fits: ``raw`` (as stored), ``unit`` ([0, 1]), ``normalised`` with
the transfer set's statistics, ``normalised`` with mean = std = 0.5 (the [-1, 1] of Keras'
``preprocess_input``, many TF and JAX models), ImageNet's per-channel statistics for 3-channel
rows, and the teacher's own declared statistics.

**Measures** (:func:`measures`), at T = 1 on the members' mean softmax ``p`` (Hinton's ensemble):
accuracy (argmax against the label), the mean negative log-likelihood of the labels
``NLL = -mean log p_y`` (nats; a proper scoring rule: it is lowest for the targets that put the
most probability where the labels are, and a collapsed, one-hot target pays for every confident
mistake), and the mean entropy ``-sum p log p`` (nats, recorded).  A row whose output is not
finite counts as wrong with an infinite NLL.

**Rule** (:func:`judge`).  An alternative is *clearly better* than the contract when its NLL is
lower by at least :data:`GATE_NATS`, or its accuracy higher by at least :data:`GATE_POINTS`
points with a lower NLL.  Of the clearly better ones, those within GATE_NATS of the lowest NLL are
equally good, and the one that changes the fewest declared fields (then the most accurate, the
fewest fields, the lowest NLL) wins (two conventions can both fit a teacher, and the one nearer its
declaration is the likelier: a right range is not changed to correct a wrong layout); if it changes a declared
field (command line, metadata, a cache's record) the contract is refused with both figures and the
declaration that fixes it; if it changes only undeclared fields it is taken, and the log says so.
A contract kept at an accuracy below chance + GATE_POINTS is refused.

**Too few labels.**  With fewer than :data:`MIN_LABELLED` labelled rows in the whole split, a
contract that would be a guess (:func:`guessed`: an undeclared range, or a layout the input shape
leaves open) is refused, naming the declaration that states it and the flag that takes it
unjudged; a declared one goes on, with a log line.

The cache judges every teacher (:func:`run_gate`; ``--no-gate`` skips it).  Export and bench judge a
teacher only where its contract would be a guess (:func:`judge_guess`), on their test rows: a
declared contract is the cache's to judge, and one reading of the teacher holds in every stage.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import numpy as np

from pipeline import contract as ct
from pipeline import feed
from pipeline.errors import DataError
from pipeline.feed import Plan
from pipeline.formats.onnx_model import InputContract
from pipeline.formats.prepared import Prepared

#: "Clearly better", in nats of mean NLL of the labels.  The difference of two mean NLLs on the same
#: rows is the mean log-likelihood ratio per row: at 0.1 nats the alternative gives the true labels
#: e^0.1 = 1.105 times the probability, on geometric average over 2048 rows.  Measured (docs/teachers.md,
#: "The sanity gate"): on Fashion-MNIST that difference has a standard error of 0.008 to 0.011 nats on
#: 2048 rows, so 0.1 is ten of them; in 14 (teacher, split) pairs (12 on Fashion-MNIST, 2 on the tests'
#: synthetic set) the right contract had the lowest
#: calibrated NLL of all candidates (by 0.03 to 0.18 nats), so no right declaration comes near the bar;
#: the mistakes that cost a teacher 5 points or more cost it 0.15 to 1.2 nats calibrated, and raw
#: pixels cost 12 to 56 nats at T = 1.
GATE_NATS = 0.1
#: "Clearly better" in accuracy, and the margin above chance a kept contract needs: percentage points.
GATE_POINTS = 5.0
#: Fewer labelled rows than this cannot tell the contracts apart: a guessed contract is refused.
MIN_LABELLED = 100
_VARIED = ("range", "layout", "mean", "std")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def draw(labels: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(rows, labelled)`` rows drawn without replacement from the labelled
    (``>= 0``) ones, anywhere in ``labels``."""
    labelled = np.flatnonzero(np.asarray(labels) >= 0)
    if len(labelled) <= rows:
        return labelled
    return np.sort(np.random.default_rng(seed).choice(labelled, size=rows, replace=False))


def short(c: InputContract) -> str:
    """The fields the gate varies, in the command-line syntax (``input=unit,layout=flat``)."""
    return InputContract(range=c.range, layout=c.layout, mean=c.mean, std=c.std).spec()


def _fix(plan: Plan, best: InputContract) -> str:
    """The declaration that states ``best``: its varied fields, and what the command line declared besides."""
    kept = {f: getattr(plan.contract, f) for f in ("output", "tta") if plan.sources.get(f) == "command line"}
    return InputContract(range=best.range, layout=best.layout, mean=best.mean, std=best.std, **kept).spec()


def _per_channel(geom: ct.Geometry, value) -> list[float]:
    """A statistic as the float32 value of each channel (how the adapter applies it)."""
    return np.broadcast_to(np.ravel(np.asarray(value, np.float32)), (geom.channels,)).tolist()


def candidates(plan: Plan, geom: ct.Geometry) -> list[InputContract]:
    """The resolved contract first, then raw / unit / normalised (the set's statistics, 0.5 and 0.5,
    ImageNet's for 3 channels, the teacher's own) in each layout the input fits, without duplicates
    (equal effective statistics are one candidate)."""
    c = plan.contract
    ranges = [("raw", None, None)]
    if c.dtype != "uint8":
        ranges += [("unit", None, None), ("normalised", None, None), ("normalised", 0.5, 0.5)]
        if geom.channels == 3:
            ranges.append(("normalised", *_IMAGENET))
        if plan.own_stats is not None:  # the teacher's own statistics, even where a declared range dropped them
            ranges.append(("normalised", *plan.own_stats))
    out, seen = [], set()
    for cand in [c] + [dataclasses.replace(c, range=r, layout=lay, mean=m, std=s)
                       for lay in plan.fits for r, m, s in ranges]:
        stats = [_per_channel(geom, geom.mean if cand.mean is None else cand.mean),
                 _per_channel(geom, geom.std if cand.std is None else cand.std)] if cand.range == "normalised" else None
        key = json.dumps([cand.range, cand.layout, stats])
        if key not in seen:
            seen.add(key)
            out.append(cand)
    return out


def _log_mean_softmax(v: np.ndarray, T: float) -> np.ndarray:
    """log of the members' mean softmax of ``v / T`` ([rows, members, classes] float64 -> [rows, classes])."""
    logp = v / T
    logp = logp - logp.max(axis=2, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=2, keepdims=True))  # per-member log-softmax
    top = logp.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(logp - top).mean(axis=1, keepdims=True)))[:, 0]


def _nll(v: np.ndarray, y: np.ndarray, T: float) -> float:
    return float(-_log_mean_softmax(v, T)[np.arange(len(y)), y].mean())


def calibrated(v: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``min_T NLL(T)`` and its T: a log grid of T from 1e-3 to 1e4 (ratio 1.26), then a finer one
    (ratio 1.01) around the best; NLL(T) is smooth, so this finds the minimum to ~1e-4 nats."""
    grid = np.geomspace(1e-3, 1e4, 71)
    k = int(np.argmin([_nll(v, y, T) for T in grid]))
    fine = np.geomspace(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)], 47)
    losses = [_nll(v, y, T) for T in fine]
    k = int(np.argmin(losses))
    return max(float(losses[k]), 0.0), float(fine[k])  # a mean NLL is >= 0; rounding can give -1e-17


def measures(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """At T = 1 on the members' mean softmax: accuracy, mean NLL of the labels and mean entropy
    (nats); and the NLL at the temperature that minimises it (``calibrated_nll_nats``, at
    ``calibration_t``).  ``logits`` [rows, members, classes]; rows whose outputs are not finite are
    wrong and make both NLLs infinite."""
    v = np.asarray(logits, np.float64)
    finite = np.isfinite(v).all(axis=(1, 2))
    v = np.where(finite[:, None, None], v, 0.0)
    logmean = _log_mean_softmax(v, 1.0)
    entropy = -(np.exp(logmean) * logmean).sum(axis=1)
    hit = (logmean.argmax(axis=1) == y) & finite
    cal, t = calibrated(v, y) if finite.all() else (np.inf, np.nan)
    return {"accuracy": float(hit.mean()), "nll_nats": _nll(v, y, 1.0) if finite.all() else float("inf"),
            "entropy_nats": float(entropy[finite].mean()) if finite.any() else float("nan"),
            "calibrated_nll_nats": cal, "calibration_t": t}


def _clearly_better(m: dict, cur: dict) -> bool:
    """Whether figures ``m`` are clearly better than ``cur`` (the rules of the module docstring)."""
    cal, cal_cur = m["calibrated_nll_nats"], cur["calibrated_nll_nats"]
    return (cal <= cal_cur - GATE_NATS  # knows the labels better at every temperature: cur misranks
            # as good at its best temperature, clearly better at T = 1 and softer: cur's targets are collapsed
            or (m["nll_nats"] <= cur["nll_nats"] - GATE_NATS and m["entropy_nats"] > cur["entropy_nats"]
                and cal <= cal_cur)
            or (m["accuracy"] - cur["accuracy"] >= GATE_POINTS / 100 and cal < cal_cur))


def _figures(m: dict) -> str:
    return (f"NLL {m['nll_nats']:.3f} nats at T=1 ({m['calibrated_nll_nats']:.3f} at its best T), entropy "
            f"{m['entropy_nats']:.3f} nats, {m['accuracy']:.1%} accuracy")


def _origin(plan: Plan) -> str:
    return " and ".join(sorted({plan.sources[f] for f in ("range", "layout") if plan.declared(f)})) or "defaults"


def guessed(plan: Plan) -> list[str]:
    """The varied fields that nothing declared and the graph does not settle: the range (when the input
    takes floats) and a layout that more than one arrangement fits."""
    out = []
    if not plan.declared("range") and plan.contract.dtype != "uint8":
        out.append("range")
    if not plan.declared("layout") and len(plan.fits) > 1:
        out.append("layout")
    return out


def _least_change(plan: Plan, cur: InputContract, better: list[tuple[InputContract, dict]]
                  ) -> tuple[InputContract, dict]:
    """Of the clearly better alternatives, those as good as the best (NLL within GATE_NATS of the
    lowest), the one that changes the fewest declared fields, then the most accurate, then the one
    that changes the fewest fields, then the lowest NLL: a wrong layout is corrected without also
    changing a range that was right."""
    low = min(m["calibrated_nll_nats"] for _, m in better)

    def cost(s: tuple[InputContract, dict]) -> tuple:
        changed = [f for f in _VARIED if getattr(s[0], f) != getattr(cur, f)]
        return sum(plan.declared(f) for f in changed), -s[1]["accuracy"], len(changed), s[1]["calibrated_nll_nats"]

    return min((s for s in better if s[1]["calibrated_nll_nats"] < low + GATE_NATS), key=cost)


def judge(plan: Plan, scored: list[tuple[InputContract, dict]], classes: int, rows: int, flag: str,
          log: Callable[[str], None], stage: str) -> InputContract:
    """The contract to keep (the resolved one, or a clearly better one over undeclared fields);
    DataError when a declared field loses clearly or the kept contract is near chance."""
    (cur, a), path = scored[0], plan.path
    better = [s for s in scored[1:] if _clearly_better(s[1], a)]
    if better:
        best, b = _least_change(plan, cur, better)
        changed = [f for f in _VARIED if getattr(best, f) != getattr(cur, f)]
        if any(plan.declared(f) for f in changed):
            raise DataError(f"{path}: sanity gate: as declared ({short(cur)}, {_origin(plan)}) the soft targets "
                            f"score {_figures(a)} on {rows} labelled rows, but {_figures(b)} as {short(best)}; "
                            f"declare --teacher {path}:{_fix(plan, best)}"
                            + (f" (or pass {flag} to keep the declaration)" if flag else ""))
        log(f"{stage}: {path}: no declaration of {', '.join(changed)}; {short(best)} scores {_figures(b)} on "
            f"{rows} labelled rows against {_figures(a)} for {short(cur)}: taking {short(best)} (declare it "
            f"to make it explicit)")
        for f in changed:
            plan.sources[f] = "gate"
        cur, a = best, b
    if a["accuracy"] < 1.0 / classes + GATE_POINTS / 100:
        best, b = max(scored, key=lambda s: s[1]["accuracy"])
        raise DataError(f"{path}: sanity gate: {a['accuracy']:.1%} accuracy on {rows} labelled rows as {short(cur)} "
                        f"({_origin(plan)}), near chance ({1.0 / classes:.1%}), and no common alternative does "
                        f"clearly better (best {b['accuracy']:.1%} as {short(best)}); check the teacher's input and "
                        f"output (e.g. --teacher {path}:input=unit,output=NAME)"
                        + (f", or pass {flag}" if flag else ""))
    return cur


def unjudged(plan: Plan, labelled: int, split: str, flag: str, log: Callable[[str], None], stage: str) -> None:
    """Too few labelled rows to judge: refuse a guessed contract (naming the declaration and ``flag``,
    which takes it unjudged), let a declared one go on, said in the log."""
    what = guessed(plan)
    cur = short(plan.contract)
    if what:
        raise DataError(f"{plan.path}: sanity gate: the {split} split has {labelled} labelled rows (the gate needs "
                        f"{MIN_LABELLED}), so the {' and '.join(what)} it would guess ({cur}) cannot be checked; "
                        f"declare the contract, e.g. --teacher {plan.path}:{cur}"
                        + (f", or pass {flag} to take it unchecked" if flag else ""))
    log(f"{stage}: {plan.path}: sanity gate skipped: {labelled} labelled rows in the {split} split (needs "
        f"{MIN_LABELLED}); feeding the declared contract {cur} ({_origin(plan)})")


def _plain(m: dict) -> dict:
    """JSON-ready figures: a non-finite value (an output that was NaN) is null."""
    return {k: (v if np.isfinite(v) else None) for k, v in m.items()}


def run_gate(plans: list[Plan], run: Callable[[int, InputContract], np.ndarray], y: np.ndarray, geom: ct.Geometry,
             classes: int, drawn: dict, log: Callable[[str], None], *, stage: str = "cache", flag: str = "--no-gate",
             first: Callable[[int, np.ndarray], None] | None = None) -> list[dict]:
    """Score and judge every plan: ``run(i, contract)`` gives model ``i``'s logits on the gate rows
    under ``contract``, ``y`` their labels; ``drawn`` (seed, labelled, split) goes into each record.
    Changes the plans' contracts where a clear winner is taken; returns each one's gate record.
    ``first(i, logits)`` checks the outputs under the resolved contract (the run's own: its errors)."""
    records = []
    for i, plan in enumerate(plans):
        scored = []
        for k, c in enumerate(candidates(plan, geom)):
            logits = run(i, c)
            if k == 0 and first is not None:
                first(i, logits)
            scored.append((c, measures(logits, y)))
        plan.contract = judge(plan, scored, classes, len(y), flag, log, stage)
        kept = next(m for c, m in scored if c == plan.contract)
        others = "; ".join(f"{short(c)}: {_figures(m)}" for c, m in scored if c != plan.contract)
        log(f"{stage}: gate: {plan.path}: {_figures(kept)} on "
            f"{len(y)} labelled rows (of {drawn['labelled']} in the {drawn['split']} split, seed {drawn['seed']}) "
            f"as {short(plan.contract)} ({_origin(plan) if plan.sources['range'] != 'gate' else 'gate'})"
            + (f"; alternatives: {others}" if others else ""))
        records.append({"rows": len(y), **drawn, **_plain(kept),
                        "alternatives": {short(c): _plain(m) for c, m in scored}})
    return records


def gate_rows(labels: np.ndarray, rows: int, seed: int) -> tuple[np.ndarray, int]:
    """The rows the gate reads (:func:`draw`) and how many labelled rows there were to draw from."""
    return draw(labels, rows, seed), int(np.sum(np.asarray(labels) >= 0))



#: Rows the gate reads where a stage judges a guessed contract (export, bench): as the cache's default.
GUESS_ROWS = 2048


def judge_guess(sess, plan: Plan, info: Prepared, split: str, log: Callable[[str], None], stage: str) -> dict | None:
    """Export and bench: the gate, run only where the contract would be a guess (:func:`guessed`), on
    :data:`GUESS_ROWS` labelled rows of ``split`` (seed 0); a declared contract (command line,
    metadata) was the cache's to judge.  No flag: a refused guess is declared, not waved through.
    Returns the gate record (None: not run)."""
    if not guessed(plan):
        return None
    rows, labelled = gate_rows(info.labels(split), GUESS_ROWS, 0)
    if labelled < MIN_LABELLED:
        unjudged(plan, labelled, split, "", log, stage)  # refuses: the contract is a guess
    x, y = info.take(split, rows)
    geom = ct.Geometry.of(info)

    def run(i: int, c: InputContract) -> np.ndarray:
        return feed.run_model(sess, plan, x, geom, 1024, c)

    def first(i: int, logits: np.ndarray) -> None:
        feed.check_finite(logits, plan.path, 0, 0, rows=rows)

    drawn = {"seed": 0, "labelled": labelled, "split": split}
    return run_gate([plan], run, y, geom, len(info.classes), drawn, log, stage=stage, flag="", first=first)[0]
