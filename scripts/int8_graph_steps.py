"""Rebuild the four int8 graphs of docs/results.md, "What got the int8 model there", and time them side
by side through IOBinding at batch 1.

The table's figures (6.86 -> 6.31 -> 5.84-6.00 -> 5.07 us per run) were measured once, before this
script existed, by ad-hoc scripts that were not kept; this script rebuilds the same four graphs with
today's export code and times them the same way (one bound input refilled before each run, outside
the clock; the variants interleaved round by round; the median round per variant).  Its output is a
re-measurement on whatever machine runs it, not the historical numbers.

    .venv/bin/python scripts/int8_graph_steps.py --checkpoint data/students/fashion-mnist-kd.ckpt \
        --prepared data/prepared/fashion-mnist.h5 --out data/bench/int8-graph-steps.json

Without --checkpoint it builds a random-weight student of --arch (default mlp:128, the shipped
size: the timing of a batch-1 matrix-vector product does not depend on the weights' values), and
without --prepared it uses synthetic 28x28 uint8 pixels.

The steps, each applied on top of the previous one:

1. ``qdq``: static QDQ int8 as first shipped: float input, per-channel weight scales, the final
   QuantizeLinear -> DequantizeLinear pair that rounds the logits kept.
2. ``float-logits``: the final Q/DQ pair dropped (``stages.export.quantize.float_logits``).
3. ``raw-pixels``: the raw-input export (normalisation folded into the first layer), the uint8
   pixels fed straight into the first QGemm (``quantize.pixels_in``).
4. ``per-tensor``: one weight scale per matrix instead of one per output unit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS = ("qdq", "float-logits", "raw-pixels", "per-tensor")


def student(args) -> tuple:
    """(net, normalisation (scale, mean, std), raw test pixels uint8, raw calibration pixels uint8)."""
    import torch

    from pipeline import models

    if args.prepared:
        from pipeline.formats.prepared import open_prepared

        info = open_prepared(Path(args.prepared))
        norm, shape, classes = (info.scale, info.mean, info.std), info.shape, len(info.classes)
        test, train = info.load_raw("test", 0, 1024)[0], info.load_raw("train", 0, args.calibration_rows)[0]
    else:
        rng = np.random.default_rng(0)
        norm, shape, classes = (255.0, 0.2860, 0.3530), (28, 28), 10  # Fashion-MNIST's train-split statistics
        test = rng.integers(0, 256, (1024, *shape), dtype=np.uint8)
        train = rng.integers(0, 256, (args.calibration_rows, *shape), dtype=np.uint8)
    if args.checkpoint:
        net = models.load(Path(args.checkpoint))[0]
    else:
        torch.manual_seed(0)
        net = models.build(args.arch, shape, classes)
    return net.eval(), norm, test, train


def build(args, tmp: Path) -> dict[str, Path]:
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from pipeline import onnxio
    from stages.export import quantize as q
    from stages.export import rewrites as rw
    from stages.export import stage as ex

    net, (scale, mean, std), test, train = student(args)
    normalise = lambda p: ((p.astype(np.float32) / scale - mean) / std).astype(np.float32)  # noqa: E731
    fp32, raw = tmp / "fp32.onnx", tmp / "raw.onnx"
    onnxio.export(net, torch.from_numpy(normalise(test[:2])), fp32, "logits")
    folded = ex.fold_normalisation(net, scale, mean, std)
    if folded is None:
        raise SystemExit("the raw-pixel steps need an MLP (Flatten -> Linear -> ...)")
    onnxio.export(folded, torch.from_numpy(test[:2]), raw, "logits")

    def quantise(src: Path, out: Path, calib: np.ndarray, per_channel: bool, rewrites) -> Path:
        with tempfile.TemporaryDirectory() as t:
            pre = q._preprocessed(src, t)
            extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
            path, _ = rw.pixel_path(__import__("onnx").load(str(pre)).graph)
            if path:
                extra["TensorQuantOverrides"] = {path[-1].output[0]: [{
                    "quant_type": QuantType.QUInt8, "scale": np.array(1.0, np.float32),
                    "zero_point": np.array(0, np.uint8)}]}
            with onnxio.quiet():
                quantize_static(str(pre), str(out), q._Calibration("x", calib), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax,
                                extra_options=extra)
        return q._finish(out, *rewrites)

    return {"qdq": quantise(fp32, tmp / "qdq.onnx", normalise(train), True, ()),
            "float-logits": quantise(fp32, tmp / "float-logits.onnx", normalise(train), True, (rw.float_logits,)),
            "raw-pixels": quantise(raw, tmp / "raw-pixels.onnx", train, True, (rw.float_logits, rw.pixels_in)),
            "per-tensor": quantise(raw, tmp / "per-tensor.onnx", train, False, (rw.float_logits, rw.pixels_in))}, \
        test, normalise


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="student .ckpt (default: a random-weight --arch)")
    p.add_argument("--prepared", help="prepared file: test pixels to feed, train pixels to calibrate on")
    p.add_argument("--arch", default="mlp:128")
    p.add_argument("--calibration-rows", type=int, default=2000)
    p.add_argument("--runs", type=int, default=20000, help="timed runs per variant per round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median round is reported")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON to write (default: print only)")
    args = p.parse_args(argv)

    from pipeline.inference import optimised_ops
    from stages.bench import runners
    from stages.bench.worker import timed_loop

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        graphs, test, normalise = build(args, tmp)
        variants = {}
        for step, path in graphs.items():
            sess = runners.make_session(path, args.threads)
            pool = test if sess.get_inputs()[0].type == "tensor(uint8)" else normalise(test)
            run, refills, _ = runners.frame_buffer_runner(sess, runners.cut_batches(pool, 1))
            variants[step] = (run, refills)
            timed_loop([run], 0, 200, 0.0, refills)  # warm-up
        rounds: dict[str, list[float]] = {s: [] for s in STEPS}
        for _ in range(args.rounds):
            for step in STEPS:  # interleaved: a slow phase of the host weighs on every variant alike
                run, refills = variants[step]
                lat, _ = timed_loop([run], 0, args.runs, 0.0, refills)
                rounds[step].append(float(np.median(lat)) * 1e6)
        report = {"settings": vars(args), "source": "scripts/int8_graph_steps.py",
                  "steps": {s: {"us_per_run_p50": statistics.median(rounds[s]), "round_p50s_us": rounds[s],
                                "size_bytes": graphs[s].stat().st_size,
                                "onnxruntime_ops": optimised_ops(graphs[s])} for s in STEPS}}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    for s in STEPS:
        r = report["steps"][s]
        print(f"{s:13} {r['us_per_run_p50']:7.2f} us  {r['size_bytes'] / 1024:6.1f} KiB  "
              f"{' -> '.join(r['onnxruntime_ops'])}")
    return report


if __name__ == "__main__":
    main()
