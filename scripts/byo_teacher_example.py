"""Bring your own teacher, worked through (README "Bring your own teacher", docs/teachers.md).

A scikit-learn LogisticRegression fitted on prepared Fashion-MNIST pixels in [0, 1], flat [N, 784],
converted by skl2onnx with ``zipmap=False`` (outputs ``label`` int64 then ``probabilities``); then,
with the real ``distill`` commands: the cache refusing it mis-declared, taking it undeclared (the
gate's clear winner) and declared; the cache's accuracy for it against the model's own on the same
rows; a student distilled from it; and a mixed ensemble (the smoke CNN ensemble + this model).

    .venv/bin/pip install -e '.[examples]'     # scikit-learn, skl2onnx (not needed by the pipeline)
    make prepare && make smoke SMOKE_GOALS=cache
    .venv/bin/python scripts/byo_teacher_example.py > docs/byo-teacher-example.log 2>&1

Everything goes under data/byo/.  Settings are modest for a 2-core machine (the model is fitted on
the first 20,000 train rows; students train 10 epochs).
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
PREPARED = DATA / "prepared" / "fashion-mnist.h5"
SMOKE_TEACHER = DATA / "smoke" / "teachers" / "fashion-mnist" / "ensemble.onnx"
OUT = DATA / "byo"
FIT_ROWS = 20_000
STUDENT = ("--arch", "mlp:128", "--temperature", "2", "--alpha", "0.5", "--epochs", "10")


def say(text: str = "") -> None:
    print(text, flush=True)


def distill(*args: str, expect: int = 0) -> str:
    """Run ``distill ARGS`` as a user would, echoing the command, its exit code and its stderr."""
    cmd = [str(ROOT / ".venv" / "bin" / "distill"), *map(str, args)]
    say("$ distill " + " ".join(shlex.quote(str(Path(a).relative_to(ROOT)) if str(a).startswith(str(ROOT)) else str(a))
                                for a in args))
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in proc.stderr.strip().splitlines():
        say("  " + line.replace(str(ROOT) + "/", ""))
    say(f"  [exit {proc.returncode}, {time.perf_counter() - t:.1f} s]")
    if proc.returncode != expect:
        raise SystemExit(f"expected exit {expect}")
    return proc.stderr


def main() -> None:
    import onnxruntime
    import skl2onnx
    import sklearn
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from pipeline import sanity_gate, soft
    from pipeline.formats.cache import open_cache
    from pipeline.formats.prepared import open_prepared

    OUT.mkdir(parents=True, exist_ok=True)
    info = open_prepared(PREPARED)
    say(f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, onnxruntime {onnxruntime.__version__}")
    x, y = info.load_raw("train")
    flat = x.reshape(len(x), -1).astype(np.float32) / np.float32(255)  # what the model is fitted on: [0, 1], flat
    t = time.perf_counter()
    model = LogisticRegression(max_iter=300, C=0.1).fit(flat[:FIT_ROWS], y[:FIT_ROWS])
    say(f"LogisticRegression fitted on the first {FIT_ROWS} train rows, x / 255 flat, "
        f"in {time.perf_counter() - t:.0f} s")
    onx = to_onnx(model, flat[:1], options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    onx.ir_version = min(onx.ir_version, 10)
    path = OUT / "logreg.onnx"
    path.write_bytes(onx.SerializeToString())
    say(f"skl2onnx with zipmap=False -> {path.relative_to(ROOT)}: input {onx.graph.input[0].name} "
        f"[N, 784] float; outputs " + ", ".join(o.name for o in onx.graph.output))
    own_train = float(model.score(flat, y))
    xt, yt = info.load_raw("test")
    own_test = float(model.score(xt.reshape(len(xt), -1).astype(np.float32) / 255, yt))
    gate_rows = sanity_gate.draw(y, 2048, 0)  # the rows the gate draws (--gate-rows 2048, --gate-seed 0)
    say(f"the model's own accuracy (scikit-learn, float64): all {len(y)} transfer (train) rows {own_train:.4f}, "
        f"the gate's 2048 {float(model.score(flat[gate_rows], y[gate_rows])):.4f}, test {own_test:.4f}")
    sk_pred = model.predict(flat)

    say("\n# 1. declared wrong (the project's normalised input): refused by the sanity gate, nothing written")
    bad = OUT / "refused.h5"
    distill("cache", "--teacher", f"{path}:input=normalised", "--transfer-set", PREPARED, "--out", bad,
            "--temperatures", "1,2,4", "--device", "cpu", expect=3)
    say(f"  {bad.name} exists: {bad.exists()}, {bad.name}.partial exists: {Path(str(bad) + '.partial').exists()}")

    say("\n# 2. not declared: the default (normalised) loses clearly, so the gate takes input=unit and says so")
    auto = OUT / "auto.h5"
    distill("cache", "--teacher", path, "--transfer-set", PREPARED, "--out", auto, "--temperatures", "1,2,4",
            "--device", "cpu")

    say("\n# 3. declared: the command to use")
    cache = OUT / "logreg-cache.h5"
    distill("cache", "--teacher", f"{path}:input=unit", "--transfer-set", PREPARED, "--out", cache,
            "--temperatures", "1,2,4", "--device", "cpu")
    c = open_cache(cache)
    stored = c.read("logits")[:, 0].argmax(1)
    say(f"cache member accuracy {c.member_accuracy[0]:.4f} on {c.rows} rows vs the model's own {own_train:.4f}; "
        f"predictions differing from scikit-learn's: {int(np.sum(stored != sk_pred))} of {c.rows}")
    gate = c.teacher_inputs[0]["gate"]
    say(f"gate record: {gate['accuracy']:.4f} accuracy, NLL {gate['nll_nats']:.4f} nats on {gate['rows']} rows; "
        "alternatives " + json.dumps({k: {f: round(v, 4) for f, v in m.items() if v is not None}
                                      for k, m in gate["alternatives"].items()}))
    same = np.array_equal(*(soft.targets(x.stored(T=1.0), 1.0) for x in (c, open_cache(auto))))
    say(f"soft targets of the undeclared run (2) equal the declared run's (3): {same}")
    distill("cache", "verify", cache, "--teacher", path, "--transfer-set", PREPARED)

    say("\n# 4. a student distilled from it (mlp:128, T=2, alpha 0.5, 10 epochs)")
    distill("student", "--cache", cache, "--transfer-set", PREPARED, "--out", OUT / "student.ckpt", *STUDENT)
    m = json.loads((OUT / "student.metrics.json").read_text())
    say(f"student test accuracy {m['test_accuracy']:.4f}; the teacher's own test accuracy {own_test:.4f}")

    say("\n# 5. a mixed ensemble: the smoke CNN ensemble (metadata: normalised [N, 1, 28, 28]) + this model")
    mixed = OUT / "mixed-cache.h5"
    distill("cache", "--teacher", SMOKE_TEACHER, "--teacher", f"{path}:input=unit", "--transfer-set", PREPARED,
            "--out", mixed, "--temperatures", "1,2,4", "--device", "cpu", "--member-weights", "1,1,2")
    mc = open_cache(mixed)
    say("mixed cache: members " + ", ".join(f"{i}: {a:.4f}" for i, a in enumerate(mc.member_accuracy))
        + f"; weights {json.loads(mc.attrs['member_weights'])}; ensemble accuracy at T=1 "
        f"{mc.diagnostics()[1.0]['teacher_accuracy']:.4f}")
    distill("student", "--cache", mixed, "--transfer-set", PREPARED, "--out", OUT / "mixed-student.ckpt", *STUDENT)
    m = json.loads((OUT / "mixed-student.metrics.json").read_text())
    say(f"student from the mixed ensemble: test accuracy {m['test_accuracy']:.4f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
