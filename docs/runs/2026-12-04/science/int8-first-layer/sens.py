"""Per-layer int8 sensitivity of a raw-pixel export: quantise it (as `distill export` does, uint8
activations, per-tensor weights, MinMax on 2,000 training rows) with one node at a time kept float, and
print the test accuracy of each.  Run from a clone's root:
    .venv/bin/python docs/runs/2026-12-04/science/int8-first-layer/sens.py FP32.onnx
(FP32.onnx: the fp32 file of `distill export --raw-input`)."""
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.quantization as oq

sys.path.insert(0, '.')
from pipeline.formats.prepared import open_prepared
from stages.export import quantize

fp32 = Path(sys.argv[1])
info = open_prepared(Path('data/prepared/fashion-mnist.h5'))
xt, yt = info.load_raw('test')
xtr, _ = info.load_raw('train')
calib = xtr[np.random.default_rng(0).choice(len(xtr), 2000, replace=False)]
orig = oq.quantize_static


def acc(p):
    s = ort.InferenceSession(str(p), providers=['CPUExecutionProvider'])
    return float((quantize.logits_of(s, xt).argmax(1) == yt).mean())


def run(excl, tag):
    def patched(*a, **k):
        k['nodes_to_exclude'] = excl
        return orig(*a, **k)
    oq.quantize_static = patched
    out = Path(f'/tmp/sens-{tag}.onnx')
    quantize.static_int8(fp32, out, calib)
    oq.quantize_static = orig
    return acc(out)


a32 = acc(fp32)
print('fp32', a32, flush=True)
print('all int8', run([], 'none'), flush=True)
kinds = ('Conv', 'Gemm', 'MatMul', 'Add', 'Relu', 'AveragePool', 'Flatten')
for n in [n for n in onnx.load(str(fp32)).graph.node if n.op_type in kinds]:
    a = run([n.name], n.name.replace('/', '_'))
    print(f'{n.op_type:18s} {n.name:40s} {a:.4f} ({(a - a32) * 100:+.2f})', flush=True)
