"""Lineage: every stage that reads an artifact made from another checks the recorded hashes, and what
a resume trusts is checked again.

- export, bench and bench-fidelity take the transfer set the student's checkpoint was trained on, and
  no other of the same shape (its mean and std go into a raw-input graph, its test split scores every
  model): exit 4 before anything is written or timed (``pipeline.provenance.check_lineage``);
- a sweep reuses a student only when its metrics describe the very checkpoint beside them (their
  ``checkpoint_sha256``): new metrics beside an old checkpoint (a kill between the two renames of an
  earlier layout, a copy) mean retraining it;
- the cache resumes a partial only when its committed rows still match their checksum chain: a row
  changed in the partial after a kill is recomputed, never sealed into the published cache.
"""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from pipeline import provenance
from pipeline.errors import IntegrityError
from pipeline.formats.cache import open_cache
from tests.conftest import synthetic_images

QUIET = dict(log=lambda m: None)


def _written(folder):
    """Files a stage wrote in ``folder``; its claims' empty ``.partial`` files, removed as the process
    exits, aside."""
    return [p for p in folder.iterdir() if not (p.name.endswith(".partial") and p.stat().st_size == 0)]


@pytest.fixture(scope="module")
def other_prepared(tmp_path_factory):
    """A prepared file of the same shape and classes as tiny_prepared, from other rows."""
    from stages.prepare import PrepareConfig, prepare_dataset

    d = tmp_path_factory.mktemp("other")
    x, y = synthetic_images(1400, seed=11)
    xt, yt = synthetic_images(300, seed=12)
    np.savez(d / "o.npz", x=x, y=y, x_test=xt, y_test=yt)
    return prepare_dataset(PrepareConfig(val_rows=200), d / "o.h5", npz=d / "o.npz", **QUIET)


@pytest.fixture(scope="module")
def exported(tiny_student, tiny_prepared, tmp_path_factory):
    from stages.export import ExportConfig, export_student

    d = tmp_path_factory.mktemp("lineage-export")
    export_student(ExportConfig(calibration_rows=100, max_accuracy_drop=100, mobile=False), tiny_student,
                   tiny_prepared, d / "s.onnx", d / "s.int8.onnx", d / "s.json", **QUIET)
    return d / "s.onnx", d / "s.int8.onnx"


@pytest.mark.parametrize("raw_input", [False, True])
def test_export_refuses_another_transfer_set(tiny_student, other_prepared, tmp_path, raw_input):
    from stages.export import ExportConfig, export_student

    out = tmp_path / "s.onnx"
    with pytest.raises(IntegrityError, match=rf"{other_prepared}: not the file the checkpoint .* was made from"):
        export_student(ExportConfig(calibration_rows=100, raw_input=raw_input, mobile=False), tiny_student,
                       other_prepared, out, out.with_suffix(".int8.onnx"), out.with_suffix(".json"), **QUIET)
    assert not _written(tmp_path)


def test_export_records_the_transfer_set_for_the_bench(exported, tiny_prepared):
    from pipeline.formats.onnx_model import TRANSFER_KEY, read_metadata

    for path in exported:
        assert read_metadata(path)[TRANSFER_KEY] == provenance.sha256_file(tiny_prepared)


def _bench(teacher, prepared, out_dir, **models):
    from stages.bench import BenchConfig, benchmark

    cfg = BenchConfig(threads=(1,), batches=(1,), warmup_count=1, warmup_s=0, min_count=2, min_s=0, trials=1,
                      iobinding=False)
    return benchmark(cfg, teacher, models.get("candidates", {}), prepared, out_dir / "b.json", out_dir / "b.md",
                     out_dir / "b.csv", torch_models=models.get("torch", {}), **QUIET)


def test_bench_refuses_a_student_of_another_transfer_set(exported, tiny_teacher, tiny_student, other_prepared,
                                                         tmp_path):
    match = rf"{other_prepared}: not the file the (student|checkpoint) .* was made from"
    with pytest.raises(IntegrityError, match=match):
        _bench(tiny_teacher, other_prepared, tmp_path, candidates={"s": exported[0]})
    with pytest.raises(IntegrityError, match=match):
        _bench(tiny_teacher, other_prepared, tmp_path, candidates={"t": tiny_teacher}, torch={"s": tiny_student})
    assert not _written(tmp_path)


def test_bench_fidelity_refuses_a_student_of_another_transfer_set(exported, tiny_teacher, other_prepared, tmp_path):
    from stages.bench import FidelityConfig, check_fidelity

    with pytest.raises(IntegrityError, match=rf"{other_prepared}: not the file the student"):
        check_fidelity(FidelityConfig(rounds=1, trials=1, min_count=2, min_s=0, warmup_count=1, warmup_s=0),
                       tiny_teacher, *exported, other_prepared, tmp_path / "f.json", **QUIET)
    assert not (tmp_path / "f.json").exists()


# --------------------------------------------------------------------------------------------- sweep
@pytest.fixture(scope="module")
def two_caches(tiny_cache, tmp_path_factory):
    """tiny_cache and another cache of the same transfer set (one more temperature: another file)."""
    from stages.cache import AddTemperatureConfig, add_temperature

    d = tmp_path_factory.mktemp("two-caches")
    return tiny_cache, add_temperature(AddTemperatureConfig(temperatures=(3.0,)), tiny_cache, d / "c2.h5", **QUIET)


def _sweep_student(cache, prepared, work_dir):
    """The first student of a one-student sweep, trained here (in this process) as the sweep would."""
    from stages.student import SweepConfig
    from stages.student.sweep import job_name

    cfg = SweepConfig(archs=("mlp:8",), temperatures=(2.0,), alphas=(), seeds=(0,), epochs=1).students()[0]
    from stages.student import distill_student

    out = work_dir / f"{job_name(cfg)}.ckpt"
    distill_student(cfg, cache, prepared, out, out.with_suffix(".metrics.json"), **QUIET)
    return cfg, out


def test_sweep_trusts_metrics_only_beside_their_own_checkpoint(two_caches, tiny_prepared, tmp_path):
    from stages.student.sweep import _trained

    c1, c2 = two_caches
    cfg, out = _sweep_student(c1, tiny_prepared, tmp_path / "work")  # the old checkpoint, from cache 1
    _, other = _sweep_student(c2, tiny_prepared, tmp_path / "other")  # its successor, from cache 2
    logs = []
    assert _trained(cfg, out, provenance.sha256_file(c1), logs.append) is not None  # the control: a true pair
    shutil.copy(other.with_suffix(".metrics.json"), out.with_suffix(".metrics.json"))  # new metrics, old weights
    assert _trained(cfg, out, provenance.sha256_file(c2), logs.append) is None
    assert any("not the file the metrics" in line and "retraining" in line for line in logs), logs


@pytest.mark.slow
def test_sweep_retrains_a_student_whose_metrics_describe_another_checkpoint(two_caches, tiny_prepared, tmp_path):
    """The same through a whole sweep (one spawned worker): the pair is not reported as trained, and the
    student reported is the one trained from this cache."""
    from stages.student import SweepConfig, run_sweep

    c1, c2 = two_caches
    work = tmp_path / "work"
    cfg, out = _sweep_student(c1, tiny_prepared, work)
    _, other = _sweep_student(c2, tiny_prepared, tmp_path / "other")
    shutil.copy(other.with_suffix(".metrics.json"), out.with_suffix(".metrics.json"))
    old = out.read_bytes()
    logs = []
    sweep = SweepConfig(archs=("mlp:8",), temperatures=(2.0,), alphas=(), seeds=(0,), epochs=1, jobs=1)
    rows = run_sweep(sweep, c2, tiny_prepared, work, tmp_path / "s.csv", tmp_path / "s.md", tmp_path / "s.png",
                     log=logs.append)
    assert any("students, 0 already trained" in line for line in logs), logs
    assert out.read_bytes() != old
    m = json.loads(out.with_suffix(".metrics.json").read_text())
    assert m["checkpoint_sha256"] == provenance.sha256_file(out)
    assert m["provenance"]["inputs"]["cache"]["sha256"] == provenance.sha256_file(c2)
    assert [r["checkpoint"] for r in rows if r["alpha"] == 0] == [str(out)]


# --------------------------------------------------------------------------------------- cache resume
@pytest.mark.parametrize("name", ["logits", "labels"])
def test_cache_resume_recomputes_a_partial_edited_after_a_kill(name, tiny_teacher, tiny_prepared, tmp_path,
                                                               monkeypatch):
    from stages.cache import CacheConfig, cache_soft_targets
    from stages.cache import stage as cache_stage

    cfg = CacheConfig(temperatures=(1.0, 2.0), batch_size=256, device="cpu", threads=1, gate=False)
    out = tmp_path / "c.h5"

    def killed(*a, **k):
        raise KeyboardInterrupt  # every row committed, never finished: the partial stays to resume

    with monkeypatch.context() as m:
        m.setattr(cache_stage, "_finish", killed)
        with pytest.raises(KeyboardInterrupt):
            cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, out, **QUIET)
    partial = tmp_path / "c.h5.partial"
    with h5py.File(partial, "r+") as f:  # one committed row (its logits, or its label) changed after the kill
        assert int(f.attrs["committed_rows"]) == 1200
        f[name][17] = np.roll(f["logits"][17], 1, axis=-1) if name == "logits" else (f["labels"][17] + 1) % 10
    logs = []
    cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, out, log=logs.append)
    assert any("no longer match their checksums" in line and "restarting from row 0" in line for line in logs), logs
    fresh = cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, tmp_path / "fresh.h5", **QUIET)
    assert np.array_equal(open_cache(out).read(name), open_cache(fresh).read(name))
    with h5py.File(out, "r") as f:
        assert "committed_sha256" not in f.attrs  # resume state, not content


def test_cache_resume_trusts_an_untouched_partial(tiny_teacher, tiny_prepared, tmp_path, monkeypatch):
    """The control: the same kill, no edit, and the rerun resumes (runs no teacher again) to the same file."""
    from stages.cache import CacheConfig, cache_soft_targets
    from stages.cache import stage as cache_stage
    from tests.faultkit import content_digest

    cfg = CacheConfig(temperatures=(1.0, 2.0), batch_size=256, device="cpu", threads=1, gate=False)
    out = tmp_path / "c.h5"
    with monkeypatch.context() as m:
        m.setattr(cache_stage, "_finish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, out, **QUIET)
    logs = []
    cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, out, log=logs.append)
    assert any("resuming" in line and "at row 1200" in line for line in logs), logs
    fresh = cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, tmp_path / "fresh.h5", **QUIET)
    assert content_digest(out) == content_digest(fresh)


def test_a_jittered_transfer_set_shares_its_sources_splits(tiny_prepared, other_prepared, tmp_path):
    """A student trained on a jittered transfer set may be scored on the file it was jittered from (its
    val and test splits and normalisation are that file's, bit for bit): the student records that file
    (``transfer_source_sha256``), and the lineage check accepts either, and nothing else."""
    jittered = tmp_path / "pj.h5"
    jittered.write_bytes(b"a jittered transfer set")
    source = {"stage": "jitter", "inputs": {"prepared": {"path": str(tiny_prepared),
                                                           "sha256": provenance.sha256_file(tiny_prepared)}}}
    assert provenance.splits_source(source) == provenance.sha256_file(tiny_prepared)
    assert provenance.splits_source({"stage": "prepare", "inputs": {}}) is None
    student = {"inputs": {"transfer_set": {"path": str(jittered), "sha256": provenance.sha256_file(jittered)}},
               "transfer_source_sha256": provenance.splits_source(source)}
    for accepted in (jittered, tiny_prepared):
        provenance.check_lineage(accepted, provenance.trained_on(student), "the checkpoint s.ckpt", "make student")
    with pytest.raises(IntegrityError, match=r"not the file the checkpoint s.ckpt was made from \(nor the file it "
                                             r"was jittered from\)"):
        provenance.check_lineage(other_prepared, provenance.trained_on(student), "the checkpoint s.ckpt",
                                 "make student")
