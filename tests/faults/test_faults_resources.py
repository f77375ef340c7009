"""Case 11 (a): a file-size limit at every writing stage -- exit 7, nothing published, the rerun identical.

Each writing stage runs in a subprocess under ``RLIMIT_FSIZE`` (no root needed: a write past the
limit fails with EFBIG), at a size that lets it start and fails it mid-write.  It must exit 7 with one
error line naming the file and the cause, publish nothing (no final file, no partial left, except
the cache's, kept to resume), and -- the limit lifted, the command run again -- give the result of a
run that never failed: the same bytes, or for a resumed cache the same content digest (the seal).
Memory ceilings, a full disk and the in-process checks are in ``test_faults_memory_disk.py``.

A subprocess that imports torch takes seconds to start on this machine, so the reruns of the torch
stages (jitter, teacher, student, export) call the stage's function here, with the settings the
command line gave: what is being tested is that the failed run left nothing in the way.
"""
from __future__ import annotations

import dataclasses
import os
import re
import resource
import shutil

import numpy as np
import pytest

from pipeline.formats.bench_report import read_bench_report
from tests.conftest import BIG_ROWS
from tests.faultkit import content_digest, exit7, linear_model, run_limited, unpublished

EFBIG = "file too large for this process's file-size limit (EFBIG"
BIG_CACHE = ["--temperatures", "1,2,4", "--batch-size", "1024", "--device", "cpu", "--threads", "1", "--store-soft",
             "--logits-dtype", "float32"]  # as big_transfer
TEACHER = ["--members", "2", "--arch", "mlp:32", "--epochs", "2", "--threads", "1", "--max-shift",
           "1"]  # tiny_teacher's


def quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------- RLIMIT_FSIZE
def test_git_revision_under_file_size_limit_leaves_the_repository_alone(tmp_path):
    """Every stage records the code's git revision.  Under a file-size limit smaller than the index, a
    ``git status`` that refreshes a stale index is killed mid-write (SIGXFSZ) and leaves ``index.lock``,
    which blocks every later git command in the checkout.  The revision is read from a copy of
    pipeline/provenance.py in a throwaway repository whose index is made stale."""
    import subprocess
    import sys

    from tests.faultkit import ROOT

    repo = tmp_path / "repo"
    (repo / "pipeline").mkdir(parents=True)
    shutil.copy(ROOT / "pipeline" / "provenance.py", repo / "pipeline" / "provenance.py")
    for name in range(20):  # an index of ~2 KB, past the limit below
        (repo / f"f{name}.txt").write_text(str(name))
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "c"]):
        subprocess.run([*git, *cmd], check=True)
    stamp = (repo / "f0.txt").stat().st_mtime_ns + 10**9
    for name in range(20):  # same content, newer mtimes: git status would refresh the index
        os.utime(repo / f"f{name}.txt", ns=(stamp, stamp))
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('p', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.git_revision())")
    proc = subprocess.run([sys.executable, "-c", code, str(repo / "pipeline" / "provenance.py")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
                                                               "PYTHONPATH": str(ROOT)},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)))
    assert proc.returncode == 0, proc.stderr
    assert not (repo / ".git" / "index.lock").exists()
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == rev.stdout.strip()  # and no file differs: not -dirty


def test_prepare_under_file_size_limit(tiny_npz, tiny_prepared, tmp_path):
    out = tmp_path / "p.h5"
    args = ["prepare", "--npz", tiny_npz, "--out", out, "--val-rows", "200"]  # tiny_prepared's settings
    exit7(run_limited(*args, fsize=600_000), str(out), EFBIG, "nothing was published")  # the file is 1.4 MB
    unpublished(out)
    assert run_limited(*args).returncode == 0
    assert out.read_bytes() == tiny_prepared.read_bytes()


@pytest.mark.slow
def test_jitter_under_file_size_limit(tiny_prepared, tmp_path):
    from stages.jitter import JitterConfig, jitter_transfer_set

    out = tmp_path / "pj.h5"
    proc = run_limited("jitter", "--prepared", tiny_prepared, "--out", out, "--copies", "2", fsize=1_500_000)
    exit7(proc, str(out), EFBIG, "nothing was published")  # 3600 train rows: 3.2 MB
    unpublished(out)
    cfg = JitterConfig(copies=2)
    jitter_transfer_set(cfg, tiny_prepared, out, log=quiet)
    assert out.read_bytes() == jitter_transfer_set(cfg, tiny_prepared, tmp_path / "ref.h5", log=quiet).read_bytes()


@pytest.mark.slow
def test_teacher_member_and_ensemble_under_file_size_limit(tiny_prepared, tiny_teacher, tmp_path):
    from stages.teacher import TeacherConfig, train_teachers

    out = tmp_path / "t" / "ensemble.onnx"
    members = [out.with_name(f"member{i}.ckpt") for i in range(2)]
    proc = run_limited("teacher", "--prepared", tiny_prepared, "--out", out, "--members", "1", "--arch", "mlp:32",
                       "--epochs", "1", "--threads", "1", fsize=50_000)  # a member checkpoint is 110 KB
    exit7(proc, str(members[0]), EFBIG, "nothing was published")
    unpublished(members[0], out)
    # a member's training state, written after every epoch but its last, is larger than a member (weights,
    # Adam's two moments and the best weights so far): under 150 KB it cannot be written
    state = out.with_name("member0.state")
    exit7(run_limited("teacher", "--prepared", tiny_prepared, "--out", out, *TEACHER, fsize=150_000), str(state),
          EFBIG, "nothing was published")
    unpublished(state, members[0], out)
    # and it outweighs the ensemble graph (217 KB), so the ensemble's own limit is met with finished members
    # (tiny_teacher's, trained with these settings): both are reused, the ensemble does not fit under 150 KB
    for m in members:
        shutil.copyfile(tiny_teacher.with_name(m.name), m)
    proc = run_limited("teacher", "--prepared", tiny_prepared, "--out", out, *TEACHER, fsize=150_000)
    exit7(proc, str(out), EFBIG)
    assert proc.stderr.count("reusing") == 2
    unpublished(out)
    assert all(m.is_file() for m in members)  # finished members stay: the rerun starts from them
    log = []
    cfg = TeacherConfig(members=2, arch="mlp:32", epochs=2, threads=1, max_shift=1)  # tiny_teacher's, as TEACHER
    train_teachers(cfg, tiny_prepared, out, log.append)
    assert sum("reusing" in line for line in log) == 2
    assert out.read_bytes() == tiny_teacher.read_bytes()


@pytest.mark.slow
def test_cache_under_file_size_limit_resumes_after_committed_rows(big_transfer, tiny_teacher, tmp_path):
    out = tmp_path / "c.h5"
    args = ["cache", "--teacher", tiny_teacher, "--transfer-set", big_transfer.prepared, "--out", out, *BIG_CACHE]
    line = exit7(run_limited(*args, fsize=5 << 20), f"{out}.partial: write failed: ", EFBIG)
    committed = int(re.search(rf"; (\d+) of {BIG_ROWS} rows are committed in it: .* resume", line).group(1))
    assert 0 < committed < BIG_ROWS and not out.exists()
    proc = run_limited(*args)
    assert proc.returncode == 0, proc.stderr
    assert f" at row {committed} (its last committed batch)" in proc.stderr
    assert content_digest(out) == content_digest(big_transfer.cache)


def test_add_temperature_under_file_size_limit(tiny_teacher, tiny_prepared, tmp_path):
    from stages.cache import AddTemperatureConfig, CacheConfig, add_temperature, cache_soft_targets

    # a cache that stores its targets (and float32 logits: kd-cache/1's content), so a new T adds 48 KB
    cfg = CacheConfig(temperatures=(1.0, 2.0, 4.0), batch_size=256, device="cpu", threads=1, store_soft=True,
                      logits_dtype="float32")
    tiny_cache = cache_soft_targets(cfg, [tiny_teacher], tiny_prepared, tmp_path / "c.h5", log=quiet)
    out = tmp_path / "c3.h5"
    args = ["cache", "add-temperature", tiny_cache, "--out", out, "--temperatures", "3"]
    assert 250_000 < tiny_cache.stat().st_size < 300_000  # the copy fits; the new soft targets do not
    exit7(run_limited(*args, fsize=300_000), str(out), EFBIG, "nothing was published")
    unpublished(out)
    assert run_limited(*args).returncode == 0
    ref = add_temperature(AddTemperatureConfig(temperatures=(3.0,)), tiny_cache, tmp_path / "ref.h5", log=quiet)
    assert content_digest(out) == content_digest(ref)


def test_merge_under_file_size_limit(tiny_teacher, tiny_prepared, tmp_path):
    from stages.cache import CacheConfig, MergeConfig, cache_soft_targets, merge

    cfg = CacheConfig(temperatures=(1.0, 2.0, 4.0), batch_size=256, device="cpu", threads=1, store_soft=True,
                      logits_dtype="float32")  # kd-cache/1's content: a merge of 276 KB
    parts = [cache_soft_targets(dataclasses.replace(cfg, shard=f"{i}/2"), [tiny_teacher], tiny_prepared,
                                tmp_path / "c.h5", log=quiet) for i in range(2)]
    out = tmp_path / "m.h5"
    args = ["cache", "merge", "--part", parts[0], "--part", parts[1], "--out", out]
    exit7(run_limited(*args, fsize=150_000), str(out), EFBIG, "nothing was published")  # the merge is 276 KB
    unpublished(out)
    assert run_limited(*args).returncode == 0
    assert content_digest(out) == content_digest(merge(MergeConfig(), parts, tmp_path / "ref.h5", log=quiet))


@pytest.mark.slow
def test_student_under_file_size_limit(tiny_cache, tiny_prepared, tiny_student, tmp_path):
    from stages.student import StudentConfig, distill_student

    out, metrics = tmp_path / "s.ckpt", tmp_path / "s.metrics.json"
    args = ("student", "--cache", tiny_cache, "--transfer-set", tiny_prepared, "--out", out, "--metrics", metrics,
            "--arch", "mlp:16", "--temperature", "2", "--alpha", "0.5")
    # Two epochs: the training state after the first (four copies of the weights) is the first file to fail.
    exit7(run_limited(*args, "--epochs", "2", fsize=30_000), str(out.with_suffix(".state")), EFBIG,
          "nothing was published")
    unpublished(out, metrics, out.with_suffix(".state"))
    # One epoch saves no state: the checkpoint (59 KB) is.
    exit7(run_limited(*args, "--epochs", "1", fsize=30_000), str(out), EFBIG, "nothing was published")
    unpublished(out, metrics)
    cfg = StudentConfig(arch="mlp:16", epochs=2, temperature=2.0, alpha=0.5)  # tiny_student's
    distill_student(cfg, tiny_cache, tiny_prepared, out, metrics, log=quiet)
    assert out.read_bytes() == tiny_student.read_bytes()


@pytest.mark.slow
def test_export_under_file_size_limit(tiny_student, tiny_prepared, tmp_path):
    from stages.export import ExportConfig, export_student

    out = tmp_path / "e" / "s.onnx"
    outs = (out, out.with_suffix(".int8.onnx"), out.with_suffix(".export.json"))
    proc = run_limited("export", "--checkpoint", tiny_student, "--transfer-set", tiny_prepared, "--out", out,
                       "--calibration-rows", "100", "--max-accuracy-drop", "100", "--no-mobile",
                       fsize=40_000)  # the fp32 graph, written to a temporary folder first, is 56 KB
    exit7(proc, "fp32.onnx: write failed: ", EFBIG, "a temporary file; nothing was published")
    unpublished(*outs)
    cfg = ExportConfig(calibration_rows=100, max_accuracy_drop=100, mobile=False)
    export_student(cfg, tiny_student, tiny_prepared, *outs, log=quiet)
    ref = tmp_path / "ref" / "s.onnx"
    export_student(cfg, tiny_student, tiny_prepared, ref, ref.with_suffix(".int8.onnx"),
                   ref.with_suffix(".export.json"), log=quiet)
    for mine, theirs in ((out, ref), (outs[1], ref.with_suffix(".int8.onnx"))):
        assert mine.read_bytes() == theirs.read_bytes()


@pytest.mark.slow
def test_bench_reports_under_file_size_limit(tmp_path):
    """4x4 images, so that the bench's pools (8 KB) and its CSV fit under the limit and a report does not.

    The teacher declares no contract, so the bench's sanity gate judges the one it guesses (normalised
    rows) on the test split: that split needs MIN_LABELLED labelled rows (840 rows give 120) and labels
    the teacher predicts, else the bench stops (exit 3) before it writes anything.  The labels are the
    teacher's own on rows normalised with all rows' statistics (the train split's differ a little)."""
    import onnxruntime as ort

    from pipeline.sanity_gate import MIN_LABELLED
    from stages.prepare import PrepareConfig, prepare_dataset

    x = np.random.default_rng(0).integers(0, 256, (840, 4, 4), dtype=np.uint8)
    teacher = linear_model(tmp_path / "t.onnx", in_shape=(4, 4), members=2)
    u = x.astype(np.float32) / 255
    logits = ort.InferenceSession(teacher).run(None, {"x": (u - u.mean()) / u.std()})[0]  # [rows, members, classes]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    y = (p / p.sum(-1, keepdims=True)).mean(1).argmax(1)
    np.savez(tmp_path / "small.npz", x=x, y=y)
    prepared = prepare_dataset(PrepareConfig(val_rows=100), tmp_path / "small.h5", npz=tmp_path / "small.npz")
    assert int(len(x) / 7) >= MIN_LABELLED  # the test split: a seeded 1/7 of the rows
    student = linear_model(tmp_path / "s.onnx", in_shape=(4, 4), seed=1)
    d = tmp_path / "bench"
    reports = {"out": d / "b.json", "plot-accuracy": d / "acc.png", "plot-throughput": d / "tp.png"}
    args = ["bench", "--teacher", teacher, "--candidate", f"s={student}", "--prepared", prepared, "--threads", "1",
            "--batches", "1", "--warmup-count", "2", "--warmup-s", "0", "--min-count", "10", "--min-s", "0",
            "--trials", "2", "--no-iobinding", *[a for k, p in reports.items() for a in (f"--{k}", p)]]
    exit7(run_limited(*args, fsize=20_000), str(reports["plot-accuracy"]), EFBIG, "nothing was published")
    unpublished(*reports.values(), d / "b.md", d / "b.csv")  # one set: none of it, the complete CSV included
    proc = run_limited(*args)
    assert proc.returncode == 0, proc.stderr
    models = read_bench_report(reports["out"])["models"]
    assert set(models) == {"teacher-ensemble", "s", "identity-floor"}
    assert models["teacher-ensemble"]["input_contract"]["gate"]["rows"] >= MIN_LABELLED  # judged, and kept
    assert (d / "b.md").read_text().startswith("# Edge benchmark")
