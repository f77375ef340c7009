"""Outputs never alias inputs: every stage refuses, before any work (exit 2, naming both paths), an
output -- given, or derived from ``--out`` -- that is one of its inputs (the same path, a symbolic or
hard link to it, or the input its ``.partial`` would overwrite), the same file as another output, or an
existing directory.  Every input is left as it was.

Inputs are copied into the test's folder first: were a refusal missing, the stage would destroy the
copy, not a shared fixture.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from tests.conftest import run_cli

QUIET = dict(log=lambda m: None)


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, dst))


def _refused(fn, *inputs: Path, match: str) -> None:
    """``fn()`` raises UsageError matching ``match``, and every input keeps its bytes."""
    before = {p: p.read_bytes() for p in inputs}
    with pytest.raises(UsageError, match=match):
        fn()
    assert {p: p.read_bytes() for p in inputs} == before


# ------------------------------------------------------------------------------------ the check itself
def test_check_outputs_knows_a_file_under_every_name(tmp_path):
    from pipeline.artifacts import check_outputs

    inp = tmp_path / "in.h5"
    inp.write_bytes(b"data")
    (tmp_path / "link.h5").symlink_to(inp)
    os.link(inp, tmp_path / "hard.h5")
    (tmp_path / "sub").mkdir()
    cases = {tmp_path / "sub" / ".." / "in.h5": "is the input --in",
             tmp_path / "link.h5": "is the input --in", tmp_path / "hard.h5": "is the input --in",
             tmp_path / "in": None, tmp_path / "sub": "is an existing directory"}
    for out, fragment in cases.items():
        if fragment is None:
            check_outputs({"--in": inp}, {"--out": out})  # another file: fine
        else:
            with pytest.raises(UsageError, match=fragment):
                check_outputs({"--in": inp}, {"--out": out})
    staged = tmp_path / "x.h5.partial"  # an input named like the partial an output would be staged in
    staged.write_bytes(b"data")
    with pytest.raises(UsageError, match=r"would be staged as .*x\.h5\.partial, which is the input --in"):
        check_outputs({"--in": staged}, {"--out": tmp_path / "x.h5"})
    with pytest.raises(UsageError, match="--b .* and --a .* are the same file"):
        check_outputs({}, {"--a": tmp_path / "o.json", "--b": tmp_path / "sub" / ".." / "o.json"})


# ------------------------------------------------------------------------------------------ each stage
def test_prepare(tiny_npz, tmp_path):
    from stages.prepare import PrepareConfig, prepare_dataset

    npz = _copy(tiny_npz, tmp_path / "d.npz")
    _refused(lambda: prepare_dataset(PrepareConfig(val_rows=200), npz, npz=npz, **QUIET), npz,
             match=r"--out .*d\.npz is the input --npz")


def test_jitter(tiny_prepared, tmp_path):
    from stages.jitter import JitterConfig, jitter_transfer_set

    p = _copy(tiny_prepared, tmp_path / "p.h5")
    _refused(lambda: jitter_transfer_set(JitterConfig(copies=1), p, p, **QUIET), p, match="is the input --prepared")


def test_teacher_and_its_member_checkpoints(tiny_prepared, tmp_path):
    from stages.teacher import TeacherConfig, train_teachers

    cfg = TeacherConfig(members=2, arch="mlp:8", epochs=1, threads=1)
    p = _copy(tiny_prepared, tmp_path / "p.h5")
    _refused(lambda: train_teachers(cfg, p, p, **QUIET), p, match="--out .* is the input --prepared")
    member = _copy(tiny_prepared, tmp_path / "t" / "member1.ckpt")  # where member 1's checkpoint would go
    _refused(lambda: train_teachers(cfg, member, tmp_path / "t" / "ensemble.onnx", **QUIET), member,
             match="member 1's checkpoint .* is the input --prepared")


@pytest.mark.parametrize("which", ["transfer set", "teacher", "directory"])
def test_cache(tiny_teacher, tiny_prepared, tmp_path, which):
    from stages.cache import CacheConfig, cache_soft_targets

    p, t = _copy(tiny_prepared, tmp_path / "p.h5"), _copy(tiny_teacher, tmp_path / "t.onnx")
    out = {"transfer set": p, "teacher": t, "directory": tmp_path}[which]
    match = {"transfer set": "is the input --transfer-set", "teacher": "is the input --teacher",
             "directory": "is an existing directory"}[which]
    cfg = CacheConfig(temperatures=(2.0,), device="cpu", threads=1)
    _refused(lambda: cache_soft_targets(cfg, [t], p, out, **QUIET), p, t, match=match)


def test_cache_tools(tiny_cache, tmp_path):
    from stages.cache import AddTemperatureConfig, MergeConfig, add_temperature, merge

    c = _copy(tiny_cache, tmp_path / "c.h5")
    _refused(lambda: add_temperature(AddTemperatureConfig(temperatures=(3.0,)), c, tmp_path, **QUIET), c,
             match="--out .* is an existing directory")
    _refused(lambda: merge(MergeConfig(), [c], c, **QUIET), c, match="is the input --part")


def test_student(tiny_cache, tiny_prepared, tmp_path):
    from stages.student import StudentConfig, distill_student

    c, p = _copy(tiny_cache, tmp_path / "c.h5"), _copy(tiny_prepared, tmp_path / "p.h5")
    cfg = StudentConfig(arch="mlp:8", epochs=1)
    _refused(lambda: distill_student(cfg, c, p, c, tmp_path / "m.json", **QUIET), c, p,
             match="--out .* is the input --cache")
    _refused(lambda: distill_student(cfg, c, p, tmp_path / "s.ckpt", p, **QUIET), c, p,
             match="--metrics .* is the input --transfer-set")
    _refused(lambda: distill_student(cfg, c, p, tmp_path / "s.ckpt", tmp_path / "s.ckpt", **QUIET), c, p,
             match="are the same file")


def test_sweep(tiny_cache, tiny_prepared, tmp_path):
    from stages.student import SweepConfig, run_sweep

    c, p = _copy(tiny_cache, tmp_path / "c.h5"), _copy(tiny_prepared, tmp_path / "p.h5")
    cfg = SweepConfig(archs=("mlp:8",), temperatures=(2.0,), alphas=(), seeds=(0,), epochs=1, jobs=1)
    _refused(lambda: run_sweep(cfg, c, p, tmp_path / "w", c, tmp_path / "s.md", tmp_path / "s.png", **QUIET), c, p,
             match="--csv .* is the input --cache")


@pytest.mark.parametrize("which", ["out", "int8", "report", "mobile"])
def test_export(tiny_student, tiny_prepared, tmp_path, which):
    from stages.export import ExportConfig, export_student

    ck, p = _copy(tiny_student, tmp_path / "s.ckpt"), _copy(tiny_prepared, tmp_path / "p.h5")
    out, mobile = tmp_path / "e" / "s.onnx", tmp_path / "e" / "s.mobile"
    paths = {"out": out, "int8": out.with_suffix(".int8.onnx"), "report": out.with_suffix(".export.json")}
    if which == "mobile":  # the checkpoint sits where the fp32 model's .ort would be written
        ck = _copy(tiny_student, mobile / "s.ort")
        match = "the mobile file of s.onnx .* is the input --checkpoint"
    else:
        paths[which] = ck if which != "int8" else p
        match = f"--{which} .* is the input --{'transfer-set' if which == 'int8' else 'checkpoint'}"
    _refused(lambda: export_student(ExportConfig(calibration_rows=100), ck, p, paths["out"], paths["int8"],
                                    paths["report"], mobile_dir=mobile, **QUIET), ck, p, match=match)


def test_bench_and_its_tools(tiny_teacher, tiny_prepared, tiny_student, tmp_path):
    from stages.bench import BenchConfig, FidelityConfig, benchmark, check_fidelity, pick_model
    from stages.bench.settings import PickConfig

    t, p = _copy(tiny_teacher, tmp_path / "t.onnx"), _copy(tiny_prepared, tmp_path / "p.h5")
    s = _copy(tiny_teacher, tmp_path / "s.onnx")
    ck = _copy(tiny_student, tmp_path / "s.ckpt")
    d = tmp_path / "b"

    def bench(out, md, csv):
        return lambda: benchmark(BenchConfig(), t, {"s": s}, p, out, md, csv, torch_models={"s": ck}, **QUIET)

    _refused(bench(p, d / "b.md", d / "b.csv"), t, p, s, ck, match="--out .* is the input --prepared")
    _refused(bench(d / "b.json", s, d / "b.csv"), t, p, s, ck, match="--markdown .* is the input --candidate")
    _refused(bench(d / "b.json", d / "b.md", ck), t, p, s, ck, match="--csv .* is the input --torch")
    _refused(lambda: check_fidelity(FidelityConfig(), t, s, s, p, s, **QUIET), t, p, s,
             match="--out .* is the input --student")
    report = _copy(tiny_teacher, tmp_path / "r.json")  # what it holds does not matter: refused first
    _refused(lambda: pick_model(PickConfig(), report, report, echo=lambda m: None), report,
             match="--out .* is the input --report")


def test_an_output_that_is_a_directory_is_one_line_before_any_work(tiny_teacher, tiny_prepared, tmp_path):
    """The cache once ran to its end and then failed with a traceback at the rename."""
    proc = run_cli("cache", "--teacher", tiny_teacher, "--transfer-set", tiny_prepared, "--out", tmp_path,
                   "--device", "cpu", "--threads", "1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"distill cache: error: --out {tmp_path} is an existing directory; give the path " \
                                  "of a file to write"
    assert list(tmp_path.iterdir()) == []
