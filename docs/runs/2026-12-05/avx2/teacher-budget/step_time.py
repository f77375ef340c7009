"""Training step time of candidate teacher architectures: float32, channels-last, batch 128, SGD, random input,
median of 8 steps after 2 warm-up steps; 'epoch' = 430 steps (55,000 rows), without augmentation or validation.

    python docs/runs/2026-12-05/avx2/teacher-budget/step_time.py THREADS ARCH...
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[5]))
from pipeline import models

torch.set_num_threads(int(sys.argv[1]))
for arch in sys.argv[2:]:
    torch.manual_seed(0)
    net = models.build(arch, (1, 28, 28), 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    times = []
    for _ in range(10):
        t = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    step = sorted(times[2:])[4]
    print(f"{arch} threads {sys.argv[1]}: {step * 1000:.1f} ms a step, {step * 430:.0f} s an epoch", flush=True)
