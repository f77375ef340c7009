"""The formats layer: each reader says precisely what is wrong (corrupt, truncated, stale, another
schema, a newer schema version), and no tool writes past a broken seal (docs/formats.md)."""
import json
import shutil

import h5py
import numpy as np
import pytest

from pipeline.errors import DataError, IntegrityError
from pipeline.formats import h5seal
from pipeline.formats.bench_report import SCHEMA as BENCH_SCHEMA
from pipeline.formats.bench_report import read_bench_report, write_bench_report
from pipeline.formats.cache import open_cache, open_part
from pipeline.formats.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from pipeline.formats.onnx_model import read_student_metadata, set_metadata, student_metadata
from pipeline.formats.prepared import open_prepared
from stages.cache import CacheConfig, MergeConfig, cache_soft_targets, merge
from tests.conftest import run_cli
from tests.faultkit import linear_model

QUIET = dict(log=lambda m: None)


def _copy(src, dst, edit=None, seal=False):
    shutil.copy(src, dst)
    if edit is not None:
        with h5py.File(dst, "r+") as f:
            edit(f)
            if seal:
                h5seal.seal(f)
    return dst


# ------------------------------------------------------------------- schema and version, every HDF5 format
@pytest.mark.parametrize("reader, fixture, schema, current", [
    (open_prepared, "tiny_prepared", "kd-prepared", 1), (open_cache, "tiny_cache", "kd-cache", 2),
    (read_checkpoint, "tiny_student", "kd-checkpoint", 1)])
def test_schema_other_newer_older(reader, fixture, schema, current, request, tmp_path):
    src = request.getfixturevalue(fixture)
    cases = [("other", "kd-something/1", "not a .* \\(schema 'kd-something/1', expected"),
             ("newer", f"{schema}/{current + 1}", f"schema {schema}/{current + 1}, newer than this code reads"),
             ("older", f"{schema}/0", "of an older schema")]
    for name, value, message in cases:
        path = _copy(src, tmp_path / f"{name}.h5", lambda f, value=value: f.attrs.__setitem__("schema", value),
                     seal=True)
        with pytest.raises(DataError, match=message):
            reader(path)


@pytest.mark.parametrize("reader, fixture", [(open_prepared, "tiny_prepared"), (open_cache, "tiny_cache"),
                                             (read_checkpoint, "tiny_student")])
def test_truncated_corrupt_and_edited_are_told_apart(reader, fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    data = src.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated .*cut short"):
        reader(cut)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(data[:8] + bytes(len(data) - 8))  # HDF5's signature, nothing behind it
    with pytest.raises(DataError, match="corrupt"):
        reader(junk)
    edited = _copy(src, tmp_path / "edited.h5", lambda f: f.attrs.__setitem__("provenance", "{}"))
    with pytest.raises(IntegrityError, match="content checksum mismatch"):
        reader(edited)


@pytest.mark.slow
def test_truncated_prepared_is_corrupt_not_stale_at_every_stage(tiny_prepared, tiny_cache, tiny_teacher,
                                                                 tiny_student, tmp_path):
    """A truncated transfer set given to the student was once called 'changed, rebuild
    the cache'; every stage now says it is truncated (exit 3) before comparing any hash."""
    data = tiny_prepared.read_bytes()
    p = tmp_path / "p.h5"
    p.write_bytes(data[: len(data) * 2 // 3])
    o = tmp_path / "out"
    commands = {
        "jitter": ["jitter", "--prepared", p, "--out", o / "j.h5"],
        "teacher": ["teacher", "--prepared", p, "--out", o / "e.onnx", "--members", "1"],
        "cache": ["cache", "--teacher", tiny_teacher, "--transfer-set", p, "--out", o / "c.h5", "--device", "cpu"],
        "verify": ["cache", "verify", tiny_cache, "--teacher", tiny_teacher, "--transfer-set", p],
        "student": ["student", "--cache", tiny_cache, "--transfer-set", p, "--out", o / "s.ckpt"],
        "export": ["export", "--checkpoint", tiny_student, "--transfer-set", p, "--out", o / "s.onnx"],
        "bench": ["bench", "--teacher", tiny_teacher, "--candidate", f"s={tiny_teacher}", "--prepared", p,
                  "--out", o / "b.json"],
    }
    for name, args in commands.items():
        proc = run_cli(*args)
        assert proc.returncode == 3, (name, proc.stderr)
        assert f"{p}: truncated prepared dataset" in proc.stderr and "changed" not in proc.stderr, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
    assert not o.exists() or not [f for f in o.rglob("*") if f.is_file()]


# ------------------------------------------------------------------------------------- the cache's shards
@pytest.fixture(scope="module")
def shards(tiny_prepared, tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    teacher = linear_model(d / "t.onnx")
    cfg = dict(temperatures=(1.0, 2.0), device="cpu", threads=1, batch_size=256, gate=False)  # untrained teacher
    parts = [cache_soft_targets(CacheConfig(shard=f"{i}/2", **cfg), [teacher], tiny_prepared, d / "c.h5", **QUIET)
             for i in range(2)]
    whole = cache_soft_targets(CacheConfig(**cfg), [teacher], tiny_prepared, d / "whole.h5", **QUIET)
    return parts, whole


def test_merge_refuses_a_part_edited_after_its_seal(shards, tmp_path):
    """An integrity hole once open: one soft target of shard 0 changed with h5py after sealing.
    merge read parts with plain h5py and re-sealed the result; it now verifies each part's seal."""
    parts, _ = shards
    bad = _copy(parts[0], tmp_path / "c.part0of2.h5", lambda f: f["logits"].__setitem__((0, 0, 0), 0.5))
    good = _copy(parts[1], tmp_path / "c.part1of2.h5")
    out = tmp_path / "merged.h5"
    proc = run_cli("cache", "merge", "--part", bad, "--part", good, "--out", out)
    assert proc.returncode == 4, proc.stderr
    assert str(bad) in proc.stderr and "checksum mismatch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "merged.h5.partial").exists()


def test_merged_parts_equal_one_run(shards, tmp_path):
    parts, whole = shards
    merged = merge(MergeConfig(), list(parts), tmp_path / "m.h5", **QUIET)
    a, b = open_cache(merged), open_cache(whole)
    for name in ("logits", "labels"):
        assert np.array_equal(a.read(name), b.read(name)), name
    assert a.diagnostics() == b.diagnostics()
    assert open_part(parts[0]).part["index"] == 0
    with pytest.raises(IntegrityError, match="one part of a sharded cache"):
        open_cache(parts[0])
    with pytest.raises(DataError, match="not a shard part"):
        open_part(whole)


# --------------------------------------------------------------------------------------------- checkpoint
def _ckpt(**kw):
    base = dict(role="student", arch="mlp:4", input_shape=(1, 2, 2), class_names=("a", "b"),
                norm={"scale": 255.0, "mean": 0.25, "std": 0.5},
                state={"1.weight": np.arange(16, dtype=np.float32).reshape(4, 4), "1.bias": np.ones(4, np.float32),
                       "steps": np.array(7, np.int64)},
                meta={"temperature": 2.0, "alpha": 0.5, "epoch": 3}, provenance={"stage": "test"})
    return Checkpoint(**{**base, **kw})


def test_checkpoint_round_trip_keeps_order_dtypes_and_values(tmp_path):
    path = write_checkpoint(tmp_path / "c.ckpt", _ckpt())
    got = read_checkpoint(path)
    assert list(got.state) == ["1.weight", "1.bias", "steps"]
    assert got.state["1.weight"].dtype == np.float32 and np.array_equal(got.state["1.weight"],
                                                                        _ckpt().state["1.weight"])
    assert got.state["steps"].dtype == np.int64 and int(got.state["steps"]) == 7
    assert (got.meta, got.norm, got.input_shape, got.class_names) == (_ckpt().meta, _ckpt().norm, (1, 2, 2), ("a", "b"))
    with pytest.raises(DataError, match="a student checkpoint, expected a teacher-member one"):
        read_checkpoint(path, role="teacher-member")
    with pytest.raises(ValueError, match="role"):
        write_checkpoint(tmp_path / "x.ckpt", _ckpt(role="ghost"))


# ---------------------------------------------------------------------------------------- ONNX metadata
def test_student_metadata_round_trip_and_missing_keys(tmp_path):
    path = linear_model(tmp_path / "m.onnx")
    import onnx

    meta = student_metadata(["a", "b"], {"scale": 255.0, "mean": 0.2, "std": 0.3}, True, 4.0, 0.5, "c" * 64,
                            "d" * 64, "mlp:8")
    model = onnx.load(str(path))
    set_metadata(model, {**meta, "precision": "int8"})
    onnx.save(model, str(path))
    got = read_student_metadata(path)
    assert got["class_names"] == ["a", "b"] and got["normalisation_in_graph"] is True and got["temperature"] == 4.0
    assert got["input_dtype"] == "uint8" and got["normalisation"]["formula"] == "(x / scale - mean) / std"
    bare = linear_model(tmp_path / "bare.onnx")
    with pytest.raises(DataError, match="metadata lacks class_names"):
        read_student_metadata(bare)


# ----------------------------------------------------------------------------------------- bench report
def _report():
    run = {"threads": 1, "batch": 1, "providers_used": ["CPUExecutionProvider"], "load": {"session_create_s": 0.01},
           "first_run_s": 1e-4, "steady": {"p50": 5.0, "p90": 6.0, "p99": 7.0, "p999": 8.0, "max": 9.0, "valid": True,
                                           "throughput_rows_s": 2e5}}
    settings = dict(provider="cpu", threads=[1], batches=[1], trials=3, min_count=10, min_s=0.1, warmup_count=1,
                    warmup_s=0.0, max_spread=0.1)
    return {"settings": settings, "threads_resolved": [1], "environment": {}, "provenance": {},
            "models": {"m": {"path": "m.onnx", "engine": "onnxruntime", "input_dtype": "float32", "runs": [run],
                             "test_accuracy": 0.9, "agreement_with_teacher": 0.95, "sha256": "e" * 64,
                             "files": {"m.onnx": 10}, "size_bytes": 10, "parameters": 4}}}


def test_bench_report_schema_both_ways(tmp_path):
    path = write_bench_report(tmp_path / "b.json", _report())
    assert read_bench_report(path)["schema"] == BENCH_SCHEMA
    broken = _report()
    del broken["models"]["m"]["runs"][0]["steady"]["p99"]
    with pytest.raises(AssertionError, match=r"runs\[0\].steady lacks 'p99'"):
        write_bench_report(tmp_path / "c.json", broken)  # the writer refuses its own bug
    raw = json.loads(path.read_text())
    raw["models"]["m"]["test_accuracy"] = "high"
    (tmp_path / "d.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="test_accuracy is str, expected float"):
        read_bench_report(tmp_path / "d.json")
    (tmp_path / "e.json").write_text(json.dumps({**raw, "schema": "kd-bench/9"}))
    with pytest.raises(DataError, match="schema is 'kd-bench/9'"):
        read_bench_report(tmp_path / "e.json")
