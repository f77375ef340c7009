"""Stage 3, cache: run the teachers once with onnxruntime and store soft targets at several T.

Writes HDF5 schema ``kd-cache/1`` (DESIGN.md section 3): raw per-member logits, combined soft
targets ``p_T`` at each temperature, labels, per-temperature diagnostics and provenance.  Because
the raw logits are kept, a new temperature is computed from the file without any teacher.

Crash safety: rows are written in batches to ``<out>.partial``; after each batch the file is
flushed and fsynced and ``committed_rows`` advanced.  Run again with the same arguments, the stage
resumes after the last committed batch (batch boundaries are fixed, so the content is identical to
an uninterrupted run); a ``.partial`` that does not open, or was made from other inputs, is
restarted from zero.  The finished file is published by fsync, rename, fsync of the directory.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from pipeline import h5safe, provenance, runtime
from pipeline.artifacts import exclusive, fsync_path, publish
from pipeline.config import require, setting, to_dict
from pipeline.errors import DataError, IntegrityError, UsageError
from stages import kd
from stages.prepare import open_prepared

SCHEMA = "kd-cache/1"
CHUNK_BYTES = 512 << 10  # chunks of whole rows, ~512 KiB: in DESIGN's 256 KiB - 1 MiB band


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Run the teacher ensemble over the transfer set with onnxruntime and write the soft-target
    cache (kd-cache/1): per-member logits and combined soft targets at each temperature."""

    temperatures: tuple[float, ...] = setting((1.0, 2.0, 4.0, 8.0, 20.0), "temperatures to store soft targets at")
    combine: str = setting("arithmetic", "member combination: arithmetic (mean of softmaxes, Hinton) or "
                                         "geometric (softmax of mean logits)")
    split: str = setting("train", "split of the prepared file used as the transfer set")
    batch_size: int = setting(1024, "rows per onnxruntime call (also the commit unit)")
    device: str = setting("auto", "auto (CUDA when onnxruntime can run it, else CPU, said aloud), cpu or cuda")
    threads: int = setting(2, "onnxruntime intra-op threads")

    def __post_init__(self) -> None:
        require(len(self.temperatures) > 0, "give at least one temperature")
        require(all(t > 0 for t in self.temperatures), "temperatures must be > 0")
        require(len(set(self.temperatures)) == len(self.temperatures), "temperatures must be distinct")
        require(self.combine in kd.COMBINES, f"combine must be one of {', '.join(kd.COMBINES)}")
        require(self.split in ("train", "val", "test"), "split must be train, val or test")
        require(self.batch_size >= 1 and self.threads >= 1, "batch_size and threads must be >= 1")
        require(self.device in runtime.DEVICES, f"device must be one of {', '.join(runtime.DEVICES)}")


def t_key(T: float) -> str:
    """Dataset name of temperature T: ``4`` for 4.0, ``2.5`` for 2.5."""
    return f"{float(T):g}"


class Teachers:
    """One or more ONNX teachers run as one ensemble: outputs joined on the member axis."""

    def __init__(self, paths: list[Path], shape: tuple[int, ...], cfg: CacheConfig, log: Callable):
        self.paths = [Path(p) for p in paths]
        self.sessions = [runtime.session(p, cfg.device, cfg.threads, log=log) for p in self.paths]
        self.provider = runtime.provider_name(self.sessions[0])
        self.probabilities: list[bool | None] = [None] * len(self.paths)
        for path, sess in zip(self.paths, self.sessions):
            _check_input(path, sess.get_inputs()[0], shape)

    def __call__(self, x: np.ndarray, first_row: int) -> np.ndarray:
        """member_logits [rows, members, classes] float32; DataError on NaN/Inf or mismatches."""
        parts = []
        for i, (path, sess) in enumerate(zip(self.paths, self.sessions)):
            out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            out = out[:, None, :] if out.ndim == 2 else out
            if out.ndim != 3 or out.shape[0] != len(x):
                raise DataError(f"{path}: output shape {out.shape}, expected [batch, classes] or "
                                f"[batch, members, classes]")
            bad = ~np.isfinite(out)
            if bad.any():
                row, member = np.argwhere(bad)[0][:2]
                raise DataError(f"{path}: non-finite output at row {first_row + int(row)}, member {int(member)}")
            if self.probabilities[i] is None:  # decided once per teacher, on its first batch
                self.probabilities[i] = kd.looks_like_probabilities(out)
            parts.append(kd.as_logits(out) if self.probabilities[i] else out.astype(np.float32))
        classes = {p.shape[2] for p in parts}
        if len(classes) != 1:
            raise DataError(f"teachers disagree on the class count: "
                            + ", ".join(f"{p.name}: {q.shape[2]}" for p, q in zip(self.paths, parts)))
        return np.concatenate(parts, axis=1)


def _check_input(path: Path, inp, shape: tuple[int, ...]) -> None:
    """The model's declared input must take float32 rows of the transfer set's shape."""
    dims = list(inp.shape)
    if inp.type != "tensor(float)":
        raise DataError(f"{path}: input {inp.name!r} has type {inp.type}, the transfer set is tensor(float)")
    if len(dims) != len(shape) + 1 or any(isinstance(d, int) and d != s for d, s in zip(dims[1:], shape)):
        raise DataError(f"{path}: input {inp.name!r} has shape {dims}, the transfer set gives [batch, "
                        + ", ".join(map(str, shape)) + "]")


def _open_partial(tmp: Path, identity: dict, log: Callable) -> h5py.File | None:
    """Reopen a partial cache made from the same inputs and settings, else None (restart)."""
    if tmp.stat().st_size == 0:  # just created by the lock: nothing to resume
        return None
    try:
        f = h5py.File(tmp, "r+", locking=False)
        if json.loads(f.attrs["identity"]) == identity and "logits" in f:
            log(f"resuming {tmp} at row {int(f.attrs['committed_rows'])}")
            return f
        f.close()
        log(f"{tmp}: made from other inputs or settings; restarting from row 0")
    except (OSError, KeyError, ValueError):
        log(f"{tmp}: unreadable partial cache (killed writer?); restarting from row 0")
    return None  # _create truncates it in place (same inode: the lock stays valid)


def _create(tmp: Path, identity: dict, rows: int, members: int, classes: int, cfg: CacheConfig) -> h5py.File:
    f = h5py.File(tmp, "w", locking=False)
    chunk = max(1, min(rows, CHUNK_BYTES // (members * classes * 4)))
    f.create_dataset("logits", (rows, members, classes), np.float32, chunks=(chunk, members, classes))
    soft_chunk = max(1, min(rows, CHUNK_BYTES // (classes * 4)))
    for T in cfg.temperatures:
        f.create_dataset(f"soft/{t_key(T)}", (rows, classes), np.float32, chunks=(soft_chunk, classes))
    f.create_dataset("labels", (rows,), np.int64)
    f.attrs.update(schema=SCHEMA, rows=rows, members=members, classes=classes, committed_rows=0,
                   complete=False, identity=json.dumps(identity))
    return f


def cache_soft_targets(cfg: CacheConfig, teacher: list[Path], transfer_set: Path, out: Path,
                       log: Callable[[str], None] = print) -> Path:
    """Run ``teacher`` (one or more ONNX files) over ``transfer_set`` and write the cache ``out``."""
    if not teacher:
        raise UsageError("give at least one teacher ONNX file")
    info = open_prepared(transfer_set)
    rows = info.rows[cfg.split]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    teachers = Teachers(teacher, info.shape, cfg, log)
    for path, sess in zip(teachers.paths, teachers.sessions):  # before any row is read
        runtime.check_io(path, sess, info.shape, len(info.classes))
    identity = {"teacher_sha256": [provenance.sha256_file(p) for p in teacher],
                "transfer_sha256": provenance.sha256_file(transfer_set), "settings": to_dict(cfg)}
    identity["settings"].pop("device"), identity["settings"].pop("threads")  # do not change the content
    with exclusive(out) as tmp:
        f = _open_partial(tmp, identity, log)
        try:
            start = int(f.attrs["committed_rows"]) if f is not None else 0
            with runtime.progress(total=rows, initial=start, desc="cache", unit="row") as bar:
                for lo in range(start, rows, cfg.batch_size):
                    hi = min(rows, lo + cfg.batch_size)
                    x, y = info.load(cfg.split, lo, hi)
                    logits = teachers(x, lo)
                    if f is None:
                        f = _create(tmp, identity, rows, logits.shape[1], logits.shape[2], cfg)
                    _write_batch(f, tmp, lo, logits, y, cfg)
                    bar.update(hi - lo)
            _finish(f, cfg, teachers, identity, info, transfer_set)
        finally:
            if f is not None:
                f.close()
        publish(tmp, out)
    log(f"cache: {rows} rows x {teachers.provider} -> {out}")
    return out


def _write_batch(f: h5py.File, tmp: Path, lo: int, logits: np.ndarray, y: np.ndarray, cfg: CacheConfig) -> None:
    hi = lo + len(logits)
    f["logits"][lo:hi] = logits
    for T in cfg.temperatures:
        f[f"soft/{t_key(T)}"][lo:hi] = kd.combine_soft_targets(logits, T, cfg.combine)
    f["labels"][lo:hi] = y
    f.flush()  # data before the counter: a committed row is always on disk
    f.attrs["committed_rows"] = hi
    f.flush()
    fsync_path(tmp)  # h5py's flush reaches the OS only; the counter must survive a crash


def _finish(f: h5py.File, cfg: CacheConfig, teachers: Teachers, identity: dict, info, transfer_set: Path) -> None:
    """Diagnostics per temperature and provenance; marks the file complete."""
    if f is None:
        raise DataError(f"{transfer_set}: the {cfg.split} split has no rows")
    logits, labels = f["logits"][:], f["labels"][:]
    for T in cfg.temperatures:
        write_diagnostics(f, logits, labels, T)
    f.attrs.update(
        temperatures=[float(t) for t in cfg.temperatures], combine=cfg.combine,
        teacher_sha256=identity["teacher_sha256"], transfer_sha256=identity["transfer_sha256"],
        transfer_split=cfg.split, settings=json.dumps(to_dict(cfg)), provider=teachers.provider,
        teacher_probabilities=json.dumps(teachers.probabilities), classes_names=json.dumps(list(info.classes)),
        onnxruntime_version=provenance.versions().get("onnxruntime-gpu", provenance.versions().get("onnxruntime", "")),
        package_version=provenance.versions().get(provenance.PACKAGE, ""),
        provenance=json.dumps(provenance.record("cache", to_dict(cfg), {
            **{f"teacher{i}": p for i, p in enumerate(teachers.paths)}, "transfer_set": transfer_set},
            provider=teachers.provider)))
    f.attrs["complete"] = True
    h5safe.seal(f)  # content checksum, verified by open_cache: call after every later change too


def write_diagnostics(f: h5py.File, logits: np.ndarray, labels: np.ndarray, T: float) -> dict:
    d = kd.diagnostics(logits, f[f"soft/{t_key(T)}"][:], labels, T)
    g = f.require_group(f"diagnostics/{t_key(T)}")
    g.attrs.update(d)
    return d


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
        if not a.get("complete") or int(a["committed_rows"]) != int(a["rows"]):
            raise IntegrityError(f"{path}: incomplete cache; rebuild with `make cache`")
        h5safe.verify(path, f, "make cache")
        info = CacheInfo(path, int(a["rows"]), int(a["members"]), int(a["classes"]),
                         tuple(float(t) for t in a["temperatures"]), str(a["transfer_sha256"]),
                         str(a["transfer_split"]), a)
        want = {"logits": (info.rows, info.members, info.classes), "labels": (info.rows,),
                **{f"soft/{t_key(T)}": (info.rows, info.classes) for T in info.temperatures}}
        for name, shape in want.items():
            if name not in f or f[name].shape != shape:
                raise DataError(f"{path}: dataset {name} is missing or not of shape {shape}")
        y = f["labels"][:]
        if ((y < -1) | (y >= info.classes)).any():
            raise DataError(f"{path}: labels outside [-1, {info.classes})")
        return info
