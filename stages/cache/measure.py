"""Benchmarks of the cache stage (docs/design.md, "measuring": commands that write JSON; tests never time).

- :func:`bench_speed` (``make bench-cache``): rows/s of one ensemble run by onnxruntime and by
  PyTorch eager, alternated trial by trial in one process (side by side, same threads, same
  batches), and the share of the stage's wall time spent in HDF5 I/O when the stage runs it.
- :func:`bench_scale` (``make bench-cache-scale``): peak RSS and time of the stage on synthetic
  transfer sets of 10k, 100k and 1M rows, each in a fresh spawned process (:func:`in_child`; peak RSS
  is the child's own ``ru_maxrss``).

Synthetic inputs are written in blocks (1M rows x 784 float32 is 3.1 GB; it never sits in memory).
"""
from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import atomic_output, check_outputs, write_json
from pipeline.config import to_dict
from pipeline.formats.onnx_model import IR_VERSION, OPSET
from pipeline.formats.prepared import Normalisation, PreparedWriter
from stages.cache.settings import CacheBenchConfig, CacheConfig, CacheScaleConfig

_BLOCK = 65536  # rows generated per block: 200 MB of float32 at 784 features


def synthetic_prepared(path: Path, rows: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0) -> Path:
    """A kd-prepared/1 file of Gaussian rows, written ``_BLOCK`` rows at a time, atomically."""
    rng = np.random.default_rng(seed)
    with atomic_output(Path(path)) as tmp, PreparedWriter(
            tmp, [str(i) for i in range(classes)], Normalisation(1.0, 0.0, 1.0),
            {"stage": "synthetic", "rows": rows, "seed": seed}) as w:
        for split, n in (("train", rows), ("val", 256), ("test", 256)):
            x, y = w.allocate(split, n, shape, np.float32)  # contiguous: batches are plain reads
            for lo in range(0, n, _BLOCK):
                hi = min(n, lo + _BLOCK)
                x[lo:hi] = rng.standard_normal((hi - lo, *shape), dtype=np.float32)
                y[lo:hi] = rng.integers(0, classes, hi - lo)
    return Path(path)


def linear_teacher(path: Path, features: int, classes: int = 10, seed: int = 0,
                   shape: tuple[int, ...] | None = None, members: int = 1, hidden: int = 0) -> Path:
    """The smallest honest teacher: ``x [batch, features] -> x W + b`` (so the stage's own costs show);
    ``shape``: rows of that shape, flattened first.  ``hidden`` > 0: ``tanh(x W1) W2 + b`` through that
    many units (a thousand classes cost ``hidden x classes`` multiply-adds a member, not ``features x
    classes``); ``members`` > 1: one output ``[batch, members, classes]`` of that many such heads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    src = "f" if shape else "x"
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1)] if shape else []
    width, inits = features, []
    if hidden:
        inits.append(numpy_helper.from_array(rng.normal(0, features ** -0.5, (features, hidden)).astype(np.float32),
                                             "W1"))
        nodes += [helper.make_node("MatMul", [src, "W1"], ["h0"]), helper.make_node("Tanh", ["h0"], ["h"])]
        src, width = "h", hidden
    # logits of spread ~3 with a hidden layer (tanh units of ~0.6), as a trained classifier's
    scale = 5.0 * width ** -0.5 if hidden else width ** -0.5
    inits += [numpy_helper.from_array(rng.normal(0, scale, (width, members * classes)).astype(np.float32), "W"),
              numpy_helper.from_array(np.zeros(members * classes, np.float32), "b")]
    nodes += [helper.make_node("MatMul", [src, "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["z"])]
    out_shape = ["batch", classes]
    if members > 1:
        inits.append(numpy_helper.from_array(np.array([-1, members, classes], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["z", "shape"], ["logits"]))
        out_shape = ["batch", members, classes]
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["logits"]))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *(shape or (features,))])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    with atomic_output(Path(path)) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


def _ensemble(cfg: CacheBenchConfig, shape: tuple[int, ...], path: Path):
    import torch

    from pipeline import models, onnxio

    torch.manual_seed(0)
    net = models.Ensemble([models.build(cfg.arch, shape, 10) for _ in range(cfg.members)]).eval()
    with atomic_output(path) as tmp:
        try:
            onnxio.export(net, torch.zeros(2, *shape), tmp, "member_logits")
        except ImportError:  # a bare GPU machine may lack onnxscript: the TorchScript exporter then
            import onnx

            torch.onnx.export(net, (torch.zeros(2, *shape),), str(tmp), input_names=["x"],
                              output_names=["member_logits"],
                              dynamic_axes={"x": {0: "batch"}}, opset_version=OPSET, dynamo=False)
            model = onnx.load(str(tmp))
            model.ir_version = IR_VERSION
            onnx.save(model, str(tmp))
    return net


def bench_speed(cfg: CacheBenchConfig, work: Path, out: Path, log: Callable[[str], None] = print) -> dict:
    """Write ``out`` (JSON): onnxruntime vs PyTorch eager rows/s, and the stage's HDF5 I/O share."""
    check_outputs({}, {"--out": out})
    import torch

    from pipeline import inference, runtime
    from stages.cache.stage import build_cache

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    shape = (1, 28, 28)
    prepared = synthetic_prepared(work / f"speed-{cfg.rows}.h5", cfg.rows, shape)
    net = _ensemble(cfg, shape, work / "ensemble.onnx")
    x = np.random.default_rng(1).standard_normal((cfg.rows, *shape), dtype=np.float32)
    sess = inference.session(work / "ensemble.onnx", cfg.device, cfg.threads, log=log)
    on_cuda = inference.provider_name(sess) == inference.PROVIDERS["cuda"]
    dev = torch.device("cuda" if on_cuda and torch.cuda.is_available() else "cpu")  # both on the same device
    net = net.to(dev)
    runtime.set_torch_threads(cfg.threads)
    batches = [x[lo:lo + cfg.batch_size] for lo in range(0, cfg.rows, cfg.batch_size)]

    def ort_pass() -> np.ndarray:  # host arrays in and out, as the stage uses it
        return inference.run_batched(sess, x, cfg.batch_size)

    def torch_pass() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([net(torch.from_numpy(b).to(dev)).cpu().numpy() for b in batches])

    ref, got = torch_pass(), ort_pass()  # warm-up of both, and a check that they compute the same thing
    times: dict[str, list[float]] = {"onnxruntime": [], "torch_eager": []}
    for _ in range(cfg.trials):  # alternate, so drift on a shared machine hits both alike
        for name, fn in (("onnxruntime", ort_pass), ("torch_eager", torch_pass)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rate = {k: cfg.rows / statistics.median(v) for k, v in times.items()}
    log(f"bench-cache: onnxruntime {rate['onnxruntime']:.0f} rows/s, torch eager {rate['torch_eager']:.0f} rows/s")
    # random weights score at chance, which the sanity gate refuses: it is not what is timed here
    stage_cfg = CacheConfig(batch_size=cfg.batch_size, threads=cfg.threads, device=cfg.device, gate=False)
    cache_out = work / "speed-cache.h5"
    _, stats = build_cache(stage_cfg, [work / "ensemble.onnx"], prepared, cache_out, log=log, env={})
    cache_out.unlink()
    wall = stats["wall_s"]
    report = {
        "settings": to_dict(cfg), "rows": cfg.rows, "threads": cfg.threads,
        "onnxruntime_provider": inference.provider_name(sess), "torch_device": str(dev),
        "rows_per_s": rate, "trial_s": times, "ort_over_torch": rate["onnxruntime"] / rate["torch_eager"],
        "max_abs_diff_ort_vs_torch": float(np.max(np.abs(got - ref))),
        "stage": {**stats, "hdf5_read_s": stats["read_s"], "hdf5_write_s": stats["write_s"],
                  # all time inside HDF5 calls (reader + writer threads, incl. fsync) over stage wall time
                  "hdf5_io_share": (stats["read_s"] + stats["write_s"]) / wall,
                  # the part of it that inference did not hide: the calling thread waiting on I/O
                  "io_stall_share": (stats["wait_read_s"] + stats["wait_write_s"]) / wall},
    }
    write_json(out, report)
    log(f"bench-cache: HDF5 I/O {100 * report['stage']['hdf5_io_share']:.1f}% of the stage's {wall:.2f} s "
        f"(not overlapped: {100 * report['stage']['io_stall_share']:.1f}%) -> {out}")
    return report


def _child_main(send, fn: Callable, args: tuple) -> None:
    """In the child: ``fn(*args)``, then send (result or error, the process's own peak RSS in KiB)."""
    try:
        out = ("ok", fn(*args))
    except Exception as e:  # the parent raises it, with the size it was running
        out = ("error", f"{type(e).__name__}: {' '.join(str(e).split())}")
    send.send((*out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def in_child(fn: Callable, *args) -> tuple[Any, float]:
    """``fn(*args)`` in a fresh *spawned* process: (its result, the child's peak RSS in MiB).

    Spawned, not forked, and nothing large is held by this process: a child's ru_maxrss starts from the
    address space it was started from (exec records that space's peak), so a forked child of a process
    holding rows would report the parent's rows as its own.  ``fn`` and ``args`` must be picklable."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        status, value, maxrss_kib = recv.recv()
    except EOFError:  # died before it could answer (killed, out of memory)
        status, value, maxrss_kib = "error", "the process died without a result", 0
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed (exit {proc.exitcode}): {value}")
    return value, maxrss_kib / 1024


def _cache_stage(cfg: CacheConfig, teacher: Path, prepared: Path, cache: Path) -> float:
    """The cache stage on ``prepared`` (in a child of :func:`_run_sized`): its own wall seconds."""
    from stages.cache.stage import build_cache

    return build_cache(cfg, [teacher], prepared, cache, log=lambda m: None)[1]["wall_s"]


def _run_sized(cfg: CacheScaleConfig, work: Path, rows: int, log: Callable, shape: tuple[int, ...] | None = None,
               views: int = 0) -> dict:
    """The cache stage in a fresh process on ``rows`` synthetic rows (of ``shape``; with ``views`` K views of
    each when given): its peak RSS, time and sizes."""
    shape = shape or (cfg.features,)
    name = f"scale-{rows}" + (f"-k{views}" if views else "")
    prepared = work / f"{name}.h5"
    in_child(synthetic_prepared, prepared, rows, shape, cfg.classes)  # apart: its rows never weigh on a figure
    cache = work / f"{name}.cache.h5"
    teacher = work / ("linear.onnx" if len(shape) == 1 else "linear-image.onnx")
    # an untrained synthetic teacher: the sanity gate would rightly refuse it
    stage_cfg = CacheConfig(temperatures=(1.0, 2.0, 4.0, 8.0, 20.0), batch_size=cfg.batch_size, threads=cfg.threads,
                            device=cfg.device, gate=False, views=views, top_k=cfg.top_k,
                            logits_dtype=cfg.logits_dtype, store_soft=cfg.store_soft)
    t = time.perf_counter()
    stage_s, peak_mib = in_child(_cache_stage, stage_cfg, teacher, prepared, cache)
    wall = time.perf_counter() - t
    sizes = {"prepared_bytes": prepared.stat().st_size, "cache_bytes": cache.stat().st_size}
    if not cfg.keep:
        prepared.unlink()
        cache.unlink()
    cached = rows * max(1, views)  # cache rows: one per view
    row = {"rows": rows, "views": views, "cache_rows": cached, "peak_rss_mib": peak_mib,
           "process_wall_s": wall, "stage_s": stage_s, "us_per_row": 1e6 * stage_s / cached,
           "rows_per_s": cached / stage_s, "cache_bytes_per_row": sizes["cache_bytes"] / cached, **sizes}
    log(f"bench-cache-scale: {rows} rows" + (f" x {views} views" if views else "")
        + f": peak RSS {row['peak_rss_mib']:.0f} MiB, stage {stage_s:.1f} s, {row['rows_per_s']:.0f} cache rows/s, "
          f"{row['cache_bytes_per_row']:.1f} bytes a cache row")
    return row


def _ratios(runs: list[dict], key: str) -> list[float]:
    return [r[key] / runs[0][key] for r in runs]


def bench_scale(cfg: CacheScaleConfig, work: Path, out: Path, log: Callable[[str], None] = print) -> dict:
    """Write ``out`` (JSON): per size, peak RSS (MiB) and time; plus ratios against the smallest; and per
    total of views, the same against K."""
    check_outputs({}, {"--out": out})
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    heads = dict(classes=cfg.classes, members=cfg.members, hidden=cfg.hidden)
    linear_teacher(work / "linear.onnx", cfg.features, **heads)
    runs = [_run_sized(cfg, work, rows, log) for rows in cfg.sizes]
    image = (1, cfg.view_image, cfg.view_image)
    groups = []
    if cfg.views:
        linear_teacher(work / "linear-image.onnx", cfg.view_image ** 2, shape=image, **heads)
        for total in cfg.view_totals or (None,):  # None: view_rows rows for every K
            v = [_run_sized(cfg, work, cfg.view_rows if total is None else max(1, total // k), log, image, k)
                 for k in cfg.views]
            groups.append({"total": total, "views": v, "rss_ratio_vs_fewest": _ratios(v, "peak_rss_mib"),
                           "time_per_view_ratio_vs_fewest": _ratios(v, "us_per_row")})
    views = groups[0]["views"] if groups else []
    kind = f"tanh {cfg.hidden} then " if cfg.hidden else ""
    report = {"settings": to_dict(cfg),
              "teacher": f"linear {cfg.features}->{cfg.classes}" if not cfg.hidden and cfg.members == 1 else
              f"{cfg.members} x ({kind}linear) {cfg.features}->{cfg.classes}", "runs": runs,
              # K views of the same rows: time per cached view and peak RSS against K (memory flat in K)
              "views": views,
              "views_rss_ratio_vs_fewest": _ratios(views, "peak_rss_mib") if views else [],
              "views_time_per_view_ratio_vs_fewest": _ratios(views, "us_per_row") if views else [],
              # per total of views (view_totals): the same, and at each K the ratio across totals
              "view_groups": groups,
              "views_rss_ratio_across_totals": [
                  [g["views"][i]["peak_rss_mib"] / groups[0]["views"][i]["peak_rss_mib"] for g in groups]
                  for i in range(len(cfg.views))] if groups else [],
              # floor of every child's figure (see in_child): this process's own peak
              "parent_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "rss_ratio_vs_smallest": _ratios(runs, "peak_rss_mib") if runs else [],
              "time_per_row_ratio_vs_smallest": _ratios(runs, "us_per_row") if runs else []}
    write_json(out, report)
    log(f"bench-cache-scale -> {out}")
    return report
