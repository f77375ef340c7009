"""The ``distill`` command: one subcommand per stage; each only parses and calls its stage.

Every path is given by the caller (the Makefile names them); settings come from the stage's frozen
dataclass (``--help`` lists them), optionally from ``--config FILE.json``.  Errors end the command
with one line on stderr and the exit code of :mod:`pipeline.errors`; a resource fault that no stage
turned into a ResourceError (a full disk under a temporary folder, an allocation that failed deep in
numpy, torch or onnxruntime) is turned into one here (exit 7), naming for memory the setting that
lowers the command's footprint (``FOOTPRINT`` of its settings class).

Lazy: this module imports only the stages' settings modules (no torch, no onnxruntime); a command
imports its stage's code when it runs, so ``distill --help`` and ``distill <stage> --help`` are fast
(``tests/unit/test_cli_lazy.py`` checks ``sys.modules``).
"""
from __future__ import annotations

import functools
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import click

from pipeline import config, resources
from pipeline.errors import PipelineError

PathArg = click.Path(path_type=Path)


def _say(message: str) -> None:
    click.echo(message, err=True)


def stage_command(group: click.Group, name: str, settings: type, **kw: Any) -> Callable:
    """Register ``fn(cfg, **paths)`` as subcommand ``name`` with the options of ``settings``."""

    # the command as the user typed it: `cache merge`, not `merge` (defaults of a group stay implicit)
    where = (name if group is main else group.name if getattr(group, "default", None) == name
             else f"{group.name} {name}")

    def decorate(fn: Callable) -> click.Command:
        @functools.wraps(fn)
        def run(config_file: Path | None, **kwargs: Any) -> None:
            # A write past `ulimit -f` raises SIGXFSZ, whose default action kills the process (and
            # dumps core) before the write can fail.  CPython already ignores it at start-up; say so
            # here too, for embedders and forks that restore default signals, so that such a write
            # fails with EFBIG and is reported like a full disk (exit 7).
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            overrides, paths = config.split_settings(settings, kwargs)
            cfg = None
            try:
                cfg = config.load(settings, config_file, overrides)
                fn(cfg, **paths)
            except PipelineError as e:
                _fail(where, e)
            except KeyboardInterrupt:
                _say(f"distill {where}: interrupted; nothing was published")
                sys.exit(130)
            except Exception as e:  # noqa: BLE001 - a resource fault becomes exit 7, anything else stays a bug
                err = resources.as_resource_error(e, _footprint(settings, cfg))
                if err is None:
                    raise
                _fail(where, err)

        cmd = config.options(settings)(run)
        return group.command(name, help=settings.__doc__, **kw)(cmd)

    return decorate


def _fail(where: str, e: PipelineError) -> None:
    _say(f"distill {where}: error: {' '.join(str(e).split())}")  # always one line
    sys.exit(e.exit_code)


def _footprint(settings: type, cfg: Any) -> str:
    """The settings class's ``FOOTPRINT`` hint with the values in force (``{batch_size}`` -> 1024)."""
    hint = getattr(settings, "FOOTPRINT", "")
    try:
        return hint.format(**config.to_dict(cfg if cfg is not None else settings()))
    except Exception:  # noqa: BLE001 - settings without defaults for every field: the hint without values
        return re.sub(r" \(now \{\w+\}\)", "", hint)


def cache_inputs(fn: Callable) -> Callable:
    """``--cache`` and ``--transfer-set``: what every student command reads (x by row from the latter)."""
    fn = click.option("--transfer-set", type=PathArg, required=True,
                      help="the prepared dataset the cache was built from")(fn)
    return click.option("--cache", "cache_path", type=PathArg, required=True,
                        help="soft-target cache (from `distill cache`)")(fn)


class DefaultGroup(click.Group):
    """A group that runs its ``default`` subcommand when the first argument names no other one
    (``distill cache --teacher ...`` builds; ``distill cache verify FILE`` verifies)."""

    def __init__(self, *args: Any, default: str, **kw: Any):
        super().__init__(*args, **kw)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Distil a teacher ensemble into a small, fast edge model (Hinton, Vinyals & Dean 2015).

    Stages, in order: prepare (-> jitter) -> teacher -> cache -> student -> export -> bench.
    """


from stages.augment.settings import JitterConfig  # noqa: E402 - settings only: torch-free
from stages.bench.settings import BenchConfig, FidelityConfig, PickConfig  # noqa: E402
from stages.cache.settings import (AddTemperatureConfig, CacheBenchConfig, CacheConfig,  # noqa: E402
                                   CacheScaleConfig, MergeConfig, VerifyConfig)
from stages.export.settings import ExportConfig  # noqa: E402
from stages.prepare.settings import PrepareConfig  # noqa: E402
from stages.student.settings import ExperimentConfig, StudentBenchConfig, StudentConfig, SweepConfig  # noqa: E402
from stages.teacher.settings import TeacherConfig  # noqa: E402


@stage_command(main, "prepare", PrepareConfig)
@click.option("--source", type=PathArg, default=None, help="directory of MNIST-format IDX files "
              "[default: /usr/share/datasets/fashion-mnist unless --npz or --image-folder is given]")
@click.option("--npz", type=PathArg, default=None, help=".npz file with arrays x and y (y = -1: unlabelled), "
              "optionally x_test and y_test; x laid out as --layout says")
@click.option("--image-folder", type=PathArg, default=None, help="folder of PNG/JPEG images: one subfolder per "
              "class, or train/ and test/ each with one subfolder per class (see --size, --mode)")
@click.option("--out", type=PathArg, required=True, help="prepared HDF5 file to write")
def prepare(cfg, source, npz, image_folder, out):
    if source is None and npz is None and image_folder is None:
        source = Path("/usr/share/datasets/fashion-mnist")
    from stages.prepare import prepare_dataset

    prepare_dataset(cfg, out, source=source, npz=npz, image_folder=image_folder, log=_say)
    _say(f"prepared -> {out}")


@stage_command(main, "jitter", JitterConfig)
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (from `distill prepare`)")
@click.option("--out", type=PathArg, required=True, help="prepared HDF5 file to write (the enlarged transfer set)")
def jitter(cfg, prepared, out):
    from stages.augment import jitter_transfer_set

    jitter_transfer_set(cfg, prepared, out, log=_say)


@stage_command(main, "teacher", TeacherConfig)
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (from `distill prepare`)")
@click.option("--out", type=PathArg, required=True, help="ensemble ONNX file; member checkpoints go beside it")
def teacher(cfg, prepared, out):
    from stages.teacher import train_teachers

    train_teachers(cfg, prepared, out, log=_say)


def _plot_cache(cache: Path, plot: Path) -> None:
    from pipeline.formats.cache import open_cache
    from stages.cache import plot_diagnostics

    plot_diagnostics(open_cache(cache).diagnostics(), plot)


@main.group("cache", cls=DefaultGroup, default="build")
def cache_group() -> None:
    """Soft-target cache: build (default), and tools that work on an existing cache."""


TEACHER_HELP = ("teacher ONNX file, optionally with its input contract: PATH[:input=raw|unit|normalised,"
                "layout=same|nchw|nhwc|flat|flat-nhwc,mean=M[/M..],std=S[/S..],dtype=float32|uint8,output=NAME] "
                "(a path with ':' ends with one more ':'); repeat for several, outputs are joined as members; "
                "undeclared fields come from the model's metadata, else the defaults (docs/teachers.md)")


@stage_command(cache_group, "build", CacheConfig)
@click.option("--teacher", "teachers", multiple=True, required=True, help=TEACHER_HELP)
@click.option("--transfer-set", type=PathArg, required=True, help="prepared dataset whose rows are the transfer set")
@click.option("--out", type=PathArg, required=True, help="cache HDF5 file to write (a shard writes "
              "<out stem>.part<i>of<n><suffix>)")
@click.option("--plot", type=PathArg, default=None, help="also plot entropy and accuracy against T to this PNG")
def cache_build(cfg, teachers, transfer_set, out, plot):
    from stages.cache import cache_soft_targets

    written = cache_soft_targets(cfg, list(teachers), transfer_set, out, log=_say)
    if plot is not None:
        _plot_cache(written, plot)


@stage_command(cache_group, "add-temperature", AddTemperatureConfig)
@click.argument("cache_path", type=PathArg)
@click.option("--out", type=PathArg, default=None, help="write the extended cache here [default: replace FILE atomically]")
@click.option("--plot", type=PathArg, default=None, help="also plot entropy and accuracy against T to this PNG")
def cache_add_temperature(cfg, cache_path, out, plot):
    from stages.cache import add_temperature

    written = add_temperature(cfg, cache_path, out, log=_say)
    if plot is not None:
        _plot_cache(written, plot)


@stage_command(cache_group, "verify", VerifyConfig)
@click.argument("cache_path", type=PathArg)
@click.option("--teacher", "teachers", multiple=True, required=True,
              help="teacher ONNX file the cache was built from (repeat, in the same order); it is fed as the "
                   "cache recorded, so a declaration (PATH:...) is only checked against that record")
@click.option("--transfer-set", type=PathArg, required=True, help="prepared dataset the cache was built from")
def cache_verify(cfg, cache_path, teachers, transfer_set):
    from stages.cache import verify

    verify(cfg, cache_path, list(teachers), transfer_set, log=_say)


@stage_command(cache_group, "merge", MergeConfig)
@click.option("--part", "parts", type=PathArg, multiple=True, required=True, help="a shard's part file (repeat for each)")
@click.option("--out", type=PathArg, required=True, help="merged cache HDF5 file to write")
def cache_merge(cfg, parts, out):
    from stages.cache import merge

    merge(cfg, list(parts), out, log=_say)


@stage_command(cache_group, "bench", CacheBenchConfig)
@click.option("--work", type=PathArg, required=True, help="folder for the synthetic inputs")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
def cache_bench(cfg, work, out):
    from stages.cache import bench_speed

    bench_speed(cfg, work, out, log=_say)


@stage_command(cache_group, "bench-scale", CacheScaleConfig)
@click.option("--work", type=PathArg, required=True, help="folder for the synthetic inputs (GBs at 1M rows)")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
def cache_bench_scale(cfg, work, out):
    from stages.cache import bench_scale

    bench_scale(cfg, work, out, log=_say)


@main.group("student", cls=DefaultGroup, default="train")
def student_group() -> None:
    """Students distilled from the cache: train one (default), or sweep a grid."""


@stage_command(student_group, "train", StudentConfig)
@cache_inputs
@click.option("--out", type=PathArg, required=True, help="student checkpoint (.ckpt) to write")
@click.option("--metrics", type=PathArg, default=None, help="metrics JSON [default: <out>.metrics.json]")
def student(cfg, cache_path, transfer_set, out, metrics):
    metrics = metrics or out.with_suffix(".metrics.json")
    from stages.student import distill_student

    distill_student(cfg, cache_path, transfer_set, out, metrics, log=_say)


@stage_command(student_group, "sweep", SweepConfig)
@cache_inputs
@click.option("--work-dir", type=PathArg, required=True, help="folder for every student's checkpoint and metrics")
@click.option("--csv", "csv_path", type=PathArg, required=True, help="CSV of every student (+ <stem>.json)")
@click.option("--markdown", type=PathArg, default=None, help="Markdown table [default: <csv stem>.md]")
@click.option("--plot", type=PathArg, default=None, help="PNG plot [default: <csv stem>.png]")
@click.option("--teacher", type=PathArg, default=None, help="teacher ONNX of the cache: adds its test accuracy "
              "and the fraction of the gap closed")
def student_sweep(cfg, cache_path, transfer_set, work_dir, csv_path, markdown, plot, teacher):
    from stages.student import run_sweep

    run_sweep(cfg, cache_path, transfer_set, work_dir, csv_path, markdown or csv_path.with_suffix(".md"),
                 plot or csv_path.with_suffix(".png"), teacher, log=_say)


@stage_command(student_group, "experiment", ExperimentConfig)
@cache_inputs
@click.option("--work-dir", type=PathArg, required=True, help="folder for every student's checkpoint and metrics")
@click.option("--markdown", type=PathArg, required=True, help="Markdown table to write (+ <stem>.json)")
def student_experiment(cfg, cache_path, transfer_set, work_dir, markdown):
    from stages.student import run_experiment

    run_experiment(cfg, cache_path, transfer_set, work_dir, markdown, log=_say)


@stage_command(student_group, "bench", StudentBenchConfig)
@cache_inputs
@click.option("--teacher", type=PathArg, required=True, help="teacher ensemble ONNX (run every step in online mode)")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
@click.option("--views-cache", type=PathArg, default=None, help="a views cache of the same transfer set: adds the "
              "views mode (one view per row per epoch, re-made on the fly)")
def student_bench(cfg, cache_path, transfer_set, teacher, out, views_cache):
    from stages.student import bench_student

    bench_student(cfg, cache_path, transfer_set, teacher, out, log=_say, views_cache=views_cache)


@stage_command(main, "export", ExportConfig)
@click.option("--checkpoint", type=PathArg, required=True, help="student checkpoint (from `distill student`)")
@click.option("--transfer-set", type=PathArg, required=True, help="prepared dataset (calibration and parity rows)")
@click.option("--out", type=PathArg, required=True, help="fp32 ONNX file to write")
@click.option("--int8", "out_int8", type=PathArg, default=None, help="int8 ONNX file [default: <out stem>.int8.onnx]")
@click.option("--report", type=PathArg, default=None, help="export check report [default: <out stem>.export.json]")
@click.option("--dynamic-int8", "out_dynamic", type=PathArg, default=None, help="dynamic int8 ONNX file [default: none]")
@click.option("--fp16", "out_fp16", type=PathArg, default=None, help="fp16 ONNX file, for GPUs [default: none]")
@click.option("--teacher", type=PathArg, default=None, help="teacher ensemble ONNX: adds agreement with it to the gate")
@click.option("--mobile-dir", type=PathArg, default=None,
              help="folder for .ort files, required_operators.config [default: <out stem>.mobile]")
def export(cfg, checkpoint, transfer_set, out, out_int8, report, out_dynamic, out_fp16, teacher, mobile_dir):
    out_int8 = out_int8 or out.with_suffix(".int8.onnx")
    report = report or out.with_suffix(".export.json")
    from stages.export import export_student

    export_student(cfg, checkpoint, transfer_set, out, out_int8, report, log=_say, teacher=teacher,
                           out_dynamic=out_dynamic, out_fp16=out_fp16,
                           mobile_dir=mobile_dir or out.with_suffix(".mobile"))


def _candidates(values: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {v!r}", param_hint="--candidate")
        out[name] = Path(path)
    return out


@main.group("bench", cls=DefaultGroup, default="run")
def bench_group() -> None:
    """Edge benchmark: run it (default), or pick a model from its report under latency and size budgets."""


@stage_command(bench_group, "run", BenchConfig)
@click.option("--teacher", "teacher_path", type=PathArg, required=True, help="teacher ensemble ONNX file")
@click.option("--candidate", "candidates", multiple=True, required=True, help="NAME=PATH of a student ONNX (repeat)")
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (test rows)")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
@click.option("--markdown", type=PathArg, default=None, help="Markdown report [default: <out stem>.md]")
@click.option("--csv", "csv_path", type=PathArg, default=None, help="CSV of every timed run [default: <out stem>.csv]")
@click.option("--torch", "torch_models", multiple=True,
              help="NAME=CHECKPOINT of a student .ckpt timed in PyTorch eager as NAME-torch (repeat)")
@click.option("--plot-accuracy", type=PathArg, default=None, help="PNG: accuracy against p50 latency [default: none]")
@click.option("--plot-throughput", type=PathArg, default=None, help="PNG: throughput against batch size [default: none]")
def bench(cfg, teacher_path, candidates, prepared, out, markdown, csv_path, torch_models, plot_accuracy,
          plot_throughput):
    from stages.bench import benchmark

    benchmark(cfg, teacher_path, _candidates(candidates), prepared, out,
                     markdown or out.with_suffix(".md"), csv_path or out.with_suffix(".csv"), log=_say,
                     torch_models=_candidates(torch_models), plot_accuracy=plot_accuracy,
                     plot_throughput=plot_throughput)


@stage_command(bench_group, "pick", PickConfig)
@click.option("--report", type=PathArg, required=True, help="bench report JSON (from `distill bench`)")
@click.option("--out", type=PathArg, default=None, help="also write the decision as JSON here [default: none]")
def bench_pick(cfg, report, out):
    from pipeline.artifacts import write_json
    from pipeline.config import to_dict
    from pipeline.formats.bench_report import read_bench_report
    from stages.bench.choice import describe, pick

    decision = pick(read_bench_report(report), **to_dict(cfg))
    for line in describe(decision):
        click.echo(line)
    if out is not None:
        write_json(out, {"report": str(report), **decision})


@stage_command(main, "bench-fidelity", FidelityConfig)
@click.option("--teacher", "teacher_path", type=PathArg, required=True, help="teacher ensemble ONNX file")
@click.option("--student", type=PathArg, required=True, help="fp32 student ONNX file")
@click.option("--student-int8", type=PathArg, required=True,
              help="int8 student ONNX file (taking normalised rows or, raw-input export, uint8 pixels)")
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (test rows)")
@click.option("--out", type=PathArg, required=True, help="fidelity JSON to write")
def bench_fidelity(cfg, teacher_path, student, student_int8, prepared, out):
    from stages.bench import check_fidelity

    check_fidelity(cfg, teacher_path, student, student_int8, prepared, out, log=_say)


if __name__ == "__main__":
    main()
