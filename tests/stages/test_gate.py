"""The sanity gate against the mistakes it must not let through (pipeline/sanity_gate.py), end to end
through the cache stage, on teachers and transfer sets built here (tests/foreign.py).

Every accepted case is checked against onnxruntime run by hand on inputs prepared by hand
(foreign.by_hand, never the code under test); every refusal is one line, exit 3 (2 for a setting),
naming the figures and the declaration that fixes it, and leaves no artifact.
"""
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from commands.main import main
from pipeline import sanity_gate
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.cache import settings as cache_settings
from tests import foreign
from tests.cache_helpers import targets

# float32 logits: these tests compare the cached logits and targets with onnxruntime by hand, to 1e-6
CPU = ("--device", "cpu", "--threads", "1", "--batch-size", "256", "--temperatures", "1,2", "--logits-dtype", "float32")


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def softmax(z):
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def by_hand(teacher, x_model):
    return ort.InferenceSession(str(teacher)).run(["logits"], {"x": x_model})[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The transfer sets and teachers: a [0, 1] MLP (flat), an undeclared [0, 1] teacher (flat), a
    [-1, 1] colour teacher (channel last), a semi-supervised set and a set without labels."""
    d = tmp_path_factory.mktemp("gate")
    grey = open_prepared(foreign.grey_prepared(d / "grey.h5"))
    colour = open_prepared(foreign.colour_prepared(d / "colour.h5", per_channel=True))  # as prepare writes colour
    x, y = grey.load_raw("train")
    unit_mlp = foreign.teacher(d / "mlp-unit.onnx", foreign.fit(foreign.by_hand(x, "unit", "flat"), y,
                                                                 thresholds=False), (196,))
    flat_unit = foreign.teacher(d / "flat-unit.onnx", foreign.fit(foreign.by_hand(x, "unit", "flat"), y), (196,))
    xc, yc = colour.load_raw("train")
    signed = foreign.teacher(d / "signed.onnx", foreign.fit(foreign.by_hand(xc, "normalised", "nhwc", mean=0.5,
                                                                            std=0.5), yc, hidden=64), (8, 8, 3))
    semi = foreign.semi_supervised_prepared(d / "semi.h5")
    xs, ys = foreign.grey_images(600, seed=5)
    unlabelled = foreign.write_prepared(d / "unlabelled.h5", {"train": (xs, np.full_like(ys, -1)),
                                                              "val": foreign.grey_images(200, seed=1),
                                                              "test": foreign.grey_images(200, seed=2)})
    return dict(grey=grey.path, colour=colour.path, unit_mlp=unit_mlp, flat_unit=flat_unit, signed=signed,
                semi=semi, unlabelled=unlabelled)


def test_an_explicit_raw_range_on_a_unit_mlp_is_refused_on_its_soft_targets(data, tmp_path):
    """The argmax survives (within a few points: an accuracy-only gate let it through) but the targets
    collapse to one-hot; the gate refuses it, naming both sets of figures and input=unit."""
    info = open_prepared(data["grey"])
    x, y = info.load_raw("train")
    raw, unit = (by_hand(data["unit_mlp"], foreign.by_hand(x, r, "flat")) for r in ("raw", "unit"))
    acc = [float(np.mean(v.argmax(1) == y)) for v in (raw, unit)]
    entropy = [float(np.mean(-(softmax(v) * np.log(np.maximum(softmax(v), 1e-300))).sum(1))) for v in (raw, unit)]
    assert acc[1] > 0.6 and abs(acc[0] - acc[1]) < 0.05, acc  # the old gate's 5-point margin: passed
    assert entropy[0] < 0.01 < 0.1 < entropy[1], entropy  # one-hot targets against soft ones
    out = tmp_path / "c.h5"
    code, err = cli("cache", "--teacher", f"{data['unit_mlp']}:input=raw", "--transfer-set", info.path, "--out", out,
                    *CPU)
    assert code == 3 and len(err.splitlines()) == 1, err
    assert "sanity gate" in err and f"--teacher {data['unit_mlp']}:input=unit,layout=flat" in err, err
    assert err.count("NLL") == 2 and err.count("entropy") == 2 and err.count("accuracy") == 2, err
    assert f"{acc[0]:.1%} accuracy" in err and f"{acc[1]:.1%} accuracy" in err, err
    assert not out.exists() and not (tmp_path / "c.h5.partial").exists()
    code, err = cli("cache", "--teacher", f"{data['unit_mlp']}:input=unit", "--transfer-set", info.path, "--out", out,
                    *CPU)
    assert code == 0, err
    assert np.max(np.abs(targets(open_cache(out), 1.0) - softmax(unit))) <= 1e-6


def test_an_undeclared_minus_one_to_one_colour_teacher_is_given_its_range(data, tmp_path):
    """A channel-last teacher of [-1, 1] pixels (Keras' preprocess_input), undeclared: the default,
    the set's per-channel mean/std, costs it points and calibration; the gate gives it its range."""
    info = open_prepared(data["colour"])
    x, y = info.load_raw("train")
    right, wrong = (by_hand(data["signed"], foreign.by_hand(x, "normalised", "nhwc", mean=mean, std=std))
                    for mean, std in ((0.5, 0.5), (info.mean, info.std)))
    assert np.mean(right.argmax(1) == y) - np.mean(wrong.argmax(1) == y) > 0.05  # what feeding it the default costs
    code, err = cli("cache", "--teacher", data["signed"], "--transfer-set", info.path, "--out", tmp_path / "c.h5", *CPU)
    assert code == 0, err
    c = open_cache(tmp_path / "c.h5")
    rec = c.teacher_inputs[0]
    assert rec["input"]["range"] == "normalised" and rec["input"]["mean"] == 0.5 and rec["input"]["std"] == 0.5, rec
    assert rec["sources"]["mean"] == rec["sources"]["std"] == "gate", rec  # the range was normalised already
    assert "no declaration of" in err and "taking input=normalised,layout=nhwc,mean=0.5,std=0.5" in err, err
    assert np.max(np.abs(targets(c, 1.0) - softmax(right))) <= 1e-6


def test_a_semi_supervised_set_is_judged_on_its_labelled_rows_anywhere(data, tmp_path):
    """The first 2048 rows are unlabelled: the gate draws its rows from the labelled ones after them
    and gives an undeclared [0, 1] teacher its range (the gate used to be skipped, and the teacher fed
    normalised rows)."""
    info = open_prepared(data["semi"])
    code, err = cli("cache", "--teacher", data["flat_unit"], "--transfer-set", info.path, "--out", tmp_path / "c.h5",
                    *CPU, "--gate-rows", "500", "--gate-seed", "3")
    assert code == 0, err
    c = open_cache(tmp_path / "c.h5")
    gate = c.teacher_inputs[0]["gate"]
    assert gate["rows"] == 500 and gate["labelled"] == 3000 - 2048 and gate["seed"] == 3 and gate["split"] == "train"
    assert c.teacher_inputs[0]["input"]["range"] == "unit" and c.teacher_inputs[0]["sources"]["range"] == "gate"
    x, y = info.load_raw("train")
    want = softmax(by_hand(data["flat_unit"], foreign.by_hand(x, "unit", "flat")))
    assert np.max(np.abs(targets(c, 1.0) - want)) <= 1e-6
    rows = sanity_gate.draw(y, 500, 3)  # the rows drawn: labelled, anywhere after the unlabelled head, seeded
    assert len(rows) == 500 and rows.min() >= 2048 and np.all(np.diff(rows) > 0)
    assert not np.array_equal(rows, sanity_gate.draw(y, 500, 4)) and np.array_equal(rows, sanity_gate.draw(y, 500, 3))
    # the gate's figures are those of the drawn rows, computed by hand
    hand = sanity_gate.measures(by_hand(data["flat_unit"], foreign.by_hand(x[rows], "unit", "flat"))[:, None], y[rows])
    assert gate["accuracy"] == pytest.approx(hand["accuracy"]) and gate["nll_nats"] == pytest.approx(hand["nll_nats"])
    assert gate["entropy_nats"] == pytest.approx(hand["entropy_nats"], rel=1e-6)
    assert gate["alternatives"]["input=unit,layout=flat"]["accuracy"] == gate["accuracy"]


def test_no_labelled_rows_refuse_a_guessed_range_and_go_on_with_a_declared_one(data, tmp_path):
    out = tmp_path / "c.h5"
    code, err = cli("cache", "--teacher", data["flat_unit"], "--transfer-set", data["unlabelled"], "--out", out, *CPU)
    assert code == 3 and len(err.splitlines()) == 1, err
    assert "0 labelled rows" in err and f"--teacher {data['flat_unit']}:input=normalised,layout=flat" in err, err
    assert "--no-gate" in err and not out.exists() and not (tmp_path / "c.h5.partial").exists()
    code, err = cli("cache", "--teacher", f"{data['flat_unit']}:input=unit", "--transfer-set", data["unlabelled"],
                    "--out", out, *CPU)
    assert code == 0 and "sanity gate skipped: 0 labelled rows" in err, err
    assert open_cache(out).teacher_inputs[0]["gate"] is None
    code, err = cli("cache", "--teacher", data["flat_unit"], "--transfer-set", data["unlabelled"], "--out",
                    tmp_path / "d.h5", *CPU, "--no-gate")
    assert code == 0, err  # the flag that takes the default unjudged
    assert open_cache(tmp_path / "d.h5").teacher_inputs[0]["input"]["range"] == "normalised"


def test_too_few_gate_rows_are_a_usage_error(data, tmp_path):
    code, err = cli("cache", "--teacher", data["flat_unit"], "--transfer-set", data["grey"], "--out", tmp_path / "c.h5",
                    *CPU, "--gate-rows", "50")
    assert code == 2 and len(err.splitlines()) == 1 and "gate_rows must be >= 100" in err and "--no-gate" in err, err
    assert not (tmp_path / "c.h5").exists()


def test_the_settings_bound_is_the_gates_own():
    assert cache_settings.MIN_LABELLED == sanity_gate.MIN_LABELLED


# ------------------------------------------------------------------------------------- the rule, by figures
def m(nll, cal, entropy, accuracy):
    return {"nll_nats": nll, "calibrated_nll_nats": cal, "entropy_nats": entropy, "accuracy": accuracy}


@pytest.mark.parametrize("alt, cur, better", [
    (m(0.26, 0.26, 0.28, 0.905), m(34.4, 0.29, 0.0003, 0.897), True),  # cur collapsed: one-hot, confident mistakes
    (m(0.09, 0.03, 0.02, 0.997), m(1.25, 0.05, 1.10, 0.994), False),  # alt only sharper: cur is right, just soft
    (m(0.80, 0.40, 0.50, 0.90), m(0.90, 0.70, 0.40, 0.88), True),  # alt knows the labels better at every T
    (m(0.30, 0.29, 0.20, 0.96), m(0.31, 0.30, 0.20, 0.90), True),  # 6 points, and better calibrated
    (m(0.30, 0.31, 0.20, 0.96), m(0.31, 0.30, 0.20, 0.90), False),  # 6 points but worse calibrated
    (m(0.25, 0.25, 0.29, 0.91), m(0.28, 0.27, 0.24, 0.90), False),  # within noise
])
def test_clearly_better(alt, cur, better):
    assert sanity_gate._clearly_better(alt, cur) is better
