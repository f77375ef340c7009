"""Stage 5, export: the student to ONNX (fp32 and its quantised variants), checked before it ships.

fp32: the torch.export-based exporter, one self-contained file (no ``.onnx.data``), dynamic batch,
opset 18, IR 10, ``onnx.checker`` full check, and the metadata an edge runtime needs (class names,
input normalisation, T and alpha, the hashes of the checkpoint and of the cache it was distilled
from, input dtype).  What is exported is the network rewritten for the edge
(:mod:`stages.export.graph`: batch norm folded, channels-last flatten); with ``raw_input`` the
normalisation ``(x / scale - mean) / std`` is part of the graph (folded where exact) and the input
is raw uint8 pixels.  onnxruntime must reproduce the checkpoint's *unrewritten* PyTorch network on
real test rows at batch sizes 1, 7 and 256 (:func:`pipeline.onnxio.validate`: every failure
collected, the largest difference named).  The report gives the network's parameters and
multiply-accumulates per image (:func:`pipeline.macs.count_macs`).

Variants (:mod:`stages.export.quantize`): static QDQ int8, dynamic int8, fp16, each judged against fp32 on
the whole validation split by the quality gate (``gate_split``; scored on the test split beside it, so
the test figures are not those of a build picked on them: int8 with per-tensor weight scales first, per-channel
where that fails, ``weight_scales = auto``, then both again with the first layer kept float,
``int8_first_layer = auto``); a variant losing more than ``max_accuracy_drop`` points there is
not written (and a stale file at its path is removed) unless ``force``; the stage then fails with
exit 4 after publishing everything else and the report.

Mobile (:mod:`stages.export.mobile`): the ORT format of every shipped model, the reduced-build operator
config and onnxruntime's NNAPI / CoreML usability analysis, summarised in the report.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline import contract as ct
from pipeline import feed, inference, macs, models, onnxio, provenance, resources, sanity_gate, soft
from pipeline.artifacts import check_outputs, claim, publish_together, write_json
from pipeline.config import to_dict
from pipeline.errors import IntegrityError, UsageError
from pipeline.formats.checkpoint import Checkpoint
from pipeline.formats.onnx_model import set_metadata, student_metadata
from pipeline.formats.prepared import Prepared, open_prepared
from stages.export import mobile, quantize
from stages.export.graph import RawInput, edge_module, fold_normalisation  # noqa: F401 - the stage's API
from stages.export.settings import FIRST_LAYER, WEIGHT_SCALES, ExportConfig

PARITY_BATCHES = (1, 7, 256)


def metadata(ckpt: Checkpoint, checkpoint: Path, raw_input: bool) -> dict[str, str]:
    """``metadata_props`` of every exported file (:func:`pipeline.formats.onnx_model.student_metadata`)."""
    return student_metadata(list(ckpt.class_names), ckpt.norm, raw_input, ckpt.meta["temperature"],
                            ckpt.meta["alpha"], provenance.sha256_file(checkpoint),
                            ckpt.provenance["inputs"]["cache"]["sha256"], ckpt.arch,
                            transfer_sha256=ckpt.provenance["inputs"]["transfer_set"]["sha256"],
                            transfer_source_sha256=ckpt.provenance.get("transfer_source_sha256"))


def outputs(out: Path, report: Path, variants: dict[str, Path], mobile_dir: Path | None) -> dict[str, Path]:
    """Every file an export may write, by what the user calls it: the ONNX files, the report and, under
    ``mobile_dir``, each one's ``.ort`` and the operator config."""
    files = {"--out": out, **{f"--{'int8' if k == 'int8' else k + '-int8' if k == 'dynamic' else k}": p
                              for k, p in variants.items()}, "--report": report}
    if mobile_dir is not None:
        files.update({f"the mobile file of {p.name}": mobile_dir / f"{p.name.removesuffix('.onnx')}.ort"
                      for p in (out, *variants.values())})
        files["the operator config"] = mobile_dir / mobile.CONFIG_NAME
    return files


def _previous(report: Path, mobile_dir: Path | None) -> list[Path]:
    """Files the export before this one wrote, as its report (at the same path) names them: its ONNX
    files that still hold what it recorded (their sha256), and its ``.ort`` files under ``mobile_dir``.
    Whatever this export does not replace is removed when it publishes: never two generations side by side."""
    try:
        old = json.loads(report.read_text())
        files = [old["fp32"], *old.get("variants", {}).values()]
        onnx_files = [Path(e["path"]) for e in files if e.get("written", True) and "sha256" in e
                      and Path(e["path"]).is_file() and provenance.sha256_file(Path(e["path"])) == e["sha256"]]
        orts = [Path(p) for p in old.get("mobile", {}).get("ort", {}).values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no previous report, or not ours
        return []
    inside = [p for p in orts if mobile_dir is not None and Path(p).parent.resolve() == mobile_dir.resolve()]
    return onnx_files + inside


def _raw(info: Prepared, split: str) -> np.ndarray:
    x = info.load_raw(split)[0]
    if x.dtype != np.uint8:
        raise UsageError(f"{info.path}: raw_input needs uint8 pixels, the prepared {split} split holds {x.dtype}")
    return x


def teacher_predictions(teacher: str | Path, info: Prepared, log: Callable[[str], None]) -> tuple[np.ndarray, dict]:
    """The teacher's predictions on the test split (argmax of its members' mean softmax at T = 1), fed
    under its contract (:func:`pipeline.feed.open_model`: ``PATH[:key=value,...]``, else its metadata,
    else defaults, a guessed contract judged by the sanity gate), and what the report records of it."""
    geom = ct.Geometry.of(info)
    sess, plan = feed.open_model(teacher, geom, len(info.classes), "cpu", threads=os.cpu_count() or 1)
    gate = sanity_gate.judge_guess(sess, plan, info, "test", log, "export")
    logits = feed.run_model(sess, plan, info.load_raw("test")[0], geom)
    return soft.combine_soft_targets(logits, 1.0).argmax(1), {"path": str(plan.path), **plan.record(), "gate": gate}


def _gate_rows(info: Prepared, cfg: ExportConfig) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (raw pixels or normalised, as the export takes them) and labels of the gate's split."""
    x = _raw(info, cfg.gate_split) if cfg.raw_input else info.load(cfg.gate_split)[0]
    return x, info.labels(cfg.gate_split)


def _scorer(fp32, test: tuple[np.ndarray, np.ndarray],
            judged: tuple[np.ndarray, np.ndarray] | None, teacher_pred: np.ndarray | None,
            cfg: ExportConfig) -> tuple[dict, Callable[[Path], dict]]:
    """The fp32 model's figures, and the function that scores a variant against it.  The gate judges
    (``passed``, and so which int8 build ships) on ``judged``, the rows of ``cfg.gate_split`` (``test``
    itself where that split is the test split); the
    report's test figures are measured beside it, so with the validation split they are an unbiased
    estimate of what the chosen build scores, not the best of several tries on the rows that report it."""
    same = cfg.gate_split == "test"
    (xtest, ytest), (xgate, ygate) = test, test if same else judged
    ref_test = quantize.logits_of(fp32, xtest)
    ref_gate = ref_test if same else quantize.logits_of(fp32, xgate)

    def verdict(test_logits: np.ndarray, gate_logits: np.ndarray) -> dict:
        t = quantize.gate(ref_test, test_logits, ytest, teacher_pred, cfg.max_accuracy_drop)
        g = quantize.gate(ref_gate, gate_logits, ygate, None, cfg.max_accuracy_drop)
        return {"test_accuracy": t["accuracy"], "fp32_test_accuracy": t["fp32_accuracy"],
                **{k: t[k] for k in ("accuracy_change_points", "agreement_with_fp32", "agreement_with_teacher",
                                     "mean_kl_vs_fp32_nats", "max_accuracy_drop_points")},
                "passed": g["passed"], "gate": {"split": cfg.gate_split, "rows": len(ygate), **{
                    k: g[k] for k in ("accuracy", "fp32_accuracy", "accuracy_change_points", "agreement_with_fp32")}}}

    def score(path: Path) -> dict:
        sess = inference.session(path, "cpu", threads=1)
        logits = quantize.logits_of(sess, xtest)
        return verdict(logits, logits if same else quantize.logits_of(sess, xgate))

    own = verdict(ref_test, ref_gate)
    return {"test_accuracy": own["test_accuracy"], "agreement_with_teacher": own["agreement_with_teacher"],
            "gate": {"split": cfg.gate_split, "rows": len(ygate), "accuracy": own["gate"]["accuracy"]}}, score


def _count_bn(net: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def _stamp(path: Path, meta: dict[str, str], precision: str) -> None:
    """Give a variant the fp32 file's metadata (the quantisers drop it) plus its precision."""
    model = onnx.load(str(path))
    set_metadata(model, {**meta, "precision": precision}, replace=True)
    onnx.save(model, str(path))


def _make_variant(kind: str, fp32: Path, out: Path, calib: np.ndarray, cfg: ExportConfig,
                  scales: str = "tensor", first: str = "int8") -> Path:
    if kind == "int8":
        return quantize.static_int8(fp32, out, calib, cfg.calibration_method, scales == "channel",
                                    cfg.int8_activations, first == "float")
    if kind == "dynamic":
        return quantize.dynamic_int8(fp32, out, scales == "channel")
    return quantize.fp16(fp32, out)


def _attempts(kind: str, cfg: ExportConfig) -> list[tuple[str, str, str]]:
    """(name, weight scales, first layer) of each build of ``kind`` to try, in order: the weight scales
    of ``cfg``, with the first layer int8 before float (static int8 only; fp16 is built once)."""
    if kind == "fp16":
        return [("-", "-", "-")]
    firsts = FIRST_LAYER[cfg.int8_first_layer] if kind == "int8" else ("int8",)
    return [(s if f == "int8" else f"{s}+float-first", s, f) for f in firsts for s in WEIGHT_SCALES[cfg.weight_scales]]


def _variant(kind: str, fp32: Path, tmp: Path, calib: np.ndarray, cfg: ExportConfig, meta: dict,
             score: Callable[[Path], dict]) -> tuple[Path, dict]:
    """Build ``kind`` and gate it (``score``); int8 kinds try the weight scales of ``cfg`` in order (static
    int8 then again with its first layer float, ``int8_first_layer``) and keep the first build that
    passes (else the last), the verdicts of the ones passed over included."""
    passed_over = {}
    for name, scales, first in _attempts(kind, cfg):
        with resources.writing(tmp / f"{kind}-{name}.onnx"):  # the quantisers name no file
            path = _make_variant(kind, fp32, tmp / f"{kind}-{name}.onnx", calib, cfg, scales, first)
        _stamp(path, meta, kind)
        verdict = {**score(path), **({"weight_scales": scales} if kind != "fp16" else {}),
                   **({"first_layer": first} if kind == "int8" else {})}
        if verdict["passed"]:
            break
        passed_over[name] = verdict
    passed_over.pop(name, None)
    return path, {**verdict, **({"rejected": passed_over} if passed_over else {})}


def export_student(cfg: ExportConfig, checkpoint: Path, transfer_set: Path, out: Path, out_int8: Path | None,
                   report: Path, log: Callable[[str], None] = print, *, teacher: str | Path | None = None,
                   out_dynamic: Path | None = None, out_fp16: Path | None = None,
                   mobile_dir: Path | None = None) -> Path:
    """Write ``out`` (fp32), each variant whose path is given (``out_int8`` static QDQ, ``out_dynamic``,
    ``out_fp16``) that passes the gate, the mobile files under ``mobile_dir`` and the check ``report``.
    ``teacher`` (an ONNX file, optionally ``PATH:key=value,...`` declaring its input contract) adds
    agreement with the teacher to the gate.

    Every file is published as one set (:func:`pipeline.artifacts.publish_together`, ``out`` last): a
    failure leaves the previous export whole, and a variant that fails the gate (its ``.ort`` too), or
    a file the previous export wrote that this one does not, is removed as the set is published."""
    wanted = {k: Path(p) for k, p in (("int8", out_int8), ("dynamic", out_dynamic), ("fp16", out_fp16)) if p}
    mobile_dir = Path(mobile_dir) if cfg.mobile and mobile_dir is not None else None
    if mobile_dir is not None and mobile_dir.exists() and not mobile_dir.is_dir():
        raise UsageError(f"--mobile-dir {mobile_dir} is a file; give a folder for the mobile files")
    check_outputs({"--checkpoint": checkpoint, "--transfer-set": transfer_set,
                   "--teacher": ct.parse_teacher(teacher).path if teacher else None},
                  outputs(out, report, wanted, mobile_dir))
    claim(out, report, *wanted.values())
    net, ckpt = models.load(checkpoint)
    info = open_prepared(transfer_set)  # corrupt before stale: a damaged file is not one that "changed"
    # the transfer set the checkpoint was trained on, and no other: its mean and std go into a raw-input
    # graph, its test split scores every variant
    provenance.check_lineage(transfer_set, provenance.trained_on(ckpt.provenance), f"the checkpoint {checkpoint}",
                             "make student")
    xtest, ytest = info.load("test")
    ntrain = info.rows["train"]
    calib_idx = np.sort(np.random.default_rng(cfg.seed).choice(ntrain, size=min(cfg.calibration_rows, ntrain),
                                                               replace=False))
    if cfg.raw_input:
        # checked against the normalisation as trained; the rewritten graph is what ships
        module, xin, calib = RawInput(net, info.scale, info.mean, info.std, info.shape).eval(), \
            _raw(info, "test"), _raw(info, "train")[calib_idx]
    else:
        module, xin, calib = net, xtest, info.load("train")[0][calib_idx]
    graph, front = edge_module(net, info.shape, cfg.raw_input, info.scale, info.mean, info.std)
    teacher_pred, teacher_record = None, None
    if teacher is not None:
        teacher_pred, teacher_record = teacher_predictions(teacher, info, log)
    meta = metadata(ckpt, checkpoint, cfg.raw_input)
    result: dict = {"settings": to_dict(cfg), "metadata": meta, "arch": ckpt.arch,
                    "parameters": models.count_parameters(net),
                    "macs_per_image": macs.count_macs(net, tuple(info.shape)),
                    "graph": {"input": front, "batchnorm_folded": _count_bn(net)}, "variants": {},
                    **({"teacher": teacher_record} if teacher_record else {})}
    with resources.temporary_folder() as tmp:  # a full TMPDIR is one line naming it (exit 7)
        fp32 = Path(tmp) / "fp32.onnx"
        onnxio.export(graph, torch.from_numpy(xin[:2]), fp32, "logits", metadata={**meta, "precision": "fp32"})
        sess = inference.session(fp32, "cpu", threads=1)
        worst = onnxio.validate(module, sess, [xin[:b] for b in PARITY_BATCHES], rtol=cfg.rtol, what=str(out))
        judged = None if cfg.gate_split == "test" else _gate_rows(info, cfg)
        record, score = _scorer(sess, (xin, ytest), judged, teacher_pred, cfg)
        result["fp32"] = {"path": str(out), "max_abs_diff_vs_torch": worst, "parity_batches": list(PARITY_BATCHES),
                          **record}
        built = {}

        for kind, final in wanted.items():
            path, verdict = _variant(kind, fp32, Path(tmp), calib, cfg, meta, score)
            written = verdict["passed"] or cfg.force
            result["variants"][kind] = {"path": str(final), "written": written, **verdict}
            if written:
                built[kind] = path
        shipped = {out: fp32} | {wanted[k]: p for k, p in built.items()}  # final path -> its file in tmp
        for entry in [result["fp32"], *[v for v in result["variants"].values() if v["written"]]]:
            entry["sha256"] = provenance.sha256_file(shipped[Path(entry["path"])])
        inputs = {"checkpoint": checkpoint, "transfer_set": transfer_set,
                  **({"teacher": Path(teacher_record["path"])} if teacher_record else {})}
        result["provenance"] = provenance.record("export", to_dict(cfg), inputs)
        with publish_together(out) as s:
            for final, src in shipped.items():
                with s.file(final) as part:
                    shutil.copyfile(src, part)
            if mobile_dir is not None:
                stems = {final.name.removesuffix(".onnx"): src for final, src in shipped.items()}
                result["mobile"] = {**mobile.convert_to_ort(stems, mobile_dir, into=s),
                                    "usability": {final.name.removesuffix(".onnx"): mobile.usability(src, final)
                                                  for final, src in shipped.items()}}
            for old in _previous(report, mobile_dir) + [p for k, p in wanted.items() if k not in built]:
                s.remove(old)  # a stale variant would be benchmarked as if current
            if mobile_dir is not None:
                for k in wanted.keys() - built.keys():
                    s.remove(mobile_dir / f"{wanted[k].name.removesuffix('.onnx')}.ort")
            write_json(report, result, into=s)
    summary = "; ".join(f"{k} {v['test_accuracy']:.4f} ({v['accuracy_change_points']:+.2f} pts, "
                        f"{'written' if v['written'] else 'NOT written'})" for k, v in result["variants"].items())
    log(f"export: fp32 test {result['fp32']['test_accuracy']:.4f} (max |diff| vs torch {worst:.2g}) -> {out}"
        + (f"; {summary}" if summary else "") + f"; report {report}")
    failed = [k for k, v in result["variants"].items() if not v["passed"] and not v["written"]]
    if failed:
        raise IntegrityError("quality gate: " + ", ".join(
            f"{k} loses {-result['variants'][k]['gate']['accuracy_change_points']:.2f} points of {cfg.gate_split} "
            f"accuracy (> {cfg.max_accuracy_drop}; {result['variants'][k]['accuracy_change_points']:+.2f} on test)"
            for k in failed) + f"; not written (see {report}; --force writes it)")
    return out
