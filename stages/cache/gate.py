"""The sanity gate: each teacher scored on labelled transfer rows before the first row is committed.

A teacher fed the wrong range or layout still runs and still gives confident, wrong soft targets
(a classifier trained on [0, 1] pixels and fed ``(x / 255 - mean) / std`` scored 65.9% where it
really scores 87.6%; docs/teachers.md).  So before the long run the first ``gate_rows`` rows of the
transfer split (their labelled ones) are run through each teacher under its resolved contract and
under the common alternatives that fit its input: raw, unit and normalised (the transfer set's
statistics, and the teacher's own if it declares some), in every layout its input shape fits.
With ``a`` the accuracy under the contract and ``b`` the best alternative's, in percentage points:

- ``b - a >= GATE_POINTS`` and the alternative changes a *declared* field (command line or
  metadata): refused, one line naming both accuracies, the declaration that fixes it, and
  ``--no-gate``;
- ``b - a >= GATE_POINTS`` and it changes only undeclared fields: the alternative is taken, and the
  log says so (a clear winner, taken automatically);
- the accuracy finally kept below chance (``100 / classes``) plus ``GATE_POINTS``: refused.

Each teacher's accuracies are recorded in the cache (attribute ``teacher_inputs``, key ``gate``).
Only the very outputs the run would produce are judged, so a teacher's NaN under its contract is
the run's error (row and member), while NaN under an alternative only counts as wrong rows.
"""
from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from pipeline import contract as ct
from pipeline import soft
from pipeline.errors import DataError
from pipeline.formats.onnx_model import InputContract
from stages.cache.teachers import Plan, Teachers, check_finite

GATE_POINTS = 5.0  # "clearly better", "near chance": percentage points
MIN_LABELLED = 100  # fewer labelled gate rows than this cannot tell 5 points apart: the gate is skipped
_VARIED = ("range", "layout", "mean", "std")


def short(c: InputContract) -> str:
    """The fields the gate varies, in the command-line syntax (``input=unit,layout=flat``)."""
    return InputContract(range=c.range, layout=c.layout, mean=c.mean, std=c.std).spec()


def candidates(plan: Plan, geom: ct.Geometry) -> list[InputContract]:
    """The resolved contract first, then raw / unit / normalised in each layout the input fits,
    without duplicates (the transfer set's statistics and equal declared ones are one candidate)."""
    c = plan.contract
    ranges = [("raw", None, None)]
    if c.dtype != "uint8":
        ranges += [("unit", None, None), ("normalised", None, None)]
        if plan.own_stats is not None:  # the teacher's own statistics, even where a declared range dropped them
            ranges.append(("normalised", *plan.own_stats))
    out, seen = [], set()
    for cand in [c] + [InputContract(range=r, layout=lay, mean=m, std=s, dtype=c.dtype, output=c.output)
                       for lay in plan.fits for r, m, s in ranges]:
        stats = (geom.mean if cand.mean is None else cand.mean, geom.std if cand.std is None else cand.std)
        key = json.dumps([cand.range, cand.layout, stats if cand.range == "normalised" else None])
        if key not in seen:
            seen.add(key)
            out.append(cand)
    return out


def accuracy(teachers: Teachers, i: int, c: InputContract, x: np.ndarray, y: np.ndarray, first: bool) -> float:
    """Accuracy of teacher ``i`` fed ``x`` under ``c`` over the rows with ``y >= 0`` (argmax of the
    members' mean softmax at T = 1); NaN rows are wrong, or the run's error when ``first``."""
    plan, sess, batch = teachers.plans[i], teachers.sessions[i], teachers.batch
    outs = [np.asarray(sess.run([c.output], {plan.input: ct.adapt(x[a:a + batch], c, teachers.geom)})[0])
            for a in range(0, len(x), batch)]
    out = np.concatenate(outs)
    out = out[:, None, :] if out.ndim == 2 else out
    if first:  # the run's own outputs: its error, naming the row and the ensemble member
        check_finite(out, plan.path, 0, sum(s[1] if len(s) == 3 else 1 for s in teachers.shapes[:i]))
    finite = np.isfinite(out).all(axis=(1, 2))
    pred = np.full(len(y), -1)
    if finite.any():
        pred[finite] = soft.model_soft_targets(out[finite]).argmax(axis=1)
    keep = y >= 0
    return float(np.mean(pred[keep] == y[keep]))


def _origin(plan: Plan) -> str:
    return " and ".join(sorted({plan.sources[f] for f in ("range", "layout") if plan.declared(f)})) or "defaults"


def judge(plan: Plan, scored: list[tuple[InputContract, float]], classes: int, rows: int,
          log: Callable[[str], None]) -> InputContract:
    """The contract to keep (the resolved one, or a clear winner over undeclared fields); DataError
    when a declared field loses clearly or the kept contract is near chance."""
    (cur, a), pts = scored[0], GATE_POINTS / 100
    best, b = max(scored[1:] or scored[:1], key=lambda s: s[1])
    path, chance = plan.path, 1.0 / classes
    if b - a >= pts:
        changed = [f for f in _VARIED if getattr(best, f) != getattr(cur, f)]
        if any(plan.declared(f) for f in changed):
            raise DataError(f"{path}: sanity gate: {a:.1%} accuracy on {rows} labelled transfer rows as declared "
                            f"({short(cur)}, {_origin(plan)}) but {b:.1%} as {short(best)}; declare "
                            f"--teacher {path}:{short(best)} (or pass --no-gate to keep the declaration)")
        log(f"cache: {path}: no declaration of {', '.join(changed)}; {short(best)} scores {b:.1%} on {rows} "
            f"labelled rows against {a:.1%} for {short(cur)}: taking {short(best)} (declare it to make it explicit)")
        for f in changed:
            plan.sources[f] = "gate"
        cur, a = best, b
    if a < chance + pts:
        raise DataError(f"{path}: sanity gate: {a:.1%} accuracy on {rows} labelled transfer rows as {short(cur)} "
                        f"({_origin(plan)}), near chance ({chance:.1%}), and no common alternative does clearly better "
                        f"(best {b:.1%} as {short(best)}); check the teacher's input and output "
                        f"(e.g. --teacher {path}:input=unit,output=NAME), or pass --no-gate")
    return cur


def run_gate(teachers: Teachers, x: np.ndarray, y: np.ndarray, log: Callable[[str], None]) -> list[dict | None]:
    """Score and judge every teacher on rows ``x`` (stored form) with labels ``y``; changes the plans'
    contracts where a clear winner is taken; returns each teacher's gate record (None: skipped)."""
    rows = int(np.sum(y >= 0))
    if rows < MIN_LABELLED:
        log(f"cache: sanity gate skipped: {rows} labelled rows among the first {len(y)} (needs {MIN_LABELLED})")
        return [None] * len(teachers.plans)
    records = []
    for i, plan in enumerate(teachers.plans):
        scored = [(c, accuracy(teachers, i, c, x, y, k == 0)) for k, c in enumerate(candidates(plan, teachers.geom))]
        plan.contract = judge(plan, scored, teachers.classes, rows, log)
        kept = next(a for c, a in scored if c == plan.contract)
        others = ", ".join(f"{short(c)} {a:.1%}" for c, a in scored if c != plan.contract)
        log(f"cache: gate: {plan.path}: {kept:.1%} on {rows} labelled rows as {short(plan.contract)}"
            + (f" (alternatives: {others})" if others else ""))
        records.append({"rows": rows, "accuracy": kept, "alternatives": {short(c): a for c, a in scored}})
    return records
