"""``distill cache``: build the soft-target cache (the default), and the tools on a finished cache."""
from __future__ import annotations

from pathlib import Path

import click

from commands.main import DefaultGroup, PathArg, importing, say, stage_command
from stages.cache.settings import (
    AddTemperatureConfig,
    CacheBenchConfig,
    CacheConfig,
    CacheScaleConfig,
    MergeConfig,
    VerifyConfig,
)

TEACHER_HELP = ("teacher ONNX file, optionally with its input contract: PATH[:input=raw|unit|normalised,"
                "layout=same|nchw|nhwc|flat|flat-nhwc,mean=M[/M..],std=S[/S..],dtype=float32|uint8,output=NAME] "
                "(a path with ':' ends with one more ':'); repeat for several, outputs are joined as members; "
                "undeclared fields come from the model's metadata, else the defaults (docs/teachers.md)")


def _plot_cache(cache: Path, plot: Path) -> None:
    with importing("pipeline.formats.cache"):
        from pipeline.formats.cache import open_cache
    with importing("the cache stage"):
        from stages.cache import plot_diagnostics

    plot_diagnostics(open_cache(cache).diagnostics(), plot)


@click.group("cache", cls=DefaultGroup, default="build")
def cache() -> None:
    """Soft-target cache: build (default), and tools that work on an existing cache."""


@stage_command("build", CacheConfig, cache, renamed={"view_shift": "view_max_shift"})
@click.option("--teacher", "teachers", multiple=True, required=True, help=TEACHER_HELP)
@click.option("--transfer-set", type=PathArg, required=True, help="prepared dataset whose rows are the transfer set")
@click.option("--out", type=PathArg, required=True, help="cache HDF5 file to write (a shard writes "
              "<out stem>.part<i>of<n><suffix>)")
@click.option("--plot", type=PathArg, default=None, help="also plot entropy and accuracy against T to this PNG")
def cache_build(cfg, teachers, transfer_set, out, plot):
    with importing("the cache stage"):
        from stages.cache import cache_soft_targets

    written = cache_soft_targets(cfg, list(teachers), transfer_set, out, log=say)
    if plot is not None:
        _plot_cache(written, plot)


@stage_command("add-temperature", AddTemperatureConfig, cache)
@click.argument("cache_path", type=PathArg)
@click.option("--out", type=PathArg, default=None,
              help="write the extended cache here [default: replace FILE atomically]")
@click.option("--plot", type=PathArg, default=None, help="also plot entropy and accuracy against T to this PNG")
def cache_add_temperature(cfg, cache_path, out, plot):
    with importing("the cache stage"):
        from stages.cache import add_temperature

    written = add_temperature(cfg, cache_path, out, log=say)
    if plot is not None:
        _plot_cache(written, plot)


@stage_command("verify", VerifyConfig, cache)
@click.argument("cache_path", type=PathArg)
@click.option("--teacher", "teachers", multiple=True, required=True,
              help="teacher ONNX file the cache was built from (repeat, in the same order); it is fed as the "
                   "cache recorded, so a declaration (PATH:...) is only checked against that record")
@click.option("--transfer-set", type=PathArg, required=True, help="prepared dataset the cache was built from")
def cache_verify(cfg, cache_path, teachers, transfer_set):
    with importing("the cache stage"):
        from stages.cache import verify

    verify(cfg, cache_path, list(teachers), transfer_set, log=say)


@stage_command("merge", MergeConfig, cache)
@click.option("--part", "parts", type=PathArg, multiple=True, required=True,
              help="a shard's part file (repeat for each)")
@click.option("--out", type=PathArg, required=True, help="merged cache HDF5 file to write")
def cache_merge(cfg, parts, out):
    with importing("the cache stage"):
        from stages.cache import merge

    merge(cfg, list(parts), out, log=say)


@stage_command("bench", CacheBenchConfig, cache)
@click.option("--work", type=PathArg, required=True, help="folder for the synthetic inputs")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
def cache_bench(cfg, work, out):
    with importing("the cache stage"):
        from stages.cache import bench_speed

    bench_speed(cfg, work, out, log=say)


@stage_command("bench-scale", CacheScaleConfig, cache)
@click.option("--work", type=PathArg, required=True, help="folder for the synthetic inputs (GBs at 1M rows)")
@click.option("--out", type=PathArg, required=True, help="report JSON to write")
def cache_bench_scale(cfg, work, out):
    with importing("the cache stage"):
        from stages.cache import bench_scale

    bench_scale(cfg, work, out, log=say)
