"""``distill jitter``: a prepared transfer set enlarged with shifted copies of its training rows."""
from __future__ import annotations

import click

from commands.main import PathArg, importing, say, stage_command
from stages.jitter.settings import JitterConfig


@stage_command("jitter", JitterConfig)
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (from `distill prepare`)")
@click.option("--out", type=PathArg, required=True, help="prepared HDF5 file to write (the enlarged transfer set)")
def jitter(cfg, prepared, out):
    with importing("the jitter stage"):
        from stages.jitter import jitter_transfer_set

    jitter_transfer_set(cfg, prepared, out, log=say)
