"""The choice of an edge model from a bench report: Pareto front, pick under budgets, the CLI's
output and exit codes (a synthetic kd-bench/1 report: nothing is timed)."""
from __future__ import annotations

import json

import pytest

from pipeline.errors import NothingFits, UsageError
from pipeline.formats.bench_report import read_bench_report, write_bench_report
from stages.bench import choice
from tests.conftest import run_cli

SETTINGS = dict(provider="cpu", threads=[1], batches=[1], trials=3, min_count=10, min_s=0.0, warmup_count=1,
                warmup_s=0.0, max_spread=0.1)


def _run(threads: int, p50: float, valid: bool = True) -> dict:
    return {"threads": threads, "batch": 1, "providers_used": ["CPUExecutionProvider"], "load": {},
            "first_run_s": 1e-4, "steady": {"p50": p50, "p90": p50 * 1.2, "p99": p50 * 2, "p999": p50 * 3,
                                             "max": p50 * 5, "valid": valid, "throughput_rows_s": 1e6 / p50}}


def _model(acc: float, kib: float, run_us: float, bound_us: float, valid: bool = True) -> tuple[dict, dict]:
    entry = {"path": f"/m/{acc}.onnx", "engine": "onnxruntime", "input_dtype": "uint8", "runs": [_run(1, run_us)],
             "test_accuracy": acc, "agreement_with_teacher": acc + 0.02, "sha256": "0" * 64,
             "files": {"m.onnx": int(kib * 1024)}, "size_bytes": int(kib * 1024), "parameters": 1000,
             "macs_per_image": 5000}
    return entry, {"path": entry["path"], "engine": "iobinding", "input_dtype": "uint8",
                   "runs": [_run(1, bound_us, valid)]}


def make_report() -> dict:
    table = {  # name: accuracy, KiB, p50 run, p50 IOBinding
        "teacher-ensemble": (0.926, 4986.0, 285.0, 280.0),
        "mlp-int8": (0.896, 106.0, 7.9, 5.2),
        "dws-int8": (0.905, 40.0, 20.0, 16.0),   # more accurate, smaller, slower than mlp-int8
        "dws-fp32": (0.906, 60.0, 25.0, 22.0),   # a hair more accurate, a bit slower and larger
        "mlp-fp32": (0.896, 400.0, 11.8, 7.5),   # dominated by mlp-int8
    }
    models = {}
    for name, (acc, kib, run_us, bound_us) in table.items():
        models[name], models[f"{name}-iobinding"] = _model(acc, kib, run_us, bound_us)
        models[f"{name}-iobinding"]["same_model_as"] = name
    models["identity-floor-uint8"] = {"path": "(Identity)", "engine": "onnxruntime", "input_dtype": "uint8",
                                      "runs": [_run(1, 4.9)]}
    return {"schema": "kd-bench/1", "settings": SETTINGS, "threads_resolved": [1], "environment": {},
            "provenance": {}, "models": models}


def test_pareto_front_drops_dominated_models():
    report = make_report()
    assert choice.pareto(choice.candidates(report, "iobinding")) == ["mlp-int8", "dws-int8", "dws-fp32",
                                                                      "teacher-ensemble"]
    fronts = choice.fronts(report)
    assert [(f["threads"], f["engine"]) for f in fronts] == [(1, "run"), (1, "iobinding")]
    assert "mlp-fp32" not in fronts[0]["models"] and "identity-floor-uint8" not in fronts[0]["models"]


@pytest.mark.parametrize("latency, size, expected", [
    (0, 0, "teacher-ensemble"),   # no budget: the most accurate
    (20, 128, "dws-int8"),        # dws-fp32 is 22 us
    (25, 128, "dws-fp32"),
    (10, 0, "mlp-int8"),          # mlp-fp32 (7.5 us) is as accurate but larger: ties go to the faster
    (300, 50, "dws-int8"),        # the size budget decides
])
def test_pick_the_most_accurate_within_budget(latency, size, expected):
    d = choice.pick(make_report(), max_latency_us=latency, max_size_kib=size)
    assert d["choice"]["name"] == expected and d["choice"]["pareto_optimal"]
    assert all("why_not" in m for m in d["left_out"]) and len(d["left_out"]) + len(d["runners_up"]) == 4


def test_pick_ranks_on_validation_and_reports_test(tmp_path):
    # dws-fp32 is a hair better on test (0.906 vs 0.905), dws-int8 on validation: the pick, and the
    # front, follow validation, so the test figure the pick reports is not the best of several tries
    report = make_report()
    for name, val in {"teacher-ensemble": 0.93, "mlp-int8": 0.90, "dws-int8": 0.911, "dws-fp32": 0.909,
                      "mlp-fp32": 0.90}.items():
        report["models"][name]["val_accuracy"] = val
    d = choice.pick(report, max_latency_us=25, max_size_kib=128)
    assert d["choice"]["name"] == "dws-int8" and d["ranked_on"] == "val" and "validation" in d["summary"]
    assert d["choice"]["test_accuracy"] == 0.905 and "(validation 91.10%)" in "\n".join(choice.describe(d))
    assert "dws-fp32" not in choice.pareto(choice.candidates(report, "iobinding"))  # dominated on validation
    del report["models"]["mlp-fp32"]["val_accuracy"]  # one model without: every model ranks on test
    d = choice.pick(report, max_latency_us=25, max_size_kib=128)
    assert d["choice"]["name"] == "dws-fp32" and d["ranked_on"] == "test" and "test split" in d["summary"]
    body = {k: v for k, v in report.items() if k != "schema"}
    read_bench_report(write_bench_report(tmp_path / "b.json", body))  # optional in the format, checked when there
    body["models"]["dws-int8"]["val_accuracy"] = "high"
    with pytest.raises(AssertionError, match="val_accuracy"):
        write_bench_report(tmp_path / "c.json", body)


def test_pick_by_call_path_percentile_and_noise():
    report = make_report()
    assert choice.pick(report, max_latency_us=10, engine="run")["choice"]["name"] == "mlp-int8"  # 7.9 us
    assert choice.pick(report, max_latency_us=20, engine="run")["choice"]["name"] == "dws-int8"  # p50 20.0 us
    assert choice.pick(report, max_latency_us=20, engine="run", latency="p99")["choice"]["name"] == "mlp-int8"
    report["models"]["dws-int8-iobinding"]["runs"][0]["steady"]["valid"] = False
    assert choice.pick(report, max_latency_us=20)["choice"]["name"] == "dws-int8"  # noisy, still counted
    d = choice.pick(report, max_latency_us=20, allow_noisy=False)
    assert d["choice"]["name"] == "mlp-int8" and any(m["why_not"] == "noisy timing" for m in d["left_out"])


def test_nothing_fits_names_the_nearest_misses():
    with pytest.raises(NothingFits) as e:
        choice.pick(make_report(), max_latency_us=3, max_size_kib=30)
    msg = str(e.value)
    assert e.value.exit_code == 8 and "mlp-int8" in msg and "5.2 us" in msg and "dws-int8" in msg and "40.0 KiB" in msg
    with pytest.raises(UsageError, match=r"no batch-1 iobinding timing .* at 2 thread"):
        choice.pick(make_report(), threads=2)


def test_pick_command(tmp_path):
    path = write_bench_report(tmp_path / "b.json", {k: v for k, v in make_report().items() if k != "schema"})
    assert read_bench_report(path)["models"]["dws-int8"]["macs_per_image"] == 5000
    proc = run_cli("bench", "pick", "--report", path, "--max-latency-us", "20", "--max-size-kib", "128",
                   "--out", tmp_path / "pick.json", check=True)
    assert proc.stdout.startswith("pick: dws-int8  (/m/0.905.onnx)") and "Pareto-optimal" in proc.stdout
    assert "left out: teacher-ensemble (p50 280.0 us > 20; 4986.0 KiB > 128)" in proc.stdout
    assert json.loads((tmp_path / "pick.json").read_text())["choice"]["name"] == "dws-int8"
    proc = run_cli("bench", "pick", "--report", path, "--max-latency-us", "1")
    assert proc.returncode == 8 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("distill bench pick: error: no model fits 1 us")
    proc = run_cli("bench", "pick", "--report", tmp_path / "missing.json")
    assert proc.returncode == 3 and "run `make bench`" in proc.stderr


def test_report_schema_checks_the_front(tmp_path):
    report = {k: v for k, v in make_report().items() if k != "schema"}
    report["pareto"] = [{"threads": 1, "engine": "run", "latency": "p50", "models": ["nope"]}]
    with pytest.raises(AssertionError, match="names models the report lacks"):
        write_bench_report(tmp_path / "b.json", report)
