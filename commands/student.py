"""``distill student``: train one student from the cache (the default), sweep a grid, run the paper's
experiments, or time a student epoch."""
from __future__ import annotations

from collections.abc import Callable

import click

from commands.main import DefaultGroup, PathArg, importing, say, stage_command
from stages.student.settings import ExperimentConfig, StudentBenchConfig, StudentConfig, SweepConfig


def cache_inputs(fn: Callable) -> Callable:
    """``--cache`` and ``--transfer-set``: what every student command reads (x by row from the latter)."""
    fn = click.option("--transfer-set", type=PathArg, required=True,
                      help="the prepared dataset the cache was built from")(fn)
    return click.option("--cache", "cache_path", type=PathArg, required=True,
                        help="soft-target cache (from `distill cache`)")(fn)


@click.group("student", cls=DefaultGroup, default="train")
def student() -> None:
    """Students distilled from the cache: train one (default), or sweep a grid."""


@stage_command("train", StudentConfig, student)
@cache_inputs
@click.option("--out", type=PathArg, required=True, help="student checkpoint (.ckpt) to write")
@click.option("--metrics", type=PathArg, default=None, help="metrics JSON [default: <out>.metrics.json]")
def student_train(cfg, cache_path, transfer_set, out, metrics):
    metrics = metrics or out.with_suffix(".metrics.json")
    with importing("the student stage"):
        from stages.student import distill_student

    distill_student(cfg, cache_path, transfer_set, out, metrics, log=say)


@stage_command("sweep", SweepConfig, student)
@cache_inputs
@click.option("--work-dir", type=PathArg, required=True, help="folder for every student's checkpoint and metrics")
@click.option("--csv", "csv_path", type=PathArg, required=True, help="CSV of every student (+ <stem>.json)")
@click.option("--markdown", type=PathArg, default=None, help="Markdown table [default: <csv stem>.md]")
@click.option("--plot", type=PathArg, default=None, help="PNG plot [default: <csv stem>.png]")
@click.option("--teacher", type=PathArg, default=None, help="teacher ONNX of the cache: adds its test accuracy "
              "and the fraction of the gap closed")
def student_sweep(cfg, cache_path, transfer_set, work_dir, csv_path, markdown, plot, teacher):
    with importing("the student stage"):
        from stages.student import run_sweep

    run_sweep(cfg, cache_path, transfer_set, work_dir, csv_path, markdown or csv_path.with_suffix(".md"),
              plot or csv_path.with_suffix(".png"), teacher, log=say)


@stage_command("experiment", ExperimentConfig, student)
@cache_inputs
@click.option("--work-dir", type=PathArg, required=True, help="folder for every student's checkpoint and metrics")
@click.option("--markdown", type=PathArg, required=True, help="Markdown table to write (+ <stem>.json)")
def student_experiment(cfg, cache_path, transfer_set, work_dir, markdown):
    with importing("the student stage"):
        from stages.student import run_experiment

    run_experiment(cfg, cache_path, transfer_set, work_dir, markdown, log=say)


@stage_command("bench", StudentBenchConfig, student)
@cache_inputs
@click.option("--teacher", type=PathArg, required=True, help="teacher ensemble ONNX (run every step in online mode)")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
@click.option("--views-cache", type=PathArg, default=None, help="a views cache of the same transfer set: adds the "
              "views mode (one view per row per epoch, re-made on the fly)")
def student_bench(cfg, cache_path, transfer_set, teacher, out, views_cache):
    with importing("the student stage"):
        from stages.student import bench_student

    bench_student(cfg, cache_path, transfer_set, teacher, out, log=say, views_cache=views_cache)
