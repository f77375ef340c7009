"""``distill bench``: the edge benchmark (the default), the pick of a model from its report, and
``distill bench-fidelity``, the check of the harness itself."""
from __future__ import annotations

from pathlib import Path

import click

from commands.main import DefaultGroup, PathArg, importing, say, stage_command
from stages.bench.settings import BenchConfig, FidelityConfig, PickConfig

TEACHER_HELP = ("teacher ONNX file, optionally with its input contract: PATH[:key=value,...] as `distill cache "
                "--teacher` takes it (docs/teachers.md); undeclared fields come from the model's metadata, else the "
                "defaults")


def _candidates(values: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {v!r}", param_hint="--candidate")
        out[name] = Path(path)
    return out


@click.group("bench", cls=DefaultGroup, default="run")
def bench() -> None:
    """Edge benchmark: run it (default), or pick a model from its report under latency and size budgets."""


@stage_command("run", BenchConfig, bench)
@click.option("--teacher", "teacher_path", required=True, help=TEACHER_HELP)
@click.option("--candidate", "candidates", multiple=True, required=True, help="NAME=PATH of a student ONNX (repeat)")
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (test rows)")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
@click.option("--markdown", type=PathArg, default=None, help="Markdown report [default: <out stem>.md]")
@click.option("--csv", "csv_path", type=PathArg, default=None, help="CSV of every timed run [default: <out stem>.csv]")
@click.option("--torch", "torch_models", multiple=True,
              help="NAME=CHECKPOINT of a student .ckpt timed in PyTorch eager as NAME-torch (repeat)")
@click.option("--plot-accuracy", type=PathArg, default=None, help="PNG: accuracy against p50 latency [default: none]")
@click.option("--plot-throughput", type=PathArg, default=None,
              help="PNG: throughput against batch size [default: none]")
def bench_run(cfg, teacher_path, candidates, prepared, out, markdown, csv_path, torch_models, plot_accuracy,
              plot_throughput):
    with importing("the bench stage"):
        from stages.bench import benchmark

    benchmark(cfg, teacher_path, _candidates(candidates), prepared, out,
              markdown or out.with_suffix(".md"), csv_path or out.with_suffix(".csv"), log=say,
              torch_models=_candidates(torch_models), plot_accuracy=plot_accuracy,
              plot_throughput=plot_throughput)


@stage_command("pick", PickConfig, bench)
@click.option("--report", type=PathArg, required=True, help="bench report JSON (from `distill bench`)")
@click.option("--out", type=PathArg, default=None, help="also write the decision as JSON here [default: none]")
def bench_pick(cfg, report, out):
    with importing("the bench stage"):
        from stages.bench import pick_model

    pick_model(cfg, report, out, echo=click.echo)


@stage_command("bench-fidelity", FidelityConfig)
@click.option("--teacher", "teacher_path", required=True, help=TEACHER_HELP)
@click.option("--student", type=PathArg, required=True, help="fp32 student ONNX file")
@click.option("--student-int8", type=PathArg, required=True,
              help="int8 student ONNX file (taking normalised rows or, raw-input export, uint8 pixels)")
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (test rows)")
@click.option("--out", type=PathArg, required=True, help="fidelity JSON to write")
def bench_fidelity(cfg, teacher_path, student, student_int8, prepared, out):
    with importing("the bench stage"):
        from stages.bench import check_fidelity

    check_fidelity(cfg, teacher_path, student, student_int8, prepared, out, log=say)
