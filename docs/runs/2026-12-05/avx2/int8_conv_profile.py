"""Why int8 CNN exports run no faster than float32 on an AVX2-only CPU: per-operator kernel times.

For ResNet-8 (res:16x1-32x1-64x1) and conv:32/2-64/2-128/2 (untrained, seed 0: a dense kernel's time does not
depend on its weights' values), exported as the export stage exports them (pipeline.onnxio.export) and
quantised by its static QDQ int8 (stages.export.quantize.static_int8, per-channel weights, uint8
activations), plus three onnxruntime variants of ResNet-8 (per-tensor weights, QOperator format, uint8
weights), this prints: the latency at batch 1 on one thread, each model timed in interleaved rounds in one
process (median of the rounds' means), and onnxruntime's profile of 500 runs summed per operator type.

    python docs/runs/2026-12-05/avx2/int8_conv_profile.py OUT_DIR > int8_conv_profile.txt
"""
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from pipeline import models, onnxio
from stages.export.quantize import static_int8

OUT = Path(sys.argv[1])
CALIB = np.random.default_rng(0).normal(size=(256, 1, 28, 28)).astype(np.float32)


class Rows(CalibrationDataReader):
    def __init__(self):
        self.rows = iter({"x": CALIB[i:i + 1]} for i in range(64))

    def get_next(self):
        return next(self.rows, None)


def build(arch: str) -> dict[str, Path]:
    tag = arch.replace(":", "_").replace("/", "s")
    torch.manual_seed(0)
    fp32 = onnxio.export(models.build(arch, (1, 28, 28), 10).eval(), torch.zeros(2, 1, 28, 28),
                         OUT / f"{tag}.onnx", "logits")
    paths = {"fp32": fp32, "int8 (export stage)": static_int8(fp32, OUT / f"{tag}.int8.onnx", CALIB, per_channel=True)}
    if arch.startswith("res"):
        pre = OUT / f"{tag}.pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        for name, kw in {"int8 per-tensor weights": dict(per_channel=False),
                         "int8 QOperator format": dict(quant_format=QuantFormat.QOperator),
                         "int8 uint8 weights (U8U8)": dict(weight_type=QuantType.QUInt8)}.items():
            p = OUT / f"{tag}.{len(paths)}.onnx"
            quantize_static(str(pre), str(p), Rows(), **{"quant_format": QuantFormat.QDQ, "per_channel": True,
                                                         "activation_type": QuantType.QUInt8,
                                                         "weight_type": QuantType.QInt8, **kw})
            paths[name] = p
    return paths


def session(path: Path, profile: bool = False) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = o.inter_op_num_threads = 1
    o.enable_profiling, o.profile_file_prefix = profile, str(OUT / path.stem)
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    x = CALIB[:1]
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}; batch 1, one thread")
    for arch in ("res:16x1-32x1-64x1", "conv:32/2-64/2-128/2"):
        paths = build(arch)
        sessions = {k: session(p) for k, p in paths.items()}
        means = collections.defaultdict(list)
        for _ in range(7):  # interleaved rounds
            for k, s in sessions.items():
                for _ in range(50):
                    s.run(None, {"x": x})
                t, n = time.perf_counter(), 400
                for _ in range(n):
                    s.run(None, {"x": x})
                means[k].append((time.perf_counter() - t) / n * 1e6)
        base = float(np.median(means["fp32"]))
        print(f"\n{arch}")
        for k, v in means.items():
            print(f"  {k:28s} p50-of-rounds {np.median(v):7.1f} us   speed-up vs fp32 {base / np.median(v):.2f}x")
        for k in ("fp32", "int8 (export stage)"):
            s = session(paths[k], profile=True)
            for _ in range(500):
                s.run(None, {"x": x})
            by = collections.Counter()
            for e in json.loads(Path(s.end_profiling()).read_text()):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    by[e["args"]["op_name"]] += e["dur"] / 500
            ops = ", ".join(f"{op} {us:.1f}" for op, us in by.most_common(6))
            print(f"  profile {k:20s} kernels {sum(by.values()):6.1f} us a run: {ops}")


if __name__ == "__main__":
    main()
