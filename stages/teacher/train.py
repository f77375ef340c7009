"""Stage 2, teacher: train an ensemble of M members in PyTorch and export it as ONE ONNX graph.

Members differ only in their seed (initialisation, batch order, jitter), the ensemble recipe of
Hinton et al. (2015, section 3).  Default members are small CNNs trained with random shifts of up to
2 pixels; ``--arch mlp:1200-1200:dropout=0.5`` gives the paper's MLP teacher.  The graph maps
``x [batch, ...]`` to ``member_logits [batch, members, classes]`` (docs/design.md, "stages and artifacts"); the cache
stage combines members, so no averaging is baked into the teacher.  Its ``input_contract`` metadata
(:mod:`pipeline.formats.onnx_model`) says it takes the transfer set's layout normalised with the
train split's mean and std, as float32, and gives ``member_logits``: the cache needs no flags for it.

Each member's checkpoint is written beside the ONNX file as soon as it is trained, with the hash of
the prepared data and the settings: a run killed after member k resumes at member k+1.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline import models, runtime
from pipeline.formats.prepared import Prepared
from pipeline.jitter import jitter
from stages.teacher.settings import TeacherConfig


def black_pixel(info: Prepared) -> float | torch.Tensor:
    """What pixels shifted in by the jitter are: a black pixel, normalised as the teacher sees it:
    one number, or one per channel when the prepared set's statistics are per channel."""
    black = info.black()
    return torch.from_numpy(black) if info.norm.per_channel else float(black[0])


def train_member(cfg: TeacherConfig, index: int, data: dict, shape: tuple, classes: int,
                 fill: float | torch.Tensor, log: Callable[[str], None]) -> tuple[torch.nn.Module, float]:
    """Train member ``index``; returns the weights of its best validation epoch and that accuracy."""
    seed = cfg.seed + index
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = models.build(cfg.arch, shape, classes)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xtr, ytr = data["train"]
    labelled = ytr >= 0
    xtr, ytr = xtr[labelled], ytr[labelled]
    steps = cfg.epochs * -(-len(xtr) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    best, best_state = -1.0, None
    bar = runtime.progress(total=steps, desc=f"teacher {index + 1}/{cfg.members}", unit="step")
    for epoch in range(cfg.epochs):
        net.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(net(jitter(xtr[idx], cfg.max_shift, gen, fill)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
        acc = models.accuracy(models.predict(net, data["val"][0]), data["val"][1])
        log(f"member {index}: epoch {epoch + 1}/{cfg.epochs} val accuracy {acc:.4f}")
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in net.state_dict().items()}
    bar.close()
    net.load_state_dict(best_state)
    return net.eval(), best
