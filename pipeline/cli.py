"""The ``distill`` command: one subcommand per stage; each only parses and calls its stage.

Every path is given by the caller (the Makefile names them); settings come from the stage's frozen
dataclass (``--help`` lists them), optionally from ``--config FILE.json``.  Errors end the command
with one line on stderr and the exit code of :mod:`pipeline.errors`.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click

from pipeline import config
from pipeline.errors import PipelineError

PathArg = click.Path(path_type=Path)


def _say(message: str) -> None:
    click.echo(message, err=True)


def stage_command(group: click.Group, name: str, settings: type, **kw: Any) -> Callable:
    """Register ``fn(cfg, **paths)`` as subcommand ``name`` with the options of ``settings``."""

    def decorate(fn: Callable) -> click.Command:
        @functools.wraps(fn)
        def run(config_file: Path | None, **kwargs: Any) -> None:
            overrides, paths = config.split_settings(settings, kwargs)
            try:
                cfg = config.load(settings, config_file, overrides)
                fn(cfg, **paths)
            except PipelineError as e:
                _say(f"distill {name}: error: {' '.join(str(e).split())}")  # always one line
                sys.exit(e.exit_code)
            except KeyboardInterrupt:
                _say(f"distill {name}: interrupted; nothing was published")
                sys.exit(130)

        cmd = config.options(settings)(run)
        return group.command(name, help=settings.__doc__, **kw)(cmd)

    return decorate


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

    Stages, in order: prepare -> teacher -> cache -> student -> export -> bench.
    """


from stages import bench as _bench  # noqa: E402 - stage modules after the group they join
from stages import cache as _cache  # noqa: E402
from stages import export as _export  # noqa: E402
from stages import prepare as _prepare  # noqa: E402
from stages import student as _student  # noqa: E402
from stages import teacher as _teacher  # noqa: E402


@stage_command(main, "prepare", _prepare.PrepareConfig)
@click.option("--source", type=PathArg, default=None, help="directory of MNIST-format IDX files "
              "[default: /usr/share/datasets/fashion-mnist unless --npz is given]")
@click.option("--npz", type=PathArg, default=None, help=".npz file with arrays x and y (y = -1: unlabelled)")
@click.option("--out", type=PathArg, required=True, help="prepared HDF5 file to write")
def prepare(cfg, source, npz, out):
    if source is None and npz is None:
        source = Path("/usr/share/datasets/fashion-mnist")
    _prepare.prepare_dataset(cfg, out, source=source, npz=npz)
    _say(f"prepared -> {out}")


@stage_command(main, "teacher", _teacher.TeacherConfig)
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (from `distill prepare`)")
@click.option("--out", type=PathArg, required=True, help="ensemble ONNX file; member checkpoints go beside it")
def teacher(cfg, prepared, out):
    _teacher.train_teachers(cfg, prepared, out, log=_say)


@main.group("cache", cls=DefaultGroup, default="build")
def cache_group() -> None:
    """Soft-target cache: build (default), and tools that work on an existing cache."""


@stage_command(cache_group, "build", _cache.CacheConfig)
@click.option("--teacher", "teachers", type=PathArg, multiple=True, required=True,
              help="teacher ONNX file (repeat for several; outputs are joined as members)")
@click.option("--transfer-set", type=PathArg, required=True, help="prepared dataset whose rows are the transfer set")
@click.option("--out", type=PathArg, required=True, help="cache HDF5 file to write")
def cache_build(cfg, teachers, transfer_set, out):
    _cache.cache_soft_targets(cfg, list(teachers), transfer_set, out, log=_say)


@main.group("student", cls=DefaultGroup, default="train")
def student_group() -> None:
    """Students distilled from the cache: train one (default), or sweep a grid."""


@stage_command(student_group, "train", _student.StudentConfig)
@click.option("--cache", "cache_path", type=PathArg, required=True, help="soft-target cache (from `distill cache`)")
@click.option("--transfer-set", type=PathArg, required=True, help="the prepared dataset the cache was built from")
@click.option("--out", type=PathArg, required=True, help="student checkpoint (.pt) to write")
@click.option("--metrics", type=PathArg, default=None, help="metrics JSON [default: <out>.metrics.json]")
def student(cfg, cache_path, transfer_set, out, metrics):
    metrics = metrics or out.with_suffix(".metrics.json")
    _student.distill_student(cfg, cache_path, transfer_set, out, metrics, log=_say)


@stage_command(main, "export", _export.ExportConfig)
@click.option("--checkpoint", type=PathArg, required=True, help="student checkpoint (from `distill student`)")
@click.option("--transfer-set", type=PathArg, required=True, help="prepared dataset (calibration and parity rows)")
@click.option("--out", type=PathArg, required=True, help="fp32 ONNX file to write")
@click.option("--int8", "out_int8", type=PathArg, default=None, help="int8 ONNX file [default: <out stem>.int8.onnx]")
@click.option("--report", type=PathArg, default=None, help="export check report [default: <out stem>.export.json]")
def export(cfg, checkpoint, transfer_set, out, out_int8, report):
    out_int8 = out_int8 or out.with_suffix(".int8.onnx")
    report = report or out.with_suffix(".export.json")
    _export.export_student(cfg, checkpoint, transfer_set, out, out_int8, report, log=_say)


def _candidates(values: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {v!r}", param_hint="--candidate")
        out[name] = Path(path)
    return out


@stage_command(main, "bench", _bench.BenchConfig)
@click.option("--teacher", "teacher_path", type=PathArg, required=True, help="teacher ensemble ONNX file")
@click.option("--candidate", "candidates", multiple=True, required=True, help="NAME=PATH of a student ONNX (repeat)")
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (test rows)")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
@click.option("--markdown", type=PathArg, default=None, help="Markdown report [default: <out stem>.md]")
@click.option("--csv", "csv_path", type=PathArg, default=None, help="CSV of every timed run [default: <out stem>.csv]")
def bench(cfg, teacher_path, candidates, prepared, out, markdown, csv_path):
    _bench.benchmark(cfg, teacher_path, _candidates(candidates), prepared, out,
                     markdown or out.with_suffix(".md"), csv_path or out.with_suffix(".csv"), log=_say)


if __name__ == "__main__":
    main()
