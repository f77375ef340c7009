"""One teacher contract in every stage that runs a teacher: test-time augmentation and quoted output
names in the cache, verify's order message, export's agreement with the teacher and the bench's
teacher scores, each checked against onnxruntime run by hand on inputs prepared by hand
(tests/foreign.py); missing model files are one line and exit 3 in every stage."""
import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from commands.main import main
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.bench import BenchConfig, benchmark
from stages.cache import CacheConfig, cache_soft_targets
from stages.export import ExportConfig, export_student
from stages.student import StudentConfig, distill_student
from tests import foreign
from tests.cache_helpers import targets

# float32 logits: these tests compare the cached logits and targets with onnxruntime by hand, to 1e-6
CPU = ("--device", "cpu", "--threads", "1", "--batch-size", "256", "--temperatures", "1,2", "--logits-dtype", "float32")


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def logits_by_hand(teacher, x_model, output="logits"):
    return ort.InferenceSession(str(teacher)).run([output], {"x": x_model})[0]


def softmax(z):
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    return open_prepared(foreign.grey_prepared(tmp_path_factory.mktemp("grey") / "grey.h5"))


@pytest.fixture(scope="module")
def teachers(grey, tmp_path_factory):
    """A [0, 1] flat teacher, a channel-last teacher of the set's normalised rows and tf2onnx-style
    outputs, in a folder whose name has a colon."""
    d = tmp_path_factory.mktemp("teachers") / "run:1"
    d.mkdir()
    x, y = grey.load_raw("train")
    unit = foreign.by_hand(x, "unit", "flat")
    nhwc = foreign.by_hand(x, "normalised", "nhwc", mean=grey.mean, std=grey.std)
    return {"flat": foreign.teacher(d / "flat.onnx", foreign.fit(unit, y), (196,)),
            "nhwc": foreign.teacher(d / "nhwc.onnx", foreign.fit(nhwc, y, seed=1), (14, 14, 1)),
            "tf": foreign.teacher(d / "tf.onnx", foreign.fit(unit, y, seed=2), (196,), outputs="tf")}


# ------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("data", ["grey", "colour"])
def test_hflip_caches_the_mean_logits_of_each_image_and_its_mirror(data, grey, tmp_path):
    info = grey if data == "grey" else open_prepared(foreign.colour_prepared(tmp_path / "colour.h5"))
    shape = tuple(info.shape)
    teacher, w = foreign.mirror_teacher(tmp_path / "mirror.onnx", (*shape[1:], shape[0]) if data == "colour"
                                        else shape)
    layout = "nhwc" if data == "colour" else "same"
    out = tmp_path / "c.h5"
    code, err = cli("cache", "--teacher", f"{teacher}:input=unit,tta=hflip", "--transfer-set", info.path,
                    "--out", out, *CPU, "--no-gate")  # random weights: near chance, which the gate refuses
    assert code == 0, err
    x, _ = info.load_raw("train")
    plain = foreign.by_hand(x, "unit", layout).reshape(len(x), -1).astype(np.float64) @ w
    mirror = foreign.by_hand(x[..., ::-1], "unit", layout).reshape(len(x), -1).astype(np.float64) @ w
    assert np.max(np.abs(plain - mirror)) > 0.1  # the teacher is not symmetric: the mirror changes its logits
    c = open_cache(out)
    np.testing.assert_allclose(c.read("logits")[:, 0], (plain + mirror) / 2, rtol=0, atol=1e-5)
    np.testing.assert_allclose(targets(c, 2.0), softmax((plain + mirror) / 4), rtol=0, atol=1e-6)  # T=2 of the mean
    assert c.teacher_inputs[0]["input"]["tta"] == "hflip" and c.teacher_inputs[0]["sources"]["tta"] == "command line"
    assert c.identity["teacher_inputs"][0]["tta"] == "hflip"  # a partial made without it restarts
    code, err = cli("cache", "verify", out, "--teacher", teacher, "--transfer-set", info.path)
    assert code == 0, err  # verify replays the recorded TTA
    code, err = cli("cache", "verify", out, "--teacher", f"{teacher}:tta=none", "--transfer-set", info.path)
    assert code == 4 and "declared as tta=none" in err and len(err.splitlines()) == 1, err


def test_hflip_is_refused_for_rows_that_are_not_images(tmp_path):
    xs, ys = foreign.grey_images(300, seed=0)
    feats = xs.reshape(300, -1)[:, :20]
    prepared = foreign.write_prepared(tmp_path / "f.h5", {"train": (feats, ys), "val": (feats[:50], ys[:50]),
                                                          "test": (feats[:50], ys[:50])})
    teacher, _ = foreign.mirror_teacher(tmp_path / "t.onnx", (20,))
    code, err = cli("cache", "--teacher", f"{teacher}:tta=hflip", "--transfer-set", prepared, "--out",
                    tmp_path / "c.h5", *CPU)
    assert code == 2 and len(err.splitlines()) == 1 and "tta=hflip" in err and "not images" in err, err
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()


@pytest.mark.parametrize("output, scale", [("dense/BiasAdd:0", 1.0), ("Identity:0", 2.0)])
def test_output_names_with_colons_and_slashes_are_declared_quoted(output, scale, grey, teachers, tmp_path):
    """tf2onnx's names, in a folder whose name has a colon: the path stays a path."""
    out = tmp_path / "c.h5"
    code, err = cli("cache", "--teacher", f'{teachers["tf"]}:input=unit,output="{output}"', "--transfer-set",
                    grey.path, "--out", out, *CPU)
    assert code == 0, err
    x, _ = grey.load_raw("train")
    want = logits_by_hand(teachers["tf"], foreign.by_hand(x, "unit", "flat"), "dense/BiasAdd:0") * scale
    c = open_cache(out)
    np.testing.assert_allclose(c.read("logits")[:, 0], want, rtol=0, atol=1e-5)
    assert c.teacher_inputs[0]["input"]["output"] == output
    code, err = cli("cache", "--teacher", f"{teachers['tf']}:output=Identity:0", "--transfer-set", grey.path, "--out",
                    tmp_path / "d.h5", *CPU)
    assert code == 3 and "no such ONNX file" in err and "output=Identity:0" in err, err  # unquoted: all of it a path


def test_verify_names_the_order_of_teachers_given_in_another(grey, teachers, tmp_path):
    out = tmp_path / "c.h5"
    cfg = CacheConfig(temperatures=(1.0,), device="cpu", threads=1, batch_size=256, logits_dtype="float32", gate=False)
    cache_soft_targets(cfg, [f"{teachers['flat']}:input=unit", teachers["nhwc"]], grey.path, out, log=lambda m: None)
    code, err = cli("cache", "verify", out, "--teacher", teachers["nhwc"], "--teacher", teachers["flat"],
                    "--transfer-set", grey.path)
    assert code == 2 and len(err.splitlines()) == 1 and "another order" in err and "rebuild" not in err, err
    assert f"--teacher {teachers['flat']} --teacher {teachers['nhwc']}" in err
    code, err = cli("cache", "verify", out, "--teacher", teachers["flat"], "--teacher", teachers["nhwc"],
                    "--transfer-set", grey.path)
    assert code == 0, err


# ------------------------------------------------------------------------------------- export and bench
@pytest.fixture(scope="module")
def student(grey, teachers, tmp_path_factory):
    """The fp32 ONNX student distilled from the [0, 1] flat teacher, and its test logits by hand."""
    d = tmp_path_factory.mktemp("student")
    cfg = CacheConfig(temperatures=(2.0,), device="cpu", threads=1, batch_size=256, logits_dtype="float32")
    cache = cache_soft_targets(cfg, [f"{teachers['flat']}:input=unit"], grey.path, d / "c.h5", log=lambda m: None)
    ckpt = distill_student(StudentConfig(arch="mlp:16", epochs=2, temperature=2.0, alpha=0.5), cache, grey.path,
                           d / "s.ckpt", d / "s.json", log=lambda m: None)
    out = d / "s.onnx"
    export_student(ExportConfig(calibration_rows=100, max_accuracy_drop=100, mobile=False), ckpt, grey.path, out,
                   None, d / "s.export.json", log=lambda m: None)
    x, _ = grey.load_raw("test")
    pred = ort.InferenceSession(str(out)).run(None, {"x": grey.normalise(x)})[0].argmax(1)
    return ckpt, out, pred


def teacher_pred(grey, teachers, name):
    x, _ = grey.load_raw("test")
    prep = {"flat": ("unit", "flat", None, None), "nhwc": ("normalised", "nhwc", grey.mean, grey.std)}[name]
    return logits_by_hand(teachers[name], foreign.by_hand(x, prep[0], prep[1], mean=prep[2], std=prep[3])).argmax(1)


@pytest.mark.parametrize("name, decl", [("flat", "input=unit"), ("flat", ""), ("nhwc", "")],
                         ids=["flat-declared", "flat-undeclared", "channel-last"])
def test_export_agreement_is_with_the_teacher_fed_its_contract(name, decl, grey, teachers, student, tmp_path):
    ckpt, _, pred = student
    arg = f"{teachers[name]}:{decl}" if decl else str(teachers[name])
    code, err = cli("export", "--checkpoint", ckpt, "--transfer-set", grey.path, "--out", tmp_path / "e.onnx",
                    "--teacher", arg, "--calibration-rows", "100", "--max-accuracy-drop", "100", "--no-mobile")
    assert code == 0, err
    report = json.loads((tmp_path / "e.export.json").read_text())
    want = float(np.mean(pred == teacher_pred(grey, teachers, name)))
    assert report["fp32"]["agreement_with_teacher"] == pytest.approx(want, abs=1e-12)
    t = report["teacher"]
    assert t["path"] == str(teachers[name]) and t["input"]["range"] == ("unit" if name == "flat" else "normalised")
    assert (t["gate"] is None) == bool(decl)  # an undeclared range is judged, a declared one is not
    if name == "flat" and not decl:
        assert t["sources"]["range"] == "gate" and "no declaration of range" in err
    assert report["provenance"]["inputs"]["teacher"]["path"] == str(teachers[name])


@pytest.mark.parametrize("name, decl, fed", [
    ("nhwc", "input=normalised", "input=normalised,layout=nhwc,dtype=float32,output=logits"),
    ("flat", "", "input=unit,layout=flat,dtype=float32,output=logits"),  # undeclared: the gate gives it [0, 1]
], ids=["channel-last-declared", "flat-undeclared"])
def test_bench_scores_the_teacher_fed_its_contract_and_names_it(name, decl, fed, grey, teachers, student, tmp_path):
    _, onnx_student, pred = student
    cfg = BenchConfig(threads=(1,), batches=(1,), warmup_count=2, warmup_s=0, min_count=10, min_s=0, trials=3,
                      iobinding=False)
    out = tmp_path / "b.json"
    benchmark(cfg, f"{teachers[name]}:{decl}" if decl else teachers[name], {"s": onnx_student}, grey.path, out,
              tmp_path / "b.md", tmp_path / "b.csv", log=lambda m: None)
    report = json.loads(out.read_text())
    t, s = report["models"]["teacher-ensemble"], report["models"]["s"]
    want = teacher_pred(grey, teachers, name)
    _, y = grey.load_raw("test")
    assert t["test_accuracy"] == pytest.approx(float(np.mean(want == y)), abs=1e-12)
    assert t["test_accuracy"] > 0.5 and t["agreement_with_teacher"] == 1.0
    assert s["agreement_with_teacher"] == pytest.approx(float(np.mean(pred == want)), abs=1e-12)
    contract = t["input_contract"]
    assert contract["sources"]["range"] == ("command line" if decl else "gate")
    assert (contract["gate"] is None) == bool(decl)
    assert t["path"] == str(teachers[name]) and t["runs"][0]["providers_used"][0] == "CPUExecutionProvider"
    assert f"is fed as `{fed}`" in (tmp_path / "b.md").read_text()


def test_fidelity_times_a_flat_teacher_on_the_rows_it_takes(grey, teachers, student, tmp_path):
    _, onnx_student, _ = student
    code, err = cli("bench-fidelity", "--teacher", f"{teachers['flat']}:input=unit", "--student", onnx_student,
                    "--student-int8", onnx_student, "--prepared", grey.path, "--out", tmp_path / "f.json",
                    "--warmup-count", "2", "--warmup-s", "0", "--min-count", "10", "--min-s", "0", "--trials", "2",
                    "--rounds", "1", "--profile-runs", "20")
    assert code == 0, err
    f = json.loads((tmp_path / "f.json").read_text())
    assert f["teacher_input_contract"]["input"] == {"range": "unit", "layout": "flat", "dtype": "float32",
                                                    "output": "logits"}
    assert f["p50_us"]["run"]["teacher"] > 0 and f["provenance"]["inputs"]["teacher"]["path"] == str(teachers["flat"])


@pytest.mark.parametrize("command", ["export", "bench-teacher", "bench-candidate", "fidelity", "verify"])
def test_a_missing_model_file_is_one_line_and_exit_3(command, grey, teachers, student, tmp_path):
    ckpt, onnx_student, _ = student
    missing = tmp_path / "nowhere.onnx"
    args = {"export": ["export", "--checkpoint", ckpt, "--transfer-set", grey.path, "--out", tmp_path / "e.onnx",
                       "--teacher", f"{missing}:input=unit"],
            "bench-teacher": ["bench", "--teacher", f"{missing}:input=unit", "--candidate", f"s={onnx_student}",
                              "--prepared", grey.path, "--out", tmp_path / "b.json"],
            "bench-candidate": ["bench", "--teacher", teachers["nhwc"], "--candidate", f"s={missing}", "--prepared",
                                grey.path, "--out", tmp_path / "b.json"],
            "fidelity": ["bench-fidelity", "--teacher", missing, "--student", onnx_student, "--student-int8",
                         onnx_student, "--prepared", grey.path, "--out", tmp_path / "f.json"],
            "verify": ["cache", "verify", tmp_path / "c.h5", "--teacher", missing, "--transfer-set", grey.path],
            }[command]
    if command == "verify":
        cfg = CacheConfig(temperatures=(1.0,), device="cpu", threads=1, batch_size=256, logits_dtype="float32",
                          gate=False)
        cache_soft_targets(cfg, [teachers["nhwc"]], grey.path, tmp_path / "c.h5", log=lambda m: None)
    code, err = cli(*args)
    assert code == 3 and len(err.splitlines()) == 1 and f"{missing}: no such ONNX file" in err, err
