"""The cache stage's benchmarks (stages/cache/measure.py) at a tiny size.

They are behind published figures (docs/results.md, docs/gpu.md: rows/s, the HDF5 I/O share, peak
RSS against row count), so their JSON is checked here for being consistent with the timings it
records beside each figure: rows/s is rows over the median trial, the shares are the ratios of the
recorded seconds, the per-row and per-size ratios follow from the runs.  No time is asserted.
"""
import json

import pytest

from stages.cache import bench_scale, bench_speed
from stages.cache.settings import CacheBenchConfig, CacheScaleConfig
from tests.conftest import run_cli
from tests.oracles import median

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def speed(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache-bench")
    cfg = CacheBenchConfig(rows=256, members=2, arch="mlp:16", batch_size=64, threads=1, trials=3, device="cpu")
    report = bench_speed(cfg, d / "work", d / "speed.json", **QUIET)
    return cfg, report, d


def test_bench_speed_figures_follow_from_its_timings(speed):
    cfg, r, d = speed
    assert json.loads((d / "speed.json").read_text()) == json.loads(json.dumps(r))  # what was written
    assert r["rows"] == 256 and r["threads"] == 1 and r["onnxruntime_provider"] == "CPUExecutionProvider"
    assert r["torch_device"] == "cpu" and r["settings"]["trials"] == 3
    assert set(r["trial_s"]) == set(r["rows_per_s"]) == {"onnxruntime", "torch_eager"}
    for runtime, trials in r["trial_s"].items():
        assert len(trials) == 3 and all(t > 0 for t in trials), runtime
        # three trials: a mean, a min or the first trial would differ from the median
        assert r["rows_per_s"][runtime] == pytest.approx(256 / median(trials), rel=1e-12), runtime
    assert r["ort_over_torch"] == pytest.approx(r["rows_per_s"]["onnxruntime"] / r["rows_per_s"]["torch_eager"],
                                                rel=1e-12)
    # the same random-weight ensemble in onnxruntime and in PyTorch, both float32 on this CPU
    assert 0 <= r["max_abs_diff_ort_vs_torch"] <= 1e-5


def test_bench_speed_stage_shares_are_ratios_of_its_seconds(speed):
    _, r, d = speed
    s = r["stage"]
    assert s["rows"] == 256 and s["batches"] == 4 and s["provider"] == "CPUExecutionProvider"  # 256 / 64
    wall = s["wall_s"]
    for k in ("read_s", "write_s", "combine_s", "infer_s", "wait_read_s", "wait_write_s"):
        assert 0 <= s[k] <= wall, k  # each of them is a part of the stage's wall time
    assert s["hdf5_read_s"] == s["read_s"] and s["hdf5_write_s"] == s["write_s"]
    assert s["hdf5_io_share"] == pytest.approx((s["read_s"] + s["write_s"]) / wall, rel=1e-12)
    assert s["io_stall_share"] == pytest.approx((s["wait_read_s"] + s["wait_write_s"]) / wall, rel=1e-12)
    assert 0 <= s["hdf5_io_share"] <= 1 and 0 <= s["io_stall_share"] <= 1
    assert not (d / "work" / "speed-cache.h5").exists()  # the stage's cache is a by-product, removed


@pytest.mark.slow
def test_bench_scale_figures_follow_from_its_runs(tmp_path):
    cfg = CacheScaleConfig(sizes=(500, 1500), features=16, batch_size=128, threads=1, device="cpu",
                           views=(1, 4), view_rows=300, view_image=8)
    r = bench_scale(cfg, tmp_path / "work", tmp_path / "scale.json", **QUIET)
    assert json.loads((tmp_path / "scale.json").read_text()) == json.loads(json.dumps(r))
    assert [run["rows"] for run in r["runs"]] == [500, 1500] and r["teacher"] == "linear 16->10"
    for run in r["runs"]:
        assert 0 < run["stage_s"] <= run["process_wall_s"]  # the stage's own time excludes start-up
        assert run["us_per_row"] == pytest.approx(1e6 * run["stage_s"] / run["rows"], rel=1e-12)
        assert run["peak_rss_mib"] > 0
        # the synthetic train split alone is rows x 16 float32; val and test add 256 rows each
        assert run["prepared_bytes"] >= (run["rows"] + 512) * 16 * 4 and run["cache_bytes"] > 0
    first = r["runs"][0]
    assert r["rss_ratio_vs_smallest"] == pytest.approx([x["peak_rss_mib"] / first["peak_rss_mib"] for x in r["runs"]])
    assert r["time_per_row_ratio_vs_smallest"] == pytest.approx(
        [x["us_per_row"] / first["us_per_row"] for x in r["runs"]])
    assert r["rss_ratio_vs_smallest"][0] == 1.0 and r["parent_peak_rss_mib"] > 0
    assert not list((tmp_path / "work").glob("scale-*.h5"))  # keep=False: the GB-sized inputs are removed
    # the views runs: K views of view_rows rows each, their ratios against the fewest views
    v = r["views"]
    assert [(x["views"], x["rows"], x["cache_rows"]) for x in v] == [(1, 300, 300), (4, 300, 1200)]
    assert all(x["us_per_row"] == pytest.approx(1e6 * x["stage_s"] / x["cache_rows"], rel=1e-12) for x in v)
    assert r["views_rss_ratio_vs_fewest"] == pytest.approx([x["peak_rss_mib"] / v[0]["peak_rss_mib"] for x in v])
    assert r["views_time_per_view_ratio_vs_fewest"] == pytest.approx([x["us_per_row"] / v[0]["us_per_row"] for x in v])


@pytest.mark.slow
def test_cache_bench_cli_writes_the_same_report(tmp_path):
    """`distill cache bench` is the command docs/results.md quotes: it writes this JSON."""
    out = tmp_path / "b.json"
    run_cli("cache", "bench", "--work", tmp_path / "w", "--out", out, "--rows", "128", "--members", "1",
            "--arch", "mlp:8", "--batch-size", "64", "--threads", "1", "--trials", "1", "--device", "cpu", check=True)
    r = json.loads(out.read_text())
    assert r["rows"] == 128 and r["stage"]["batches"] == 2 and len(r["trial_s"]["onnxruntime"]) == 1
    assert r["rows_per_s"]["onnxruntime"] == pytest.approx(128 / r["trial_s"]["onnxruntime"][0], rel=1e-12)


@pytest.mark.slow
def test_bench_scale_of_a_many_class_top_k_teacher_by_totals_of_views(tmp_path):
    """The many-class runs: a synthetic teacher of 2 members x 50 classes, a top-5 cache, and for each total of
    views one run per K of total / K rows; ratios against the fewest views and across totals."""
    cfg = CacheScaleConfig(sizes=(), features=16, classes=50, members=2, hidden=4, top_k=5, batch_size=128,
                           threads=1, device="cpu", views=(1, 4), view_totals=(400, 800), view_image=8)
    r = bench_scale(cfg, tmp_path / "work", tmp_path / "scale.json", **QUIET)
    assert r["runs"] == [] and r["teacher"] == "2 x (tanh 4 then linear) 16->50"
    g = r["view_groups"]
    assert [[(x["views"], x["rows"], x["cache_rows"]) for x in grp["views"]] for grp in g] == [
        [(1, 400, 400), (4, 100, 400)], [(1, 800, 800), (4, 200, 800)]]
    for grp in g:
        v = grp["views"]
        assert grp["rss_ratio_vs_fewest"] == pytest.approx([x["peak_rss_mib"] / v[0]["peak_rss_mib"] for x in v])
        assert all(x["rows_per_s"] == pytest.approx(x["cache_rows"] / x["stage_s"], rel=1e-12) for x in v)
        # a top-5 row of 50 classes, 2 members, float16: 5 ids (uint8), 2 x 5 logits, 2 tails, and more per file
        assert all(x["cache_bytes_per_row"] >= 5 + 2 * 5 * 2 + 2 * 2 + 8 for x in v)
    for i, ratios in enumerate(r["views_rss_ratio_across_totals"]):  # at K = 1, then 4: each total against the first
        assert ratios == pytest.approx([x["views"][i]["peak_rss_mib"] / g[0]["views"][i]["peak_rss_mib"] for x in g])
