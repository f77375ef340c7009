"""``distill cache verify``: a finished cache checked against its teachers and transfer set.

The recorded sha256 of the teachers and transfer set are compared with the files given (the
cache's teachers given in another order is a usage error that names the order); random
contiguous windows of rows (never row-by-row h5py indexing) are re-run, fed as the recorded input
contracts say, and the largest difference from the stored logits is reported; the stored soft
targets are recomputed from them.  Any difference beyond the tolerance is an IntegrityError (exit 4).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import contract as ct
from pipeline import provenance, soft, views
from pipeline.errors import DataError, IntegrityError, UsageError
from pipeline.formats.cache import open_cache
from pipeline.formats.onnx_model import InputContract
from pipeline.formats.prepared import open_prepared
from stages.cache.recorded import recorded_contracts, recorded_weights
from stages.cache.settings import VerifyConfig
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
    logit_diff, scale, soft_diff, label_bad, param_bad = 0.0, 1.0, 0.0, 0, 0
    stored_dtype = c.read("logits", 0, 1).dtype
    with info.rows_reader(c.transfer_split) as raw:
        source = RowSource(info, c.transfer_split, spec, raw)
        for lo, hi in windows:
            stored = c.read("logits", lo, hi).astype(np.float32)
            x, (y, params) = source.read(lo, hi)
            got = teachers(teachers.adapt(x), lo).astype(stored_dtype).astype(np.float32)  # as stored
            logit_diff = max(logit_diff, float(np.max(np.abs(got - stored))))
            scale = max(scale, float(np.max(np.abs(stored))))
            for T in c.temperatures:
                ref = soft.combine_soft_targets(stored, T, c.combine, weights)
                soft_diff = max(soft_diff, float(np.max(np.abs(ref - c.soft(T, lo, hi)))))
            label_bad += int(np.sum(c.read("labels", lo, hi) != y))
            if params is not None:  # the stored parameters are the ones the recorded seed draws
                param_bad += int(np.sum(np.any(c.read("view_params", lo, hi) != params, axis=1)))
    n = sum(hi - lo for lo, hi in windows)
    report = {"rows_checked": n, "windows": windows, "max_abs_logit_diff": logit_diff,
              "logit_tolerance": cfg.tolerance * scale, "max_abs_soft_diff": soft_diff,
              "label_mismatches": label_bad, "view_param_mismatches": param_bad, "hashes": "match",
              "provider": teachers.provider}
    log(f"verify: {n} rows in {len(windows)} windows on {teachers.provider}: max |logit diff| "
        f"{logit_diff:.3g} (tolerance {cfg.tolerance * scale:.3g}), max |soft diff| {soft_diff:.3g}, "
        f"{label_bad} label mismatches" + (f", {param_bad} view parameter mismatches" if spec else "")
        + "; hashes match")
    log(format_diagnostics(c.diagnostics(), c.member_accuracy))
    if logit_diff > cfg.tolerance * scale or soft_diff > 1e-6 or label_bad or param_bad:
        raise IntegrityError(f"{cache}: stored targets differ from the teachers (max |logit diff| {logit_diff:.3g}, "
                             f"max |soft diff| {soft_diff:.3g}, {label_bad} label mismatches, {param_bad} view "
                             f"parameter mismatches); rebuild with `make cache`")
    return report
