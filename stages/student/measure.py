"""Benchmark of the student's epoch: from the cache against arrays in memory against online distillation.

docs/design.md, "measuring": a command writing JSON, never a test; things compared are timed side by side in
one run, as ratios.  Modes, each with its own student, optimiser and seed, epochs interleaved
(A B C D A B C D ...) so that drift in the shared machine's load hits every mode alike:

- ``in_memory``: x, p_T and y already float32 tensors in memory (the floor).
- ``cache_resident``: :class:`stages.student.loader.TransferLoader` within budget (its one-off load timed apart).
- ``cache_streaming``: the same loader with a small budget, reading contiguous blocks every epoch.
- ``views`` (with a views cache): one view of each row per epoch, re-made from its 8 bytes of
  parameters (:class:`stages.student.viewloader.ViewLoader`), against the same target of 1.15x.
- ``online``: no cache: the teacher ensemble runs (onnxruntime) on every minibatch and p_T is computed
  from its member logits, as a pipeline without a cache would.

Reported: per mode the median and min epoch seconds over the timed epochs, and the ratio of each
median to ``in_memory``'s (target: cache within 1.15x).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline import inference, models, provenance, runtime, soft
from pipeline.artifacts import check_outputs, write_json
from pipeline.config import to_dict
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.student.loader import TransferLoader
from stages.student.settings import StudentBenchConfig, StudentConfig
from stages.student.train import train_epoch
from stages.student.viewloader import ViewLoader

MODES = ("in_memory", "cache_resident", "cache_streaming", "online")


def _online_batches(x, y, sess, T, gen, batch):
    name = sess.get_inputs()[0].name
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), batch):
        idx = order[i:i + batch]
        xb = x[idx]
        yield xb, torch.from_numpy(soft.model_soft_targets(sess.run(None, {name: xb.numpy()})[0], T)), y[idx]


def bench_student(cfg: StudentBenchConfig, cache: Path, transfer_set: Path, teacher: Path, out: Path,
                  log: Callable[[str], None] = print, views_cache: Path | None = None) -> dict:
    """Time ``cfg.epochs`` interleaved epochs of every mode and write the report ``out`` (JSON);
    ``views_cache`` (a views cache of the same transfer set) adds the ``views`` mode: one view of each
    row per epoch, re-made from its parameters on the fly."""
    check_outputs({"--cache": cache, "--transfer-set": transfer_set, "--teacher": teacher,
                   "--views-cache": views_cache}, {"--out": out})
    runtime.set_torch_threads(cfg.threads)
    c, info = open_cache(cache), open_prepared(transfer_set)
    provenance.check_lineage(transfer_set, c.transfer_sha256, f"the cache {cache}", "make cache")
    n = min(cfg.rows or c.rows, c.rows)
    sel = np.arange(n)
    scfg = StudentConfig(arch=cfg.arch, temperature=cfg.temperature, alpha=cfg.alpha, batch_size=cfg.batch_size,
                         epochs=cfg.epochs, threads=cfg.threads)
    t0 = time.perf_counter()
    resident = TransferLoader(c, info, "soft", cfg.temperature, sel, budget_mib=1 << 20)
    load_s = time.perf_counter() - t0
    # At most half of what the rows need, so the streaming mode streams however few rows are timed.
    stream_mib = min(cfg.stream_budget_mib, n * resident.row_bytes / 2 / (1 << 20))
    streaming = TransferLoader(c, info, "soft", cfg.temperature, sel, budget_mib=stream_mib)
    x, t, y = (a.clone() for a in resident.arrays())  # the same arrays, handed in
    sess = inference.session(teacher, "cpu", threads=cfg.threads)

    def in_memory(gen):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            yield x[idx], t[idx], y[idx]

    sources = {"in_memory": in_memory,
               "cache_resident": lambda g: resident.epoch(g, cfg.batch_size),
               "cache_streaming": lambda g: streaming.epoch(g, cfg.batch_size),
               "online": lambda g: _online_batches(x, y, sess, cfg.temperature, g, cfg.batch_size)}
    modes = list(MODES)
    if views_cache is not None:
        vc = open_cache(views_cache)
        provenance.check_lineage(transfer_set, vc.transfer_sha256, f"the views cache {views_cache}", "make cache")
        viewed = ViewLoader(vc, info, "soft", cfg.temperature, sel, budget_mib=1 << 20)
        sources["views"] = lambda g: viewed.epoch(g, cfg.batch_size)
        modes.append("views")
    state = {}
    for mode in modes:
        torch.manual_seed(0)
        net = models.build(cfg.arch, info.shape, len(info.classes))
        opt = torch.optim.AdamW(net.parameters(), lr=scfg.lr)
        steps = cfg.epochs * resident.steps(cfg.batch_size) + 1
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=scfg.lr, total_steps=steps)
        state[mode] = (net, opt, sched, torch.Generator().manual_seed(0), [])
    for epoch in range(cfg.epochs):
        for mode in modes:
            net, opt, sched, gen, times = state[mode]
            t1 = time.perf_counter()
            train_epoch(scfg, net, opt, sched, sources[mode](gen))
            times.append(time.perf_counter() - t1)
        log(f"bench-student epoch {epoch + 1}: " + ", ".join(f"{m} {state[m][4][-1]:.2f}s" for m in modes))
    med = {m: statistics.median(state[m][4]) for m in modes}
    report = {
        "rows": n, "epochs_timed": cfg.epochs, "batch_size": cfg.batch_size, "torch_threads": torch.get_num_threads(),
        "resident_load_seconds": load_s, "streaming_budget_mib": stream_mib,
        "streaming_block_rows": streaming.block_rows,
        "streaming_buffer_rows": streaming.buffer_blocks * streaming.block_rows,
        "onnxruntime_provider": inference.provider_name(sess),
        "modes": {m: {"median_epoch_seconds": med[m], "min_epoch_seconds": min(state[m][4]),
                      "epoch_seconds": state[m][4], "ratio_to_in_memory": med[m] / med["in_memory"]} for m in modes},
        "target": "cache_resident, cache_streaming and views within 1.15x of in_memory",
        "views": None if views_cache is None else {"cache": str(views_cache), "views": vc.views},
        "provenance": provenance.record("bench-student", to_dict(cfg), {
            "cache": cache, "transfer_set": transfer_set, "teacher": teacher,
            **({"views_cache": views_cache} if views_cache is not None else {})}),
    }
    write_json(out, report)
    log("bench-student: " + ", ".join(f"{m} {report['modes'][m]['ratio_to_in_memory']:.2f}x" for m in modes)
        + f" of in-memory -> {out}")
    return report
