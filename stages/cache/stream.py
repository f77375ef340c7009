"""Streaming pieces of the cache stage: the read / infer / write pipeline, block diagnostics, shards.

Pipeline: a reader thread reads batch k+1 from the transfer set while the calling thread runs the
teachers on batch k (onnxruntime releases the GIL) and a writer thread writes batch k-1.  Queues of
``depth`` batches bound the memory to a few batches whatever the row count.  The writer is the only
thread that touches the output file, and it takes batches in order, so the committed-row counter
only ever grows by whole batches.  An error in any thread stops the other two and is re-raised in
the calling thread, with a note naming the thread it came from (the stage turns it into its one-line
error).

Diagnostics are accumulated over blocks of rows as sums, so a million-row cache is never loaded
whole; :func:`diagnostics_in_blocks` equals :func:`pipeline.soft.diagnostics` on the whole array up to
float64 summation order (tested to 1e-12), and block boundaries are fixed multiples of ``block``
rows, so a cache written in one run, resumed, or merged from shards gets bit-identical values.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline import soft
from pipeline.formats.cache import RowReader
from pipeline.soft import DiagnosticSums
from stages.cache.settings import parse_shard

_END = object()
_POLL_S = 0.1  # how often a blocked queue operation looks at the stop flag


@dataclasses.dataclass
class StreamStats:
    """Seconds spent by each part of the pipeline (the threads overlap, so these need not add up)."""

    read_s: float = 0.0        # reader thread, inside HDF5 reads of the transfer set (+ normalising)
    infer_s: float = 0.0       # calling thread, inside the teachers
    write_s: float = 0.0       # writer thread, inside HDF5 writes, flush and fsync of the cache
    combine_s: float = 0.0     # writer thread, computing soft targets
    wait_read_s: float = 0.0   # calling thread idle because the next batch was not read yet
    wait_write_s: float = 0.0  # calling thread idle because the writer queue was full
    batches: int = 0


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            pass
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            pass
    return _END


def run_pipeline(batches: Iterable[tuple[int, int]], read: Callable, infer: Callable, write: Callable,
                 stats: StreamStats, depth: int = 2) -> None:
    """``write(lo, hi, infer(x, lo), y)`` for ``x, y = read(lo, hi)`` over ``batches``, overlapped."""
    stop, errors = threading.Event(), []
    q_in: queue.Queue = queue.Queue(depth)
    q_out: queue.Queue = queue.Queue(depth)

    def guarded(fn: Callable) -> Callable:
        def body() -> None:
            try:
                fn()
            except BaseException as e:  # re-raised in the calling thread
                e.add_note(f"in the cache's {fn.__name__} thread")
                errors.append(e)
                stop.set()
        return body

    def reader() -> None:
        for lo, hi in batches:
            t = time.perf_counter()
            x, y = read(lo, hi)
            stats.read_s += time.perf_counter() - t
            if not _put(q_in, (lo, hi, x, y), stop):
                return
        _put(q_in, _END, stop)

    def writer() -> None:
        while (item := _get(q_out, stop)) is not _END:
            write(*item)
            stats.batches += 1

    threads = [threading.Thread(target=guarded(f), name=f"cache-{f.__name__}", daemon=True) for f in (reader, writer)]
    for th in threads:
        th.start()
    try:
        while True:
            t = time.perf_counter()
            item = _get(q_in, stop)
            stats.wait_read_s += time.perf_counter() - t
            if item is _END:
                break
            lo, hi, x, y = item
            t = time.perf_counter()
            logits = infer(x, lo)
            stats.infer_s += time.perf_counter() - t
            t = time.perf_counter()
            ok = _put(q_out, (lo, hi, logits, y), stop)
            stats.wait_write_s += time.perf_counter() - t
            if not ok:
                break
        _put(q_out, _END, stop)
    except BaseException:
        stop.set()
        raise
    finally:
        if errors or stop.is_set():
            stop.set()
        for th in threads:
            th.join()
    if errors:
        raise errors[0]


def resolve_shard(shard: str, env: Mapping[str, str]) -> tuple[int, int]:
    """This process's (index, count): ``--shard`` first, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if shard:
        return parse_shard(shard)
    if "WORLD_SIZE" in env:
        return parse_shard(f"{env.get('RANK', '0')}/{env['WORLD_SIZE']}")
    return 0, 1


def shard_rows(rows: int, batch: int, index: int, count: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of shard ``index`` of ``count``: whole batches, split as evenly as possible.

    Shards start on multiples of ``batch`` so that every batch is the very batch a single process
    would run (same rows, same padding), which makes merged shards equal a single-process run.
    """
    nb = -(-rows // batch)
    lo, hi = nb * index // count * batch, nb * (index + 1) // count * batch
    return min(lo, rows), min(hi, rows)


def part_path(out: Path, index: int, count: int) -> Path:
    return out.with_name(f"{out.stem}.part{index}of{count}{out.suffix}")


def blocks(lo: int, hi: int, block: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut at the multiples of ``block`` (absolute row numbers: resumes and shards align)."""
    out, start = [], lo
    while start < hi:
        stop = min(hi, (start // block + 1) * block)
        out.append((start, stop))
        start = stop
    return out


def member_accuracy_in_blocks(rows: RowReader, n: int, block: int) -> list[float]:
    """Each member's accuracy (its argmax, :func:`pipeline.soft.member_predictions`, against the labels
    >= 0; NaN without labels) over a cache's ``n`` rows, ``block`` rows at a time."""
    correct, labelled = None, 0
    for lo, hi in blocks(0, n, block):
        pred, labels = soft.member_predictions(rows.stored(lo, hi)), rows.labels(lo, hi)
        keep = labels >= 0
        hits = (pred[keep] == labels[keep][:, None]).sum(axis=0)
        correct = hits if correct is None else correct + hits
        labelled += int(keep.sum())
    if correct is None:
        return []
    return [float(c) / labelled if labelled else float("nan") for c in correct]


def diagnostics_in_blocks(rows: RowReader, temperatures: Iterable[float], n: int, block: int) -> dict[float, dict]:
    """Per-temperature diagnostics of a cache's ``n`` rows, ``block`` rows at a time: of the targets
    :func:`pipeline.soft.targets` derives from the stored rows (what a student is given)."""
    temperatures = list(temperatures)
    sums = {T: DiagnosticSums() for T in temperatures}
    for lo, hi in blocks(0, n, block):
        stored, labels = rows.stored(lo, hi), rows.labels(lo, hi)
        pred = soft.member_predictions(stored)
        for T in temperatures:
            sums[T].add(pred, soft.targets(stored, T), labels)
    return {T: s.result() for T, s in sums.items()}
