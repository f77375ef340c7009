"""Stage 4, student: distil a small network from the soft-target cache alone.

Objective (Hinton, Vinyals & Dean 2015, section 2; :func:`stages.kd.kd_loss`)::

    L = alpha * T^2 * KL(p_T || softmax(z / T)) + (1 - alpha) * CE(y, softmax(z))

``alpha = 0`` is the hard-label baseline, ``alpha = 1`` needs no labels.  ``objective = logits``
matches zero-meaned logits instead (the high-temperature limit).  Soft targets, labels and teacher
logits come from the cache; the inputs x come from the prepared transfer set by row, after checking
that the cache was built from that very file.  The epoch is chosen by validation accuracy; the test
split is scored once, with the chosen weights.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import checkpoints, provenance, runtime
from pipeline.artifacts import atomic_output, claim, write_json
from pipeline.config import require, setting, to_dict
from pipeline.errors import UsageError
from stages import kd, models
from stages.cache import open_cache
from stages.prepare import open_prepared

OBJECTIVES = ("kd", "logits")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """Train a student from the soft-target cache with
    alpha*T^2*KL(p_T || q_T) + (1-alpha)*CE(y, q_1); the epoch is selected on validation accuracy."""

    arch: str = setting("mlp:128", "student architecture spec (mlp:64 is 784-64-10; mlp:800-800 Hinton's)")
    temperature: float = setting(4.0, "distillation temperature T; the cache must hold soft targets at T")
    alpha: float = setting(0.5, "weight of the soft term; 0 = hard labels only, 1 = soft targets only")
    objective: str = setting("kd", "kd (tempered soft targets) or logits (match zero-meaned mean logits)")
    epochs: int = setting(30, "training epochs")
    batch_size: int = setting(128, "minibatch rows")
    lr: float = setting(1e-3, "Adam learning rate (one-cycle schedule)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    seed: int = setting(0, "seed of initialisation and batch order")
    threads: int = setting(1, "torch threads (one trains a small MLP fastest on 2 shared cores)")

    def __post_init__(self) -> None:
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(0.0 <= self.alpha <= 1.0, f"alpha must lie in [0, 1], got {self.alpha}")
        require(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}")
        require(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        require(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0")
        models.parse_spec(self.arch)


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict]:
    """A student checkpoint (weights-only loading: a pickle that runs code is refused)."""
    from pipeline.errors import DataError

    try:
        ckpt = checkpoints.load(path)  # weights-only; a pickle that would run code is refused
        net = models.build(ckpt["arch"], tuple(ckpt["input_shape"]), len(ckpt["class_names"]))
        net.load_state_dict(ckpt["state_dict"])
    except FileNotFoundError:
        raise DataError(f"{path}: student checkpoint not found; run `make student`") from None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise DataError(f"{path}: not a loadable student checkpoint ({type(e).__name__}: {str(e)[:160]})") from None
    return net.eval(), ckpt


def _targets(cfg: StudentConfig, cache) -> torch.Tensor:
    if cfg.objective == "logits":
        return torch.from_numpy(cache.read("logits").mean(axis=1))  # members' mean logits
    if cfg.alpha == 0:
        return torch.zeros(cache.rows, cache.classes)  # unused by the hard-label loss
    return torch.from_numpy(cache.soft(cfg.temperature))


def _loss(cfg: StudentConfig, z: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if cfg.objective == "logits":
        return kd.logit_matching_loss(z, target, y, cfg.alpha)
    return kd.kd_loss(z, target, y, cfg.temperature, cfg.alpha)


def distill_student(cfg: StudentConfig, cache: Path, transfer_set: Path, out: Path, metrics: Path,
                    log: Callable[[str], None] = print) -> Path:
    """Train the student of ``cfg`` from ``cache`` (+ x of ``transfer_set``); write ``out`` and ``metrics``."""
    claim(out, metrics)  # a second writer of these outputs fails now, not after training
    runtime.set_torch_threads(cfg.threads)
    c = open_cache(cache)
    provenance.check_hash(transfer_set, c.transfer_sha256, f"the transfer set the cache {cache} was built from",
                          "make cache")
    provenance.check_recorded_inputs(json.loads(c.attrs["provenance"]), f"the cache {cache}", "make cache")
    info = open_prepared(transfer_set)
    target = _targets(cfg, c)
    y = torch.from_numpy(c.read("labels"))
    if cfg.alpha < 1 and not bool((y >= 0).any()):
        raise UsageError(f"{cache}: the transfer set has no labels; use --alpha 1")
    x = torch.from_numpy(info.load(c.transfer_split)[0])
    xval, yval = map(torch.from_numpy, info.load("val"))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = models.build(cfg.arch, info.shape, len(info.classes))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    history, best = [], (-1.0, 0, None)
    t0 = time.perf_counter()
    for epoch in runtime.progress(range(cfg.epochs), desc="student", unit="epoch"):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = _loss(cfg, net(x[idx]), target[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = models.accuracy(models.predict(net, xval), yval)
        history.append({"epoch": epoch + 1, "val_accuracy": acc, "loss": float(loss.detach())})
        if acc > best[0]:
            best = (acc, epoch + 1, {k: v.clone() for k, v in net.state_dict().items()})
    seconds = time.perf_counter() - t0
    net.load_state_dict(best[2])
    xtest, ytest = info.load("test")
    test_acc = models.accuracy(models.predict(net, xtest), ytest)
    prov = provenance.record("student", to_dict(cfg), {"cache": cache, "transfer_set": transfer_set})
    ckpt = {"arch": cfg.arch, "state_dict": net.state_dict(), "input_shape": list(info.shape),
            "class_names": list(info.classes), "norm": {"scale": info.scale, "mean": info.mean, "std": info.std},
            "temperature": cfg.temperature, "alpha": cfg.alpha, "epoch": best[1],
            "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "provenance": json.dumps(prov)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        torch.save(ckpt, tmp)
    result = {"name": out.stem, "settings": to_dict(cfg), "parameters": models.count_parameters(net),
              "best_epoch": best[1], "val_accuracy": best[0], "test_accuracy": test_acc,
              "train_seconds": seconds, "history": history, "checkpoint_sha256": provenance.sha256_file(out),
              "provenance": prov}
    write_json(metrics, result)
    log(f"student {cfg.arch} T={cfg.temperature:g} alpha={cfg.alpha:g}: val {best[0]:.4f} (epoch {best[1]}), "
        f"test {test_acc:.4f} -> {out}")
    return out
