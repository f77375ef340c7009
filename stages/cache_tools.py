"""Tools on an existing soft-target cache: add temperatures, verify against the teachers, merge shards.

- ``add_temperature``: soft targets at new T from the stored raw logits, in blocks, no teacher run
  (``p_T = mean_m softmax(v_m / T)`` or ``softmax(mean_m v_m / T)``, the combine recorded in the
  file; DESIGN.md section 3).  The file is copied to ``<target>.partial``, extended and published
  atomically, so a crash leaves the original untouched.
- ``verify``: checks the recorded sha256 of the teachers and transfer set against the files given,
  re-runs random contiguous windows of rows (DESIGN.md section 3: never row-by-row h5py indexing)
  and reports the largest difference from the stored logits, and recomputes the stored soft targets
  from the stored logits.
- ``merge``: joins the parts written by ``--shard i/n`` into one cache equal to a single-process run.
- ``plot_diagnostics``: mean entropy and teacher accuracy against T (matplotlib, Agg backend).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from pipeline import h5safe, provenance
from pipeline.artifacts import atomic_output
from pipeline.config import require, setting, to_dict
from pipeline.errors import DataError, IntegrityError
from stages import kd
from stages.cache import (DIAG_BLOCK, SCHEMA, add_soft_dataset, create_cache, format_diagnostics, open_cache,
                          t_key, write_diagnostics)
from stages.cache_stream import blocks, diagnostics_in_blocks
from stages.cache_teachers import Teachers
from stages.kd import DiagnosticSums
from stages.prepare import open_prepared

# Attributes every part of one sharded run must share (besides the identity without its "part").
_SHARED = ("schema", "members", "classes", "temperatures", "combine", "teacher_sha256", "transfer_sha256",
           "transfer_split", "settings", "teacher_probabilities", "classes_names")


@dataclasses.dataclass(frozen=True)
class AddTemperatureConfig:
    """Add soft targets at new temperatures to an existing cache from its stored logits (no
    teacher run); in place, or to --out. Refuses a cache without logits."""

    temperatures: tuple[float, ...] = setting((), "temperatures to add, e.g. 3,5")
    block_rows: int = setting(DIAG_BLOCK, "rows read and written per block (bounds memory)")

    def __post_init__(self) -> None:
        require(len(self.temperatures) > 0, "give --temperatures, e.g. 3,5")
        require(all(t > 0 and math.isfinite(t) for t in self.temperatures), "temperatures must be > 0")
        require(self.block_rows >= 1, "block_rows must be >= 1")


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    """Check a cache against its teachers and transfer set: recorded sha256 of each file, and a
    random sample of rows re-run through the teachers compared with the stored logits."""

    sample_rows: int = setting(256, "rows to re-run (in `windows` random contiguous windows)")
    windows: int = setting(8, "number of random contiguous windows the sample is drawn in")
    seed: int = setting(0, "seed of the sample")
    tolerance: float = setting(1e-4, "largest |stored - recomputed| logit allowed, times max(1, max|logit|)")
    device: str = setting("cpu", "auto, cpu or cuda (CPU and CUDA logits differ by ~1e-6 relative)")
    threads: int = setting(2, "onnxruntime intra-op threads")

    def __post_init__(self) -> None:
        require(self.sample_rows >= 1 and self.windows >= 1, "sample_rows and windows must be >= 1")
        require(self.tolerance >= 0, "tolerance must be >= 0")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Join the parts of a sharded cache (`distill cache --shard i/n`) into one cache, after checking
    that every part exists, is complete, has the same provenance and that they cover the rows once."""

    block_rows: int = setting(DIAG_BLOCK, "rows copied per block (bounds memory)")

    def __post_init__(self) -> None:
        require(self.block_rows >= 1, "block_rows must be >= 1")


def _need_logits(path: Path, f: h5py.File) -> None:
    if "logits" not in f:
        raise DataError(f"{path}: the cache has no stored logits, so new temperatures cannot be computed "
                        f"from it; rebuild it with `distill cache`")


def add_temperature(cfg: AddTemperatureConfig, cache: Path, out: Path | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """Add soft targets (and diagnostics) at ``cfg.temperatures`` to ``cache``, written to ``out``
    (default: ``cache`` itself, replaced atomically)."""
    cache = Path(cache)
    info = open_cache(cache)
    with h5py.File(cache, "r") as f:
        _need_logits(cache, f)
    target = Path(out) if out is not None else cache
    new = [float(T) for T in cfg.temperatures if float(T) not in info.temperatures]
    for T in sorted(set(map(float, cfg.temperatures)) - set(new)):
        log(f"{cache}: already has T={t_key(T)}; kept as it is")
    if not new and target == cache:
        return cache
    with atomic_output(target) as tmp:
        shutil.copyfile(cache, tmp)  # rewrites tmp in place (same inode: the lock holds)
        with h5py.File(tmp, "r+", locking=False) as f:
            combine = str(f.attrs["combine"])
            sums = {T: DiagnosticSums() for T in new}
            datasets = {T: add_soft_dataset(f, T, info.rows, info.classes) for T in new}
            for lo, hi in blocks(0, info.rows, cfg.block_rows):
                logits, labels = f["logits"][lo:hi], f["labels"][lo:hi]
                for T in new:
                    soft = kd.combine_soft_targets(logits, T, combine)
                    datasets[T][lo:hi] = soft
                    sums[T].add(logits, soft, labels)
            diags = {T: s.result() for T, s in sums.items()}
            for T, d in diags.items():
                write_diagnostics(f, T, d)
            prov = json.loads(f.attrs.get("provenance", "{}"))
            prov.setdefault("added_temperatures", []).append(
                {"temperatures": new, "settings": to_dict(cfg), "versions": provenance.versions()})
            f.attrs.update(temperatures=[*info.temperatures, *new], provenance=json.dumps(prov))
            h5safe.seal(f)  # the content changed: a new checksum, or open_cache refuses the file
    log(format_diagnostics(open_cache(target).diagnostics()))
    log(f"add-temperature: T={', '.join(map(t_key, new))} from stored logits -> {target}")
    return target


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
    recorded = list(c.attrs["teacher_sha256"])
    problems = []
    if len(teacher) != len(recorded):
        problems.append(f"{len(teacher)} teacher file(s) given, the cache was built from {len(recorded)}")
    for i, (path, sha) in enumerate(zip(teacher, recorded)):
        if provenance.sha256_file(path) != sha:
            problems.append(f"teacher {path} differs from teacher {i} of the cache (sha256 {str(sha)[:12]})")
    if provenance.sha256_file(transfer_set) != c.transfer_sha256:
        problems.append(f"transfer set {transfer_set} differs from the one recorded (sha256 {c.transfer_sha256[:12]})")
    if problems:
        raise IntegrityError(f"{cache}: " + "; ".join(problems) + "; rebuild with `make cache`")
    info = open_prepared(transfer_set)
    windows = _windows(c.rows, cfg)
    teachers = Teachers(teacher, info.shape, c.classes, cfg.device, cfg.threads, windows[0][1] - windows[0][0],
                        "off", log=log)
    teachers.probabilities = json.loads(c.attrs["teacher_probabilities"])
    logit_diff, scale, soft_diff, label_bad = 0.0, 1.0, 0.0, 0
    with h5py.File(cache, "r") as f, h5py.File(transfer_set, "r") as src:
        combine = str(f.attrs["combine"])
        for lo, hi in windows:
            stored = f["logits"][lo:hi]
            got = teachers(info.normalise(src[c.transfer_split]["x"][lo:hi]), lo)
            logit_diff = max(logit_diff, float(np.max(np.abs(got - stored))))
            scale = max(scale, float(np.max(np.abs(stored))))
            for T in c.temperatures:
                ref = kd.combine_soft_targets(stored, T, combine)
                soft_diff = max(soft_diff, float(np.max(np.abs(ref - f[f"soft/{t_key(T)}"][lo:hi]))))
            label_bad += int(np.sum(f["labels"][lo:hi] != src[c.transfer_split]["y"][lo:hi]))
    rows = sum(hi - lo for lo, hi in windows)
    report = {"rows_checked": rows, "windows": windows, "max_abs_logit_diff": logit_diff,
              "logit_tolerance": cfg.tolerance * scale, "max_abs_soft_diff": soft_diff,
              "label_mismatches": label_bad, "hashes": "match", "provider": teachers.provider}
    log(f"verify: {rows} rows in {len(windows)} windows on {teachers.provider}: max |logit diff| "
        f"{logit_diff:.3g} (tolerance {cfg.tolerance * scale:.3g}), max |soft diff| {soft_diff:.3g}, "
        f"{label_bad} label mismatches; hashes match")
    log(format_diagnostics(c.diagnostics()))
    if logit_diff > cfg.tolerance * scale or soft_diff > 1e-6 or label_bad:
        raise IntegrityError(f"{cache}: stored targets differ from the teachers (max |logit diff| {logit_diff:.3g}, "
                             f"max |soft diff| {soft_diff:.3g}, {label_bad} label mismatches); rebuild with `make cache`")
    return report


def _read_part(path: Path) -> tuple[dict, dict]:
    """(attrs, part info) of one shard part; one-line errors when it is missing or unfinished."""
    if not path.is_file():
        raise DataError(f"{path}: part not found (run its shard first)")
    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
    except OSError as e:
        raise DataError(f"{path}: unreadable part ({str(e)[:120]})") from None
    if a.get("schema") != SCHEMA or "identity" not in a:
        raise DataError(f"{path}: not a soft-target cache part (schema {a.get('schema')!r})")
    part = json.loads(a["identity"]).get("part")
    if part is None:
        raise DataError(f"{path}: not a shard part (built without --shard); nothing to merge")
    if not a.get("complete") or int(a["committed_rows"]) != int(a["rows"]):
        raise IntegrityError(f"{path}: incomplete part ({int(a['committed_rows'])} of {int(a['rows'])} rows); "
                             f"rerun shard {part['index']}/{part['count']} with the same arguments to resume it")
    return a, part


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def merge(cfg: MergeConfig, parts: list[Path], out: Path, log: Callable[[str], None] = print) -> Path:
    """Check and join shard ``parts`` into the cache ``out``."""
    if not parts:
        raise DataError("give the parts to merge with --part")
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise DataError(f"parts not found: {', '.join(missing)} (run those shards first)")
    read = [(Path(p), *_read_part(Path(p))) for p in parts]
    p0, a0, part0 = read[0]
    base = {k: v for k, v in json.loads(a0["identity"]).items() if k != "part"}
    for path, a, part in read[1:]:
        ident = {k: v for k, v in json.loads(a["identity"]).items() if k != "part"}
        bad = [k for k in _SHARED if not _same(a.get(k), a0.get(k))]
        if ident != base or bad or part["count"] != part0["count"] or part["total_rows"] != part0["total_rows"]:
            raise IntegrityError(f"{path}: made from other inputs or settings than {p0} "
                                 f"({', '.join(bad) or 'identity'} differ); rebuild the parts from one set of inputs")
    total, expected = int(part0["total_rows"]), 0
    for path, a, part in sorted(read, key=lambda r: r[2]["rows"][0]):
        lo, hi = part["rows"]
        if lo > expected:
            raise IntegrityError(f"rows [{expected}, {lo}) are in no part; missing a shard of {part0['count']}?")
        if lo < expected:
            raise IntegrityError(f"{path}: rows [{lo}, {min(hi, expected)}) are in two parts")
        expected = hi
    if expected != total:
        raise IntegrityError(f"rows [{expected}, {total}) are in no part; missing a shard of {part0['count']}?")
    temps = tuple(float(t) for t in a0["temperatures"])
    providers = sorted({str(a["provider"]) for _, a, _ in read})
    with atomic_output(Path(out)) as tmp:
        with create_cache(tmp, base, total, int(a0["members"]), int(a0["classes"]), temps) as f:
            for path, a, part in read:
                with h5py.File(path, "r") as src:
                    off = part["rows"][0]
                    for lo, hi in blocks(0, int(a["rows"]), cfg.block_rows):
                        for name in ("logits", "labels", *(f"soft/{t_key(T)}" for T in temps)):
                            f[name][off + lo:off + hi] = src[name][lo:hi]
            for T, d in diagnostics_in_blocks(f, temps, DIAG_BLOCK, t_key).items():
                write_diagnostics(f, T, d)
            f.attrs.update({k: a0[k] for k in _SHARED if k in a0 and k != "schema"})
            f.attrs.update(
                onnxruntime_version=a0.get("onnxruntime_version", ""), package_version=a0.get("package_version", ""),
                provider=", ".join(providers), committed_rows=total,
                provenance=json.dumps(provenance.record(
                    "cache-merge", to_dict(cfg), {f"part{part['index']}": path for path, _, part in read},
                    provider=", ".join(providers), parts=[json.loads(a.get("provenance", "{}")) for _, a, _ in read])))
            f.attrs["complete"] = True
            h5safe.seal(f)
    log(format_diagnostics(open_cache(out).diagnostics()))
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
