"""Stage 2, teacher: the entry ``train_teachers``, which trains the ensemble's members
(:func:`stages.teacher.train.train_member`, the recipe) and exports them as one ONNX graph.

Each member's checkpoint is written beside the ONNX file as soon as it is trained, with the hash of
the prepared data and the settings: a run killed after member k resumes at member k+1 (and inside a
member after its last finished epoch: :mod:`stages.teacher.train`).  The graph maps ``x [batch, ...]``
to ``member_logits [batch, members, classes]`` (docs/design.md, "stages and artifacts"); the cache stage
combines members, so no averaging is baked into the teacher.  Its ``input_contract`` metadata says what
it takes (the transfer set's rows normalised with the train split's statistics, float32).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pipeline import inference, models, onnxio, provenance, runtime
from pipeline.artifacts import atomic_output, check_outputs, claim
from pipeline.config import to_dict
from pipeline.formats.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from pipeline.formats.onnx_model import InputContract, input_contract_metadata
from pipeline.formats.prepared import open_prepared
from stages.teacher.settings import TeacherConfig
from stages.teacher.train import train_member, training_data


def _state_path(out: Path, index: int) -> Path:
    return out.with_name(f"member{index}.state")


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
    data, pixels = training_data(cfg, info)
    sha = provenance.sha256_file(prepared)
    precision = runtime.resolve_precision(cfg.precision)
    if precision != cfg.precision:
        log(f"teacher: precision auto -> {precision}")
    nets, accs = [], []
    for i in range(cfg.members):
        # what determines member i's weights: not the member count, not the thread count
        settings = {**to_dict(cfg), "members": None, "threads": None, "precision": precision,
                    "arch": cfg.member_arch(i)}
        key = {"prepared_sha256": sha, "settings": settings, "index": i}
        done = _load_member(_member_path(out, i), key, log)
        if done is not None:
            log(f"member {i}: reusing {_member_path(out, i)} (val accuracy {done[1]:.4f})")
        else:
            done = train_member(cfg, i, data, info.shape, len(info.classes), pixels, log,
                                state=(_state_path(out, i), key))
            with atomic_output(_member_path(out, i)) as tmp:
                write_checkpoint(tmp, Checkpoint(
                    "teacher-member", cfg.member_arch(i), info.shape, info.classes, info.norm.as_dict(),
                    models.state_arrays(done[0]), {"key": key, "val_accuracy": done[1]},
                    provenance.record("teacher-member", to_dict(cfg), {"prepared": prepared}, index=i)))
        _state_path(out, i).unlink(missing_ok=True)  # the checkpoint supersedes the epoch state
        nets.append(done[0])
        accs.append(done[1])
    ensemble = models.Ensemble(nets).eval()
    xval, yval = data["val"]
    val_probs = models.predict(ensemble, xval).softmax(-1).mean(1)
    ens_acc = models.accuracy(val_probs, yval)
    prov = provenance.record("teacher", to_dict(cfg), {"prepared": prepared}, member_val_accuracy=accs,
                             ensemble_val_accuracy=ens_acc, classes=list(info.classes), precision=precision)
    # What the graph takes, for any later stage or tool: the transfer set's rows normalised with the
    # statistics it was trained on (written as numbers: another transfer set may have other ones).
    takes = InputContract(range="normalised", layout="same", mean=info.mean, std=info.std, dtype="float32",
                          output="member_logits")
    with atomic_output(out) as tmp:
        onnxio.export(ensemble, xval[:2], tmp, "member_logits",
                      metadata={"provenance": json.dumps(prov), "classes": json.dumps(list(info.classes)),
                                **input_contract_metadata(takes)})
        sess = inference.session(tmp, "cpu", threads=cfg.threads)
        xv = xval.numpy()
        onnxio.validate(ensemble, sess, [xv[:1], xv[:7], xv[:256]], what=str(out))
    log(f"teacher ensemble: {cfg.members} x {cfg.arch}, member val accuracy "
        + ", ".join(f"{a:.4f}" for a in accs) + f", ensemble (mean of probabilities) {ens_acc:.4f} -> {out}")
    return out
