"""Stage 3, cache: run the teachers once with onnxruntime and store soft targets at several T.

Writes the soft-target cache (schema ``kd-cache/1``, :mod:`pipeline.formats.cache`, docs/formats.md):
raw per-member logits, combined soft targets ``p_T`` at each temperature, labels, per-temperature
diagnostics and provenance.  Because the raw logits are kept, a new temperature is computed from
the file without any teacher (``distill cache add-temperature``, :mod:`stages.cache.tools`).

Streaming: the transfer set is read, run and written batch by batch, with reading and writing
overlapped with inference (:mod:`stages.cache.stream`), and diagnostics are computed over blocks,
so memory stays bounded whatever the row count.

Crash safety: rows are written in batches to ``<out>.partial``, each batch committed (flushed,
counter advanced, fsynced) by the format's writer.  Run again with the same arguments, the stage
resumes after the last committed batch (batch boundaries are fixed multiples of ``batch_size``, so
the content is identical to an uninterrupted run); a ``.partial`` that does not open, or was made
from other inputs, is restarted from zero, and the log says which.  The finished file is published
by fsync, rename, fsync of the directory.  No attribute records a time, so equal runs give equal
attributes.

Sharding: ``--shard i/n`` (or RANK/WORLD_SIZE from torchrun) gives rank i the i-th contiguous run
of whole batches; it writes ``<out stem>.part<i>of<n><suffix>``, which ``distill cache merge`` joins.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from pipeline import ort, provenance, runtime, soft
from pipeline.artifacts import exclusive, publish
from pipeline.config import to_dict
from pipeline.errors import DataError, UsageError
from pipeline.formats.cache import CacheWriter, t_key
from pipeline.formats.prepared import Prepared, open_prepared
from stages.cache.settings import DIAG_BLOCK, RUN_ONLY, CacheConfig
from stages.cache.stream import (StreamStats, diagnostics_in_blocks, part_path, resolve_shard, run_pipeline,
                                 shard_rows)
from stages.cache.teachers import Teachers
from stages.cache.viewsource import RowSource


def cache_soft_targets(cfg: CacheConfig, teacher: list[Path], transfer_set: Path, out: Path,
                       log: Callable[[str], None] = print) -> Path:
    """Run ``teacher`` (one or more ONNX files) over ``transfer_set`` and write the cache ``out``
    (or, when sharded, this rank's part of it; the path written is returned)."""
    return build_cache(cfg, teacher, transfer_set, out, log)[0]


def build_cache(cfg: CacheConfig, teacher: list[Path], transfer_set: Path, out: Path,
                log: Callable[[str], None] = print, env: Mapping[str, str] | None = None) -> tuple[Path, dict]:
    """:func:`cache_soft_targets`, also returning timings (seconds; for ``distill cache bench``)."""
    if not teacher:
        raise UsageError("give at least one teacher ONNX file")
    env = os.environ if env is None else env
    t0 = time.perf_counter()
    info = open_prepared(transfer_set)
    spec = cfg.view_spec()
    if spec is not None:
        try:
            spec.check_shape(info.shape)
        except ValueError as e:
            raise UsageError(f"{transfer_set}: {e}") from None
    total = info.rows[cfg.split] * (spec.count if spec is not None else 1)  # cache rows: views of the rows
    index, count = resolve_shard(cfg.shard, env)
    lo, hi = shard_rows(total, cfg.batch_size, index, count)
    out = part_path(Path(out), index, count) if count > 1 else Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    teachers = Teachers(teacher, info.shape, len(info.classes), cfg.device, cfg.threads, cfg.batch_size,
                        cfg.io_binding, log=log, device_id=int(env.get("LOCAL_RANK", 0)))
    for m in teachers.members:  # a two-row trial run of each teacher, before any row is read
        ort.check_io(m.path, m.sess, info.shape, len(info.classes))
    identity = {"teacher_sha256": [provenance.sha256_file(p) for p in teacher],
                "transfer_sha256": provenance.sha256_file(transfer_set), "settings": content_settings(cfg)}
    if count > 1:
        identity["part"] = {"index": index, "count": count, "rows": [lo, hi], "total_rows": total}
        log(f"cache: shard {index}/{count}, rows [{lo}, {hi}) -> {out}")
    if hi <= lo:
        raise DataError(f"{transfer_set}: the {cfg.split} split has no rows for shard {index}/{count}")
    stats = StreamStats()
    with exclusive(out) as tmp:
        box = {"w": CacheWriter.resume(tmp, identity, log)}
        try:
            start = lo
            if box["w"] is not None:
                start = lo + box["w"].committed_rows
                teachers.probabilities = json.loads(box["w"].attrs["teacher_probabilities"])
            bar = runtime.progress(total=hi - lo, initial=start - lo, desc="cache", unit="row")

            def write(b_lo: int, b_hi: int, logits: np.ndarray, labels_params: tuple) -> None:
                if box["w"] is None:
                    box["w"] = CacheWriter.create(
                        tmp, identity, hi - lo, logits.shape[1], logits.shape[2], cfg.temperatures,
                        views=None if spec is None else spec.as_dict(), source_rows=info.rows[cfg.split],
                        logits_dtype=cfg.logits_dtype)
                    box["w"].attrs["teacher_probabilities"] = json.dumps(teachers.probabilities)
                _write_batch(box["w"], b_lo - lo, logits, *labels_params, cfg, stats)
                bar.update(b_hi - b_lo)

            batches = [(b, min(hi, b + cfg.batch_size)) for b in range(start, hi, cfg.batch_size)]
            with info.rows_reader(cfg.split) as raw:  # one handle; only the reader thread reads it
                run_pipeline(batches, RowSource(info, cfg.split, spec, raw).read, teachers, write, stats)
            bar.close()
            diags = _finish(box["w"], cfg, teachers, identity, info, transfer_set, count > 1)
        finally:
            if box["w"] is not None:
                box["w"].close()
        publish(tmp, out)
    if diags:
        log(format_diagnostics(diags))
    wall = time.perf_counter() - t0
    log(f"cache: {hi - lo} rows x {teachers.provider} in {wall:.2f} s -> {out}")
    return out, {"wall_s": wall, "rows": hi - lo, "provider": teachers.provider,
                 "io_binding": teachers.io_binding, **dataclasses.asdict(stats)}


def used_settings(cfg: CacheConfig) -> dict:
    """The settings as recorded: the view and storage settings only when used, so a plain float32
    cache records (and is identified by) what it always was."""
    d = to_dict(cfg)
    if not cfg.views:
        d = {k: v for k, v in d.items() if not k.startswith("view")}
    if cfg.logits_dtype == "float32":
        d.pop("logits_dtype")
    return d


def content_settings(cfg: CacheConfig) -> dict:
    """The settings that change a cache's content (its identity): the used ones but the run-only ones."""
    return {k: v for k, v in used_settings(cfg).items() if k not in RUN_ONLY}


def _write_batch(w: CacheWriter, lo: int, logits: np.ndarray, y: np.ndarray, params: np.ndarray | None,
                 cfg: CacheConfig, stats: StreamStats) -> None:
    t = time.perf_counter()
    if cfg.logits_dtype != "float32":  # targets from the stored (rounded) logits: the file agrees with itself
        logits = logits.astype(cfg.logits_dtype)
    targets = {T: soft.combine_soft_targets(logits.astype(np.float32, copy=False), T, cfg.combine) for T in cfg.temperatures}
    t1 = time.perf_counter()
    w.put(lo, logits, targets, y, params)
    w.commit(lo + len(logits))
    stats.combine_s += t1 - t
    stats.write_s += time.perf_counter() - t1


def content_attrs(cfg: CacheConfig, identity: dict, probabilities: list, info: Prepared) -> dict:
    """The attributes that describe the content (equal for one run, a resumed run and merged shards)."""
    versions = provenance.versions()
    return dict(
        temperatures=[float(t) for t in cfg.temperatures], combine=cfg.combine,
        teacher_sha256=identity["teacher_sha256"], transfer_sha256=identity["transfer_sha256"],
        transfer_split=cfg.split, settings=json.dumps(identity["settings"]),
        teacher_probabilities=json.dumps(probabilities), classes_names=json.dumps(list(info.classes)),
        onnxruntime_version=versions.get("onnxruntime-gpu", versions.get("onnxruntime", "")),
        package_version=versions.get(provenance.PACKAGE, ""))


def _finish(w: CacheWriter | None, cfg: CacheConfig, teachers: Teachers, identity: dict, info: Prepared,
            transfer_set: Path, part: bool) -> dict:
    """Diagnostics per temperature (not for a part: merge computes them) and provenance; complete, sealed."""
    if w is None:
        raise DataError(f"{transfer_set}: the {cfg.split} split has no rows")
    diags = {} if part else diagnostics_in_blocks(w.read, cfg.temperatures, w.f["labels"].shape[0], DIAG_BLOCK)
    for T, d in diags.items():
        w.write_diagnostics(T, d)
    w.finish({**content_attrs(cfg, identity, teachers.probabilities, info), "provider": teachers.provider,
              "provenance": json.dumps(provenance.record("cache", used_settings(cfg), {
                  **{f"teacher{i}": p for i, p in enumerate(teachers.paths)}, "transfer_set": transfer_set},
                  provider=teachers.provider, io_binding=teachers.io_binding))},
             identity["part"] if part else None)
    return diags


def format_diagnostics(diags: dict[float, dict]) -> str:
    """A small table: one row per temperature."""
    lines = ["     T  entropy(nats)  accuracy  disagreement     ECE"]
    for T in sorted(diags):
        d = diags[T]
        lines.append(f"{t_key(T):>6}  {d['mean_entropy_nats']:13.4f}  {d['teacher_accuracy']:8.4f}  "
                     f"{d['member_disagreement']:12.4f}  {d['ece']:6.4f}")
    return "\n".join(lines)
