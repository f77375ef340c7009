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

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline import models, onnxio, ort, provenance, runtime
from pipeline.artifacts import atomic_output, claim
from pipeline.config import to_dict
from pipeline.errors import DataError, UsageError
from pipeline.formats.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from pipeline.formats.onnx_model import InputContract, input_contract_metadata
from pipeline.formats.prepared import Prepared, open_prepared
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


def _member_path(out: Path, index: int) -> Path:
    return out.with_name(f"member{index}.ckpt")


def _load_member(path: Path, key: dict, log: Callable[[str], None]):
    """A finished member's network and validation accuracy, if its checkpoint was made from the same
    data and settings; None (retrain, said in the log) if it was not; DataError (exit 3) if the file
    exists but cannot be read: a corrupt checkpoint is never silently replaced."""
    if not path.is_file():
        return None
    ckpt = read_checkpoint(path, role="teacher-member")
    if ckpt.meta.get("key") != key:
        log(f"{path}: trained from other data or settings; retraining this member")
        return None
    return models.from_checkpoint(ckpt), float(ckpt.meta["val_accuracy"])


def train_teachers(cfg: TeacherConfig, prepared: Path, out: Path, log: Callable[[str], None] = print) -> Path:
    """Train ``cfg.members`` teachers on ``prepared`` and write the ensemble graph to ``out``."""
    claim(out)  # a second teacher on the same output fails now, not after training
    runtime.set_torch_threads(cfg.threads)
    info = open_prepared(prepared)
    if cfg.max_shift and len(info.shape) not in (2, 3):
        raise UsageError(f"{prepared}: rows of shape {list(info.shape)} are not images and cannot be shifted; "
                         "train with --max-shift 0")
    data = {s: tuple(map(torch.from_numpy, info.load(s))) for s in ("train", "val")}
    if not bool((data["train"][1] >= 0).any()):
        raise DataError(f"{prepared}: the train split has no labelled rows; teachers need labels")
    fill = black_pixel(info)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = provenance.sha256_file(prepared)
    nets, accs = [], []
    for i in range(cfg.members):
        # what determines member i's weights: not the member count, not the thread count
        key = {"prepared_sha256": sha, "settings": {**to_dict(cfg), "members": None, "threads": None}, "index": i}
        done = _load_member(_member_path(out, i), key, log)
        if done is not None:
            log(f"member {i}: reusing {_member_path(out, i)} (val accuracy {done[1]:.4f})")
        else:
            done = train_member(cfg, i, data, info.shape, len(info.classes), fill, log)
            with atomic_output(_member_path(out, i)) as tmp:
                write_checkpoint(tmp, Checkpoint(
                    "teacher-member", cfg.arch, info.shape, info.classes, info.norm.as_dict(),
                    models.state_arrays(done[0]), {"key": key, "val_accuracy": done[1]},
                    provenance.record("teacher-member", to_dict(cfg), {"prepared": prepared}, index=i)))
        nets.append(done[0])
        accs.append(done[1])
    ensemble = models.Ensemble(nets).eval()
    prov = provenance.record("teacher", to_dict(cfg), {"prepared": prepared},
                             member_val_accuracy=accs, classes=list(info.classes))
    # What the graph takes, for any later stage or tool: the transfer set's rows normalised with the
    # statistics it was trained on (written as numbers: another transfer set may have other ones).
    takes = InputContract(range="normalised", layout="same", mean=info.mean, std=info.std, dtype="float32",
                          output="member_logits")
    with atomic_output(out) as tmp:
        onnxio.export(ensemble, data["val"][0][:2], tmp, "member_logits",
                      metadata={"provenance": json.dumps(prov), "classes": json.dumps(list(info.classes)),
                                **input_contract_metadata(takes)})
        sess = ort.session(tmp, "cpu", threads=cfg.threads)
        xval = data["val"][0].numpy()
        onnxio.validate(ensemble, sess, [xval[:1], xval[:7], xval[:256]], what=str(out))
    log(f"teacher ensemble: {cfg.members} x {cfg.arch}, member val accuracy "
        + ", ".join(f"{a:.4f}" for a in accs) + f" -> {out}")
    return out
