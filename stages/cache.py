"""Stage 3, cache: run the teachers once with onnxruntime and store soft targets at several T.

Writes HDF5 schema ``kd-cache/1`` (DESIGN.md section 3): raw per-member logits, combined soft
targets ``p_T`` at each temperature, labels, per-temperature diagnostics and provenance.  Because
the raw logits are kept, a new temperature is computed from the file without any teacher
(``distill cache add-temperature``, :mod:`stages.cache_tools`).

Streaming: the transfer set is read, run and written batch by batch, with reading and writing
overlapped with inference (:mod:`stages.cache_stream`), and diagnostics are computed over blocks,
so memory stays bounded whatever the row count.

Crash safety: rows are written in batches to ``<out>.partial``; after each batch the file is
flushed and fsynced and ``committed_rows`` advanced.  Run again with the same arguments, the stage
resumes after the last committed batch (batch boundaries are fixed multiples of ``batch_size``, so
the content is identical to an uninterrupted run); a ``.partial`` that does not open, or was made
from other inputs, is restarted from zero.  The finished file is published by fsync, rename, fsync
of the directory.  No attribute records a time, so equal runs give equal attributes.

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

import h5py
import numpy as np

from pipeline import h5safe, provenance, runtime
from pipeline.artifacts import exclusive, fsync_path, publish
from pipeline.config import require, setting, to_dict
from pipeline.errors import DataError, IntegrityError, UsageError
from stages import kd
from stages.cache_stream import (StreamStats, diagnostics_in_blocks, parse_shard, part_path,  # noqa: F401
                                 resolve_shard, run_pipeline, shard_rows)
from stages.cache_teachers import Teachers  # noqa: F401 - re-exported: the stage's teacher wrapper
from stages.prepare import open_prepared

SCHEMA = "kd-cache/1"
CHUNK_BYTES = 512 << 10  # chunks of whole rows, ~512 KiB: in DESIGN's 256 KiB - 1 MiB band
DIAG_BLOCK = 16384  # rows per diagnostics block: ~0.7 MB of logits per member at 10 classes (float64 temporaries ~6 MB)
RUN_ONLY = ("device", "threads", "shard", "io_binding")  # settings that do not change the content


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Run the teacher ensemble over the transfer set with onnxruntime and write the soft-target
    cache (kd-cache/1): per-member logits and combined soft targets at each temperature."""

    temperatures: tuple[float, ...] = setting((1.0, 2.0, 4.0, 8.0, 20.0), "temperatures to store soft targets at")
    combine: str = setting("arithmetic", "member combination: arithmetic (mean of softmaxes, Hinton) or "
                                         "geometric (softmax of mean logits)")
    split: str = setting("train", "split of the prepared file used as the transfer set")
    batch_size: int = setting(1024, "rows per onnxruntime call (also the commit unit and the CUDA bound size)")
    device: str = setting("auto", "auto (CUDA when onnxruntime can run it, else CPU, said aloud), cpu or cuda")
    threads: int = setting(2, "onnxruntime intra-op threads")
    io_binding: str = setting("auto", "bind inputs/outputs at a fixed padded batch: auto (on CUDA only), on, off")
    shard: str = setting("", "i/n: write part i of n (rows of a contiguous range of batches) to "
                             "<out stem>.part<i>of<n><suffix>; empty = RANK/WORLD_SIZE when set, else all rows")

    def __post_init__(self) -> None:
        require(len(self.temperatures) > 0, "give at least one temperature")
        require(all(t > 0 for t in self.temperatures), "temperatures must be > 0")
        require(len(set(self.temperatures)) == len(self.temperatures), "temperatures must be distinct")
        require(self.combine in kd.COMBINES, f"combine must be one of {', '.join(kd.COMBINES)}")
        require(self.split in ("train", "val", "test"), "split must be train, val or test")
        require(self.batch_size >= 1 and self.threads >= 1, "batch_size and threads must be >= 1")
        require(self.device in runtime.DEVICES, f"device must be one of {', '.join(runtime.DEVICES)}")
        require(self.io_binding in ("auto", "on", "off"), "io_binding must be auto, on or off")
        if self.shard:
            parse_shard(self.shard)


def t_key(T: float) -> str:
    """Dataset name of temperature T: ``4`` for 4.0, ``2.5`` for 2.5."""
    return f"{float(T):g}"


def _open_partial(tmp: Path, identity: dict, log: Callable) -> h5py.File | None:
    """Reopen a partial cache made from the same inputs and settings, else None (restart)."""
    if tmp.stat().st_size == 0:  # just created by the lock: nothing to resume
        return None
    try:
        f = h5py.File(tmp, "r+", locking=False)
        if (json.loads(f.attrs["identity"]) == identity and "logits" in f
                and "teacher_probabilities" in f.attrs):
            log(f"resuming {tmp} at row {int(f.attrs['committed_rows'])}")
            return f
        f.close()
        log(f"{tmp}: made from other inputs or settings; restarting from row 0")
    except (OSError, KeyError, ValueError):
        log(f"{tmp}: unreadable partial cache (killed writer?); restarting from row 0")
    return None  # _create truncates it in place (same inode: the lock stays valid)


def create_cache(path: Path, identity: dict, rows: int, members: int, classes: int,
                 temperatures: tuple[float, ...]) -> h5py.File:
    """A new, empty kd-cache/1 file at ``path`` (truncated if it exists) with its datasets."""
    f = h5py.File(path, "w", locking=False)
    chunk = max(1, min(rows, CHUNK_BYTES // (members * classes * 4)))
    f.create_dataset("logits", (rows, members, classes), np.float32, chunks=(chunk, members, classes))
    for T in temperatures:
        add_soft_dataset(f, T, rows, classes)
    f.create_dataset("labels", (rows,), np.int64, chunks=(max(1, min(rows, CHUNK_BYTES // 8)),))
    f.attrs.update(schema=SCHEMA, rows=rows, members=members, classes=classes, committed_rows=0,
                   complete=False, identity=json.dumps(identity))
    return f


def add_soft_dataset(f: h5py.File, T: float, rows: int, classes: int) -> h5py.Dataset:
    soft_chunk = max(1, min(rows, CHUNK_BYTES // (classes * 4)))
    return f.create_dataset(f"soft/{t_key(T)}", (rows, classes), np.float32, chunks=(soft_chunk, classes))


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
    index, count = resolve_shard(cfg.shard, env)
    lo, hi = shard_rows(info.rows[cfg.split], cfg.batch_size, index, count)
    out = part_path(Path(out), index, count) if count > 1 else Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    teachers = Teachers(teacher, info.shape, len(info.classes), cfg.device, cfg.threads, cfg.batch_size,
                        cfg.io_binding, log=log, device_id=int(env.get("LOCAL_RANK", 0)))
    for m in teachers.members:  # a two-row trial run of each teacher, before any row is read
        runtime.check_io(m.path, m.sess, info.shape, len(info.classes))
    identity = {"teacher_sha256": [provenance.sha256_file(p) for p in teacher],
                "transfer_sha256": provenance.sha256_file(transfer_set),
                "settings": {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY}}
    if count > 1:
        identity["part"] = {"index": index, "count": count, "rows": [lo, hi], "total_rows": info.rows[cfg.split]}
        log(f"cache: shard {index}/{count}, rows [{lo}, {hi}) -> {out}")
    if hi <= lo:
        raise DataError(f"{transfer_set}: the {cfg.split} split has no rows for shard {index}/{count}")
    stats = StreamStats()
    with exclusive(out) as tmp:
        box = {"f": _open_partial(tmp, identity, log)}
        try:
            start = lo
            if box["f"] is not None:
                start = lo + int(box["f"].attrs["committed_rows"])
                teachers.probabilities = json.loads(box["f"].attrs["teacher_probabilities"])
            bar = runtime.progress(total=hi - lo, initial=start - lo, desc="cache", unit="row")

            def write(b_lo: int, b_hi: int, logits: np.ndarray, y: np.ndarray) -> None:
                if box["f"] is None:
                    box["f"] = create_cache(tmp, identity, hi - lo, logits.shape[1], logits.shape[2], cfg.temperatures)
                    box["f"].attrs["teacher_probabilities"] = json.dumps(teachers.probabilities)
                _write_batch(box["f"], tmp, b_lo - lo, logits, y, cfg, stats)
                bar.update(b_hi - b_lo)

            with h5py.File(transfer_set, "r") as src:  # opened once; only the reader thread reads it
                xs, ys = src[cfg.split]["x"], src[cfg.split]["y"]
                run_pipeline([(b, min(hi, b + cfg.batch_size)) for b in range(start, hi, cfg.batch_size)],
                             lambda a, b: (info.normalise(xs[a:b]), ys[a:b]), teachers, write, stats,
                             throttle_s=float(env.get("DISTILL_CACHE_THROTTLE_S", 0) or 0))
            bar.close()
            diags = _finish(box["f"], cfg, teachers, identity, info, transfer_set, count > 1)
        finally:
            if box["f"] is not None:
                box["f"].close()
        publish(tmp, out)
    if diags:
        log(format_diagnostics(diags))
    wall = time.perf_counter() - t0
    log(f"cache: {hi - lo} rows x {teachers.provider} in {wall:.2f} s -> {out}")
    return out, {"wall_s": wall, "rows": hi - lo, "provider": teachers.provider,
                 "io_binding": teachers.io_binding, **dataclasses.asdict(stats)}


def _write_batch(f: h5py.File, tmp: Path, lo: int, logits: np.ndarray, y: np.ndarray, cfg: CacheConfig,
                 stats: StreamStats) -> None:
    hi = lo + len(logits)
    t = time.perf_counter()
    soft = {T: kd.combine_soft_targets(logits, T, cfg.combine) for T in cfg.temperatures}
    t1 = time.perf_counter()
    f["logits"][lo:hi] = logits
    for T, p in soft.items():
        f[f"soft/{t_key(T)}"][lo:hi] = p
    f["labels"][lo:hi] = y
    f.flush()  # data before the counter: a committed row is always on disk
    f.attrs["committed_rows"] = hi
    f.flush()
    fsync_path(tmp)  # h5py's flush reaches the OS only; the counter must survive a crash
    stats.combine_s += t1 - t
    stats.write_s += time.perf_counter() - t1


def content_attrs(cfg: CacheConfig, identity: dict, probabilities: list, info) -> dict:
    """The attributes that describe the content (equal for one run, a resumed run and merged shards)."""
    return dict(
        temperatures=[float(t) for t in cfg.temperatures], combine=cfg.combine,
        teacher_sha256=identity["teacher_sha256"], transfer_sha256=identity["transfer_sha256"],
        transfer_split=cfg.split, settings=json.dumps(identity["settings"]),
        teacher_probabilities=json.dumps(probabilities), classes_names=json.dumps(list(info.classes)),
        onnxruntime_version=provenance.versions().get("onnxruntime-gpu", provenance.versions().get("onnxruntime", "")),
        package_version=provenance.versions().get(provenance.PACKAGE, ""))


def _finish(f: h5py.File, cfg: CacheConfig, teachers: Teachers, identity: dict, info, transfer_set: Path,
            part: bool) -> dict:
    """Diagnostics per temperature (not for a part: merge computes them) and provenance; complete."""
    if f is None:
        raise DataError(f"{transfer_set}: the {cfg.split} split has no rows")
    diags = {} if part else diagnostics_in_blocks(f, cfg.temperatures, DIAG_BLOCK, t_key)
    for T, d in diags.items():
        write_diagnostics(f, T, d)
    f.attrs.update(
        **content_attrs(cfg, identity, teachers.probabilities, info), provider=teachers.provider,
        provenance=json.dumps(provenance.record("cache", to_dict(cfg), {
            **{f"teacher{i}": p for i, p in enumerate(teachers.paths)}, "transfer_set": transfer_set},
            provider=teachers.provider, io_binding=teachers.io_binding)))
    if part:
        f.attrs["part"] = json.dumps(identity["part"])
    f.attrs["complete"] = True
    h5safe.seal(f)  # content checksum, verified by open_cache: call after every later change too
    f.flush()
    return diags


def write_diagnostics(f: h5py.File, T: float, d: dict) -> None:
    g = f.require_group(f"diagnostics/{t_key(T)}")
    g.attrs.update(d)


def format_diagnostics(diags: dict[float, dict]) -> str:
    """A small table: one row per temperature."""
    lines = ["     T  entropy(nats)  accuracy  disagreement     ECE"]
    for T in sorted(diags):
        d = diags[T]
        lines.append(f"{t_key(T):>6}  {d['mean_entropy_nats']:13.4f}  {d['teacher_accuracy']:8.4f}  "
                     f"{d['member_disagreement']:12.4f}  {d['ece']:6.4f}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    path: Path
    rows: int
    members: int
    classes: int
    temperatures: tuple[float, ...]
    transfer_sha256: str
    transfer_split: str
    attrs: dict

    def soft(self, T: float) -> np.ndarray:
        """Soft targets at T [rows, classes]; UsageError naming the stored ones when absent."""
        if float(T) not in self.temperatures:
            raise UsageError(f"{self.path}: no soft targets at T={t_key(T)}; the cache has "
                             + ", ".join(map(t_key, self.temperatures))
                             + " (add one with `distill cache add-temperature`)")
        with h5py.File(self.path, "r") as f:
            return f[f"soft/{t_key(T)}"][:]

    def read(self, name: str) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return f[name][:]

    def diagnostics(self) -> dict[float, dict]:
        """Stored per-temperature diagnostics: {T: {mean_entropy_nats, teacher_accuracy, ...}}."""
        with h5py.File(self.path, "r") as f:
            return {T: {k: float(v) for k, v in f[f"diagnostics/{t_key(T)}"].attrs.items()}
                    for T in self.temperatures if f"diagnostics/{t_key(T)}" in f}


def open_cache(path: Path) -> CacheInfo:
    """Open and check a finished cache; DataError/IntegrityError with one line when unusable.

    Untrusted input (:mod:`pipeline.h5safe`): shapes and dtypes bounded before any read, content
    checksum verified, the datasets' shapes consistent with the attributes, labels in [-1, classes).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cache not found; run `make cache`")
    with h5safe.open_untrusted(path, "cache") as f:
        h5safe.check_attrs(path, f)
        a = dict(f.attrs)
        if a.get("schema") != SCHEMA:
            raise DataError(f"{path}: not a soft-target cache (schema {a.get('schema')!r})")
        if "part" in a:
            raise IntegrityError(f"{path}: one part of a sharded cache; join the parts with `distill cache merge`")
        if not a.get("complete") or int(a["committed_rows"]) != int(a["rows"]):
            raise IntegrityError(f"{path}: incomplete cache; rebuild with `make cache`")
        h5safe.verify(path, f, "make cache")
        info = CacheInfo(path, int(a["rows"]), int(a["members"]), int(a["classes"]),
                         tuple(float(t) for t in a["temperatures"]), str(a["transfer_sha256"]),
                         str(a["transfer_split"]), a)
        want = {"logits": (info.rows, info.members, info.classes), "labels": (info.rows,),
                **{f"soft/{t_key(T)}": (info.rows, info.classes) for T in info.temperatures}}
        for name, shape in want.items():
            if name == "logits" and name not in f:
                continue  # soft targets alone still train a student; tools that need logits say so
            if name not in f or f[name].shape != shape:
                raise DataError(f"{path}: dataset {name} is missing or not of shape {shape}")
        y = f["labels"][:]
        if ((y < -1) | (y >= info.classes)).any():
            raise DataError(f"{path}: labels outside [-1, {info.classes})")
        return info
