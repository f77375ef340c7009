"""``distill teacher``: train the teacher ensemble and export it as one ONNX graph."""
from __future__ import annotations

import click

from commands.main import PathArg, importing, say, stage_command
from stages.teacher.settings import TeacherConfig


@stage_command("teacher", TeacherConfig, renamed={"shift": "max_shift"})
@click.option("--prepared", type=PathArg, required=True, help="prepared dataset (from `distill prepare`)")
@click.option("--out", type=PathArg, required=True, help="ensemble ONNX file; member checkpoints go beside it")
def teacher(cfg, prepared, out):
    with importing("the teacher stage"):
        from stages.teacher import train_teachers

    train_teachers(cfg, prepared, out, log=say)
