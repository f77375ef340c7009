"""How sensitive a raw-pixel export is to its first convolution's weights: test accuracy with those
weights rounded to 8, 7 and 6 bits (one scale for the tensor) or given uniform noise of an 8-bit
step, everything else float.  Run from a clone's root:
    .venv/bin/python docs/runs/2026-12-04/science/int8-first-layer/perturb.py FP32.onnx [WEIGHT]
(WEIGHT: the first convolution's initializer, net.0.weight for the ResNet-8)."""
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper as nh

sys.path.insert(0, '.')
from pipeline.formats.prepared import open_prepared
from stages.export import quantize

info = open_prepared(Path('data/prepared/fashion-mnist.h5'))
xt, yt = info.load_raw('test')
base = onnx.load(sys.argv[1])
name = sys.argv[2] if len(sys.argv) > 2 else 'net.0.weight'


def acc_with(w0):
    m = onnx.ModelProto()
    m.CopyFrom(base)
    for i in m.graph.initializer:
        if i.name == name:
            i.CopyFrom(nh.from_array(w0.astype(np.float32), name))
    s = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
    return float((quantize.logits_of(s, xt).argmax(1) == yt).mean())


w = {i.name: nh.to_array(i) for i in base.graph.initializer}[name].astype(np.float64)
print('fp32', acc_with(w))
for bits in (8, 7, 6):
    step = np.abs(w).max() / (2 ** (bits - 1) - 1)
    print(f'rounded to {bits} bits', acc_with(np.round(w / step) * step))
rng = np.random.default_rng(0)
step = np.abs(w).max() / 127
for k in range(8):
    print(f'uniform noise of an 8-bit step, draw {k}', acc_with(w + rng.uniform(-step / 2, step / 2, w.shape)))
