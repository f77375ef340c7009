"""Cache stage with real ONNX teachers: checks before running, probability outputs, NaN rows,
IOBinding, add-temperature, verify, the plot; in process and through the CLI."""
import shutil

import h5py
import numpy as np
import pytest
from onnx import TensorProto

from pipeline import soft
from pipeline.errors import DataError, IntegrityError, UsageError
from pipeline.formats import h5seal as h5safe
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared
from stages.cache import AddTemperatureConfig, CacheConfig, VerifyConfig, add_temperature, cache_soft_targets, verify
from tests import oracles
from tests.cache_helpers import as_kd_cache_v1, digest, linear_teacher, targets
from tests.conftest import run_cli

quiet = dict(log=lambda m: None)
CPU = dict(device="cpu", threads=1, batch_size=256, temperatures=(1.0, 4.0), gate=False)  # untrained teachers


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return {"raw": linear_teacher(d / "raw.onnx"), "prob": linear_teacher(d / "prob.onnx", softmax=True),
            "other": linear_teacher(d / "other.onnx", seed=1), "nan": linear_teacher(d / "nan.onnx", sqrt=True)}


def test_probability_teacher_is_taken_as_log_probabilities(teachers, tiny_prepared, tmp_path):
    raw = cache_soft_targets(CacheConfig(**CPU), [teachers["raw"]], tiny_prepared, tmp_path / "raw.h5", **quiet)
    prob = cache_soft_targets(CacheConfig(**CPU), [teachers["prob"]], tiny_prepared, tmp_path / "prob.h5", **quiet)
    a, b = open_cache(raw), open_cache(prob)
    assert b.attrs["teacher_probabilities"] == "[true]" and a.attrs["teacher_probabilities"] == "[false]"
    # log softmax(v) = v - logsumexp(v): a per-row shift, so every tempered target is unchanged; float32
    # softmax then log costs ~1e-6 relative, and float16 storage of logits near -3 (log p) against logits
    # near 0 rounds them differently (spacing 2^-9 against 2^-11): 1e-3
    for T in (1.0, 4.0):
        np.testing.assert_allclose(targets(b, T), targets(a, T), atol=1e-3)


def test_several_teachers_are_joined_as_members(teachers, tiny_teacher, tiny_prepared, tmp_path):
    out = cache_soft_targets(CacheConfig(**CPU), [tiny_teacher, teachers["raw"], teachers["prob"]], tiny_prepared,
                             tmp_path / "c.h5", **quiet)
    c = open_cache(out)
    assert c.members == 4 and c.attrs["teacher_probabilities"] == "[false, false, true]"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(in_shape=("batch", 28, 27), features=756),
     "has shape [batch, 28, 27], the transfer set gives [batch, 28, 28]"),
    (dict(in_shape=("batch", 783), features=783), "has shape [batch, 783], the transfer set gives [batch, 28, 28]"),
    (dict(dtype=TensorProto.DOUBLE), "has type tensor(double); a teacher takes tensor(float)"),
    (dict(inputs=2), "the model takes 2 inputs"),
    (dict(classes=7), "7 classes, the transfer set has 10"),
])
def test_teacher_checked_before_running(kwargs, fragment, tiny_prepared, tmp_path):
    bad = linear_teacher(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(DataError) as e:
        cache_soft_targets(CacheConfig(**CPU), [bad], tiny_prepared, tmp_path / "c.h5", **quiet)
    assert fragment in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c.h5.partial").exists()  # refused before the output was even locked


def test_nan_output_stops_with_row_and_member(teachers, tiny_prepared, tmp_path):
    import onnxruntime as ort

    from pipeline.formats.prepared import open_prepared

    x, _ = open_prepared(tiny_prepared).load("train", 0, 256)
    z = ort.InferenceSession(str(teachers["raw"])).run(None, {"x": x})[0]
    row = int(np.argwhere(z < 0)[0][0])  # sqrt of the first negative logit is the first NaN
    proc = run_cli("cache", "--teacher", teachers["raw"], "--teacher", teachers["nan"], "--transfer-set",
                   tiny_prepared, "--out", tmp_path / "c.h5", "--device", "cpu", "--batch-size", "256", "--no-gate")
    assert proc.returncode == 3, proc.stderr
    assert f"at row {row}, member 1 of the ensemble" in proc.stderr and "nan.onnx" in proc.stderr
    assert not (tmp_path / "c.h5").exists()
    assert not (tmp_path / "c.h5.partial").exists()  # a failed run leaves nothing behind


def test_io_binding_at_padded_batch_matches_plain_run(tiny_teacher, tiny_prepared, tmp_path):
    """The CUDA path's binding code, run on CPU: 1200 rows in batches of 512 pads the last (176) to 512."""
    cfg = dict(CPU, batch_size=512)
    plain = cache_soft_targets(CacheConfig(**cfg, io_binding="off"), [tiny_teacher], tiny_prepared, tmp_path / "a.h5",
                               **quiet)
    bound = cache_soft_targets(CacheConfig(**cfg, io_binding="on"), [tiny_teacher], tiny_prepared, tmp_path / "b.h5",
                               **quiet)
    with h5py.File(plain) as a, h5py.File(bound) as b:
        np.testing.assert_allclose(b["logits"][:], a["logits"][:], rtol=0, atol=1e-6)  # padding rows never leak
    assert '"io_binding": true' in open_cache(bound).attrs["provenance"]


def test_add_temperature_in_place_records_a_derived_temperature(tiny_cache, tmp_path):
    """A kd-cache/2 cache derives targets at any T: add-temperature records T and its diagnostics, stores nothing."""
    path = shutil.copy(tiny_cache, tmp_path / "c.h5")
    before = {T: targets(open_cache(path), T) for T in (1.0, 2.0, 4.0)}
    add_temperature(AddTemperatureConfig(temperatures=(3.0, 5.0, 4.0)), path, **quiet)
    c = open_cache(path)
    assert c.temperatures == (1.0, 2.0, 4.0, 3.0, 5.0) and not list(tmp_path.glob("*.partial"))
    assert c.soft_temperatures == () and "soft" not in h5py.File(path)
    logits, labels = c.read("logits"), c.labels()
    for T in (3.0, 5.0):  # against tests/oracles.py, not against the pipeline.soft functions the tool calls
        np.testing.assert_allclose(targets(c, T), oracles.soft_targets(logits, T), rtol=0, atol=1e-7)  # float32
        want = oracles.diagnostics(logits, targets(c, T), labels)
        # float64 sums over 1200 rows in another order: 1e-12
        assert all(c.diagnostics()[T][k] == pytest.approx(v, abs=1e-12) for k, v in want.items()), (T, want)
    for T, p in before.items():
        assert np.array_equal(targets(c, T), p)


@pytest.fixture(scope="module")
def v1_cache(tiny_teacher, tiny_prepared, tmp_path_factory):
    """A kd-cache/1 file (float32 logits, soft targets at every T, an int64 label a row)."""
    d = tmp_path_factory.mktemp("v1")
    src = cache_soft_targets(CacheConfig(**CPU, store_soft=True, logits_dtype="float32"), [tiny_teacher],
                             tiny_prepared, d / "v2.h5", **quiet)
    return as_kd_cache_v1(src, d / "v1.h5")


def test_a_version_1_cache_reads_through_the_same_interface(v1_cache, tiny_teacher, tiny_prepared, tmp_path):
    c = open_cache(v1_cache)
    assert (c.version, c.soft_temperatures, c.top_k) == (1, (1.0, 4.0), 0)
    assert c.read("labels").dtype == np.int64 and np.array_equal(c.labels(), open_prepared(tiny_prepared).load(
        "train")[1]) and np.array_equal(c.source_labels(), c.labels())
    for T in (1.0, 4.0):  # stored targets are read, and equal what the logits give
        np.testing.assert_array_equal(targets(c, T), c.stored_soft(T))
        np.testing.assert_array_equal(c.stored_soft(T), soft.combine_soft_targets(c.logits(), T))
    np.testing.assert_array_equal(targets(c, 2.0), soft.combine_soft_targets(c.logits(), 2.0))  # derived
    verify(VerifyConfig(sample_rows=64), v1_cache, [tiny_teacher], tiny_prepared, **quiet)
    out = add_temperature(AddTemperatureConfig(temperatures=(2.0,)), v1_cache, tmp_path / "c.h5", **quiet)
    a = open_cache(out)  # stays kd-cache/1, and stores its new temperature as version 1 did
    assert a.version == 1 and a.soft_temperatures == (1.0, 4.0, 2.0)
    np.testing.assert_array_equal(a.stored_soft(2.0), soft.combine_soft_targets(c.logits(), 2.0))


def test_add_temperature_to_new_file_uses_recorded_combine(tiny_teacher, tiny_prepared, tmp_path):
    geo = cache_soft_targets(CacheConfig(**CPU, combine="geometric"), [tiny_teacher], tiny_prepared,
                             tmp_path / "g.h5", **quiet)
    before = digest(geo)
    out = add_temperature(AddTemperatureConfig(temperatures=(2.5,)), geo, tmp_path / "g2.h5", **quiet)
    assert digest(geo) == before  # the source is untouched
    c = open_cache(out)
    assert c.attrs["combine"] == "geometric" and 2.5 in c.temperatures
    np.testing.assert_allclose(targets(c, 2.5), oracles.soft_targets(c.read("logits"), 2.5, "geometric"), rtol=0,
                               atol=1e-7)


def test_add_temperature_refuses_without_logits(v1_cache, tmp_path):
    path = shutil.copy(v1_cache, tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        del f["logits"]
        h5safe.seal(f)  # a consistent kd-cache/1 file without logits (an unsealed edit is refused as corrupt)
    proc = run_cli("cache", "add-temperature", path, "--temperatures", "3")
    assert proc.returncode == 3 and "has no stored logits" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("cache", "add-temperature", path)
    assert proc.returncode == 2 and "give --temperatures" in proc.stderr


def test_add_temperature_cli_prints_diagnostics_and_plots(tiny_cache, tmp_path):
    out, png = tmp_path / "c.h5", tmp_path / "d.png"
    proc = run_cli("cache", "add-temperature", tiny_cache, "--temperatures", "3,5", "--out", out, "--plot", png,
                   check=True)
    assert "entropy(nats)" in proc.stderr and "\n     5 " in proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_passes_and_catches_tampering(tiny_cache, tiny_teacher, tiny_prepared, tmp_path):
    report = verify(VerifyConfig(sample_rows=64, windows=4), tiny_cache, [tiny_teacher], tiny_prepared, **quiet)
    assert report["rows_checked"] == 64 and report["max_abs_logit_diff"] <= report["logit_tolerance"]
    bad = shutil.copy(tiny_cache, tmp_path / "c.h5")
    with h5py.File(bad, "r+") as f:
        f["logits"][:] += 0.01
    proc = run_cli("cache", "verify", bad, "--teacher", tiny_teacher, "--transfer-set", tiny_prepared)
    assert proc.returncode == 4 and "content checksum mismatch" in proc.stderr  # edited behind our back
    with h5py.File(bad, "r+") as f:
        h5safe.seal(f)  # consistent, but not what the teachers give: only re-running them can tell
    proc = run_cli("cache", "verify", bad, "--teacher", tiny_teacher, "--transfer-set", tiny_prepared)
    assert proc.returncode == 4 and "stored targets differ from the teachers" in proc.stderr


def test_verify_checks_recorded_hashes(tiny_cache, tiny_teacher, tiny_prepared, teachers):
    with pytest.raises(IntegrityError, match="differs from teacher 0 of the cache"):
        verify(VerifyConfig(), tiny_cache, [teachers["raw"]], tiny_prepared, **quiet)
    with pytest.raises(IntegrityError, match="2 teacher file"):
        verify(VerifyConfig(), tiny_cache, [tiny_teacher, tiny_teacher], tiny_prepared, **quiet)
    other = teachers["raw"].parent / "not-prepared.h5"
    shutil.copy(tiny_prepared, other)
    with h5py.File(other, "r+") as f:
        f.attrs["mean"] = 0.5
        h5safe.seal(f)  # a valid prepared file, not the one the cache was built from (an unsealed edit is corrupt)
    with pytest.raises(IntegrityError, match="transfer set .* differs"):
        verify(VerifyConfig(), tiny_cache, [tiny_teacher], other, **quiet)


def test_build_plot_and_printed_diagnostics(tiny_teacher, tiny_prepared, tmp_path):
    png = tmp_path / "t.png"
    proc = run_cli("cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", tmp_path / "c.h5",
                   "--temperatures", "1,2,4,8", "--plot", png, check=True)
    assert "device auto" in proc.stderr or "CUDA" in proc.stderr
    assert proc.stderr.count("\n     8 ") == 1 and png.read_bytes()[:4] == b"\x89PNG"


def test_config_rejects_bad_io_binding():
    with pytest.raises(UsageError, match="io_binding"):
        CacheConfig(io_binding="maybe")
