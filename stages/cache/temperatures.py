"""``distill cache add-temperature``: diagnostics (and, where a cache stores them, soft targets) at new
temperatures from a cache's stored logits, without any teacher.

A ``kd-cache/2`` cache derives its targets at any T when read (:func:`pipeline.soft.targets`), so
a temperature is never missing from it: ``add-temperature`` then records the temperature and its
diagnostics (what the build's table and ``--plot`` show), and writes no targets.  A cache that
stores its soft targets (``--store-soft``, and every ``kd-cache/1`` cache) gets them stored at the new
T too, computed by that same function from the stored logits, so the file keeps storing every
temperature it records.  New ``member_weights`` recombine every recorded temperature (diagnostics,
and stored targets where there are some), so that one file never mixes two weightings; a top-k
cache refuses them (its kept classes were chosen with its own weights).  The file is copied to
``<target>.partial``, extended and published atomically, so a crash leaves the original untouched;
the free space for the copy is checked before writing (exit 7 with the figure).  The cache is read
through :mod:`pipeline.formats.cache`, whose reader verifies the seal first: a cache that changed
since it was written is refused (exit 4), never re-sealed.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import provenance, soft
from pipeline.artifacts import atomic_output, check_outputs
from pipeline.config import to_dict
from pipeline.errors import DataError, UsageError
from pipeline.formats.cache import CacheInfo, open_cache, soft_size, t_key
from pipeline.formats.cache_writer import CacheWriter
from pipeline.resources import human, require_space
from stages.cache.recorded import recorded_weights, same, weights_list
from stages.cache.settings import AddTemperatureConfig
from stages.cache.stage import format_diagnostics
from stages.cache.stream import blocks


def _need_logits(c: CacheInfo) -> None:
    if not c.has_logits:
        raise DataError(f"{c.path}: the cache has no stored logits, so new temperatures cannot be computed "
                        f"from it; rebuild it with `distill cache`")


def add_temperature(cfg: AddTemperatureConfig, cache: Path, out: Path | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """Add diagnostics (and stored soft targets, where the cache stores them) at ``cfg.temperatures``
    to ``cache``, written to ``out`` (default: ``cache`` itself, replaced atomically)."""
    cache = Path(cache)
    in_place = out is None or (Path(out).is_file() and os.path.samefile(out, cache))  # --out FILE: in place too
    target = cache if in_place else Path(out)
    if not in_place:
        check_outputs({"FILE": cache}, {"--out": target})
    info = open_cache(cache)
    _need_logits(info)
    old_w = recorded_weights(info)
    weights = old_w
    if cfg.member_weights:
        try:
            weights = soft.normalise_weights(cfg.member_weights, info.members)
        except ValueError as e:
            raise UsageError(f"{cache}: {e}") from None
    reweigh = not same(weights if weights is not None else [], old_w if old_w is not None else [])
    if reweigh and info.top_k:
        raise UsageError(f"{cache}: a top-k cache keeps the classes its own member weights ranked first; rebuild it "
                         f"with --member-weights instead")
    recorded = {t_key(T): T for T in info.temperatures}
    new = [float(T) for T in cfg.temperatures if t_key(T) not in recorded]
    there = [float(T) for T in cfg.temperatures if t_key(T) in recorded]
    for T in there:
        if T != recorded[t_key(T)]:  # one dataset name, two values: the file cannot hold both
            raise UsageError(f"{cache}: T={T!r} would be recorded as T={t_key(T)}, which the cache holds already "
                             f"(T={recorded[t_key(T)]!r}); temperatures are told apart to six significant digits")
    if not new and not reweigh:
        raise UsageError(f"{cache}: nothing to add: " + (
            f"T={', '.join(map(t_key, there))} already recorded (it has {', '.join(recorded)})" if there
            else "the member weights given are the cache's own"))
    for T in there:
        log(f"{cache}: already has T={t_key(T)}; " + ("recombined with the new member weights" if reweigh
                                                        else "kept as it is"))
    storing = bool(info.soft_temperatures)  # a cache that stores targets stores them at every T it records
    redo = [*(info.temperatures if reweigh else ()), *new]  # every T combined with the new weights
    size = cache.stat().st_size  # the cache is copied to the partial first, even to replace it in place
    added = soft_size(info.rows, info.classes, len(new)) if storing else 0
    require_space(target, size + added, f"a copy of {cache.name} ({human(size)})" + (
        f" + {info.rows} rows x {info.classes} classes x {len(new)} new temperatures x 4 bytes, in whole chunks"
        if storing else ""))
    with atomic_output(target) as tmp:
        shutil.copyfile(cache, tmp)  # rewrites tmp in place (same inode: the lock holds)
        w = CacheWriter.update(tmp)
        try:
            _recompute(w, cfg, info, redo, new, weights, storing)
            prov = info.provenance
            prov.setdefault("added_temperatures", []).append(
                {"temperatures": new, "settings": to_dict(cfg), "versions": provenance.versions(),
                 **({"member_weights": weights_list(weights, info.members)} if reweigh else {})})
            attrs = {"temperatures": [*info.temperatures, *new], "provenance": json.dumps(prov)}
            if storing and info.version > 1:
                attrs["soft_temperatures"] = json.dumps([*info.soft_temperatures, *new])
            if reweigh:
                ident = info.identity
                ident.pop("member_weights", None)
                ident.update({"member_weights": weights.tolist()} if weights is not None else {})
                attrs.update(member_weights=json.dumps(weights_list(weights, info.members)), identity=json.dumps(ident))
            w.finish(attrs)
        finally:
            w.close()
    done = open_cache(target)
    log(format_diagnostics(done.diagnostics(), done.member_accuracy))
    log(f"add-temperature: T={', '.join(map(t_key, new)) or 'none new'} from stored logits"
        + ("" if storing else " (diagnostics; targets are derived when read)")
        + (f"; every T recombined with member weights {weights_list(weights, info.members)}" if reweigh else "")
        + f" -> {target}")
    return target


def _recompute(w: CacheWriter, cfg: AddTemperatureConfig, info: CacheInfo, redo: list[float], new: list[float],
               weights: np.ndarray | None, storing: bool) -> None:
    """Diagnostics at every T of ``redo``, and its stored targets when the cache stores them."""
    rows = w.reader(info.combine, None if weights is None else tuple(weights.tolist()))
    sums = {T: soft.DiagnosticSums() for T in redo}
    if storing:
        for T in new:
            w.add_soft(T)
    for lo, hi in blocks(0, info.rows, cfg.block_rows):
        stored, labels = rows.stored(lo, hi), rows.labels(lo, hi)
        targets = {T: soft.targets(stored, T, use_stored=False) for T in redo}
        if storing:
            w.put(lo, {f"soft/{t_key(T)}": p for T, p in targets.items()})
        pred = soft.member_predictions(stored)
        for T, p in targets.items():
            sums[T].add(pred, p, labels)
    for T, s in sums.items():
        w.write_diagnostics(T, s.result())
