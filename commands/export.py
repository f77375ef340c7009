"""``distill export``: a student checkpoint to ONNX (fp32, int8 and the other variants), checked numerically."""
from __future__ import annotations

import click

from commands.main import PathArg, importing, say, stage_command
from stages.export.settings import ExportConfig


@stage_command("export", ExportConfig)
@click.option("--checkpoint", type=PathArg, required=True, help="student checkpoint (from `distill student`)")
@click.option("--transfer-set", type=PathArg, required=True, help="prepared dataset (calibration and parity rows)")
@click.option("--out", type=PathArg, required=True, help="fp32 ONNX file to write")
@click.option("--int8", "out_int8", type=PathArg, default=None, help="int8 ONNX file [default: <out stem>.int8.onnx]")
@click.option("--report", type=PathArg, default=None, help="export check report [default: <out stem>.export.json]")
@click.option("--dynamic-int8", "out_dynamic", type=PathArg, default=None,
              help="dynamic int8 ONNX file [default: none]")
@click.option("--fp16", "out_fp16", type=PathArg, default=None, help="fp16 ONNX file, for GPUs [default: none]")
@click.option("--teacher", default=None, help="teacher ONNX, optionally with its input contract (PATH[:key=value,...], "
              "as `distill cache --teacher`; docs/teachers.md): adds agreement with it to the gate")
@click.option("--mobile-dir", type=PathArg, default=None,
              help="folder for .ort files, required_operators.config [default: <out stem>.mobile]")
def export(cfg, checkpoint, transfer_set, out, out_int8, report, out_dynamic, out_fp16, teacher, mobile_dir):
    out_int8 = out_int8 or out.with_suffix(".int8.onnx")
    report = report or out.with_suffix(".export.json")
    with importing("the export stage"):
        from stages.export import export_student

    export_student(cfg, checkpoint, transfer_set, out, out_int8, report, log=say, teacher=teacher,
                   out_dynamic=out_dynamic, out_fp16=out_fp16, mobile_dir=mobile_dir or out.with_suffix(".mobile"))
