"""Mobile and embedded deliverables of the export, all made by onnxruntime's own tools.

- ORT format (``.ort``): ``onnxruntime.tools.convert_onnx_models_to_ort`` (optimisation style
  *Fixed*, level *all*: the graph a minimal build loads without an optimiser).
- Operator config for a reduced build (``required_operators.config``): written by the same
  conversion from the converted models (its ``create_config_from_models``), one file covering every
  shipped variant; pass it to onnxruntime's ``build.py --include_ops_by_config``.
- Mobile usability (NNAPI / CoreML coverage): ``onnxruntime.tools.mobile_helpers.usability_checker``
  (what ``python -m onnxruntime.tools.check_onnx_model_mobile_usability`` runs).  That tool only
  logs; its log is kept verbatim and its verdict lines ("Model should perform well with <EP> as is:
  YES|MAYBE|NO", and the same if the input shapes were fixed) are summarised.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from pathlib import Path

from pipeline import resources
from pipeline.artifacts import OutputSet, output, write_text

CONFIG_NAME = "required_operators.config"
_VERDICT = re.compile(r"Model should perform well with (.+?) (as is|if modified to have fixed input shapes): (\w+)")
_PARTITIONS = re.compile(r"(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+?) EP")


def convert_to_ort(models: dict[str, Path], out_dir: Path, into: OutputSet | None = None) -> dict:
    """Convert ``models`` (stem -> ONNX file) to ``out_dir/<stem>.ort`` and write one
    ``out_dir/required_operators.config`` for all of them; published with the set ``into`` (the
    export's), else each file atomically.
    Returns {"ort": {stem: path}, "operator_config": path, "operators": [config lines]}."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with resources.temporary_folder() as tmp:  # a full TMPDIR is one line naming it (exit 7)
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        for stem, path in models.items():
            shutil.copyfile(path, src / f"{stem}.onnx")
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # "Created config in <tmp>"
        with contextlib.redirect_stdout(io.StringIO()):  # the tool prints progress on stdout
            try:
                convert_onnx_models_to_ort(src, output_dir=dst, optimization_styles=[OptimizationStyle.Fixed])
            except Exception as e:  # onnxruntime says only "Failed to save ...", no errno
                if "Failed to save" not in str(e):
                    raise
                raise resources.write_failure(dst, None, "a temporary folder: point TMPDIR at one with space; "
                                                         "nothing was published") from None
        written = {}
        for stem in models:
            written[stem] = out_dir / f"{stem}.ort"
            with output(written[stem], into) as part:
                shutil.copyfile(dst / f"{stem}.ort", part)
        config = (dst / CONFIG_NAME).read_text()
        # the tool names the temporary files it read; name the published ones instead
        config = config.replace(str(dst) + "/", "")
        cfg_path = write_text(out_dir / CONFIG_NAME, config, into)
    ops = [line for line in config.splitlines() if line and not line.startswith("#")]
    return {"ort": {k: str(v) for k, v in written.items()}, "operator_config": str(cfg_path), "operators": ops}


def usability(model: Path, shown: Path | None = None) -> dict:
    """onnxruntime's mobile usability analysis of ``model``: per execution provider the verdict as
    exported and with fixed input shapes, the partition coverage, and the tool's full log (naming the
    file as ``shown``, its published path, when ``model`` is a staged copy)."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    logger = logging.getLogger(f"edge_distill.usability.{id(model)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger.addHandler(handler)
    try:
        worth_trying = usability_checker.analyze_model(Path(model), skip_optimize=False, logger=logger)
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue().replace(str(model), str(shown or model))
    return {"worth_trying_nnapi_or_coreml": bool(worth_trying), "providers": summarise_log(text),
            "log": text.splitlines()}


def summarise_log(text: str) -> dict:
    """{EP: {"as_is": verdict, "fixed_shapes": verdict or None, "nodes_supported": "a/b"}} from the
    usability checker's log (the first partition line of an EP is the model as exported)."""
    out: dict[str, dict] = {}
    for m in _PARTITIONS.finditer(text):
        out.setdefault(m.group(4), {}).setdefault("nodes_supported", f"{m.group(2)}/{m.group(3)}")
    for m in _VERDICT.finditer(text):
        key = "as_is" if m.group(2) == "as is" else "fixed_shapes"
        out.setdefault(m.group(1), {})[key] = m.group(3)
    for v in out.values():
        v.setdefault("fixed_shapes", None)
    return out
