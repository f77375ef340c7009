"""``distill cache verify``: a finished cache checked against its teachers and transfer set.

The recorded sha256 of the teachers and transfer set are compared with the files given (the
cache's teachers given in another order is a usage error that names the order); random
contiguous windows of rows (never row-by-row h5py indexing) are re-run, fed as the recorded input
contracts say, and the largest difference from the stored logits is reported; stored soft targets
are recomputed from the stored logits by :func:`pipeline.soft.targets`, the function every reader
derives them with.  A top-k cache (:mod:`pipeline.topk`): its kept logits and the log-sum-exp of
the rest are compared with the re-run ones at its stored classes, the stored classes must be a top k
of the re-run ensemble, and at every recorded temperature the rebuilt targets must lie within the
module's bound of the re-run full targets (plus the slack of the storage's rounding); a prior-rule
cache's class prior is computed again from its sample of rows.  Any difference
beyond the tolerance is an IntegrityError (exit 4).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import contract as ct
from pipeline import provenance, soft, topk, views
from pipeline.errors import DataError, IntegrityError, UsageError
from pipeline.formats.cache import open_cache, t_key
from pipeline.formats.onnx_model import InputContract
from pipeline.formats.prepared import open_prepared
from stages.cache import prior as class_prior
from stages.cache.recorded import recorded_contracts, recorded_weights
from stages.cache.settings import VerifyConfig
from stages.cache.shards import PRIOR_ATOL, prior_gap
from stages.cache.stage import format_diagnostics
from stages.cache.teachers import Teachers
from stages.cache.viewsource import RowSource


def _windows(rows: int, cfg: VerifyConfig) -> list[tuple[int, int]]:
    """Random non-overlapping contiguous windows covering about ``sample_rows`` rows."""
    size = max(1, min(rows, -(-cfg.sample_rows // cfg.windows)))
    slots = rows // size
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(slots, size=min(cfg.windows, slots), replace=False))
    return [(int(s) * size, int(s) * size + size) for s in picks]


def _check_order(cache: Path, specs: list, given: list[str], recorded: list[str]) -> None:
    """UsageError when the files given are the cache's teachers in another order, naming the order."""
    if given == recorded or sorted(given) != sorted(recorded):
        return
    by_sha: dict[str, list] = {}
    for spec, sha in zip(specs, given):
        by_sha.setdefault(sha, []).append(spec.path)
    order = " ".join(f"--teacher {by_sha[sha].pop(0)}" for sha in recorded)
    raise UsageError(f"{cache}: these are the cache's teachers in another order (the order makes the ensemble's "
                     f"members); give them in the order it was built with: {order}")


def _check_topk(c, stored, got: np.ndarray, weights, d: dict) -> None:
    """A top-k window against the re-run logits ``got``: values at the stored classes, the classes a
    top k, and the bound of :mod:`pipeline.topk` at every recorded temperature (into ``d``)."""
    ids = stored.ids.astype(np.int64)
    rest = np.ones(got.shape[::2], bool)
    np.put_along_axis(rest, ids, False, 1)
    kept = np.take_along_axis(got, ids[:, None, :], 2)
    masked = np.where(rest[:, None, :], got.astype(np.float64), -np.inf)
    mx = masked.max(axis=2, keepdims=True)
    tail = (mx + np.log(np.exp(masked - mx).sum(axis=2, keepdims=True)))[..., 0]
    dt = stored.kept.dtype
    pairs = [(kept, stored.kept), (tail, stored.tail)]
    if stored.spread is not None:
        pairs.append((topk.tail_spread(got, ids, tail, weights).astype(np.float64), stored.spread))
    gaps = []  # how far the stored numbers are from the re-run ones: rounding, and any difference
    for mine, theirs in pairs:
        as_stored = mine.astype(np.float32).astype(dt).astype(np.float32)  # rounded as the stage rounds them
        d["logit"] = max(d["logit"], float(np.max(np.abs(as_stored - theirs))))
        d["scale"] = max(d["scale"], float(np.max(np.abs(theirs.astype(np.float32)))))
        gaps.append(float(np.max(np.abs(mine - theirs.astype(np.float64)))))
    # every rebuilt logit moves by at most eta: a kept one by its own gap, a tail one by the tail's and
    # (the spread rule) the spread's
    eta = max(gaps[0], sum(gaps[1:]))
    p1 = soft.combine_soft_targets(got, 1.0, c.combine, weights).astype(np.float64)
    low = np.take_along_axis(p1, ids, 1).min(axis=1)
    high = np.where(rest, p1, -np.inf).max(axis=1)
    d["ids"] += int(np.sum(high > low + 1e-6))  # a tail class above a kept one beyond float32 noise
    for T in c.temperatures:
        full = soft.combine_soft_targets(got, T, c.combine, weights).astype(np.float64)
        tv = 0.5 * np.abs(full - soft.targets(stored, T, use_stored=False)).sum(axis=1)
        eps = topk.bound(stored.kept, stored.tail, c.classes, T, c.combine, weights)
        margin = eps + topk.rounding_slack(eta, T) + 1e-6 - tv
        d["tv"], d["bound"] = max(d["tv"], float(tv.max())), max(d["bound"], float(eps.max()))
        d["margin"] = min(d["margin"], float(margin.min()))


def _check_prior(c, teachers, info, weights, batch: int, log: Callable[[str], None]) -> float:
    """The largest difference between a prior-rule cache's class prior and the one its teachers give on
    the same seeded sample of rows (0.0 for any other cache)."""
    if not c.layout.tail_prior:
        return 0.0
    count = int(c.identity["settings"]["tail_prior_rows"])
    again = class_prior.compute(teachers, info, c.transfer_split, count, c.top_k, c.combine, weights, batch, log)
    return prior_gap(again, c.prior())


def verify(cfg: VerifyConfig, cache: Path, teacher: list[Path], transfer_set: Path,
           log: Callable[[str], None] = print) -> dict:
    """Check hashes, re-run a sample of rows; returns the report, IntegrityError when anything differs."""
    c = open_cache(cache)
    info = open_prepared(transfer_set)  # corrupt before stale: a damaged file is not "changed"
    specs = [ct.parse_teacher(t) for t in teacher]
    recorded = list(c.teacher_sha256)
    problems = []
    given = [provenance.sha256_file(s.path) if s.path.is_file() else "" for s in specs]
    _check_order(cache, specs, given, recorded)
    if len(teacher) != len(recorded):
        problems.append(f"{len(teacher)} teacher file(s) given, the cache was built from {len(recorded)}")
    for i, (spec, sha, got) in enumerate(zip(specs, recorded, given)):
        if not got:
            raise DataError(f"{spec.path}: no such ONNX file (teacher {i} of the cache {cache})")
        if got != sha:
            problems.append(f"teacher {spec.path} differs from teacher {i} of the cache (sha256 {str(sha)[:12]})")
    if provenance.sha256_file(transfer_set) != c.transfer_sha256:
        problems.append(f"transfer set {transfer_set} differs from the one recorded (sha256 {c.transfer_sha256[:12]})")
    if problems:
        raise IntegrityError(f"{cache}: " + "; ".join(problems) + "; rebuild with `make cache`")
    windows = _windows(c.rows, cfg)
    contracts = recorded_contracts(c)
    for spec, rec in zip(specs, contracts or [None] * len(specs)):
        if spec.declared != InputContract() and (rec is None or ct.without_defaults(ct.merge(spec.declared, rec)[0])
                                                 != rec):
            raise IntegrityError(f"{cache}: teacher {spec.path} is declared as {spec.declared.spec()} but the cache "
                                 f"was built with {rec.spec() if rec else 'the default contract'}; verify feeds the "
                                 f"recorded contract (give the path alone)")
    teachers = Teachers(specs, ct.Geometry.of(info), c.classes, cfg.device, cfg.threads,
                        windows[0][1] - windows[0][0], "off", log=log, contracts=contracts)
    teachers.start()
    teachers.probabilities = json.loads(c.attrs["teacher_probabilities"])
    weights = recorded_weights(c)
    spec = views.spec_of(c.views, cache)  # a views cache: its views are re-made from their parameters
    d = {"logit": 0.0, "scale": 1.0, "soft": 0.0, "labels": 0, "params": 0, "ids": 0, "tv": 0.0, "bound": 0.0,
         "margin": float("inf")}
    with info.rows_reader(c.transfer_split) as raw, c.rows_reader() as rows:
        source = RowSource(info, c.transfer_split, spec, raw)
        for lo, hi in windows:
            x, (y, params) = source.read(lo, hi)
            got = teachers(teachers.adapt(x), lo)  # float32, as the stage computed them
            stored = rows.stored(lo, hi)
            if c.top_k:
                _check_topk(c, stored, got, weights, d)
            else:
                ref = stored.logits.astype(np.float32)
                as_stored = got.astype(stored.logits.dtype).astype(np.float32)
                d["logit"] = max(d["logit"], float(np.max(np.abs(as_stored - ref))))
                d["scale"] = max(d["scale"], float(np.max(np.abs(ref))))
            for T in c.soft_temperatures:
                derived = soft.targets(stored, T, use_stored=False)
                d["soft"] = max(d["soft"], float(np.max(np.abs(derived - rows.read(f"soft/{t_key(T)}", lo, hi)))))
            d["labels"] += int(np.sum(rows.labels(lo, hi) != y))
            if params is not None:  # the stored parameters are the ones the recorded seed draws
                d["params"] += int(np.sum(np.any(rows.read("view_params", lo, hi) != params, axis=1)))
    prior_diff = _check_prior(c, teachers, info, weights, windows[0][1] - windows[0][0], log)
    n = sum(hi - lo for lo, hi in windows)
    tol = cfg.tolerance * d["scale"]
    report = {"rows_checked": n, "windows": windows, "max_abs_logit_diff": d["logit"], "logit_tolerance": tol,
              "max_abs_soft_diff": d["soft"], "label_mismatches": d["labels"], "view_param_mismatches": d["params"],
              "hashes": "match", "provider": teachers.provider}
    if c.top_k:
        report.update(top_k=c.top_k, not_a_top_k=d["ids"], max_tv_from_full=d["tv"], max_bound=d["bound"],
                      min_bound_margin=d["margin"], tail_rule=c.layout.tail_rule, prior_gap=prior_diff)
    log(f"verify: {n} rows in {len(windows)} windows on {teachers.provider}: max |logit diff| "
        f"{d['logit']:.3g} (tolerance {tol:.3g}), max |soft diff| {d['soft']:.3g}, "
        f"{d['labels']} label mismatches" + (f", {d['params']} view parameter mismatches" if spec else "")
        + (f"; top-{c.top_k}: max TV from the full targets {d['tv']:.3g} (bound up to {d['bound']:.3g}, least "
           f"margin {d['margin']:.3g}), {d['ids']} rows whose kept classes are not a top {c.top_k}" if c.top_k else "")
        + (f"; class prior within {prior_diff:.3g} of the teachers' on its sample" if c.layout.tail_prior else "")
        + "; hashes match")
    log(format_diagnostics(c.diagnostics(), c.member_accuracy))
    if prior_diff > PRIOR_ATOL:
        raise IntegrityError(f"{cache}: its class prior differs from the one its teachers give on its sample of "
                             f"rows by {prior_diff:.3g} (> {PRIOR_ATOL:g}); rebuild with `make cache`")
    if d["logit"] > tol or d["soft"] > 1e-6 or d["labels"] or d["params"] or d["ids"] or d["margin"] < 0:
        raise IntegrityError(f"{cache}: stored targets differ from the teachers (max |logit diff| {d['logit']:.3g}, "
                             f"max |soft diff| {d['soft']:.3g}, {d['labels']} label mismatches, {d['params']} view "
                             f"parameter mismatches" + (f", {d['ids']} rows not a top {c.top_k}, bound margin "
                                                        f"{d['margin']:.3g}" if c.top_k else "")
                             + "); rebuild with `make cache`")
    return report
