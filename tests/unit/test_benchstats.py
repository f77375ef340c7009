"""Statistics on synthetic timings and the bench worker's shape on tiny runs.

Never asserts a time: the machine is shared and noisy (DESIGN section 5)."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.errors import DataError, RuntimeUnavailable
from pipeline.formats.onnx_model import OPSET
from stages.bench import launcher, runners
from stages.bench import worker as bw
from stages.bench.stats import STAT_KEYS, combine_trials, median_trial_index, summarize, throughput

TINY = dict(warmup_count=5, warmup_s=0, min_count=20, min_s=0, trials=3)


def trial(p50: float, **over) -> dict:
    """A synthetic trial summary centred on p50 (us)."""
    base = dict(count=200, min=p50 * 0.8, mean=p50 * 1.05, p50=p50, p90=p50 * 1.2,
                p95=p50 * 1.3, p99=p50 * 1.5, p999=p50 * 2, max=p50 * 3)
    return {**base, **over}


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    model = launcher.write_identity_model(d / "identity.onnx", (1, 28, 28))
    pool = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    np.save(d / "pool.npy", pool)
    return model, d / "pool.npy", pool


# ---------------------------------------------------------------- summarize
def test_summarize_hand_values_1_to_1000_us():
    s = summarize(np.arange(1, 1001) * 1e-6)
    assert s["count"] == 1000
    expected = dict(min=1, mean=500.5, p50=500.5, p90=900.1, p95=950.05, p99=990.01,
                    p999=999.001, max=1000)
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, rel=1e-9), key
    assert list(s) == list(STAT_KEYS)


def test_summarize_matches_np_percentile_on_skewed_timings():
    lat = np.random.default_rng(1).lognormal(mean=-9, sigma=0.5, size=5000)
    s = summarize(lat)
    want = np.percentile(lat * 1e6, [50, 90, 95, 99, 99.9])
    got = [s[k] for k in ("p50", "p90", "p95", "p99", "p999")]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert s["mean"] == pytest.approx(lat.mean() * 1e6)


def test_summarize_single_value():
    s = summarize([2e-6])
    assert s["count"] == 1
    assert all(s[k] == pytest.approx(2.0) for k in STAT_KEYS if k != "count")


@pytest.mark.parametrize("bad", [[], [1e-6, float("nan")], [float("inf")], [-1e-6]])
def test_summarize_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        summarize(bad)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(1, 300),
              elements=st.floats(1e-9, 10.0, allow_nan=False, allow_infinity=False)))
def test_percentiles_are_ordered(lat):
    s = summarize(lat)
    chain = [s[k] for k in ("min", "p50", "p90", "p95", "p99", "p999", "max")]
    assert all(a <= b for a, b in zip(chain, chain[1:])), chain
    assert s["count"] == lat.size


# ---------------------------------------------------------------- combine_trials, throughput
def test_tight_trials_are_valid_and_medianed():
    c = combine_trials([trial(100.0), trial(104.0), trial(102.0)])
    assert c["valid"] is True and c["reason"] == ""
    assert c["trials"] == 3
    assert c["p50"] == pytest.approx(102.0)
    assert c["p99"] == pytest.approx(102.0 * 1.5)
    assert c["spread"] == pytest.approx(4.0 / 102.0)
    assert set(STAT_KEYS) <= set(c)


def test_wide_spread_is_invalid_with_reason():
    c = combine_trials([trial(100.0), trial(100.0), trial(130.0)])
    assert c["spread"] == pytest.approx(0.30)
    assert c["valid"] is False and "spread" in c["reason"]
    assert combine_trials([trial(100.0)] * 2 + [trial(130.0)], max_spread=0.5)["valid"] is True


@pytest.mark.parametrize("p50s, valid", [
    ((100.0, 105.0, 110.0), True),    # spread (110 - 100) / 105 = 9.5%
    ((100.0, 100.0, 110.0), True),    # exactly 10% (10 / 100 is exact in binary): the target, not over it
    ((100.0, 100.0, 110.5), False),   # 10.5%
    ((100.0, 90.0, 110.0), False),    # 20%, the median in the middle
])
def test_spread_verdict_on_both_sides_of_the_threshold(p50s, valid):
    """docs/design.md: a result whose trials' p50s spread more than 10% of their median is noisy."""
    c = combine_trials([trial(p) for p in p50s])
    assert c["spread"] == pytest.approx((max(p50s) - min(p50s)) / sorted(p50s)[1])
    assert c["valid"] is valid and (c["reason"] == "") is valid


def test_too_few_trials_is_invalid_with_reason():
    c = combine_trials([trial(100.0), trial(100.0)])
    assert c["valid"] is False and "trial" in c["reason"] and "spread" not in c["reason"]
    both = combine_trials([trial(100.0), trial(200.0)])
    assert "trial" in both["reason"] and "spread" in both["reason"]


def test_combine_rejects_empty_and_incomplete():
    with pytest.raises(ValueError):
        combine_trials([])
    incomplete = trial(100.0)
    del incomplete["p999"]
    with pytest.raises(ValueError):
        combine_trials([trial(100.0), incomplete, trial(100.0)])


def test_median_trial_index():
    assert median_trial_index([trial(5.0), trial(1.0), trial(3.0)]) == 2
    assert median_trial_index([trial(5.0), trial(1.0), trial(3.0), trial(4.0)]) == 2


def test_throughput_arithmetic():
    assert throughput(8, [0.001, 0.002, 0.004]) == pytest.approx(4000.0)
    assert throughput(1, np.full(10, 8.4e-6)) == pytest.approx(1 / 8.4e-6)
    with pytest.raises(ValueError):
        throughput(0, [0.001])
    with pytest.raises(ValueError):
        throughput(1, [])


# ---------------------------------------------------------------- worker pieces, in-process
def test_identity_model_is_loadable_with_dynamic_batch(identity):
    model_path, _, pool = identity
    m = onnx.load(str(model_path))
    assert m.ir_version == 10
    assert [(o.domain, o.version) for o in m.opset_import] == [("", OPSET)]
    assert m.graph.input[0].name == "x"
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = runners.make_session(model_path, 1)
    for n in (1, 7):
        np.testing.assert_array_equal(sess.run(None, {"x": pool[:n]})[0], pool[:n])


def test_cut_batches_cycle_and_wrap():
    pool = np.arange(5, dtype=np.float32)[:, None]
    got = [b[:, 0].tolist() for b in runners.cut_batches(pool, 2)]
    assert got == [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]
    big = [b[:, 0].tolist() for b in runners.cut_batches(pool, 7)]  # batch larger than the pool
    assert len(big) == 5 and big[:2] == [[0, 1, 2, 3, 4, 0, 1], [2, 3, 4, 0, 1, 2, 3]]
    assert len(runners.cut_batches(pool, 5)) == 1
    assert all(b.flags.c_contiguous for b in runners.cut_batches(pool, 3))


def test_iobinding_path_runs_on_cpu_device(identity):
    model_path, _, pool = identity
    sess = runners.make_session(model_path, 1)
    batches = runners.cut_batches(pool, 4)
    bound = runners.iobinding_runners(sess, batches, device="cpu")
    for i in (1, 0, 1):  # each batch keeps its own pre-bound output: no run overwrites another's
        bound[i]()
    for i in (0, 1):
        np.testing.assert_array_equal(bound[i].__defaults__[0].copy_outputs_to_cpu()[0], batches[i])


def test_frame_buffer_refill_feeds_each_batch_and_leaves_the_pool_alone(identity):
    """The CPU IOBinding engine: one bound input refilled before each run (outside the clock); the
    bound output then holds that run's batch (Identity), and the pool's batches are never written."""
    model_path, _, pool = identity
    sess = runners.make_session(model_path, 1)
    batches = runners.cut_batches(pool, 4)
    saved = [b.copy() for b in batches]
    run, refills, binding = runners.frame_buffer_runner(sess, batches)
    assert len(refills) == len(batches)
    for i in (2, 0, 1):
        refills[i]()
        run()
        np.testing.assert_array_equal(binding.copy_outputs_to_cpu()[0], batches[i])
    lat, k = bw.timed_loop([run], 0, 7, 0.0, refills)
    assert k == 7 and len(lat) == 7 and (lat > 0).all()
    for b, s in zip(batches, saved):
        np.testing.assert_array_equal(b, s)


def test_timeit_floor_is_a_positive_time(identity):
    model_path, pool_path, _ = identity
    for cycle, bound in ((True, False), (False, False), (True, True)):
        t = bw.timeit_floor(model_path, pool_path, threads=1, batch=3, number=50, cycle=cycle, bound=bound)
        assert math.isfinite(t) and t > 0


def test_rss_reads_proc():
    r = bw.rss_mb()
    assert r["VmRSS"] > 0 and r["VmHWM"] >= r["VmRSS"]


# ---------------------------------------------------------------- worker, in a fresh process
def test_worker_json_shape(identity):
    model_path, pool_path, _ = identity
    out = launcher.run_isolated(model_path, pool_path, threads=1, batch=1, **TINY)
    assert set(out) == {"model", "engine", "provider_requested", "providers_used", "threads", "batch", "load",
                        "first_run", "first_run_s", "steady", "trials_detail", "latencies_s",
                        "trial_latencies_s", "peak_rss_mb"}
    assert len(out["trial_latencies_s"]) == TINY["trials"] and out["latencies_s"] in out["trial_latencies_s"]
    assert out["first_run"]["latency_us"] == pytest.approx(out["first_run_s"] * 1e6)
    assert out["providers_used"] == ["CPUExecutionProvider"]
    assert out["provider_requested"] == "cpu" and out["threads"] == 1 and out["batch"] == 1
    assert set(out["load"]) == {"session_create_s", "rss_before_mb", "rss_after_mb", "rss_added_mb"}
    steady = out["steady"]
    extra = {"trials", "spread", "valid", "reason", "throughput_rows_s"}
    assert set(steady) == set(STAT_KEYS) | extra
    assert steady["trials"] == 3 and steady["count"] >= 20 and steady["throughput_rows_s"] > 0
    assert len(out["trials_detail"]) == 3
    assert all(t["count"] >= 20 for t in out["trials_detail"])
    assert len(out["latencies_s"]) >= 20 and min(out["latencies_s"]) > 0
    assert out["first_run_s"] > 0 and out["peak_rss_mb"] >= out["load"]["rss_after_mb"]


def test_worker_batches_wrap_around_the_pool(identity):
    model_path, pool_path, _ = identity
    out = launcher.run_isolated(model_path, pool_path, threads=1, batch=5, **TINY)
    assert out["batch"] == 5 and out["steady"]["count"] >= 20


def test_run_isolated_reports_worker_failure(identity, tmp_path):
    _, pool_path, _ = identity
    with pytest.raises(DataError, match="missing.onnx: bench worker exited"):
        launcher.run_isolated(tmp_path / "missing.onnx", pool_path, threads=1, batch=1, **TINY)
    with pytest.raises(TypeError):
        launcher.run_isolated("m.onnx", pool_path, threads=1, batch=1, min_seconds=1)


def _cuda_works(model_path) -> bool:
    try:
        import torch
        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        runners.make_session(model_path, 1, "cuda")
        return True
    except (RuntimeUnavailable, ort.capi.onnxruntime_pybind11_state.Fail):
        return False


def test_cuda_request_without_cuda_fails_loudly(identity):
    model_path, pool_path, _ = identity
    if _cuda_works(model_path):
        pytest.skip("CUDA actually works here")
    with pytest.raises(RuntimeUnavailable,
                       match="exited 5: .*CUDA was requested but onnxruntime cannot run on CUDA here"):
        launcher.run_isolated(model_path, pool_path, threads=1, batch=1, provider="cuda", **TINY)


def test_max_spread_is_passed_to_the_verdict(identity):
    model_path, pool_path, _ = identity
    out = launcher.run_isolated(model_path, pool_path, threads=1, batch=1, max_spread=1e-9, **TINY)
    assert out["steady"]["valid"] is False and "spread" in out["steady"]["reason"]


@pytest.mark.parametrize("engine", ["timeit", "timeit-iobinding"])
def test_timeit_engine_reports_a_p50(identity, engine):
    model_path, pool_path, _ = identity
    out = launcher.run_isolated(model_path, pool_path, threads=1, batch=2, engine=engine, **TINY)
    assert out["engine"] == engine and out["steady"]["p50"] > 0 and out["steady"]["repeat"] >= TINY["trials"]


def test_iobinding_engine_times_the_bound_call(identity):
    model_path, pool_path, _ = identity
    out = launcher.run_isolated(model_path, pool_path, threads=1, batch=3, engine="iobinding", **TINY)
    assert out["engine"] == "iobinding" and out["providers_used"] == ["CPUExecutionProvider"]
    assert out["steady"]["count"] >= 20 and out["steady"]["p50"] > 0
