"""Sets of files published as one (``pipeline.artifacts.publish_together``): a failure at any file
publishes none of them, a kill between any two renames never leaves two generations side by side, and
the next claim of the set's target finishes a publication that a kill cut short.

The publisher itself is killed with SIGKILL at every step of a publication (a child process,
``python -m tests.faultkit publish``).  The stages that write several files (student: checkpoint and
metrics; export: ONNX files, report, mobile files; bench: JSON, CSV, plots, Markdown) are stopped
in-process at a step of their publication (:class:`tests.faultkit.Killed`, caught by nothing) and made
to fail at each file they stage (a full disk).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.errors import ResourceError
from tests.conftest import ROOT
from tests.export_helpers import degrading_variant
from tests.faultkit import Killed, publication_steps, publish_generation

NAMES = ("a.txt", "b.txt", "t.txt")  # t.txt: make's target
STEPS = 7  # 3 unlinks of the previous generation (target first), 3 renames (target last), the journal's unlink


def _state(folder: Path, names=NAMES) -> dict[str, str]:
    return {n: (folder / n).read_text() for n in names if (folder / n).exists()}


def _one_generation(state: dict[str, str], target: str, everything: int) -> None:
    """Never two generations side by side; make's target only in a complete set."""
    assert len(set(state.values())) <= 1, state
    if target in state:
        assert len(state) == everything, state


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".publishing")))


@pytest.mark.parametrize("at", range(STEPS + 1))
def test_kill_at_every_step_of_a_publication(tmp_path, at):
    publish_generation(tmp_path, "old")
    artifacts.release(tmp_path / "t.txt")
    proc = subprocess.run([sys.executable, "-m", "tests.faultkit", "publish", tmp_path, "new", str(at)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (-9 if at < STEPS else 0), proc.stderr
    state = _state(tmp_path)
    _one_generation(state, "t.txt", len(NAMES))
    if at == 0:
        assert state == dict.fromkeys(NAMES, "old")  # nothing removed yet
    if at in (1, 2, 3, 4, 5):
        assert "t.txt" not in state  # the old target goes first, the new one comes last
    artifacts.claim(tmp_path / "t.txt")  # the next writer of the set: finishes what the kill cut short
    artifacts.release(tmp_path / "t.txt")
    assert _state(tmp_path) == dict.fromkeys(NAMES, "new") and _leftovers(tmp_path) == []


@pytest.mark.parametrize("at", range(len(NAMES)))
def test_a_failed_write_at_any_file_publishes_nothing(tmp_path, at):
    publish_generation(tmp_path, "old")
    artifacts.release(tmp_path / "t.txt")
    with pytest.raises(ResourceError, match=r"no space left on device .*nothing was published: .*t\.txt and the files"):
        with artifacts.publish_together(tmp_path / "t.txt") as s:
            for i, name in enumerate(NAMES):
                with s.file(tmp_path / name) as tmp:
                    if i == at:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    tmp.write_text("new")
    assert _state(tmp_path) == dict.fromkeys(NAMES, "old") and _leftovers(tmp_path) == []


def test_a_staged_file_changed_after_the_commit_is_not_published(tmp_path, monkeypatch):
    """A journal whose staged file was rewritten since (by hand, or by a writer that ignored the lock) is
    dropped, not trusted: nothing more of it is published."""
    publish_generation(tmp_path, "old")
    artifacts.release(tmp_path / "t.txt")
    monkeypatch.setattr(artifacts, "_apply", publication_steps(3))  # the old files gone, nothing renamed yet
    with pytest.raises(Killed):
        publish_generation(tmp_path, "new")
    monkeypatch.undo()
    artifacts.release(tmp_path / "t.txt")
    (tmp_path / "a.txt.partial").write_text("edited")
    artifacts.claim(tmp_path / "t.txt")
    artifacts.release(tmp_path / "t.txt")
    assert _state(tmp_path) == {} and not artifacts.journal_path(tmp_path / "t.txt").exists()


# ------------------------------------------------------------------------------------------- student
def _train(cache, prepared, out, seed):
    from stages.student import StudentConfig, distill_student

    cfg = StudentConfig(arch="mlp:8", epochs=1, temperature=2.0, seed=seed)
    return distill_student(cfg, cache, prepared, out, out.with_suffix(".metrics.json"), log=lambda m: None)


@pytest.mark.parametrize("at", [2, 3])  # after the old files went; after the metrics came, before the checkpoint
def test_student_killed_between_its_renames(tiny_cache, tiny_prepared, tmp_path, monkeypatch, at):
    out = tmp_path / "s.ckpt"
    metrics = out.with_suffix(".metrics.json")
    _train(tiny_cache, tiny_prepared, out, seed=0)
    with monkeypatch.context() as m:
        m.setattr(artifacts, "_apply", publication_steps(at))
        with pytest.raises(Killed):
            _train(tiny_cache, tiny_prepared, out, seed=1)
    assert not out.exists()  # make's target: gone with its generation, not back until the set is whole
    if metrics.exists():  # the new metrics alone: they do not describe any checkpoint beside them
        assert json.loads(metrics.read_text())["settings"]["seed"] == 1
    artifacts.claim(out)  # the rerun's claim finishes the publication
    artifacts.release(out)
    m = json.loads(metrics.read_text())
    assert m["settings"]["seed"] == 1 and m["checkpoint_sha256"] == artifacts._sha256(out)


def test_student_failed_write_of_its_metrics_keeps_the_previous_pair(tiny_cache, tiny_prepared, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "s.ckpt"
    metrics = out.with_suffix(".metrics.json")
    _train(tiny_cache, tiny_prepared, out, seed=0)
    before = out.read_bytes(), metrics.read_bytes()
    _fail_staging_at(monkeypatch, 1)  # the checkpoint is staged first, its metrics second
    with pytest.raises(ResourceError, match="nothing was published"):
        _train(tiny_cache, tiny_prepared, out, seed=1)
    artifacts.release(out, metrics)  # what the process's exit does: an empty claim is removed
    assert (out.read_bytes(), metrics.read_bytes()) == before and _leftovers(tmp_path) == []


def _fail_staging_at(monkeypatch, k: int) -> None:
    """The ``k``-th file a set stages (from 0) meets a full disk."""
    real, count = artifacts.OutputSet.add, [0]

    def add(self, final):
        count[0] += 1
        if count[0] - 1 == k:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))
        return real(self, final)

    monkeypatch.setattr(artifacts.OutputSet, "add", add)


# -------------------------------------------------------------------------------------------- export
def _export(student, prepared, out, **kw):
    from stages.export import ExportConfig, export_student

    cfg = ExportConfig(calibration_rows=100, max_accuracy_drop=100, **kw)
    return export_student(cfg, student, prepared, out, out.with_suffix(".int8.onnx"),
                          out.with_suffix(".export.json"), log=lambda m: None, mobile_dir=out.with_suffix(".mobile"))


def _export_files(out: Path) -> list[Path]:
    mob = out.with_suffix(".mobile")
    return [out, out.with_suffix(".int8.onnx"), out.with_suffix(".export.json"), mob / f"{out.stem}.ort",
            mob / f"{out.stem}.int8.ort", mob / "required_operators.config"]


def _bytes(paths):
    return {p: p.read_bytes() for p in paths if p.exists()}


@pytest.fixture(scope="module")
def two_students(tmp_path_factory, tiny_cache, tiny_prepared):
    d = tmp_path_factory.mktemp("two-students")
    return [_train(tiny_cache, tiny_prepared, d / f"s{seed}.ckpt", seed) for seed in (0, 1)]


@pytest.mark.parametrize("at", [pytest.param(k, marks=pytest.mark.slow) for k in range(5)] + [5])
def test_export_fails_at_each_file_and_publishes_nothing(two_students, tiny_prepared, tmp_path, monkeypatch, at):
    out = tmp_path / "s.onnx"
    _export(two_students[0], tiny_prepared, out)
    before = _bytes(_export_files(out))
    assert len(before) == 6
    _fail_staging_at(monkeypatch, at)  # fp32, int8, their .ort files, the operator config, the report
    with pytest.raises(ResourceError, match=r"no space left on device .*nothing was published"):
        _export(two_students[1], tiny_prepared, out)
    artifacts.release(*_export_files(out))  # what the process's exit does: an empty claim is removed
    assert _bytes(_export_files(out)) == before
    assert _leftovers(tmp_path) == [] and _leftovers(out.with_suffix(".mobile")) == []


def _generation(path: Path) -> str:
    """Which checkpoint an export file comes from: its own metadata or report says (the .ort and the
    operator config say nothing, and are judged with the report)."""
    from pipeline.formats.onnx_model import read_metadata

    if path.suffix == ".onnx":
        return read_metadata(path)["checkpoint_sha256"]
    return json.loads(path.read_text())["metadata"]["checkpoint_sha256"]


def test_export_killed_between_its_renames(two_students, tiny_prepared, tmp_path, monkeypatch):
    out = tmp_path / "s.onnx"
    _export(two_students[0], tiny_prepared, out)
    labelled = _export_files(out)[:3]
    old = {_generation(p) for p in labelled}
    with monkeypatch.context() as m:
        m.setattr(artifacts, "_apply", publication_steps(8))  # 6 old files removed, 2 new ones renamed
        with pytest.raises(Killed):
            _export(two_students[1], tiny_prepared, out)
    present = [p for p in _export_files(out) if p.exists()]
    assert out not in present and 0 < len(present) < 6  # make's target comes last, with the whole set
    assert len({_generation(p) for p in labelled if p.exists()}) <= 1
    assert not {_generation(p) for p in labelled if p.exists()} & old  # the new generation only
    artifacts.claim(out)
    artifacts.release(out)
    assert all(p.exists() for p in _export_files(out))
    assert {_generation(p) for p in labelled} == {artifacts._sha256(two_students[1])}


def test_export_removes_files_of_the_previous_generation_it_does_not_replace(two_students, tiny_prepared, tmp_path,
                                                                             monkeypatch):
    """A variant not asked for again, and a variant that fails its gate (with their .ort files), are
    removed as the new export is published: no file of another checkpoint stays beside it."""
    out = tmp_path / "s.onnx"
    fp16, dyn = out.with_suffix(".fp16.onnx"), out.with_suffix(".dyn.onnx")
    from stages.export import ExportConfig, export_student
    from stages.export import stage as ex

    export_student(ExportConfig(calibration_rows=100, max_accuracy_drop=100), two_students[0], tiny_prepared, out,
                   out.with_suffix(".int8.onnx"), out.with_suffix(".export.json"), log=lambda m: None,
                   out_fp16=fp16, out_dynamic=dyn, mobile_dir=out.with_suffix(".mobile"))
    mob = out.with_suffix(".mobile")
    assert fp16.exists() and (mob / "s.fp16.ort").exists() and (mob / "s.int8.ort").exists()
    # the second export: no --fp16, the dynamic variant asked again, and variants no gate passes
    monkeypatch.setattr(ex, "_make_variant", degrading_variant)
    with pytest.raises(Exception, match="quality gate"):
        export_student(ExportConfig(calibration_rows=100, max_accuracy_drop=0, weight_scales="tensor"),
                       two_students[1], tiny_prepared, out, out.with_suffix(".int8.onnx"),
                       out.with_suffix(".export.json"), log=lambda m: None, out_dynamic=dyn,
                       mobile_dir=out.with_suffix(".mobile"))
    report = json.loads(out.with_suffix(".export.json").read_text())
    failed = [k for k, v in report["variants"].items() if not v["written"]]
    assert not fp16.exists() and not (mob / "s.fp16.ort").exists()
    for kind in failed:
        assert not Path(report["variants"][kind]["path"]).exists()
    onnx_files = [p for p in tmp_path.glob("*.onnx")]
    assert {_generation(p) for p in onnx_files} == {artifacts._sha256(two_students[1])}, onnx_files
    assert sorted(p.name for p in mob.glob("*.ort")) == sorted(f"{p.name.removesuffix('.onnx')}.ort"
                                                               for p in onnx_files)


# --------------------------------------------------------------------------------------------- bench
@pytest.fixture(scope="module")
def bench_report(tiny_teacher, tiny_prepared, tmp_path_factory):
    """A real report of a minimal bench (the teacher as its own candidate), and where it was published."""
    from stages.bench import BenchConfig, benchmark

    d = tmp_path_factory.mktemp("bench-publish")
    cfg = BenchConfig(threads=(1,), batches=(1,), warmup_count=2, warmup_s=0, min_count=5, min_s=0, trials=1,
                      iobinding=False)
    out = d / "b.json"
    benchmark(cfg, tiny_teacher, {"t": tiny_teacher}, tiny_prepared, out, d / "b.md", d / "b.csv",
              log=lambda m: None, plot_accuracy=d / "acc.png", plot_throughput=d / "tp.png")
    return json.loads(out.read_text()), d


def _bench_files(d: Path) -> list[Path]:
    return [d / "b.csv", d / "acc.png", d / "tp.png", d / "b.json", d / "b.md"]  # the order they are staged


def _publish_bench(report: dict, d: Path) -> None:
    from stages.bench import report as benchreport

    benchreport.publish(report, d / "b.json", d / "b.md", d / "b.csv", d / "acc.png", d / "tp.png")


def _full_report(report: dict) -> dict:
    """The published JSON keeps summaries only; the CSV wants every run's latencies back."""
    full = json.loads(json.dumps(report))
    for entry in full["models"].values():
        for r in entry["runs"]:
            r["latencies_s"] = [r["steady"]["p50"] * 1e-6]
    return full


def _old_set_and_newer(bench_report, folder: Path) -> tuple[dict, dict]:
    """A published bench set copied into ``folder`` (its bytes returned) and a newer report that
    differs in every text file."""
    report, src = bench_report
    for p in _bench_files(src):
        (folder / p.name).write_bytes(p.read_bytes())
    newer = _full_report(report)
    newer["settings"]["trials"] = 99  # something that shows in every text file
    return _bytes(_bench_files(folder)), newer


@pytest.mark.parametrize("at", range(5))
def test_bench_fails_at_each_file_and_publishes_nothing(bench_report, tmp_path, monkeypatch, at):
    before, newer = _old_set_and_newer(bench_report, tmp_path)
    _fail_staging_at(monkeypatch, at)
    with pytest.raises(ResourceError, match=r"no space left on device .*nothing was published"):
        _publish_bench(newer, tmp_path)
    assert _bytes(_bench_files(tmp_path)) == before and _leftovers(tmp_path) == []


@pytest.mark.parametrize("at", [3, 7])  # the old files half removed; two new files renamed
def test_bench_killed_between_its_renames(bench_report, tmp_path, monkeypatch, at):
    old, newer = _old_set_and_newer(bench_report, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(artifacts, "_apply", publication_steps(at))
        with pytest.raises(Killed):
            _publish_bench(newer, tmp_path)
    now = _bytes(_bench_files(tmp_path))
    assert tmp_path / "b.md" not in now  # make's target: only with a whole set
    kept_old = {p for p, b in now.items() if old[p] == b}
    assert not kept_old or kept_old == set(now), "files of two runs side by side"
    artifacts.claim(tmp_path / "b.md")
    artifacts.release(tmp_path / "b.md")
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["trials"] == 99
    assert all(p.exists() for p in _bench_files(tmp_path)) and _leftovers(tmp_path) == []
