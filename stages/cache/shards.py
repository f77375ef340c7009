"""``distill cache merge``: the parts written by ``--shard i/n`` joined into one cache equal to a
single-process run.

Every part's seal is verified as it is opened (:mod:`pipeline.formats.cache`); the parts must come
from one run (same identity and shared attributes) and cover every row exactly once.  The free space
for the output is checked before writing (exit 7 with the figure); a write that fails anyway removes
the partial.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import provenance
from pipeline.artifacts import atomic_output, check_outputs
from pipeline.config import to_dict
from pipeline.errors import DataError, IntegrityError
from pipeline.formats.cache import SCHEMA, CacheInfo, CacheLayout, open_cache, open_part
from pipeline.formats.cache_writer import CacheWriter
from pipeline.resources import require_space
from stages.cache.recorded import same
from stages.cache.settings import MergeConfig, diag_block
from stages.cache.stage import format_diagnostics
from stages.cache.stream import blocks, diagnostics_in_blocks, member_accuracy_in_blocks

PRIOR_ATOL = 1e-3  # class priors (mean log-probabilities, nats) of parts or re-runs: device rounding only
# Attributes every part of one sharded run must share (besides the identity without its "part").
_SHARED = ("schema", "members", "classes", "temperatures", "combine", "teacher_sha256", "transfer_sha256",
           "transfer_split", "settings", "teacher_probabilities", "classes_names", "teacher_inputs", "member_weights",
           "views", "source_rows", "layout", "top_k", "logits_dtype", "soft_temperatures",
           "tail_rule")


def _check_parts(read: list[CacheInfo]) -> int:
    """That the parts come from one run and cover every row once; returns the total row count."""
    p0 = read[0]
    base = {k: v for k, v in p0.identity.items() if k != "part"}
    for c in read[1:]:
        ident = {k: v for k, v in c.identity.items() if k != "part"}
        bad = [k for k in _SHARED if not same(c.attrs.get(k), p0.attrs.get(k))]
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


def _prior(read: list[CacheInfo]):
    """The parts' class prior (a top-k cache with the prior rule), the same in every part: each shard
    computed it from the same seeded sample of rows, so parts on other devices differ by rounding only."""
    if not read[0].layout.tail_prior:
        return None
    priors = [c.prior() for c in read]
    for c, p in zip(read[1:], priors[1:]):
        gap = prior_gap(p, priors[0])
        if gap > PRIOR_ATOL:
            raise IntegrityError(f"{c.path}: its class prior differs from {read[0].path}'s by {gap:.3g} beyond "
                                 f"the storage's rounding (> {PRIOR_ATOL:g}); rebuild the parts from one set of inputs")
    return priors[0]


def prior_gap(got: np.ndarray, stored: np.ndarray) -> float:
    """How far a class prior ``got`` is from a ``stored`` one beyond one step of the stored dtype (nats):
    two runs whose float32 priors differ by device rounding may round to adjacent float16 values."""
    step = np.spacing(np.abs(stored)).astype(np.float64)
    return float(np.max(np.abs(got.astype(stored.dtype).astype(np.float64) - stored) - step, initial=0.0))


def merge(cfg: MergeConfig, parts: list[Path], out: Path, log: Callable[[str], None] = print) -> Path:
    """Check and join shard ``parts`` into the cache ``out``; every part's seal is verified first."""
    if not parts:
        raise DataError("give the parts to merge with --part")
    check_outputs({"--part": parts}, {"--out": out})
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise DataError(f"parts not found: {', '.join(missing)} (run those shards first)")
    read = [open_part(Path(p)) for p in parts]
    old = [str(c.path) for c in read if c.version != 2]
    if old:
        raise DataError(f"{old[0]}: a part of an older schema than {SCHEMA}; rebuild the parts with this version")
    total = _check_parts(read)
    p0 = read[0]
    base = {k: v for k, v in p0.identity.items() if k != "part"}
    providers = sorted({str(c.attrs["provider"]) for c in read})
    lay = p0.layout
    layout = CacheLayout(total, lay.members, lay.classes, lay.logits_dtype, lay.top_k, lay.soft_temperatures, lay.k,
                         lay.views, 0, tail_spread=lay.tail_spread, tail_prior=lay.tail_prior)
    require_space(Path(out), *layout.size())
    names = [n for n in layout.datasets() if n != "labels"]
    with atomic_output(Path(out)) as tmp:
        w = CacheWriter.create(tmp, base, layout, views=p0.views, source_rows=p0.source_rows, prior=_prior(read))
        try:
            for c in read:
                off = c.part["rows"][0]
                with c.rows_reader() as r:
                    for lo, hi in blocks(0, c.rows, cfg.block_rows):
                        w.put(off + lo, {n: r.read(n, lo, hi) for n in names}, r.labels(lo, hi))
            reader = w.reader(p0.combine, p0.weights)
            block = diag_block(lay.classes, lay.members)
            for T, d in diagnostics_in_blocks(reader, p0.temperatures, total, block).items():
                w.write_diagnostics(T, d)
            w.finish({**{k: p0.attrs[k] for k in _SHARED if k in p0.attrs and k != "schema"},
                      "member_accuracy": member_accuracy_in_blocks(reader, total, block),
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
