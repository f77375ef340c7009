"""The stages chained on a tiny synthetic set: artifacts, provenance checks, bad input via the CLI."""
import json

import h5py
import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.errors import IntegrityError
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from pipeline.models import load as load_checkpoint
from stages.export import ExportConfig, export_student
from stages.prepare import PrepareConfig, prepare_dataset
from stages.student import StudentConfig, distill_student
from tests import oracles
from tests.cache_helpers import targets
from tests.conftest import run_cli


def test_teacher_graph_has_member_logits(tiny_teacher, tiny_prepared):
    sess = ort.InferenceSession(str(tiny_teacher), providers=["CPUExecutionProvider"])
    out = sess.get_outputs()[0]
    assert out.name == "member_logits" and sess.get_inputs()[0].name == "x"
    x = np.zeros((5, 28, 28), np.float32)  # the synthetic npz images have no channel axis
    assert sess.run(None, {"x": x})[0].shape == (5, 2, 10)  # dynamic batch, 2 members, 10 classes
    assert list(tiny_teacher.parent.glob("member*.ckpt")) and not list(tiny_teacher.parent.glob("*.data"))


def test_cache_schema_and_soft_targets(tiny_cache, tiny_teacher, tiny_prepared):
    with h5py.File(tiny_cache) as f:
        a = f.attrs
        assert a["schema"] == "kd-cache/2" and a["complete"] and a["committed_rows"] == a["rows"] == 1200
        assert (a["members"], a["classes"]) == (2, 10) and list(a["temperatures"]) == [1.0, 2.0, 4.0]
        assert a["provider"] == "CPUExecutionProvider" and a["combine"] == "arithmetic"
        assert (a["layout"], a["logits_dtype"], a["soft_temperatures"]) == ("full", "float16", "[]")
        logits = f["logits"][:]
        assert logits.dtype == np.float16 and f["labels"].dtype == np.int8 and "soft" not in f
        labels = f["labels"][:]
        for T in ("1", "2", "4"):
            # the targets every reader derives are the arithmetic mean of member softmaxes of the stored logits
            # (float32 round-off), recomputed by tests/oracles.py, which shares no code with the stage
            soft = targets(open_cache(tiny_cache), float(T))
            np.testing.assert_allclose(soft, oracles.soft_targets(logits, float(T)), rtol=0, atol=1e-7)
            np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
            d = dict(f[f"diagnostics/{T}"].attrs)
            want = oracles.diagnostics(logits, soft, labels)
            assert all(d[k] == pytest.approx(v, abs=1e-12) for k, v in want.items()), (T, d, want)
    sess = ort.InferenceSession(str(tiny_teacher), providers=["CPUExecutionProvider"])
    x, _ = open_prepared(tiny_prepared).load("train", 0, 8)
    # float16 storage: within half a float16 step of onnxruntime's float32 logits (2^-11 relative)
    want = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(logits[:8].astype(np.float32), want, rtol=2 ** -11, atol=1e-7)


def test_soft_targets_soften_with_temperature(tiny_cache):
    c = open_cache(tiny_cache)
    ent = [float(np.mean(-(targets(c, T) * np.log(targets(c, T) + 1e-30)).sum(1))) for T in (1.0, 2.0, 4.0)]
    assert ent[0] < ent[1] < ent[2]


def test_student_artifacts(tiny_student, tiny_cache):
    metrics = json.loads(tiny_student.with_suffix(".metrics.json").read_text())
    assert metrics["best_epoch"] in (1, 2) and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["test_accuracy"] > 0.5  # the synthetic classes are easy; chance is 0.1
    _, ckpt = load_checkpoint(tiny_student)
    assert ckpt.meta["temperature"] == 2.0 and ckpt.meta["alpha"] == 0.5 and ckpt.meta["epoch"] == metrics["best_epoch"]
    assert ckpt.provenance["inputs"]["cache"]["sha256"] == metrics["provenance"]["inputs"]["cache"]["sha256"]


def test_seeded_students_are_identical(tiny_cache, tiny_prepared, tmp_path):
    cfg = StudentConfig(arch="mlp:16", epochs=1, temperature=2.0)
    a = distill_student(cfg, tiny_cache, tiny_prepared, tmp_path / "a.ckpt", tmp_path / "a.json", log=lambda m: None)
    b = distill_student(cfg, tiny_cache, tiny_prepared, tmp_path / "b.ckpt", tmp_path / "b.json", log=lambda m: None)
    sa, sb = load_checkpoint(a)[1].state, load_checkpoint(b)[1].state
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_student_refuses_cache_of_another_transfer_set(tiny_cache, tiny_npz, tmp_path):
    other = prepare_dataset(PrepareConfig(val_rows=201), tmp_path / "other.h5", npz=tiny_npz)
    with pytest.raises(IntegrityError, match="make cache"):
        distill_student(StudentConfig(epochs=1), tiny_cache, other, tmp_path / "s.ckpt", tmp_path / "s.json")
    assert not (tmp_path / "s.ckpt").exists()


def test_export_parity_and_int8(tiny_student, tiny_prepared, tmp_path):
    out, out8, rep = tmp_path / "s.onnx", tmp_path / "s.int8.onnx", tmp_path / "s.export.json"
    # The documented gate is 0.5 points, on Fashion-MNIST's 10,000 test rows.  This tiny student (two
    # epochs on synthetic data, 300 test rows: one row is 0.33 points) loses 1.0 point in int8 (3 rows,
    # 98% agreement with fp32), so its gate is 2 points (6 rows): room for another CPU's rounding, while
    # a broken quantisation (wrong scale, mis-ordered weights) loses tens of points.
    export_student(ExportConfig(calibration_rows=200, max_accuracy_drop=2.0, mobile=False), tiny_student,
                   tiny_prepared, out, out8, rep, log=lambda m: None)
    report = json.loads(rep.read_text())
    x, y = open_prepared(tiny_prepared).load("test")
    net = load_checkpoint(tiny_student)[0].eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()))  # docs/design.md: 1e-5 x max(1, max |logit|)
    assert report["fp32"]["max_abs_diff_vs_torch"] <= tol
    # the gate's figures, recomputed from the published int8 file with numpy
    q = ort.InferenceSession(str(out8), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    change = 100 * (np.mean(q.argmax(1) == y) - np.mean(ref.argmax(1) == y))
    v = report["variants"]["int8"]
    assert v["accuracy_change_points"] == pytest.approx(change, abs=1e-9) and abs(change) <= 2.0
    agreement = float(np.mean(q.argmax(1) == ref.argmax(1)))
    assert v["agreement_with_fp32"] == pytest.approx(agreement) and agreement >= 0.95
    import onnx
    m = onnx.load(str(out))
    assert m.ir_version <= 13 and {p.key for p in m.metadata_props} >= {"class_names", "temperature", "cache_sha256"}
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out8)).graph.node)
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("args, code, fragment", [
    (["--temperature", "0"], 2, "temperature must be finite and > 0"),
    (["--temperature", "-2"], 2, "temperature must be finite and > 0"),
    (["--alpha", "1.5"], 2, "alpha must lie in [0, 1]"),
    (["--temperature", "1e-4"], 2, "temperature must be >= 0.001"),
])
def test_student_cli_bad_settings(tiny_cache, tiny_prepared, tmp_path, args, code, fragment):
    out = tmp_path / "s.ckpt"
    proc = run_cli("student", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--out", out, "--epochs", "1",
                   *args)
    assert proc.returncode == code, proc.stderr
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "s.ckpt.partial").exists()


def test_cache_cli_bad_temperature(tiny_teacher, tiny_prepared, tmp_path):
    out = tmp_path / "c.h5"
    proc = run_cli("cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", out,
                   "--temperatures", "1,0")
    assert proc.returncode == 2 and "temperature must be finite and > 0" in proc.stderr
    assert not out.exists()


def test_cache_cli_cuda_unavailable_is_an_error(tiny_teacher, tiny_prepared, tmp_path):
    from pipeline.inference import cuda_driver_present
    if cuda_driver_present():
        pytest.skip("a GPU is present")
    out = tmp_path / "c.h5"
    proc = run_cli("cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", out, "--device",
                   "cuda")
    assert proc.returncode == 5 and "CUDA was requested" in proc.stderr
    assert not out.exists()
