"""Stage 3, cache: run the teachers once with onnxruntime and store what soft targets at any T derive from.

Writes the soft-target cache (schema ``kd-cache/2``, :mod:`pipeline.formats.cache`, docs/formats.md):
raw per-member logits (float16 by default), or with ``top_k`` only the k classes of highest ensemble
target and what rebuilds the rest (:mod:`pipeline.topk`); a label per transfer row; per-temperature
diagnostics, each member's accuracy and provenance.  Soft targets ``p_T`` (optionally with member
weights) are derived when read, by :func:`pipeline.soft.targets`; ``store_soft`` also stores them at
every temperature, computed by that same function from the stored (rounded) numbers.

Teachers (docs/teachers.md): each ``--teacher`` is fed under its input contract (command line, then
the model's metadata, then defaults; :mod:`pipeline.feed`), checked before any row is read, then
judged by the sanity gate (:mod:`pipeline.sanity_gate`, on labelled rows drawn from the whole split)
before the first row is committed.  The resolved contracts are part of the cache's identity, so a
resume, a shard and ``verify`` feed the same inputs.  A run that fails (a refused batch, an error in
the reader or writer thread, which becomes one line) removes its ``.partial``; an interrupt, a kill
or a failed write (a full disk, a file-size limit: exit 7, saying how many rows are committed)
leaves it to resume.  Before the
partial file is created, the disk is checked for the finished file's size.

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
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from pipeline import contract as ct
from pipeline import feed, provenance, resources, runtime, sanity_gate, soft, topk
from pipeline.artifacts import check_outputs, claim, exclusive, partial_path, publish, release
from pipeline.config import to_dict
from pipeline.errors import DataError, PipelineError, UsageError
from pipeline.formats.cache import CacheLayout, StoredRows, t_key
from pipeline.formats.cache_writer import CacheWriter
from pipeline.formats.prepared import Prepared, open_prepared
from pipeline.resources import human, require_space
from stages.cache import prior as class_prior
from stages.cache.settings import NOT_IN_SETTINGS, CacheConfig, diag_block
from stages.cache.stream import (
    StreamStats,
    diagnostics_in_blocks,
    member_accuracy_in_blocks,
    part_path,
    resolve_shard,
    run_pipeline,
    shard_rows,
)
from stages.cache.teachers import Teachers
from stages.cache.viewsource import RowSource


def cache_soft_targets(cfg: CacheConfig, teacher: list, transfer_set: Path, out: Path,
                       log: Callable[[str], None] = print) -> Path:
    """Run ``teacher`` (one or more ONNX files: paths, or ``PATH:key=value,...`` declarations of their
    input contracts, :func:`pipeline.contract.parse_teacher`) over ``transfer_set`` and write the
    cache ``out`` (or, when sharded, this rank's part of it; the path written is returned)."""
    return build_cache(cfg, teacher, transfer_set, out, log)[0]


def _gate(cfg: CacheConfig, teachers: Teachers, info: Prepared, log: Callable[[str], None]) -> list:
    """Each teacher's gate record (None: not judged), after judging its contract on ``gate_rows``
    labelled rows drawn from the whole split (:mod:`pipeline.sanity_gate`)."""
    if not cfg.gate:
        return [None] * len(teachers.plans)
    rows, labelled = sanity_gate.gate_rows(info.labels(cfg.split), cfg.gate_rows, cfg.gate_seed)
    if labelled < sanity_gate.MIN_LABELLED:
        for plan in teachers.plans:
            sanity_gate.unjudged(plan, labelled, cfg.split, "--no-gate", log, "cache")
        return [None] * len(teachers.plans)
    x, y = info.take(cfg.split, rows)
    offsets = np.cumsum([0] + [s[1] if len(s) == 3 else 1 for s in teachers.shapes])

    def run(i: int, c) -> np.ndarray:
        return feed.run_model(teachers.sessions[i], teachers.plans[i], x, teachers.geom, teachers.batch, c)

    def first(i: int, logits: np.ndarray) -> None:  # the run's own outputs: its error, naming row and member
        feed.check_finite(logits, teachers.plans[i].path, 0, int(offsets[i]), rows=rows)

    drawn = {"seed": cfg.gate_seed, "labelled": labelled, "split": cfg.split}
    return sanity_gate.run_gate(teachers.plans, run, y, teachers.geom, teachers.classes, drawn, log, first=first)


def build_cache(cfg: CacheConfig, teacher: list, transfer_set: Path, out: Path,
                log: Callable[[str], None] = print, env: Mapping[str, str] | None = None) -> tuple[Path, dict]:
    """:func:`cache_soft_targets`, also returning timings (seconds; for ``distill cache bench``)."""
    if not teacher:
        raise UsageError("give at least one teacher ONNX file")
    specs = [ct.parse_teacher(t) for t in teacher]
    env = os.environ if env is None else env
    t0 = time.perf_counter()
    index, count = resolve_shard(cfg.shard, env)
    out = part_path(Path(out), index, count) if count > 1 else Path(out)
    check_outputs({"--teacher": [s.path for s in specs], "--transfer-set": transfer_set}, {"--out": out})
    info = open_prepared(transfer_set)
    spec = cfg.view_spec()
    if spec is not None:
        try:
            spec.check_shape(info.shape)
        except ValueError as e:
            raise UsageError(f"{transfer_set}: {e}") from None
    if cfg.top_k >= len(info.classes):
        raise UsageError(f"top_k {cfg.top_k}: keep fewer than the {len(info.classes)} classes (0 keeps every class)")
    total = info.rows[cfg.split] * (spec.count if spec is not None else 1)  # cache rows: views of the rows
    lo, hi = shard_rows(total, cfg.batch_size, index, count)
    if hi <= lo:
        raise DataError(f"{transfer_set}: the {cfg.split} split has no rows for shard {index}/{count}")
    teachers = Teachers(specs, ct.Geometry.of(info), len(info.classes), cfg.device, cfg.threads, cfg.batch_size,
                        cfg.io_binding, log=log, device_id=int(env.get("LOCAL_RANK", 0)))
    teachers.check()  # a two-row trial run of each teacher, before any row is read
    try:
        weights = soft.normalise_weights(cfg.member_weights, teachers.member_count)
    except ValueError as e:
        raise UsageError(str(e)) from None
    claim(out)  # a second writer fails now, not after this one's gate (the first lock of the output)
    try:
        gates = _gate(cfg, teachers, info, log)  # may take a clear winner for undeclared fields
        if spec is not None and spec.mixup > 0 and any(c.dtype == "uint8" for c in teachers.contracts):
            raise UsageError("views that mix rows (--view-mixup > 0) are not whole pixels, and a teacher here "
                             "takes uint8 input; build the views without mixing")
        teachers.start()
    except BaseException:
        release(out)  # refused before any row: no empty .partial left behind
        raise
    identity = {"teacher_sha256": [provenance.sha256_file(s.path) for s in specs],
                "transfer_sha256": provenance.sha256_file(transfer_set), "settings": content_settings(cfg),
                "teacher_inputs": [c.as_dict() for c in teachers.contracts],
                **({"member_weights": weights.tolist()} if weights is not None else {})}
    records = [{**p.record(), "gate": g} for p, g in zip(teachers.plans, gates)]
    if count > 1:
        identity["part"] = {"index": index, "count": count, "rows": [lo, hi], "total_rows": total}
        log(f"cache: shard {index}/{count}, rows [{lo}, {hi}) -> {out}")
    stats = StreamStats()
    try:
        _require_space(out, layout(cfg, hi - lo, teachers.member_count, len(info.classes), lo))
    except BaseException:
        release(out)
        raise
    with exclusive(out) as tmp:
        diags, accs = _write_cache(cfg, tmp, identity, (lo, hi), info, teachers, weights, records, stats,
                                   transfer_set, count > 1, log)
        publish(tmp, out)
    if diags:
        log(format_diagnostics(diags, accs))
    wall = time.perf_counter() - t0
    log(f"cache: {hi - lo} rows x {teachers.provider} in {wall:.2f} s -> {out}")
    return out, {"wall_s": wall, "rows": hi - lo, "provider": teachers.provider,
                 "io_binding": teachers.io_binding, **dataclasses.asdict(stats)}


def layout(cfg: CacheConfig, rows: int, members: int, classes: int, first_row: int = 0) -> CacheLayout:
    """The datasets ``cfg`` writes for cache rows ``[first_row, first_row + rows)``."""
    return CacheLayout(rows, members, classes, cfg.logits_dtype, cfg.top_k,
                       tuple(cfg.temperatures) if cfg.store_soft else (), max(1, cfg.views), cfg.views > 0, first_row,
                       tail_prior=cfg.tail_prior_rows > 0)


def _require_space(out: Path, lay: CacheLayout) -> None:
    """Refuse (exit 7) before any row runs, and before the partial file is created, when the disk
    cannot hold the finished file; a partial being resumed or replaced already holds part of that space."""
    need, figure = lay.size()
    tmp = partial_path(out)
    have = tmp.stat().st_size if tmp.exists() else 0
    require_space(out, need - have, figure + (f", less the {human(have)} of {tmp.name}" if have else ""))


def _write_cache(cfg: CacheConfig, tmp: Path, identity: dict, span: tuple[int, int], info: Prepared,
                 teachers: Teachers, weights: np.ndarray | None, records: list, stats: StreamStats,
                 transfer_set: Path, part: bool, log: Callable[[str], None]) -> tuple[dict, list | None]:
    """Run the rows of ``span`` not yet committed in ``tmp`` and finish it (diagnostics, seal).

    A failed write of ``tmp`` (full disk, file-size limit) is one ResourceError saying how many rows
    are committed: the partial stays, and the same command resumes after them.  Any other failure (a
    refused batch, an error in the reader or writer thread) is one line and removes the partial:
    rerunning would fail the same way.  An interrupt or a kill keeps it.
    """
    lo, hi = span
    box = {"w": CacheWriter.resume(tmp, identity, log, cfg.batch_size), "rows": 0}
    try:
        start = lo
        prior = None
        if box["w"] is not None:
            start = lo + box["w"].committed_rows
            box["rows"] = start - lo
            teachers.probabilities = json.loads(box["w"].attrs["teacher_probabilities"])
            prior = box["w"].prior()
        elif cfg.tail_prior_rows:  # before any row: the sample's rows are the prior's, not the cache's
            prior = class_prior.compute(teachers, info, cfg.split, cfg.tail_prior_rows, cfg.top_k, cfg.combine,
                                        weights, cfg.batch_size, log)
            with np.errstate(over="ignore"):  # as stored (the writer refuses what the dtype cannot hold), so
                prior = prior.astype(cfg.logits_dtype)  # a fresh run derives what a resumed one reads
        bar = runtime.progress(total=hi - lo, initial=start - lo, desc="cache", unit="row")

        spec = cfg.view_spec()

        def write(b_lo: int, b_hi: int, logits: np.ndarray, labels_params: tuple) -> None:
            if box["w"] is None:
                box["w"] = CacheWriter.create(
                    tmp, identity, layout(cfg, hi - lo, logits.shape[1], logits.shape[2], lo),
                    views=None if spec is None else spec.as_dict(), source_rows=info.rows[cfg.split], prior=prior)
                box["w"].attrs["teacher_probabilities"] = json.dumps(teachers.probabilities)
            _write_batch(box["w"], b_lo - lo, logits, *labels_params, cfg, weights, stats, prior)
            box["rows"] = b_hi - lo
            bar.update(b_hi - b_lo)

        batches = [(b, min(hi, b + cfg.batch_size)) for b in range(start, hi, cfg.batch_size)]
        with info.rows_reader(cfg.split) as raw:  # one handle; only the reader thread reads it
            source = RowSource(info, cfg.split, spec, raw)

            def read(a: int, b: int) -> tuple[list[np.ndarray], tuple]:
                x, labels_params = source.read(a, b)
                return teachers.adapt(x), labels_params  # each teacher's input, once per distinct contract

            run_pipeline(batches, read, teachers, write, stats)
        bar.close()
        out = _finish(box["w"], cfg, teachers, identity, records, weights, info, transfer_set, part)
        w, box["w"] = box["w"], None
        w.close()  # its last writes happen here
        return out
    except Exception as e:  # not an interrupt: a killed or interrupted run keeps its partial to resume
        if resources.failed_file(e) == str(tmp):
            done, total = box["rows"], hi - lo
            raise resources.write_failure(tmp, e, (
                f"{done} of {total} rows are committed in it: free space and rerun the same command to resume "
                f"from there" if done < total else "every row is committed in it: free space and rerun the same "
                "command to finish it")) from None
        _close(box)
        tmp.unlink(missing_ok=True)  # a run that failed leaves nothing behind (rerunning would fail again)
        if isinstance(e, PipelineError) or resources.is_memory_error(e):
            raise  # the command line words a memory error (exit 7, naming --batch-size)
        where = " ".join(getattr(e, "__notes__", [])) or "in the cache stage"  # the thread, from run_pipeline
        first = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        raise DataError(f"{tmp.with_name(tmp.name.removesuffix('.partial'))}: {type(e).__name__} {where}: "
                        f"{first}; nothing was published") from e
    finally:
        _close(box)


def _close(box: dict) -> None:
    if box["w"] is not None:
        box["w"].close()
        box["w"] = None


def used_settings(cfg: CacheConfig) -> dict:
    """The settings as recorded: the view settings only when used."""
    d = to_dict(cfg)
    if not cfg.views:
        d = {k: v for k, v in d.items() if not k.startswith("view")}
    if not cfg.tail_prior_rows:  # caches from before the prior rule keep their identity
        d.pop("tail_prior_rows")
    return d


def content_settings(cfg: CacheConfig) -> dict:
    """The settings that change a cache's content (its identity): the used ones but the run-only ones."""
    return {k: v for k, v in used_settings(cfg).items() if k not in NOT_IN_SETTINGS}


def compact_rows(logits: np.ndarray, cfg: CacheConfig, weights: np.ndarray | None,
                 classes: int, prior: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], StoredRows]:
    """What the cache stores of a batch of per-member logits (float32 ``[n, M, C]``): the datasets'
    rows, and the same numbers as :class:`StoredRows` (stored soft targets are derived from those, so
    the file agrees with itself).  DataError when a logit does not fit ``logits_dtype``."""
    dt = np.dtype(cfg.logits_dtype)
    base = StoredRows(classes, cfg.combine, None if weights is None else tuple(weights.tolist()), prior=prior)
    with np.errstate(over="ignore"):  # a logit beyond the dtype's range becomes inf, refused below
        if cfg.top_k:
            ids, kept, tail = topk.compress(logits, cfg.top_k, cfg.combine, weights)
            spread = topk.tail_spread(logits, ids, tail, weights).astype(dt)
            kept, tail = kept.astype(dt), tail.astype(dt)
            rows = {"topk/ids": ids, "topk/logits": kept, "topk/tail": tail, "topk/spread": spread}
            stored = dataclasses.replace(base, ids=ids, kept=kept, tail=tail, spread=spread)
        else:
            logits = logits.astype(dt, copy=False)
            rows, stored = {"logits": logits}, dataclasses.replace(base, logits=logits)
    if not all(np.all(np.isfinite(a)) for a in rows.values() if a.dtype.kind == "f"):
        raise DataError(f"a teacher's logits exceed the range of {cfg.logits_dtype} (|logit| > "
                        f"{float(np.finfo(dt).max):g}); build with --logits-dtype float32")
    return rows, stored


def _write_batch(w: CacheWriter, lo: int, logits: np.ndarray, y: np.ndarray, params: np.ndarray | None,
                 cfg: CacheConfig, weights: np.ndarray | None, stats: StreamStats,
                 prior: np.ndarray | None = None) -> None:
    t = time.perf_counter()
    rows, stored = compact_rows(logits, cfg, weights, logits.shape[2], prior)
    if cfg.store_soft:
        rows.update({f"soft/{t_key(T)}": soft.targets(stored, T) for T in cfg.temperatures})
    if params is not None:
        rows["view_params"] = params
    t1 = time.perf_counter()
    w.put(lo, rows, y)
    w.commit(lo + len(logits))
    stats.combine_s += t1 - t
    stats.write_s += time.perf_counter() - t1


def content_attrs(cfg: CacheConfig, identity: dict, probabilities: list, info: Prepared, records: list,
                  weights: np.ndarray | None, members: int) -> dict:
    """The attributes that describe the content (equal for one run, a resumed run and merged shards):
    besides the first ones, ``teacher_inputs`` (each file's contract, where its fields came from and
    its gate record) and ``member_weights`` (normalised; equal when none were given)."""
    versions = provenance.versions()
    return dict(
        teacher_inputs=json.dumps(records), member_weights=json.dumps(
            weights.tolist() if weights is not None else [1.0 / members] * members),
        temperatures=[float(t) for t in cfg.temperatures], combine=cfg.combine,
        teacher_sha256=identity["teacher_sha256"], transfer_sha256=identity["transfer_sha256"],
        transfer_split=cfg.split, settings=json.dumps(identity["settings"]),
        teacher_probabilities=json.dumps(probabilities), classes_names=json.dumps(list(info.classes)),
        onnxruntime_version=versions.get("onnxruntime-gpu", versions.get("onnxruntime", "")),
        package_version=versions.get(provenance.PACKAGE, ""))


def _finish(w: CacheWriter | None, cfg: CacheConfig, teachers: Teachers, identity: dict, records: list,
            weights: np.ndarray | None, info: Prepared, transfer_set: Path, part: bool) -> tuple[dict, list | None]:
    """Diagnostics per temperature and each member's accuracy (not for a part: merge computes them)
    and provenance; complete, sealed."""
    if w is None:
        raise DataError(f"{transfer_set}: the {cfg.split} split has no rows")
    rows, members = w.layout.rows, w.layout.members
    reader = w.reader(cfg.combine, weights)
    block = diag_block(w.layout.classes, members)
    diags = {} if part else diagnostics_in_blocks(reader, cfg.temperatures, rows, block)
    for T, d in diags.items():
        w.write_diagnostics(T, d)
    extra = {} if part else {"member_accuracy": member_accuracy_in_blocks(reader, rows, block)}
    w.finish({**content_attrs(cfg, identity, teachers.probabilities, info, records, weights, members),
              **extra, "provider": teachers.provider,
              "provenance": json.dumps(provenance.record("cache", used_settings(cfg), {
                  **{f"teacher{i}": p for i, p in enumerate(teachers.paths)}, "transfer_set": transfer_set},
                  provider=teachers.provider, io_binding=teachers.io_binding))},
             identity["part"] if part else None)
    return diags, extra.get("member_accuracy")


def format_diagnostics(diags: dict[float, dict], member_accuracy: list[float] | None = None) -> str:
    """A small table: one row per temperature; then each member's accuracy, when given."""
    lines = ["     T  entropy(nats)  accuracy  disagreement     ECE"]
    for T in sorted(diags):
        d = diags[T]
        lines.append(f"{t_key(T):>6}  {d['mean_entropy_nats']:13.4f}  {d['teacher_accuracy']:8.4f}  "
                     f"{d['member_disagreement']:12.4f}  {d['ece']:6.4f}")
    if member_accuracy:
        lines.append("member accuracy: " + ", ".join(f"{i}: {a:.4f}" for i, a in enumerate(member_accuracy)))
    return "\n".join(lines)
