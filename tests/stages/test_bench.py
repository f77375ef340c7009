"""The bench stage and the fidelity check end to end on the tiny fixtures (tiny timing budgets).

Never asserts a time: only the shape of the reports, the provider/engine checks and the plots."""
from __future__ import annotations

import csv
import json

import pytest

from stages.bench import bench, fidelity
from stages.export import ExportConfig, export_student

TINY = dict(warmup_count=2, warmup_s=0, min_count=10, min_s=0, trials=3)


@pytest.fixture(scope="module")
def student_onnx(tiny_student, tiny_prepared, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-export")
    export_student(ExportConfig(calibration_rows=100, max_accuracy_drop=100, mobile=False), tiny_student,
                   tiny_prepared, d / "s.onnx", d / "s.int8.onnx", d / "s.json", log=lambda m: None)
    return d / "s.onnx", d / "s.int8.onnx"


def test_bench_report_sections_csv_and_plots(student_onnx, tiny_teacher, tiny_prepared, tiny_student, tmp_path):
    fp32, int8 = student_onnx
    cfg = bench.BenchConfig(threads=(1,), batches=(1, 4), **TINY)  # each (model, batch) is a fresh process
    out = tmp_path / "b.json"
    plots = dict(plot_accuracy=tmp_path / "acc.png", plot_throughput=tmp_path / "tp.png")
    bench.benchmark(cfg, tiny_teacher, {"s": fp32, "s-int8": int8}, tiny_prepared, out, tmp_path / "b.md",
                    tmp_path / "b.csv", log=lambda m: None, torch_models={"s": tiny_student}, **plots)
    report = json.loads(out.read_text())
    onnx_models = {"teacher-ensemble", "s", "s-int8", "identity-floor"}
    assert set(report["models"]) == onnx_models | {f"{n}-iobinding" for n in onnx_models} | {"s-torch"}
    for n in onnx_models:  # the bound call: batch 1 only, the same file, scored under its plain name
        e = report["models"][f"{n}-iobinding"]
        assert e["engine"] == "iobinding" and [r["batch"] for r in e["runs"]] == [1]
        assert e["same_model_as"] == n and e["path"] == report["models"][n]["path"] and "test_accuracy" not in e
    threads = report["threads_resolved"]
    assert threads == [1] and len(report["models"]["s"]["runs"]) == 2
    for name, e in report["models"].items():
        for r in e["runs"]:
            assert {"load", "first_run", "steady"} <= set(r) and "latencies_s" not in r
            assert r["load"]["rss_added_mb"] is not None and r["peak_rss_mb"] > 0
            assert r["providers_used"][0] == ("torch-eager-cpu" if name == "s-torch" else "CPUExecutionProvider")
    s, t = report["models"]["s"], report["models"]["s-torch"]
    assert s["files"] == {"s.onnx": s["size_bytes"]} and s["parameters"] == t["parameters"]
    assert s["macs_per_image"] == t["macs_per_image"] == report["models"]["s-int8"]["macs_per_image"] == 784 * 16 + 160
    assert [(f["threads"], f["engine"]) for f in report["pareto"]] == [(1, "run"), (1, "iobinding")]
    assert all(set(f["models"]) <= {"teacher-ensemble", "s", "s-int8"} and f["models"] for f in report["pareto"])
    assert s["test_accuracy"] == pytest.approx(t["test_accuracy"], abs=0.01)  # same weights, two runtimes
    env = report["environment"]
    assert env["cores"] >= 1 and isinstance(env["cpu_flags"], list) and env["git"]
    with open(tmp_path / "b.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["trial"] for r in rows} == {"0", "1", "2"} and {r["engine"] for r in rows} == {"onnxruntime", "iobinding", "torch"}
    md = (tmp_path / "b.md").read_text()
    assert "| s-torch |" in md and "| s-iobinding | 1 |" in md and "x floor" in md
    assert "## Choosing an edge model" in md and "| 12,704 |" in md  # MACs of mlp:16 on 28x28
    for floor in ("identity-floor", "identity-floor-iobinding"):  # each call path against its own floor
        row = next(line for line in md.splitlines() if line.startswith(f"| {floor} | 1 |"))
        assert row.split("|")[8].strip() == "1.00" and "## Throughput" in md and "acc.png" in md
    for p in plots.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def raw_int8(tiny_student, tiny_prepared, tmp_path_factory):
    """The edge export: raw uint8 pixels in, int8 inside."""
    d = tmp_path_factory.mktemp("bench-raw")
    export_student(ExportConfig(raw_input=True, calibration_rows=100, max_accuracy_drop=100, mobile=False),
                   tiny_student, tiny_prepared, d / "r.onnx", d / "r.int8.onnx", d / "r.json", log=lambda m: None)
    return d / "r.int8.onnx"


def test_bench_feeds_a_raw_pixel_model_pixels(student_onnx, raw_int8, tiny_teacher, tiny_prepared, tmp_path):
    """A uint8-input candidate is timed on (and scored with) the stored pixels, against a uint8 floor."""
    fp32, _ = student_onnx
    cfg = bench.BenchConfig(threads=(1,), batches=(1,), iobinding=False, **TINY)
    out = tmp_path / "b.json"
    bench.benchmark(cfg, tiny_teacher, {"s": fp32, "raw-int8": raw_int8}, tiny_prepared, out, tmp_path / "b.md",
                    tmp_path / "b.csv", log=lambda m: None)
    m = json.loads(out.read_text())["models"]
    assert set(m) == {"teacher-ensemble", "s", "raw-int8", "identity-floor", "identity-floor-uint8"}
    assert m["raw-int8"]["input_dtype"] == m["identity-floor-uint8"]["input_dtype"] == "uint8"
    assert m["s"]["input_dtype"] == "float32"
    assert m["raw-int8"]["test_accuracy"] == pytest.approx(m["s"]["test_accuracy"], abs=0.05)  # int8 of the same net
    md = (tmp_path / "b.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| identity-floor-uint8 | 1 |"))
    assert row.split("|")[8].strip() == "1.00"  # the uint8 floor is compared with itself


@pytest.mark.slow
def test_bench_compares_mlp_and_cnn_students(tiny_cnn_students, tiny_chw_cache, tiny_chw_prepared, tmp_path):
    """MLP and CNN students of one cache side by side: fp32 and raw int8 of a depthwise-separable CNN,
    an MLP, their MACs from the graphs, the Pareto fronts, and a pick from the report."""
    from pipeline.macs import count_macs
    from pipeline.models import load
    from stages.bench.choice import pick
    from stages.student import StudentConfig, distill_student

    teacher, cache = tiny_chw_cache
    mlp = distill_student(StudentConfig(arch="mlp:16", epochs=2), cache, tiny_chw_prepared, tmp_path / "m.ckpt",
                          tmp_path / "m.json", log=lambda m: None)
    dws = tiny_cnn_students["dws:8-16/2-32/2"]
    files = {}
    for name, ckpt, raw in (("mlp", mlp, False), ("dws", dws, False), ("dws-raw", dws, True)):
        export_student(ExportConfig(raw_input=raw, calibration_rows=100, max_accuracy_drop=100, mobile=False), ckpt,
                       tiny_chw_prepared, tmp_path / f"{name}.onnx", tmp_path / f"{name}.int8.onnx",
                       tmp_path / f"{name}.json", log=lambda m: None)
        files[name] = tmp_path / f"{name}.onnx"
    files["dws-raw-int8"] = tmp_path / "dws-raw.int8.onnx"
    cfg = bench.BenchConfig(threads=(1,), batches=(1,), **TINY)
    bench.benchmark(cfg, teacher, files, tiny_chw_prepared, tmp_path / "b.json", tmp_path / "b.md",
                    tmp_path / "b.csv", log=lambda m: None)
    report = json.loads((tmp_path / "b.json").read_text())
    m = report["models"]
    assert m["dws-raw-int8"]["input_dtype"] == "uint8" and m["dws"]["input_dtype"] == "float32"
    want = count_macs(load(dws)[0], (1, 28, 28))
    assert m["dws"]["macs_per_image"] == m["dws-raw-int8"]["macs_per_image"] == want
    assert m["mlp"]["macs_per_image"] == 784 * 16 + 160
    assert {f["engine"] for f in report["pareto"]} == {"run", "iobinding"}
    decision = pick(report, engine="run")  # no budget: the most accurate model of the report
    assert decision["choice"]["test_accuracy"] == max(e.get("test_accuracy", 0) for e in m.values())
    assert "dws-raw-int8-iobinding" in m and "| dws-raw-int8 | 1 |" in (tmp_path / "b.md").read_text()


def test_thread_counts_resolve_all_cores(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 8)
    assert bench.BenchConfig(threads=(1, 0, 8)).thread_counts() == [1, 8]


def test_fidelity_report(student_onnx, raw_int8, tiny_teacher, tiny_prepared, tmp_path):
    fp32, int8 = student_onnx[0], raw_int8  # the int8 candidate takes raw pixels: fed from its own pool
    cfg = fidelity.FidelityConfig(warmup_count=2, warmup_s=0, min_count=20, min_s=0, trials=3, profile_runs=30,
                                  rounds=2)
    out = fidelity.check_fidelity(cfg, tiny_teacher, fp32, int8, tiny_prepared, tmp_path / "f.json", log=lambda m: None)
    r = json.loads(out.read_text())
    assert set(r["p50_us"]) == set(r["calls"]) == {"run", "iobinding"}
    for call, p in r["p50_us"].items():
        assert set(p) == {"student", "student-timeit", "student-int8", "teacher", "identity-floor"}
        assert all(v > 0 for v in p.values())
        v = r["calls"][call]
        for key in ("harness_vs_timeit", "int8_vs_teacher", "fp32_vs_floor"):
            assert isinstance(v[key]["ok"], bool)
        assert v["int8_vs_teacher"]["speedup"] == pytest.approx(p["teacher"] / p["student-int8"])
        for name, run in r["runs"][call].items():  # each p50 is that of one of the two interleaved rounds
            assert len(run["round_p50s"]) == 2 and p[name] == min(run["round_p50s"])  # lower median of two
    assert r["runs"]["iobinding"]["student"]["engine"] == "iobinding"
    assert r["runs"]["iobinding"]["student-timeit"]["engine"] == "timeit-iobinding"
    assert "Gemm" in "".join(r["profile"]["student"]["kernel_us_per_run"])
    for call in ("run", "iobinding"):
        assert "Identity floor" in r["calls"][call]["fp32_vs_floor"]["explanation"]
    assert r["student_int8_input"] == "uint8"
