"""The project's ensemble beside a foreign teacher with another input contract; member weights; the
default path's content unchanged by contracts; resume and verify reproduce a contract; an error in
the reader or writer thread is the stage's one line, with no .partial left."""
import json

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from commands.main import main
from pipeline import soft
from pipeline.errors import IntegrityError
from pipeline.formats.cache import open_cache
from pipeline.formats.onnx_model import read_input_contract
from pipeline.formats.prepared import open_prepared
from stages.cache import AddTemperatureConfig, CacheConfig, VerifyConfig, add_temperature, cache_soft_targets, verify
from stages.cache import stage as cache_stage
from stages.cache.teachers import Teachers
from stages.student import StudentConfig, distill_student
from tests import foreign
from tests.cache_helpers import digest, targets

QUIET = dict(log=lambda m: None)
CFG = dict(temperatures=(1.0, 4.0), device="cpu", threads=1, batch_size=256)


@pytest.fixture(scope="module")
def flat_unit(tiny_prepared, tmp_path_factory):
    """A scikit-learn-style teacher of the tiny set: flat [N, 784] pixels in [0, 1], label then probabilities;
    fitted on 12 rows only (~80%), so that its accuracy differs from the ensemble members' (~100%)."""
    x, y = open_prepared(tiny_prepared).load_raw("train")
    path = tmp_path_factory.mktemp("flat") / "flat.onnx"
    return foreign.teacher(path, foreign.fit(foreign.by_hand(x[:12], "unit", "flat"), y[:12]), (784,), outputs="skl")


def _accuracy(path, x, y, name):
    out = ort.InferenceSession(str(path)).run([name], {"x": x})[0]
    out = out[:, None] if out.ndim == 2 else out
    return [float(np.mean(out[:, m].argmax(1) == y)) for m in range(out.shape[1])]


def test_mixed_ensemble_caches_trains_a_student_and_reports_each_member(tiny_teacher, flat_unit, tiny_prepared,
                                                                        tmp_path):
    info = open_prepared(tiny_prepared)
    logs = []
    out = cache_soft_targets(CacheConfig(**CFG), [tiny_teacher, f"{flat_unit}:input=unit"], tiny_prepared,
                             tmp_path / "mixed.h5", log=logs.append)
    c = open_cache(out)
    assert c.members == 3  # two CNN-ensemble members, then the foreign one
    x, y = info.load_raw("train")
    want = (_accuracy(tiny_teacher, info.normalise(x), y, "member_logits")
            + _accuracy(flat_unit, foreign.by_hand(x, "unit", "flat"), y, "probabilities"))
    assert c.member_accuracy == pytest.approx(want, abs=1e-12) and want[2] < min(want[:2])  # told apart
    assert any("\nmember accuracy: 0: " in line for line in logs)  # and the log says them
    inputs = c.teacher_inputs
    assert inputs[0]["input"]["range"] == "normalised" and inputs[0]["sources"]["range"] == "metadata"
    assert inputs[1]["input"] == {"range": "unit", "layout": "flat", "dtype": "float32", "output": "probabilities"}
    assert all(r["gate"]["accuracy"] > 0.5 for r in inputs)
    metrics = tmp_path / "s.metrics.json"
    distill_student(StudentConfig(arch="mlp:16", epochs=2, temperature=4.0, alpha=0.5), out, tiny_prepared,
                    tmp_path / "s.ckpt", metrics, **QUIET)
    assert json.loads(metrics.read_text())["test_accuracy"] > 0.5


def test_the_ensembles_metadata_contract_feeds_the_default_bytes(tiny_teacher, tiny_cache, tiny_prepared, tmp_path):
    """The default pipeline's cache content is what it was before contracts: the ensemble's declared
    contract feeds the very bytes the default does, and the logits are onnxruntime's on them."""
    contract = read_input_contract(tiny_teacher)
    info = open_prepared(tiny_prepared)
    assert contract.range == "normalised" and contract.mean == info.mean and contract.std == info.std
    bare = onnx.load(str(tiny_teacher))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    cfg = CacheConfig(temperatures=(1.0, 2.0, 4.0), batch_size=256, device="cpu", threads=1)
    plain = cache_soft_targets(cfg, [tmp_path / "bare.onnx"], tiny_prepared, tmp_path / "bare.h5", **QUIET)
    assert digest(plain, skip_attrs=_ATTRS) == digest(tiny_cache, skip_attrs=_ATTRS)  # datasets, diagnostics
    x, _ = info.load_raw("train")
    ref = ort.InferenceSession(str(tiny_teacher)).run(None, {"x": info.normalise(x)})[0]
    assert open_cache(tiny_cache).read("logits").tobytes() == ref.astype(np.float16).tobytes()  # stored as float16
    with h5py.File(tiny_cache) as f:
        assert json.loads(f.attrs["member_weights"]) == [0.5, 0.5] and "member_weights" not in json.loads(
            f.attrs["identity"])


_ATTRS = ("teacher_sha256", "identity", "provenance", "content_sha256", "teacher_inputs")


def test_member_weights_at_cache_time_and_in_add_temperature(tiny_teacher, tiny_cache, tiny_prepared, tmp_path):
    cfg = dict(temperatures=(1.0, 2.0, 4.0), batch_size=256, device="cpu", threads=1)
    equal = cache_soft_targets(CacheConfig(**cfg, member_weights=(2.0, 2.0)), [tiny_teacher], tiny_prepared,
                               tmp_path / "eq.h5", **QUIET)
    skip = ("provenance", "content_sha256")  # provenance records the settings as typed
    assert digest(equal, skip_attrs=skip) == digest(tiny_cache, skip_attrs=skip)  # equal weights: the default
    weighted = cache_soft_targets(CacheConfig(**cfg, member_weights=(3.0, 1.0)), [tiny_teacher], tiny_prepared,
                                  tmp_path / "w.h5", **QUIET)
    c = open_cache(weighted)
    logits = c.read("logits")
    for T in c.temperatures:
        want = 0.75 * soft.tempered_softmax(logits[:, 0], T) + 0.25 * soft.tempered_softmax(logits[:, 1], T)
        np.testing.assert_allclose(targets(c, T), want, atol=1e-6)
    assert json.loads(c.attrs["member_weights"]) == [0.75, 0.25] and c.identity["member_weights"] == [0.75, 0.25]
    verify(VerifyConfig(sample_rows=64), weighted, [tiny_teacher], tiny_prepared, **QUIET)
    # add-temperature with new weights recombines every stored T (and the new one) with them
    again = add_temperature(AddTemperatureConfig(temperatures=(3.0,), member_weights=(1.0, 1.0)), weighted,
                            tmp_path / "again.h5", **QUIET)
    a = open_cache(again)
    for T in a.temperatures:
        np.testing.assert_array_equal(targets(a, T), soft.combine_soft_targets(logits, T))
    assert json.loads(a.attrs["member_weights"]) == [0.5, 0.5] and "member_weights" not in a.identity
    verify(VerifyConfig(sample_rows=64), again, [tiny_teacher], tiny_prepared, **QUIET)
    runner = CliRunner()
    bad = runner.invoke(main, ["cache", "add-temperature", str(again), "--member-weights", "1,2,3"])
    assert bad.exit_code == 2 and "3 given for 2 members" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "again.h5.partial").exists()


def test_resume_and_verify_reproduce_a_declared_contract(flat_unit, tiny_prepared, tmp_path, monkeypatch):
    out, arg = tmp_path / "c.h5", f"{flat_unit}:input=unit"

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # every row committed, never finished: the .partial stays to resume

    with monkeypatch.context() as m:
        m.setattr(cache_stage, "_finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cache_soft_targets(CacheConfig(**CFG), [arg], tiny_prepared, out, **QUIET)
    assert (tmp_path / "c.h5.partial").stat().st_size > 0
    logs = []
    cache_soft_targets(CacheConfig(**CFG), [arg], tiny_prepared, out, log=logs.append)
    assert any(line.startswith("resuming ") and " at row " in line for line in logs), logs
    fresh = cache_soft_targets(CacheConfig(**CFG), [arg], tiny_prepared, tmp_path / "fresh.h5", **QUIET)
    assert digest(out, skip_attrs=("provenance", "content_sha256")) == digest(fresh, skip_attrs=("provenance",
                                                                                                 "content_sha256"))
    report = verify(VerifyConfig(sample_rows=128), out, [flat_unit], tiny_prepared, **QUIET)  # the recorded contract
    assert report["max_abs_logit_diff"] <= 1e-6
    verify(VerifyConfig(sample_rows=128), out, [arg], tiny_prepared, **QUIET)  # the same declaration: fine
    with pytest.raises(IntegrityError, match="declared as input=raw but the cache was built with input=unit"):
        verify(VerifyConfig(sample_rows=128), out, [f"{flat_unit}:input=raw"], tiny_prepared, **QUIET)
    # another declaration is another content: a partial made under the first one is not resumed
    with monkeypatch.context() as m:
        m.setattr(cache_stage, "_finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cache_soft_targets(CacheConfig(**CFG), [arg], tiny_prepared, tmp_path / "d.h5", **QUIET)
    logs = []
    cache_soft_targets(CacheConfig(**CFG, gate=False), [f"{flat_unit}:input=raw"], tiny_prepared, tmp_path / "d.h5",
                       log=logs.append)
    assert any("made from other inputs or settings; restarting from row 0" in line for line in logs), logs


@pytest.mark.parametrize("thread", ["reader", "writer"])
def test_an_error_in_a_pipeline_thread_is_one_line_and_leaves_no_partial(thread, tiny_teacher, tiny_prepared,
                                                                         tmp_path, monkeypatch):
    calls = {"n": 0}

    def broken(*a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:  # after one batch was committed: a .partial with rows exists by then
            raise (OSError if thread == "reader" else ValueError)("simulated failure\nsecond line")
        return real(*a, **k)

    if thread == "reader":
        real = Teachers.adapt
        monkeypatch.setattr(Teachers, "adapt", lambda self, x: broken(self, x))
    else:
        real = cache_stage._write_batch
        monkeypatch.setattr(cache_stage, "_write_batch", broken)
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(main, ["cache", "--teacher", str(tiny_teacher), "--transfer-set", str(tiny_prepared),
                                       "--out", str(out), "--device", "cpu", "--batch-size", "256", "--no-gate"])
    err = result.stderr.strip().splitlines()
    assert result.exit_code == 3 and len(err) == 1, result.stderr
    assert f"Error in the cache's {thread} thread: simulated failure; nothing was published" in err[0]
    assert not out.exists() and not (tmp_path / "c.h5.partial").exists()
