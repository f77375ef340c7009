"""What float16 logits in the cache do to a student (``--logits-dtype float16``): two caches of the same teacher and
rows, float32 and float16 logits, and one student from each (same settings and seed).

    python scripts/fp16_logits_effect.py --prepared P --teacher T.onnx --cache32 C32 --cache16 C16 \
        --student32 S32.ckpt --student16 S16.ckpt --temperature 4 [--out F.json]

Reports the caches' bytes, the largest |difference| of their logits and soft targets at the
temperature, their mean KL (nats), and for each student its test accuracy, its agreement with the
teacher ensemble on the test split, and the agreement of the two students with each other.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import inference, models, soft
from pipeline.formats.cache import open_cache
from pipeline.formats.prepared import open_prepared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("prepared", "teacher", "cache32", "cache16", "student32", "student16"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    c32, c16 = open_cache(a.cache32), open_cache(a.cache16)
    l32, l16 = c32.read("logits").astype(np.float64), c16.read("logits").astype(np.float64)
    p32, p16 = (soft.targets(c.stored(T=a.temperature), a.temperature).astype(np.float64) for c in (c32, c16))
    kl = np.sum(p32 * (np.log(np.clip(p32, 1e-30, None)) - np.log(np.clip(p16, 1e-30, None))), axis=1)
    info = open_prepared(a.prepared)
    xt, yt = info.load("test")
    teacher = inference.predict_proba(a.teacher, xt).argmax(1)
    preds = {}
    for tag, path in (("float32", a.student32), ("float16", a.student16)):
        net, _ = models.load(path)
        preds[tag] = models.predict(net, xt).argmax(1).numpy()
    report = {
        "temperature": a.temperature,
        "cache_bytes": {"float32": a.cache32.stat().st_size, "float16": a.cache16.stat().st_size},
        "logits_bytes": {"float32": int(l32.size * 4), "float16": int(l16.size * 2)},
        "max_abs_logit_diff": float(np.max(np.abs(l32 - l16))),
        "max_abs_soft_diff": float(np.max(np.abs(p32 - p16))),
        "mean_kl_float32_to_float16_nats": float(kl.mean()),
        "students": {tag: {"test_accuracy": float(np.mean(p == yt)),
                           "agreement_with_teacher": float(np.mean(p == teacher))} for tag, p in preds.items()},
        "agreement_between_students": float(np.mean(preds["float32"] == preds["float16"])),
        "teacher_test_accuracy": float(np.mean(teacher == yt)),
        "inputs": {k: str(getattr(a, k)) for k in ("prepared", "teacher", "cache32", "cache16", "student32",
                                                   "student16")},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
