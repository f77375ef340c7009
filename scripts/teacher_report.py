"""A teacher ensemble's accuracy and NLL on the val and test splits, per member and combined, with
and without test-time augmentation (``tta=hflip``: the logits of each image and its mirror averaged),
fed exactly as the cache stage feeds it (pipeline.feed).  The ensemble is the arithmetic mean of the
members' softmaxes at T = 1, as the cache's default ``--combine arithmetic``.

    python scripts/teacher_report.py --teacher T.onnx --prepared P.h5 --out report.json
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from pipeline import contract as ct
from pipeline import feed, soft
from pipeline.formats.prepared import open_prepared


def scores(logits: np.ndarray, y: np.ndarray) -> dict:
    """``logits [rows, members, classes]`` -> accuracy of each member and of the ensemble, and the
    ensemble's mean negative log-likelihood (nats) of the true class."""
    probs = soft.combine_soft_targets(logits, 1.0)
    member = (logits.argmax(-1) == y[:, None]).mean(0)
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()
    return {"member_accuracy": [round(float(a), 4) for a in member],
            "ensemble_accuracy": round(float((probs.argmax(1) == y).mean()), 4), "ensemble_nll": round(float(nll), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    info = open_prepared(a.prepared)
    geom = ct.Geometry.of(info)
    report = {"teacher": a.teacher, "prepared": str(a.prepared)}
    for tta in ("none", "hflip"):
        sess, plan = feed.open_model(f"{a.teacher}:tta={tta}", geom, len(info.classes), "cpu",
                                     threads=os.cpu_count() or 1)
        for split in ("val", "test"):
            x, y = info.load_raw(split)
            report[f"{split}_tta_{tta}"] = scores(feed.run_model(sess, plan, x, geom), np.asarray(y))
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
