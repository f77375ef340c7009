"""Stage 4, student: distil a small network from the soft-target cache alone.

Objective (Hinton, Vinyals & Dean 2015, section 2; :func:`pipeline.losses.kd_loss`)::

    L = alpha * T^2 * KL(p_T || softmax(z / T)) + (1 - alpha) * CE(y, softmax(z))

``alpha = 0`` is the hard-label baseline, ``alpha = 1`` needs no labels.  ``objective = logits``
matches zero-meaned logits instead (the high-temperature limit).  Soft targets, labels and teacher
logits come from the cache; the inputs x come from the prepared transfer set, both read in contiguous
row blocks by :mod:`stages.student.loader` (resident when they fit ``memory_budget_mib``, else streamed), after
checking that the cache was built from that very file.  The epoch is chosen by validation accuracy
(early stopping); the test split is scored with the chosen weights, and with the last epoch's for
comparison.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import augment, macs, models, provenance, resume, runtime
from pipeline.artifacts import check_outputs, claim, publish_together, write_json
from pipeline.config import to_dict
from pipeline.errors import Interrupted, UsageError
from pipeline.formats.cache import CacheInfo, open_cache
from pipeline.formats.checkpoint import Checkpoint, write_checkpoint
from pipeline.formats.prepared import Prepared, open_prepared
from stages.student.batches import StudentLoader
from stages.student.loader import TransferLoader, select_rows
from stages.student.settings import StudentConfig
from stages.student.train import diverged, train_epoch
from stages.student.viewloader import ViewLoader, view_row_labels


def _target_kind(cfg: StudentConfig) -> str:
    if cfg.alpha == 0:
        return "none"  # the hard-label loss never reads a target
    if cfg.objective == "logits":
        return "logits"
    return "bucket" if cfg.topk_tail == "bucket" else "soft"


def distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) joins the process group, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the student trains on the CPU; nccl needs CUDA tensors
    return dist.get_rank(), dist.get_world_size()


def make_loader(cfg: StudentConfig, c: CacheInfo, info: Prepared) -> StudentLoader:
    """The loader of ``cfg``'s rows of cache ``c`` (a subset when train_fraction < 1 or drop_class >= 0):
    a :class:`ViewLoader` for a views cache (one view of each transfer row per epoch)."""
    if cfg.drop_class >= c.classes:
        raise UsageError(f"drop_class {cfg.drop_class} is not a class of {c.path} ({c.classes} classes)")
    rows = None
    if cfg.train_fraction < 1 or cfg.drop_class >= 0:
        labels = view_row_labels(c) if c.views is not None else c.labels()
        rows = select_rows(labels, cfg.train_fraction, cfg.drop_class, cfg.subset_seed)
    if c.views is not None:
        return ViewLoader(c, info, _target_kind(cfg), cfg.temperature, rows, cfg.memory_budget_mib, cfg.views_used)
    if cfg.views_used > 1:
        raise UsageError(f"{c.path}: views_used {cfg.views_used}, but this cache holds the rows themselves, no views")
    return TransferLoader(c, info, _target_kind(cfg), cfg.temperature, rows, cfg.memory_budget_mib, cfg.block_rows)


def state_path(out: Path) -> Path:
    """Where a student's training state lives while it trains: ``<out stem>.state`` beside the checkpoint."""
    return out.with_suffix(".state")


def _start(cfg: StudentConfig, net: torch.nn.Module, loader: StudentLoader, state: tuple[Path, dict],
           log: Callable[[str], None]) -> tuple:
    """(generator, optimizer, schedule, run record), fresh or restored from ``state`` (path, key)."""
    gen = torch.Generator().manual_seed(cfg.seed)  # batches, views, mixing; dropout draws from torch's global one
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr,
                                                total_steps=cfg.epochs * loader.steps(cfg.batch_size))
    run = resume.restore(*state, net, opt, sched, gen, log, "the student")
    if run is not None:
        log(f"student {cfg.arch}: resuming after epoch {run['epoch']}/{cfg.epochs} from {state[0]}")
    run = run or {"epoch": 0, "best": -1.0, "best_epoch": 0, "best_state": None, "history": [], "seconds": 0.0}
    return gen, opt, sched, run


def _fit(cfg: StudentConfig, model: torch.nn.Module, net: torch.nn.Module, loader: StudentLoader,
         val: tuple[torch.Tensor, torch.Tensor], state: tuple[Path, dict], log: Callable[[str], None],
         rank: int, world: int, precision: str, channels_last: bool) -> dict:
    """The epochs of training, resumed from ``state`` (path, key) when a killed run left one there and
    saved to it after every epoch but the last (rank 0); returns the run record: ``epoch``, ``best``
    (validation accuracy), ``best_epoch``, ``best_state``, ``history``, ``seconds`` (summed over resumes).
    Ctrl-C after a saved epoch is :class:`Interrupted` (exit 130), saying where a rerun resumes."""
    gen, opt, sched, run = _start(cfg, net, loader, state, log)
    kept = run["epoch"]  # the last epoch whose state is on disk
    epoch_lines = rank == 0 and not runtime.bars_shown()  # a log file gets a line an epoch, a terminal the bar
    bar = runtime.progress(total=cfg.epochs, initial=run["epoch"], desc="student", unit="epoch",
                           disable=rank > 0 or None)
    try:
        for epoch in range(run["epoch"], cfg.epochs):
            t_epoch = time.perf_counter()
            batches = loader.epoch(gen, cfg.batch_size)
            if cfg.mixup > 0:  # the whole batch, before DDP splits it: every rank mixes alike
                batches = ((*augment.mix_rows(x, t, cfg.mixup, gen), y) for x, t, y in batches)
            loss = train_epoch(cfg, model, opt, sched, batches, rank, world, precision, channels_last)
            if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):  # the last step of an epoch
                raise diverged(cfg, f"weights that are not finite after epoch {epoch + 1}")
            acc = models.accuracy(models.predict(net, val[0]), val[1])
            run["history"].append({"epoch": epoch + 1, "val_accuracy": acc, "loss": loss})
            if acc > run["best"]:
                run.update(best=acc, best_epoch=epoch + 1,
                           best_state={k: v.clone() for k, v in net.state_dict().items()})
            took = time.perf_counter() - t_epoch  # seconds
            run.update(epoch=epoch + 1, seconds=run["seconds"] + took)
            if rank == 0 and epoch + 1 < cfg.epochs:
                resume.save(*state, net, opt, sched, gen, run)
                kept = epoch + 1
            bar.update()
            if epoch_lines:
                log(f"student {cfg.arch}: epoch {epoch + 1}/{cfg.epochs} val accuracy {acc:.4f} ({took:.0f} s; "
                    f"done in ~{took * (cfg.epochs - epoch - 1) / 60:.0f} min)")
    except KeyboardInterrupt:
        if rank > 0 or kept == 0:
            raise  # nothing kept: the command line's own line (nothing was published) says it all
        raise Interrupted(f"interrupted; nothing was published, and {state[0]} keeps the run after epoch "
                          f"{kept}/{cfg.epochs}: the same command resumes there") from None
    bar.close()
    return run


def distill_student(cfg: StudentConfig, cache: Path, transfer_set: Path, out: Path, metrics: Path,
                    log: Callable[[str], None] = print) -> Path:
    """Train the student of ``cfg`` from ``cache`` (+ x of ``transfer_set``); write ``out`` and ``metrics``.

    Under torchrun (WORLD_SIZE > 1) trains with DistributedDataParallel; rank 0 writes the files.  A run
    killed at any moment resumes, when rerun with the same data and settings, after its last finished
    epoch (:func:`state_path`, :mod:`pipeline.resume`) and ends with the weights of an uninterrupted run.
    """
    state = state_path(out)
    check_outputs({"--cache": cache, "--transfer-set": transfer_set},
                  {"--out": out, "--metrics": metrics, "the training state": state})
    rank, world = distributed()
    if rank == 0:
        claim(out, metrics)  # a second writer of these outputs fails now, not after training
    runtime.set_torch_threads(cfg.threads)
    c = open_cache(cache)
    info = open_prepared(transfer_set)  # corrupt before stale: a damaged file is not one that "changed"
    provenance.check_lineage(transfer_set, c.transfer_sha256, f"the cache {cache}", "make cache")
    provenance.check_recorded_inputs(c.provenance, f"the cache {cache}", "make cache")
    loader = make_loader(cfg, c, info)
    if cfg.alpha < 1 and not bool((loader.labels() >= 0).any()):
        raise UsageError(f"{cache}: the transfer set has no labels; use --alpha 1")
    xval, yval = map(torch.from_numpy, info.load("val"))
    torch.manual_seed(cfg.seed)
    net = models.build(cfg.arch, info.shape, len(info.classes))
    channels_last = models.trains_channels_last(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # oneDNN's fast layout; the weights are the same numbers
    precision = runtime.resolve_precision(cfg.precision)
    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)  # broadcasts rank 0's weights; all ranks seed alike anyway
    # What decides the weights: the data, every setting but the thread count, the arithmetic, the world.
    key = {"cache_sha256": provenance.sha256_file(cache), "transfer_sha256": c.transfer_sha256,
           "settings": {**to_dict(cfg), "threads": None, "precision": precision}, "world_size": world}
    run = _fit(cfg, model, net, loader, (xval, yval), (state, key), log, rank, world, precision, channels_last)
    xtest, ytest = info.load("test")
    # Test accuracy of the last epoch's weights too: what training without early stopping gives.
    test_last = models.accuracy(models.predict(net, xtest), ytest)
    net.load_state_dict(run["best_state"])
    test_acc = models.accuracy(models.predict(net, xtest), ytest)
    if rank > 0:
        return out
    _publish(cfg, net, info, loader, run, world, precision, (test_acc, test_last),
             {"cache": cache, "transfer_set": transfer_set, "out": out, "metrics": metrics})
    state.unlink(missing_ok=True)  # the checkpoint supersedes the epoch state
    log(f"student {cfg.arch} T={cfg.temperature:g} alpha={cfg.alpha:g}: val {run['best']:.4f} "
        f"(epoch {run['best_epoch']}), test {test_acc:.4f} -> {out}")
    return out


def _publish(cfg: StudentConfig, net: torch.nn.Module, info: Prepared, loader: StudentLoader, run: dict, world: int,
             precision: str, test: tuple[float, float], paths: dict[str, Path]) -> None:
    """Write the checkpoint and the metrics as one set."""
    out, metrics = paths["out"], paths["metrics"]
    source = provenance.splits_source(info.provenance)  # a jittered transfer set: the splits' own file
    prov = provenance.record("student", to_dict(cfg), {"cache": paths["cache"], "transfer_set": paths["transfer_set"]},
                             world_size=world, **({"transfer_source_sha256": source} if source else {}))
    ckpt = Checkpoint("student", cfg.arch, info.shape, info.classes, info.norm.as_dict(), models.state_arrays(net),
                      {"temperature": cfg.temperature, "alpha": cfg.alpha, "epoch": run["best_epoch"]}, prov)
    # One set (pipeline.artifacts.publish_together): the old checkpoint (make's target) goes first, the
    # new one comes last, so a kill in between never leaves a checkpoint beside another one's metrics.
    with publish_together(out) as s:
        with s.file(out) as tmp:
            write_checkpoint(tmp, ckpt)
        result = {"name": out.stem, "settings": to_dict(cfg), "precision": precision,
                  "parameters": models.count_parameters(net),
                  "macs_per_image": macs.count_macs(net, tuple(info.shape)),
                  "best_epoch": run["best_epoch"], "val_accuracy": run["best"], "test_accuracy": test[0],
                  "test_accuracy_last_epoch": test[1], "train_rows": loader.n,
                  "loader": "resident" if loader.resident else "streaming", "world_size": world,
                  "train_seconds": run["seconds"], "history": run["history"],
                  "checkpoint_sha256": provenance.sha256_file(tmp), "provenance": prov}
        write_json(metrics, result, into=s)
