"""Teachers from other exporters (tests/foreign.py): each one's input contract, output choice and the
sanity gate, end to end through the cache stage.

For every accepted teacher the cached soft targets at T = 1 must equal onnxruntime run by hand on
inputs prepared by hand (max abs diff <= 1e-6), and a mis-declared one must be stopped by the gate;
every bad declaration is one line, a documented exit code, and no artifact.
"""
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from commands.main import main
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.cache import CacheConfig, cache_soft_targets
from tests import foreign
from tests.cache_helpers import targets

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# float32 logits: these tests compare the cached logits and targets with onnxruntime by hand, to 1e-6
CPU = ("--device", "cpu", "--threads", "1", "--batch-size", "256", "--temperatures", "1,2", "--logits-dtype", "float32")

# name -> (transfer set, how the teacher was fitted: range, layout, stats; its input shape, dtype,
# outputs, metadata contract, what the command line declares, the output read by hand)
CASES = {
    "flat-unit": ("grey", "unit", "flat", None, (196,), TensorProto.FLOAT, "logits", None, "input=unit", "logits"),
    "channel-last": ("grey", "normalised", "nhwc", "set", (14, 14, 1), TensorProto.FLOAT, "logits", None, "", "logits"),
    "uint8": ("grey", "raw", "same", None, (14, 14), TensorProto.UINT8, "logits", None, "", "logits"),
    "two-outputs": ("grey", "unit", "nchw", None, (1, 14, 14), TensorProto.FLOAT, "skl", None, "input=unit",
                    "probabilities"),
    "per-channel": ("colour", "normalised", "nhwc", IMAGENET, (8, 8, 3), TensorProto.FLOAT, "logits",
                    {"range": "normalised", "mean": list(IMAGENET[0]), "std": list(IMAGENET[1])}, "", "logits"),
    "flat-hwc": ("colour", "unit", "flat-nhwc", None, (192,), TensorProto.FLOAT, "logits", None,
                 "input=unit,layout=flat-nhwc", "logits"),
}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    return {"grey": foreign.grey_prepared(d / "grey.h5"), "colour": foreign.colour_prepared(d / "colour.h5")}


def _stats(info, how):
    return (info.mean, info.std) if how == "set" else how or (None, None)


def hand_input(info, x, case):
    _, range_, layout, how = CASES[case][:4]
    mean, std = _stats(info, how)
    x_model = foreign.by_hand(x, range_, layout, mean=mean, std=std)
    return x_model.astype(np.uint8) if CASES[case][5] == TensorProto.UINT8 else x_model


@pytest.fixture(scope="module")
def teachers(sets, tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign")
    out = {}
    for case, (data, *_, shape, dtype, outputs, meta, _decl, _out) in CASES.items():
        info = open_prepared(sets[data])
        x, y = info.load_raw("train")
        params = foreign.fit(hand_input(info, x, case).astype(np.float32), y)
        out[case] = foreign.teacher(d / f"{case}.onnx", params, shape, dtype=dtype, outputs=outputs, contract=meta)
    grey = open_prepared(sets["grey"])
    x, y = grey.load_raw("train")
    params = foreign.fit(foreign.by_hand(x, "unit", "flat"), y)
    for kind in ("zipmap", "label"):
        out[kind] = foreign.teacher(d / f"{kind}.onnx", params, (196,), outputs=kind)
    out["big"] = foreign.teacher(d / "big.onnx", foreign.fit(np.zeros((20, 784), np.float32), y[:20]), (28, 28))
    return out


def by_hand(teacher, info, case, rows=None):
    """Soft targets at T = 1 from onnxruntime on inputs prepared by hand: [rows, classes] float64."""
    x, _ = info.load_raw("train", 0, rows)
    out = ort.InferenceSession(str(teacher)).run([CASES[case][9]], {"x": hand_input(info, x, case)})[0]
    if CASES[case][9] == "probabilities":
        return out.astype(np.float64)
    z = out.astype(np.float64) - out.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


@pytest.mark.parametrize("case", list(CASES))
def test_cached_soft_targets_equal_onnxruntime_by_hand(case, sets, teachers, tmp_path):
    info = open_prepared(sets[CASES[case][0]])
    decl = CASES[case][8]
    arg = f"{teachers[case]}:{decl}" if decl else str(teachers[case])
    code, err = cli("cache", "--teacher", arg, "--transfer-set", info.path, "--out", tmp_path / "c.h5", *CPU)
    assert code == 0, err
    c = open_cache(tmp_path / "c.h5")
    want = by_hand(teachers[case], info, case)
    assert np.max(np.abs(targets(c, 1.0).astype(np.float64) - want)) <= 1e-6
    rec = c.teacher_inputs[0]
    _, y = info.load_raw("train")
    hand_acc = float(np.mean(want.argmax(1) == y))
    assert rec["gate"]["rows"] == len(y) and abs(rec["gate"]["accuracy"] - hand_acc) <= 1 / len(y)
    assert hand_acc > 0.6 and c.member_accuracy == pytest.approx([hand_acc], abs=1 / len(y))
    assert rec["input"]["output"] == CASES[case][9]
    if case == "per-channel":
        assert rec["sources"]["range"] == "metadata" and rec["input"]["mean"] == list(IMAGENET[0])


# (case, declaration that is wrong, what the gate suggests instead)
MISDECLARED = [
    ("flat-unit", "input=normalised", "input=unit,layout=flat"),
    ("channel-last", "input=raw", "input=normalised,layout=nhwc"),
    ("two-outputs", "input=raw", "input=unit,layout=nchw"),
    ("per-channel", "input=unit", "input=normalised,layout=nhwc,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"),
    ("flat-hwc", "input=unit,layout=flat", "input=unit,layout=flat-nhwc"),
]


@pytest.mark.parametrize("case, wrong, right", MISDECLARED, ids=[m[0] for m in MISDECLARED])
def test_a_misdeclared_teacher_is_stopped_by_the_gate(case, wrong, right, sets, teachers, tmp_path):
    info = open_prepared(sets[CASES[case][0]])
    out = tmp_path / "c.h5"
    code, err = cli("cache", "--teacher", f"{teachers[case]}:{wrong}", "--transfer-set", info.path, "--out", out, *CPU)
    assert code == 3 and len(err.splitlines()) == 1, err
    assert "sanity gate" in err and f"--teacher {teachers[case]}:{right}" in err and "--no-gate" in err, err
    assert err.count("%") >= 2  # both accuracies
    assert not out.exists() and not (tmp_path / "c.h5.partial").exists()


def test_no_gate_keeps_a_declaration_the_gate_refuses(sets, teachers, tmp_path):
    code, err = cli("cache", "--teacher", f"{teachers['flat-unit']}:input=normalised", "--transfer-set", sets["grey"],
                    "--out", tmp_path / "c.h5", *CPU, "--no-gate")
    assert code == 0, err
    rec = open_cache(tmp_path / "c.h5").teacher_inputs[0]
    assert rec["input"]["range"] == "normalised" and rec["gate"] is None


def test_an_undeclared_clear_winner_is_taken_and_said(sets, teachers, tmp_path):
    """No declaration at all: the default (normalised) loses clearly to [0, 1]; taken, logged, recorded."""
    logs = []
    cfg = CacheConfig(temperatures=(1.0,), device="cpu", threads=1, batch_size=256, logits_dtype="float32")
    out = cache_soft_targets(cfg, [teachers["flat-unit"]], sets["grey"], tmp_path / "c.h5", log=logs.append)
    assert any("no declaration of range; input=unit,layout=flat scores" in m and "taking input=unit" in m
               for m in logs), logs
    c = open_cache(out)
    assert c.teacher_inputs[0]["sources"]["range"] == "gate" and c.teacher_inputs[0]["input"]["range"] == "unit"
    assert np.max(np.abs(targets(c, 1.0) - by_hand(teachers["flat-unit"], open_prepared(sets["grey"]),
                                               "flat-unit"))) <= 1e-6


@pytest.mark.parametrize("teacher, decl, extra, code, fragment", [
    ("flat-unit", "layout=nhwc", (), 3, "but layout nhwc (declared, command line) gives [batch, 14, 14, 1]"),
    ("two-outputs", "output=scores", (), 3, "no output named 'scores'; the model has label (tensor(int64) [N]), "
                                            "probabilities (tensor(float) [N, 10])"),
    ("two-outputs", "output=label", (), 3, "output label (tensor(int64) [N]) is not a float [batch, classes]"),
    ("zipmap", "", (), 3, "'output_probability' is a ZipMap"),
    ("zipmap", "output=output_probability", (), 3, "options={id(model): {'zipmap': False}}"),
    ("label", "", (), 3, "(a label-only model?); the model has label (tensor(int64) [N])"),
    ("uint8", "input=unit", (), 3, "is uint8, which takes raw pixels, but range unit is declared"),
    ("big", "", (), 3, "has shape [batch, 28, 28], the transfer set gives [batch, 14, 14]"),
    ("flat-unit", "colour=rgb", (), 2, "unknown key 'colour'"),
    ("flat-unit", "input=percent", (), 2, "range must be one of raw, unit, normalised"),
    ("flat-unit", "input=unit", ("--temperatures", "1,inf"), 2, "temperature must be finite and > 0, got inf"),
    ("flat-unit", "input=unit", ("--temperatures", "nan"), 2, "temperature must be finite and > 0, got nan"),
    ("flat-unit", "input=unit", ("--member-weights", "1,2"), 2, "member weights: 2 given for 1 members"),
])
def test_bad_declarations_are_one_line_with_an_exit_code_and_no_artifact(teacher, decl, extra, code, fragment,
                                                                           sets, teachers, tmp_path):
    out = tmp_path / "c.h5"
    arg = f"{teachers[teacher]}:{decl}" if decl else teachers[teacher]
    got, err = cli("cache", "--teacher", arg, "--transfer-set", sets["grey"], "--out", out, *CPU, *extra)
    assert got == code and len(err.splitlines()) == 1 and fragment in err, err
    assert err.startswith("distill cache: error: ")
    assert not out.exists() and not (tmp_path / "c.h5.partial").exists()


def test_a_per_channel_declaration_must_match_the_channels(sets, teachers, tmp_path):
    out = tmp_path / "c.h5"
    code, err = cli("cache", "--teacher", f"{teachers['per-channel']}:input=normalised,mean=0.5/0.5,std=0.2",
                    "--transfer-set", sets["colour"], "--out", out, *CPU)
    assert code == 3 and len(err.splitlines()) == 1 and "mean has 2 values" in err and "3 channel(s)" in err, err
    assert f"{teachers['per-channel']}: " in err and "(declared, command line)" in err  # before any row: resolution
    assert not out.exists() and not (tmp_path / "c.h5.partial").exists()


def test_student_temperature_message_does_not_suggest_add_temperature(tmp_path):
    code, err = cli("student", "--cache", tmp_path / "c.h5", "--transfer-set", tmp_path / "p.h5", "--out",
                    tmp_path / "s.ckpt", "--temperature", "inf")
    assert code == 2 and err == "distill student: error: temperature: temperature must be finite and > 0, got inf"
    code, err = cli("cache", "add-temperature", tmp_path / "c.h5", "--temperatures", "inf")
    assert code == 2 and "finite and > 0" in err and len(err.splitlines()) == 1
