"""Mutation check of the tests: each test listed here must fail for a plausible bug planted in the code.

    python tests/tools/mutation_check.py [--only NAME ...] [--out docs/checks/mutations.json] [--list]

For every entry of MUTATIONS: run its tests on the unchanged code (they must pass), plant ONE bug in
the production code (an exact textual replacement in one file), run the same tests again with
``pytest -x -q`` (they must fail: pytest exit status 1, failed tests, not a collection or usage
error), then put the file back byte for byte.  The file is restored in a ``finally``, so an error, a
timeout, Ctrl-C or SIGTERM restores it too, and the restored bytes are compared with the original.

Refuses to start when ``git status --porcelain`` shows a tracked file under pipeline/ or stages/
modified (a planted bug must never mix with real work, and the restore must give back a clean tree).

Writes a table to stdout and a JSON report (``--out``); exit 0 only when every entry passed clean
and failed mutated.  Standard library only; run from anywhere (it finds the repository root itself).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUARDED = ("pipeline/", "stages/")
TIMEOUT_S = 600  # per pytest run; a mutated run that hangs until then counts as not caught


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str            # short id, for --only
    tests: tuple         # pytest node ids that must catch the bug
    file: str            # production file, relative to the repository root
    old: str             # exact text, present exactly once in ``file``
    new: str             # the replacement: the planted bug
    bug: str             # one line: what a developer got wrong


MUTATIONS = [
    Mutation(
        "soft-diagnostics",
        ("tests/stages/test_cache_units.py::test_diagnostics_hand_computed",
         "tests/stages/test_cache_units.py::test_soft_targets_and_diagnostics_match_a_naive_reimplementation"),
        "pipeline/soft.py",
        '"ece": float(np.clip(np.abs(self.gap).sum() / lab, 0.0, 1.0)) if lab else nan,',
        '"ece": float(np.clip(np.abs(self.gap).sum() / self.rows, 0.0, 1.0)) if lab else nan,',
        "ECE divided by all rows instead of the labelled rows (unlabelled rows dilute the error)"),
    Mutation(
        "soft-geometric",
        ("tests/stages/test_cache_tools.py::test_add_temperature_to_new_file_uses_recorded_combine",),
        "pipeline/soft.py",
        "scaled = x.astype(np.float64) / x.shape[1] if w is None",
        "scaled = x.astype(np.float64) if w is None",
        "geometric combine sums the members' logits instead of averaging them (T silently divided by M)"),
    Mutation(
        "numeric-finite",
        ("tests/faults/test_faults_numeric.py::test_kd_loss_is_finite_for_huge_float32_logits",),
        "pipeline/losses.py",
        'return F.cross_entropy(student_logits, labels, ignore_index=-1, reduction="sum") / labelled',
        'return F.nll_loss(torch.log(F.softmax(student_logits, dim=-1)), labels, ignore_index=-1,\n'
        '                      reduction="sum") / labelled',
        "hard term as log(softmax(z)) instead of log_softmax: +inf (not NaN) once the softmax underflows"),
    Mutation(
        "hdf5-empty-split",
        ("tests/faults/test_faults_hdf5.py::test_prepared_labels_out_of_range_and_empty_split_are_refused",),
        "pipeline/formats/prepared.py",
        '            if rows[s] == 0:\n                raise DataError(f"{path}: the {s} split is empty")\n',
        "",
        "the empty-split check dropped: a prepared file with an empty train or test split opens"),
    Mutation(
        "inputs-provenance",
        ("tests/faults/test_faults_inputs.py::test_unchanged_inputs_pass",),
        "stages/student/stage.py",
        '{"cache": cache, "transfer_set": transfer_set}',
        '{"cache": cache, "transfer_set": cache}',
        "copy-paste in the student's provenance: the cache recorded as its transfer set"),
    Mutation(
        "member-checkpoint",
        ("tests/faults/test_faults_inputs.py::test_corrupt_member_checkpoint_is_refused_not_retrained",),
        "stages/teacher/stage.py",
        '    ckpt = read_checkpoint(path, role="teacher-member")\n',
        '    try:\n'
        '        ckpt = read_checkpoint(path, role="teacher-member")\n'
        '    except DataError as e:  # unreadable: train it again\n'
        '        log(f"{e}; retraining this member")\n'
        '        return None\n',
        "an unreadable member checkpoint is retrained over (and replaced) instead of exit 3"),
    Mutation(
        "onnx-tripwire",
        ("tests/faults/test_faults_onnx.py::test_cache_rejects_before_reading_rows",),
        "stages/cache/stage.py",
        "    teachers.check()  # a two-row trial run of each teacher, before any row is read\n",
        "    sample = info.load_raw(cfg.split, 0, 2)[0]  # two real rows for the trial run\n"
        "    teachers.check()\n",
        "rows read before the teachers are checked: a refused model has already made the cache read data"),
    Mutation(
        "kill-resume-row",
        ("tests/faults/test_faults_kill.py::test_kill_cache_never_publishes_a_partial",),
        "stages/cache/stage.py",
        '            start = lo + box["w"].committed_rows\n',
        '            start = lo + box["w"].committed_rows // cfg.batch_size\n',
        "resume offset read as a batch count: the rerun recomputes committed rows (its log still says the right row)"),
    Mutation(
        "bench-x-floor",
        ("tests/stages/test_bench.py::test_bench_report_sections_csv_and_plots",),
        "stages/bench/report.py",
        'floor = models.get(floor_name(e.get("input_dtype", "float32"), e["engine"]))',
        'floor = models.get(floor_name(e.get("input_dtype", "float32"), "onnxruntime"))',
        "wrong floor chosen: IOBinding rows' x floor divided by the session.run Identity floor"),
    Mutation(
        "fidelity-threshold",
        ("tests/stages/test_bench.py::test_fidelity_verdicts_on_both_sides_of_each_threshold",),
        "stages/bench/fidelity.py",
        '"ok": floor_ratio <= cfg.max_floor_ratio}}',
        '"ok": floor_ratio < cfg.max_floor_ratio}}',
        "off-by-one at the threshold: fp32 at exactly 2x the floor judged a miss (target is 'at most 2x')"),
    Mutation(
        "fidelity-median-round",
        ("tests/stages/test_bench.py::test_bench_fidelity_command",),
        "stages/bench/fidelity.py",
        "results[int(np.argsort(p50s)[(len(p50s) - 1) // 2])]",
        "results[int(np.argsort(p50s)[0])]",
        "bench-fidelity keeps the fastest round instead of the median round (same as the median of two)"),
    Mutation(
        "student-bench-median",
        ("tests/stages/test_student_modes.py::test_bench_student_writes_side_by_side_ratios",),
        "stages/student/measure.py",
        "med = {m: statistics.median(state[m][4]) for m in modes}",
        "med = {m: statistics.mean(state[m][4]) for m in modes}",
        "bench-student reports the mean epoch time as the median (and ratios of means)"),
    Mutation(
        "cache-bench-median",
        ("tests/stages/test_cache_bench.py::test_bench_speed_figures_follow_from_its_timings",),
        "stages/cache/measure.py",
        "rate = {k: cfg.rows / statistics.median(v) for k, v in times.items()}",
        "rate = {k: cfg.rows / statistics.mean(v) for k, v in times.items()}",
        "cache bench rows/s over the mean trial instead of the median trial"),
    Mutation(
        "calibration-percentile",
        ("tests/stages/test_export.py::test_each_calibration_method[percentile]",),
        "stages/export/quantize.py",
        '"percentile": CalibrationMethod.Percentile}[method]',
        '"percentile": CalibrationMethod.MinMax}[method]',
        "copy-paste in the calibration map: --calibration-method percentile runs MinMax"),
    Mutation(
        "e2e-int8-agreement",
        ("tests/e2e/test_pipeline.py::test_export_parity_and_int8",),
        "stages/export/quantize.py",
        '"agreement_with_fp32": float(np.mean(got == ref)),',
        '"agreement_with_fp32": float(np.mean(got == y)),',
        "int8 gate's agreement with fp32 computed against the labels (it reports test accuracy)"),
    Mutation(
        "fold-normalisation",
        ("tests/stages/test_export.py::test_folded_normalisation_matches_the_explicit_one",),
        "stages/export/graph.py",
        "    a = 1.0 / (float(scale) * _per_feature(std, shape))\n",
        "    a = 1.0 / (float(scale) * _per_feature(std, shape) + 1e-6)\n",
        "an epsilon guarding the fold's division by scale x std (logits off by ~2e-5 relative)"),
    Mutation(
        "benchstats-spread",
        ("tests/unit/test_benchstats.py::test_spread_verdict_on_both_sides_of_the_threshold",),
        "stages/bench/stats.py",
        "    if spread > max_spread:\n",
        "    if spread >= max_spread:\n",
        "off-by-one at the noisy threshold: a spread of exactly 10% judged noisy (documented: more than 10%)"),
    Mutation(
        "specs-dropout",
        ("tests/unit/test_specs.py::test_malformed_specs_are_a_usage_error_naming_the_spec",),
        "pipeline/specs.py",
        "or not 0 <= dropout < 1:",
        "or not 0 <= dropout <= 1:",
        "dropout=1 accepted (a network that zeroes every activation in training)"),
]


# ------------------------------------------------------------------------------------------ running
class Stop(Exception):
    """SIGTERM, raised in the main thread so that every ``finally`` (the restore) runs."""


def _on_term(signum, frame):
    raise Stop(f"signal {signum}")


def guarded_changes() -> list[str]:
    """Tracked files under pipeline/ or stages/ that differ from HEAD or the index."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *GUARDED], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def run_pytest(tests: tuple) -> tuple[int, float, str]:
    """``pytest -x -q`` on ``tests`` in its own process group: (exit status, seconds, output tail)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        out, rc = f"timed out after {TIMEOUT_S} s", -1
    finally:  # a timeout, Ctrl-C or SIGTERM: end the process group this run started (pytest, its children)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return rc, time.monotonic() - t0, out


def _summary(out: str) -> str:
    """The first failed test and the first line of its error (pytest's ``E`` lines), else the last line."""
    lines = [line for line in out.splitlines() if line.strip()]
    failed = next((line.split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))), None)
    error = next((line[1:].strip() for line in lines if line.startswith("E ")), None)
    if failed is None:
        return (lines[-1] if lines else "")[:300]
    return (failed + (f": {error}" if error else ""))[:300]


@contextlib.contextmanager
def planted(m: Mutation):
    """``m.file`` with the bug planted; restored byte for byte on exit, whatever ends the block."""
    path = ROOT / m.file
    original = path.read_bytes()
    text = original.decode()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.file}: the text to replace occurs {text.count(m.old)} times, not once")
    try:
        path.write_bytes(text.replace(m.old, m.new).encode())
        yield
    finally:  # Ctrl-C and SIGTERM are held back while the original bytes go back (delivered after)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            path.write_bytes(original)
            if path.read_bytes() != original:  # never leave a bug planted
                raise RuntimeError(f"{m.file}: could not be restored to its original bytes")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def check(m: Mutation, log) -> dict:
    row = {"name": m.name, "tests": list(m.tests), "file": m.file, "bug": m.bug, "passed_clean": False,
           "failed_mutated": False, "seconds": 0.0, "clean_seconds": 0.0, "mutated_seconds": 0.0,
           "mutated_status": None, "evidence": ""}
    t0 = time.monotonic()
    try:
        text = (ROOT / m.file).read_text()
        if text.count(m.old) != 1:
            row["evidence"] = f"invalid: the text to replace occurs {text.count(m.old)} times in {m.file}"
            return row
        log(f"[{m.name}] clean run of {len(m.tests)} test id(s)")
        rc, row["clean_seconds"], out = run_pytest(m.tests)
        row["passed_clean"] = rc == 0
        if rc != 0:
            row["evidence"] = f"invalid: clean run exited {rc}: {_summary(out)}"
            return row
        log(f"[{m.name}] planting: {m.bug}")
        with planted(m):
            rc, row["mutated_seconds"], out = run_pytest(m.tests)
        row["mutated_status"] = rc
        row["failed_mutated"] = rc == 1  # 1: tests ran and failed (not a usage/collection error or a timeout)
        row["evidence"] = _summary(out)
        return row
    finally:
        row["seconds"] = round(time.monotonic() - t0, 1)
        row["clean_seconds"] = round(row["clean_seconds"], 1)
        row["mutated_seconds"] = round(row["mutated_seconds"], 1)


def table(rows: list[dict]) -> str:
    head = f"{'entry':24} {'clean':6} {'caught':6} {'s':>6}  bug"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:24} {'pass' if r['passed_clean'] else 'FAIL':6} "
                     f"{'yes' if r['failed_mutated'] else 'NO':6} {r['seconds']:6.1f}  {r['bug']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="run this entry only (repeatable)")
    ap.add_argument("--out", default="docs/checks/mutations.json", help="JSON report (relative to the repository root)")
    ap.add_argument("--list", action="store_true", help="list the entries and exit")
    a = ap.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "duplicate entry names"
    if a.list:
        for m in MUTATIONS:
            print(f"{m.name:24} {m.file:32} {m.bug}")
        return 0
    todo = MUTATIONS
    if a.only:
        unknown = sorted(set(a.only) - set(names))
        if unknown:
            ap.error(f"unknown entries {unknown}; --list shows them")
        todo = [m for m in MUTATIONS if m.name in a.only]
    dirty = guarded_changes()
    if dirty:
        print("refusing to plant bugs: tracked files under pipeline/ or stages/ are modified:\n  "
              + "\n  ".join(dirty), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    t0, rows = time.monotonic(), []
    try:
        for m in todo:
            rows.append(check(m, log))
            r = rows[-1]
            log(f"[{m.name}] clean {'pass' if r['passed_clean'] else 'FAIL'}, mutated "
                f"{'caught' if r['failed_mutated'] else 'NOT caught'} ({r['seconds']:.0f} s): {r['evidence']}")
    except (KeyboardInterrupt, Stop) as e:
        log(f"interrupted ({type(e).__name__}); the planted file was restored; no report written")
        return 130
    finally:
        left = guarded_changes()
        if left:  # each file was compared with its original bytes already; this is the last word
            print("WARNING: pipeline/ or stages/ differ from git after the run:\n  " + "\n  ".join(left),
                  file=sys.stderr)
    total = round(time.monotonic() - t0, 1)
    ok = all(r["passed_clean"] and r["failed_mutated"] for r in rows)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"command": "python tests/tools/mutation_check.py" + "".join(f" --only {n}" for n in (a.only or [])),
              "commit": head, "python": platform.python_version(), "total_seconds": total, "all_caught": ok,
              "entries": rows}
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows))
    print(f"\n{sum(r['passed_clean'] and r['failed_mutated'] for r in rows)}/{len(rows)} caught; "
          f"{total:.0f} s; report -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
