"""Stage 2, teacher: one member's training (:func:`train_member`), the recipe of the ensemble's members.

Members differ in their seed (initialisation, batch order, augmentation), the ensemble recipe of
Hinton et al. (2015, section 3), and optionally in their architecture (``--arch a,b``: member i takes
arch ``i mod 2``).  Default members are small CNNs trained with random shifts of up to 2 pixels;
``--arch mlp:1200-1200:dropout=0.5`` gives the paper's MLP teacher; the strong recipe
(``make teacher TEACHER=strong``, docs/results.md) trains ResNet-20 members with Nesterov SGD, shifts,
flips, random erasing and label smoothing, in bfloat16 autocast where the CPU has it.

Inside a member the whole training state (weights, optimizer, scheduler, random generators, best epoch
so far) is written after every epoch to ``member<i>.state`` (:mod:`pipeline.resume`): a run
killed at any point resumes after the member's last finished epoch and ends with the weights an
uninterrupted run gives (``tests/stages/test_teacher_resume.py``).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import augment, models, resume, runtime
from pipeline.errors import DataError, UsageError
from pipeline.formats.prepared import Prepared
from pipeline.jitter import jitter
from stages.teacher.settings import TeacherConfig


def black_pixel(info: Prepared) -> float | torch.Tensor:
    """What pixels shifted in by the jitter are: a black pixel, normalised as the teacher sees it:
    one number, or one per channel when the prepared set's statistics are per channel."""
    black = info.black()
    return torch.from_numpy(black) if info.norm.per_channel else float(black[0])


def _optimizer(cfg: TeacherConfig, net: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam or Nesterov SGD; weight decay on conv and linear weights only (ndim > 1), as is usual for
    batch-norm networks (decaying BN's scale only fights the normalisation)."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(groups, lr=cfg.lr)


class _Augment:
    """The training-time input pipeline of a batch: shift, flip, erase (each off at 0), all drawn from ``gen``."""

    def __init__(self, cfg: TeacherConfig, fill: float | torch.Tensor, low: torch.Tensor, high: torch.Tensor):
        self.cfg, self.fill, self.low, self.high = cfg, fill, low, high

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = jitter(x, self.cfg.max_shift, gen, self.fill)
        x = augment.hflip(x, self.cfg.flip, gen)
        return augment.erase(x, self.cfg.erase, gen, self.low, self.high)


def train_member(cfg: TeacherConfig, index: int, data: dict, shape: tuple, classes: int,
                 pixels: tuple, log: Callable[[str], None], state: tuple[Path, dict] | None = None
                 ) -> tuple[torch.nn.Module, float]:
    """Train member ``index``; returns the weights of its best validation epoch and that accuracy.

    ``pixels`` is (shift fill, lowest, highest normalised pixel per channel); ``state`` is (path, key):
    resume from the training state at path if it was saved with that key, and save it after every epoch.
    """
    seed, arch = cfg.seed + index, cfg.member_arch(index)
    precision = runtime.resolve_precision(cfg.precision)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = models.build(arch, shape, classes)
    channels_last = models.trains_channels_last(net)
    fmt = torch.channels_last if channels_last else torch.contiguous_format  # oneDNN's fast convolution layout
    net = net.to(memory_format=fmt)
    opt = _optimizer(cfg, net)
    xtr, ytr = data["train"]
    labelled = ytr >= 0
    xtr, ytr = xtr[labelled], ytr[labelled]
    per_epoch = -(-len(xtr) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * per_epoch,
                                                pct_start=0.15)
    run = {"epoch": 0, "best": -1.0, "best_state": None, "history": []}
    saved = None if state is None else resume.restore(*state, net, opt, sched, gen, log, f"member {index}")
    if saved is not None:
        run = saved
        log(f"member {index}: resuming after epoch {run['epoch']}/{cfg.epochs} from {state[0]}")
    step_aug = _Augment(cfg, *pixels)
    bar = runtime.progress(total=cfg.epochs * per_epoch, initial=run["epoch"] * per_epoch,
                           desc=f"teacher {index + 1}/{cfg.members}", unit="step")
    for epoch in range(run["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = step_aug(xtr[idx], gen)
            x = models.training_batch(x, channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), ytr[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
        acc = models.accuracy(models.predict(net, data["val"][0]), data["val"][1])
        took = time.perf_counter() - t0
        run["history"].append({"epoch": epoch + 1, "val_accuracy": acc, "seconds": took})
        run["epoch"] = epoch + 1
        if acc > run["best"]:
            run["best"], run["best_state"] = acc, {k: v.clone() for k, v in net.state_dict().items()}
        log(f"member {index}: epoch {epoch + 1}/{cfg.epochs} val accuracy {acc:.4f} ({took:.0f} s; "
            f"this member done in ~{took * (cfg.epochs - epoch - 1) / 60:.0f} min)")
        if state is not None and epoch + 1 < cfg.epochs:
            resume.save(*state, net, opt, sched, gen, run)
    bar.close()
    net.load_state_dict(run["best_state"])
    return net.to(memory_format=torch.contiguous_format).eval(), run["best"]


def _pixels(info: Prepared, xtr: torch.Tensor) -> tuple:
    """(shift fill, per-channel lowest and highest value of the normalised train split): random erasing
    fills with values the data could hold."""
    dims = [0, *range(2, xtr.ndim)] if info.norm.per_channel else list(range(xtr.ndim))
    return black_pixel(info), xtr.amin(dim=dims), xtr.amax(dim=dims)


def training_data(cfg: TeacherConfig, info: Prepared) -> tuple[dict, tuple]:
    """The train and val splits as tensors, and the pixel values the augmentation uses (:func:`_pixels`);
    UsageError/DataError when the settings cannot apply to these rows."""
    if (cfg.max_shift or cfg.flip or cfg.erase) and len(info.shape) not in (2, 3):
        raise UsageError(f"{info.path}: rows of shape {list(info.shape)} are not images and cannot be shifted, "
                         "flipped or erased; train with --max-shift 0 --flip 0 --erase 0")
    data = {s: tuple(map(torch.from_numpy, info.load(s))) for s in ("train", "val")}
    if not bool((data["train"][1] >= 0).any()):
        raise DataError(f"{info.path}: the train split has no labelled rows; teachers need labels")
    return data, _pixels(info, data["train"][0])
