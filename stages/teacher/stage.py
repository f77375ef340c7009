"""Stage 2, teacher: the entry ``train_teachers``, which trains the ensemble's members
(:func:`stages.teacher.train.train_member`) and exports them as one ONNX graph.

Each member's checkpoint is written beside the ONNX file as soon as it is trained, with the hash of
the prepared data and the settings: a run killed after member k resumes at member k+1.  The graph
maps ``x [batch, ...]`` to ``member_logits [batch, members, classes]`` and its ``input_contract``
metadata says what it takes (:mod:`stages.teacher.train` has the recipe).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import inference, models, onnxio, provenance, runtime
from pipeline.artifacts import atomic_output, check_outputs, claim
from pipeline.config import to_dict
from pipeline.errors import DataError, UsageError
from pipeline.formats.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from pipeline.formats.onnx_model import InputContract, input_contract_metadata
from pipeline.formats.prepared import open_prepared
from stages.teacher.settings import TeacherConfig
from stages.teacher.train import black_pixel, train_member


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
    check_outputs({"--prepared": prepared}, {"--out": out, **{
        f"member {i}'s {kind}": p for i in range(cfg.members)
        for kind, p in (("checkpoint", _member_path(out, i)), ("state", out.with_name(f"member{i}.state")))}})
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
        sess = inference.session(tmp, "cpu", threads=cfg.threads)
        xval = data["val"][0].numpy()
        onnxio.validate(ensemble, sess, [xval[:1], xval[:7], xval[:256]], what=str(out))
    log(f"teacher ensemble: {cfg.members} x {cfg.arch}, member val accuracy "
        + ", ".join(f"{a:.4f}" for a in accs) + f" -> {out}")
    return out
