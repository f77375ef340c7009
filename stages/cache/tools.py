"""Tools on an existing soft-target cache: add temperatures, verify against the teachers, merge shards.

Every cache is read and written through :mod:`pipeline.formats.cache`, whose reader verifies the
seal before anything is returned: a part, a cache to extend or a cache to verify that changed
since it was written is refused (content checksum mismatch, exit 4), never re-sealed.

- ``add_temperature``: soft targets at new T from the stored raw logits, in blocks, no teacher run
  (``p_T = sum_m w_m softmax(v_m / T)`` or ``softmax(sum_m w_m v_m / T)``, the combine and member
  weights recorded in the file; docs/design.md, the maths).  New ``member_weights`` recompute every
  stored temperature (and its diagnostics) with them, so that one file never mixes two weightings.
  The file is copied to ``<target>.partial``, extended and published atomically, so a crash leaves
  the original untouched.
- ``verify``: checks the recorded sha256 of the teachers and transfer set against the files given,
  re-runs random contiguous windows of rows (never row-by-row h5py indexing) fed as the recorded
  input contracts say and reports the largest difference from the stored logits, and recomputes the
  stored soft targets from them.
- ``merge``: joins the parts written by ``--shard i/n`` into one cache equal to a single-process run.
- ``plot_diagnostics``: mean entropy and teacher accuracy against T (matplotlib, Agg backend).

``add_temperature`` and ``merge`` check the free space for their output before writing (exit 7 with
the figure); a write that fails anyway removes the partial, leaving any original untouched.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import contract as ct
from pipeline import provenance, soft, views
from pipeline.artifacts import atomic_output
from pipeline.config import to_dict
from pipeline.errors import DataError, IntegrityError, UsageError
from pipeline.formats.cache import (CacheInfo, CacheWriter, open_cache, open_part, predicted_size, soft_size,
                                    t_key)
from pipeline.formats.onnx_model import InputContract
from pipeline.resources import human, require_space
from pipeline.formats.prepared import open_prepared
from stages.cache.stage import format_diagnostics
from stages.cache.settings import DIAG_BLOCK, AddTemperatureConfig, MergeConfig, VerifyConfig
from stages.cache.stream import blocks, diagnostics_in_blocks, member_accuracy_in_blocks
from stages.cache.teachers import Teachers
from stages.cache.viewsource import RowSource

# Attributes every part of one sharded run must share (besides the identity without its "part").
_SHARED = ("schema", "members", "classes", "temperatures", "combine", "teacher_sha256", "transfer_sha256",
           "transfer_split", "settings", "teacher_probabilities", "classes_names", "teacher_inputs", "member_weights",
           "views", "source_rows")


def recorded_weights(c: CacheInfo) -> np.ndarray | None:
    """The member weights a cache was combined with (None: equal; caches before them have none)."""
    return soft.normalise_weights(json.loads(c.attrs.get("member_weights", "[]")), c.members)


def recorded_contracts(c: CacheInfo) -> list[InputContract] | None:
    """The input contract each teacher file was fed under (None for caches made before contracts,
    which fed every teacher the transfer set's normalisation: the default)."""
    if "teacher_inputs" not in c.attrs:
        return None
    try:
        return [InputContract.from_dict(r["input"]) for r in json.loads(c.attrs["teacher_inputs"])]
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{c.path}: malformed teacher_inputs attribute ({e})") from None


def _need_logits(c: CacheInfo) -> None:
    if not c.has_logits:
        raise DataError(f"{c.path}: the cache has no stored logits, so new temperatures cannot be computed "
                        f"from it; rebuild it with `distill cache`")


def add_temperature(cfg: AddTemperatureConfig, cache: Path, out: Path | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """Add soft targets (and diagnostics) at ``cfg.temperatures`` to ``cache``, written to ``out``
    (default: ``cache`` itself, replaced atomically)."""
    cache = Path(cache)
    info = open_cache(cache)
    _need_logits(info)
    target = Path(out) if out is not None else cache
    old_w = recorded_weights(info)
    weights = old_w
    if cfg.member_weights:
        try:
            weights = soft.normalise_weights(cfg.member_weights, info.members)
        except ValueError as e:
            raise UsageError(f"{cache}: {e}") from None
    reweigh = not _same(weights if weights is not None else [], old_w if old_w is not None else [])
    new = [float(T) for T in cfg.temperatures if float(T) not in info.temperatures]
    for T in sorted(set(map(float, cfg.temperatures)) - set(new)):
        log(f"{cache}: already has T={t_key(T)}; kept as it is" + ("" if not reweigh else " (recombined)"))
    if not new and not reweigh and target == cache:
        return cache
    redo = [*(info.temperatures if reweigh else ()), *new]  # every T combined with the new weights
    size = cache.stat().st_size  # the cache is copied to the partial first, even to replace it in place
    require_space(target, size + soft_size(info.rows, info.classes, len(new)),
                  f"a copy of {cache.name} ({human(size)}) + {info.rows} rows x {info.classes} classes x "
                  f"{len(new)} new temperatures x 4 bytes, in whole chunks")
    with atomic_output(target) as tmp:
        shutil.copyfile(cache, tmp)  # rewrites tmp in place (same inode: the lock holds)
        w = CacheWriter.update(tmp)
        try:
            sums = {T: soft.DiagnosticSums() for T in redo}
            for T in new:
                w.add_soft(T)
            for lo, hi in blocks(0, info.rows, cfg.block_rows):
                logits, labels = w.read("logits", lo, hi), w.read("labels", lo, hi)
                targets = {T: soft.combine_soft_targets(logits, T, info.combine, weights) for T in redo}
                w.put(lo, None, targets, None)
                for T, p in targets.items():
                    sums[T].add(logits, p, labels)
            for T, s in sums.items():
                w.write_diagnostics(T, s.result())
            prov = info.provenance
            prov.setdefault("added_temperatures", []).append(
                {"temperatures": new, "settings": to_dict(cfg), "versions": provenance.versions(),
                 **({"member_weights": _weights_list(weights, info.members)} if reweigh else {})})
            attrs = {"temperatures": [*info.temperatures, *new], "provenance": json.dumps(prov)}
            if reweigh:
                ident = info.identity
                ident.pop("member_weights", None)
                ident.update({"member_weights": weights.tolist()} if weights is not None else {})
                attrs.update(member_weights=json.dumps(_weights_list(weights, info.members)), identity=json.dumps(ident))
            w.finish(attrs)
        finally:
            w.close()
    done = open_cache(target)
    log(format_diagnostics(done.diagnostics(), done.member_accuracy))
    log(f"add-temperature: T={', '.join(map(t_key, new)) or 'none new'} from stored logits"
        + (f"; every T recombined with member weights {_weights_list(weights, info.members)}" if reweigh else "")
        + f" -> {target}")
    return target


def _weights_list(weights: np.ndarray | None, members: int) -> list[float]:
    return weights.tolist() if weights is not None else [1.0 / members] * members


def _windows(rows: int, cfg: VerifyConfig) -> list[tuple[int, int]]:
    """Random non-overlapping contiguous windows covering about ``sample_rows`` rows."""
    size = max(1, min(rows, -(-cfg.sample_rows // cfg.windows)))
    slots = rows // size
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(slots, size=min(cfg.windows, slots), replace=False))
    return [(int(s) * size, int(s) * size + size) for s in picks]


def verify(cfg: VerifyConfig, cache: Path, teacher: list[Path], transfer_set: Path,
           log: Callable[[str], None] = print) -> dict:
    """Check hashes, re-run a sample of rows; returns the report, IntegrityError when anything differs."""
    c = open_cache(cache)
    info = open_prepared(transfer_set)  # corrupt before stale: a damaged file is not "changed"
    specs = [ct.parse_teacher(t) for t in teacher]
    recorded = c.teacher_sha256
    problems = []
    if len(teacher) != len(recorded):
        problems.append(f"{len(teacher)} teacher file(s) given, the cache was built from {len(recorded)}")
    for i, (path, sha) in enumerate(zip([s.path for s in specs], recorded)):
        if provenance.sha256_file(path) != sha:
            problems.append(f"teacher {path} differs from teacher {i} of the cache (sha256 {str(sha)[:12]})")
    if provenance.sha256_file(transfer_set) != c.transfer_sha256:
        problems.append(f"transfer set {transfer_set} differs from the one recorded (sha256 {c.transfer_sha256[:12]})")
    if problems:
        raise IntegrityError(f"{cache}: " + "; ".join(problems) + "; rebuild with `make cache`")
    windows = _windows(c.rows, cfg)
    contracts = recorded_contracts(c)
    for spec, rec in zip(specs, contracts or [None] * len(specs)):
        if spec.declared != InputContract() and (rec is None or ct.merge(spec.declared, rec)[0] != rec):
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


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def _check_parts(read: list[CacheInfo]) -> int:
    """That the parts come from one run and cover every row once; returns the total row count."""
    p0 = read[0]
    base = {k: v for k, v in p0.identity.items() if k != "part"}
    for c in read[1:]:
        ident = {k: v for k, v in c.identity.items() if k != "part"}
        bad = [k for k in _SHARED if not _same(c.attrs.get(k), p0.attrs.get(k))]
        if ident != base or bad or c.part["count"] != p0.part["count"] or c.part["total_rows"] != p0.part["total_rows"]:
            raise IntegrityError(f"{c.path}: made from other inputs or settings than {p0.path} "
                                 f"({', '.join(bad) or 'identity'} differ); rebuild the parts from one set of inputs")
    total, expected = int(p0.part["total_rows"]), 0
    for c in sorted(read, key=lambda r: r.part["rows"][0]):
        lo, hi = c.part["rows"]
        if lo > expected:
            raise IntegrityError(f"rows [{expected}, {lo}) are in no part; missing a shard of {p0.part['count']}?")
        if lo < expected:
            raise IntegrityError(f"{c.path}: rows [{lo}, {min(hi, expected)}) are in two parts")
        expected = hi
    if expected != total:
        raise IntegrityError(f"rows [{expected}, {total}) are in no part; missing a shard of {p0.part['count']}?")
    return total


def merge(cfg: MergeConfig, parts: list[Path], out: Path, log: Callable[[str], None] = print) -> Path:
    """Check and join shard ``parts`` into the cache ``out``; every part's seal is verified first."""
    if not parts:
        raise DataError("give the parts to merge with --part")
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise DataError(f"parts not found: {', '.join(missing)} (run those shards first)")
    read = [open_part(Path(p)) for p in parts]
    total = _check_parts(read)
    p0 = read[0]
    base = {k: v for k, v in p0.identity.items() if k != "part"}
    temps = p0.temperatures
    providers = sorted({str(c.attrs["provider"]) for c in read})
    logits_dtype = np.dtype(p0.read("logits", 0, 1).dtype)
    require_space(Path(out), *predicted_size(total, p0.members, p0.classes, len(temps),
                                             logit_bytes=logits_dtype.itemsize, views=p0.views is not None))
    with atomic_output(Path(out)) as tmp:
        w = CacheWriter.create(tmp, base, total, p0.members, p0.classes, temps, views=p0.views,
                               source_rows=p0.source_rows if p0.views else None,
                               logits_dtype=str(logits_dtype))
        try:
            for c in read:
                off = c.part["rows"][0]
                for lo, hi in blocks(0, c.rows, cfg.block_rows):
                    w.put(off + lo, c.read("logits", lo, hi), {T: c.soft(T, lo, hi) for T in temps},
                          c.read("labels", lo, hi), c.read("view_params", lo, hi) if c.views else None)
            for T, d in diagnostics_in_blocks(w.read, temps, total, DIAG_BLOCK).items():
                w.write_diagnostics(T, d)
            w.finish({**{k: p0.attrs[k] for k in _SHARED if k in p0.attrs and k != "schema"},
                      "member_accuracy": member_accuracy_in_blocks(w.read, total, DIAG_BLOCK),
                      "onnxruntime_version": p0.attrs.get("onnxruntime_version", ""),
                      "package_version": p0.attrs.get("package_version", ""),
                      "provider": ", ".join(providers), "committed_rows": total,
                      "provenance": json.dumps(provenance.record(
                          "cache-merge", to_dict(cfg), {f"part{c.part['index']}": c.path for c in read},
                          provider=", ".join(providers), parts=[c.provenance for c in read]))})
        finally:
            w.close()
    merged = open_cache(out)
    log(format_diagnostics(merged.diagnostics(), merged.member_accuracy))
    log(f"merge: {len(read)} parts, {total} rows -> {out}")
    return Path(out)


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
