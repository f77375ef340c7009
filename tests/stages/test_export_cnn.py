"""Export of convolutional students: parity, the int8 graph onnxruntime actually runs (integer kernels
only, no stray Quantize/Dequantize pair), raw uint8 pixels into the first QLinearConv, parameters and
multiply-accumulates in the report, and no onnxruntime warning when loading any exported file."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline import macs, models
from pipeline.formats.onnx_model import onnx_macs
from pipeline.formats.prepared import open_prepared
from pipeline.inference import optimised_ops
from stages.export import stage as ex
from tests.conftest import CNN_SPECS

pytestmark = pytest.mark.slow  # trains four CNN students and exports each twice (about a minute)

QUIET = dict(log=lambda m: None)
INTEGER_KERNELS = {"QLinearConv", "QLinearAdd", "QGemm", "QLinearAveragePool", "NhwcMaxPool", "MaxPool"}


@pytest.fixture(scope="module")
def cnn_exports(tiny_cnn_students, tiny_chw_prepared, tiny_chw_cache, tmp_path_factory):
    """{(spec, raw): folder} with s.onnx, s.int8.onnx, s.json (and, for the dws student, the
    dynamic int8, fp16 and mobile files too)."""
    out = {}
    for spec, ckpt in tiny_cnn_students.items():
        for raw in (False, True):
            d = tmp_path_factory.mktemp("cnn-export")
            extra = spec.startswith("dws") and not raw
            cfg = ex.ExportConfig(raw_input=raw, calibration_rows=200, max_accuracy_drop=5.0, mobile=extra)
            ex.export_student(cfg, ckpt, tiny_chw_prepared, d / "s.onnx", d / "s.int8.onnx", d / "s.json",
                              teacher=tiny_chw_cache[0], mobile_dir=d / "mobile" if extra else None,
                              out_dynamic=d / "s.dyn.onnx" if extra else None,
                              out_fp16=d / "s.fp16.onnx" if extra else None, **QUIET)
            out[spec, raw] = d
    return out


@pytest.fixture(scope="module")
def exported_mlps(tiny_student, tiny_prepared, tiny_teacher, tmp_path_factory):
    """The MLP student exported with every variant and its mobile files, float and raw input."""
    out = []
    for raw in (False, True):
        d = tmp_path_factory.mktemp("mlp-export")
        cfg = ex.ExportConfig(raw_input=raw, calibration_rows=200, max_accuracy_drop=5.0)
        ex.export_student(cfg, tiny_student, tiny_prepared, d / "s.onnx", d / "s.int8.onnx", d / "s.json",
                          teacher=tiny_teacher, out_dynamic=d / "s.dyn.onnx", out_fp16=d / "s.fp16.onnx",
                          mobile_dir=d / "mobile", **QUIET)
        out.append(d)
    return out


@pytest.mark.parametrize("spec", CNN_SPECS)
def test_report_counts_parameters_and_macs(cnn_exports, tiny_cnn_students, spec):
    report = json.loads((cnn_exports[spec, True] / "s.json").read_text())
    net, _ = models.load(tiny_cnn_students[spec])
    assert report["arch"] == spec and report["parameters"] == models.count_parameters(net)
    assert report["macs_per_image"] == macs.count_macs(net, (1, 28, 28))
    for name in ("s.onnx", "s.int8.onnx"):  # the graph counts the same multiply-accumulates
        assert onnx_macs(cnn_exports[spec, True] / name) == report["macs_per_image"]
    assert report["graph"]["input"] == "shifted"  # scale in the first conv, the mean a Sub before it
    assert report["graph"]["batchnorm_folded"] == {"cnn": 0, "conv": 2, "dws": 5, "res": 6}[spec.split(":")[0]]
    assert report["fp32"]["max_abs_diff_vs_torch"] < 1e-4  # checked against the unfolded network
    metrics = json.loads(tiny_cnn_students[spec].with_suffix(".json").read_text())
    assert metrics["macs_per_image"] == report["macs_per_image"] and metrics["parameters"] == report["parameters"]


@pytest.mark.parametrize("spec", CNN_SPECS)
def test_int8_runs_integer_kernels_only(cnn_exports, spec):
    """Normalised float input: one QuantizeLinear of the input, then integer kernels to the float
    logits; no DequantizeLinear anywhere, so no float kernel between a stray pair."""
    ops = optimised_ops(cnn_exports[spec, False] / "s.int8.onnx")
    assert ops[:2] == ["QuantizeLinear", "Transpose"] and ops.count("QuantizeLinear") == 1, ops
    assert "DequantizeLinear" not in ops and ops[-1] == "QGemm", ops
    assert ops.count("Transpose") == 1, ops  # the flatten is channels-last: no Transpose back to NCHW
    assert set(ops) - {"QuantizeLinear", "Transpose", "Reshape"} <= INTEGER_KERNELS, ops


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_int8_activation_type_reaches_the_graph(tiny_cnn_students, tiny_chw_prepared, activations, tmp_path):
    """--int8-activations sets the type of every quantised activation (weights stay int8); the
    raw pixels stay uint8 either way, and the residual student still runs integer kernels only."""
    cfg = ex.ExportConfig(raw_input=True, calibration_rows=200, max_accuracy_drop=5.0, mobile=False,
                          int8_activations=activations)
    ex.export_student(cfg, tiny_cnn_students["res:4x1-8x1"], tiny_chw_prepared, tmp_path / "s.onnx",
                      tmp_path / "s.int8.onnx", tmp_path / "s.json", **QUIET)
    g = onnx.load(str(tmp_path / "s.int8.onnx")).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    acts = {inits[n.input[2]].dtype for n in g.node if n.op_type == "QuantizeLinear"}
    assert acts == {np.dtype(activations)}, acts
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ops = optimised_ops(tmp_path / "s.int8.onnx")
    if activations == "uint8":  # U8S8: onnxruntime fuses every group, the Add included
        assert not {"QuantizeLinear", "DequantizeLinear"} & set(ops) and "QLinearAdd" in ops, ops
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["int8_activations"] == activations


@pytest.mark.parametrize("spec", CNN_SPECS)
def test_raw_int8_takes_the_pixels_into_its_first_qlinearconv(cnn_exports, tiny_chw_prepared, spec):
    d = cnn_exports[spec, True]
    ops = optimised_ops(d / "s.int8.onnx")
    assert ops[:2] == ["Transpose", "QLinearConv"], ops  # NCHW -> NHWC of the uint8 pixels, nothing else
    assert not {"QuantizeLinear", "DequantizeLinear", "Cast", "Sub"} & set(ops), ops
    if spec.startswith("dws"):
        assert ops == ["Transpose"] + ["QLinearConv"] * 5 + ["QLinearAveragePool", "Reshape", "QGemm"]
    info = open_prepared(tiny_chw_prepared)
    raw = ex._raw(info, "test")
    ref = ort.InferenceSession(str(cnn_exports[spec, False] / "s.onnx")).run(None, {"x": info.normalise(raw)})[0]
    fp32_raw = ort.InferenceSession(str(d / "s.onnx")).run(None, {"x": raw})[0]
    np.testing.assert_allclose(fp32_raw, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    got = ort.InferenceSession(str(d / "s.int8.onnx")).run(None, {"x": raw})[0]
    assert got.dtype == np.float32 and np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9  # int8 vs fp32
    fp32_ops = optimised_ops(d / "s.onnx")
    assert fp32_ops[:2] == ["Cast", "Sub"] and "Div" not in fp32_ops, fp32_ops  # the scale is in the conv


def test_cnn_mobile_files(cnn_exports):
    """The .ort files run, the reduced-build operator config lists the integer conv kernels, and the
    usability report covers both files (NNAPI takes the int8 CNN's QDQ groups once shapes are fixed)."""
    d = cnn_exports["dws:8-16/2-32/2", False]
    for stem in ("s", "s.int8", "s.dyn", "s.fp16"):
        sess = ort.InferenceSession(str(d / "mobile" / f"{stem}.ort"), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"x": np.zeros((2, 1, 28, 28), np.float32)})[0].shape == (2, 10)
    config = (d / "mobile" / "required_operators.config").read_text()
    assert "QLinearConv" in config and "QLinearAveragePool" in config
    usability = json.loads((d / "s.json").read_text())["mobile"]["usability"]
    assert usability["s.int8"]["providers"]["NNAPI"]["fixed_shapes"] == "YES"


WARNING = re.compile(r"\[(W|E|F):onnxruntime")
LOAD_ALL = """
import sys
import onnxruntime as ort
ort.set_default_logger_severity(1)
for path in sys.argv[1:]:
    print("loading", path, file=sys.stderr, flush=True)
    so = ort.SessionOptions()
    so.log_severity_level = 1
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
"""


def load_log(paths) -> str:
    """onnxruntime's log (severity INFO and up, on stderr) of creating a session for each file."""
    proc = subprocess.run([sys.executable, "-c", LOAD_ALL, *map(str, paths)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_no_onnxruntime_warning_when_loading_any_export(cnn_exports, exported_mlps):
    """Every file the export writes, MLP and CNN, float and raw input, fp32 and each variant, .onnx
    and .ort: onnxruntime logs no warning or error while loading it (it warned about the unused
    ``logits_scale`` and ``logits_zero_point`` of every int8 file before)."""
    paths = sorted(p for d in [*cnn_exports.values(), *exported_mlps] for p in d.rglob("*") if p.suffix in (".onnx",
                                                                                                            ".ort"))
    kinds = {p.name for p in paths}
    assert {"s.onnx", "s.int8.onnx", "s.dyn.onnx", "s.fp16.onnx", "s.int8.ort", "s.ort"} <= kinds, kinds
    log = load_log(paths)
    assert log.count("loading ") == len(paths) and "[I:onnxruntime" in log  # INFO and up is really logged
    bad = [line for line in log.splitlines() if WARNING.search(line)]
    assert not bad, "\n".join(bad[:10])


def test_the_log_check_sees_a_warning(tmp_path):
    """The check above is not blind: an initializer no node reads is warned about at load."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    unused = onnx.numpy_helper.from_array(np.ones(1, np.float32), "logits_scale")
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y], [unused])
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10),
              str(tmp_path / "m.onnx"))
    assert any("logits_scale" in line and WARNING.search(line) for line in load_log([tmp_path / "m.onnx"]).splitlines())


def test_a_float_first_conv_quantises_from_its_output_on(tiny_cnn_students, tiny_chw_prepared, tmp_path):
    """int8_first_layer = float on a raw residual CNN: the pixels are cast and shifted for one float
    convolution, quantised once after it, and every later layer runs an integer kernel."""
    cfg = ex.ExportConfig(raw_input=True, calibration_rows=200, max_accuracy_drop=5.0, mobile=False,
                          int8_first_layer="float")
    ex.export_student(cfg, tiny_cnn_students["res:4x1-8x1"], tiny_chw_prepared, tmp_path / "s.onnx",
                      tmp_path / "s.int8.onnx", tmp_path / "s.json", **QUIET)
    ops = optimised_ops(tmp_path / "s.int8.onnx")
    q = ops.index("QuantizeLinear")
    assert ops.count("QuantizeLinear") == 1 and "DequantizeLinear" not in ops, ops
    assert {"Cast", "Sub"} <= set(ops[:q]) and {"Conv", "FusedConv"} & set(ops[:q]), ops
    assert set(ops[q + 1:]) - {"Transpose", "Reshape"} <= INTEGER_KERNELS, ops
    v = json.loads((tmp_path / "s.json").read_text())["variants"]["int8"]
    assert v["first_layer"] == "float" and v["agreement_with_fp32"] >= 0.9
