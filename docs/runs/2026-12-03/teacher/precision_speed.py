"""Training step time (batch 128, one thread) of the teachers' ResNet-20 and the edge CNN in float32
against bfloat16 autocast with channels-last tensors (what `--precision auto` picks on a CPU with
AVX512-BF16), in interleaved rounds; median ms a step per mode.

    python docs/runs/2026-12-03/teacher/precision_speed.py > docs/runs/2026-12-03/teacher/precision_speed.json
"""
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline import models

torch.set_num_threads(1)
out = {}
for spec in ("res:16x3-32x3-64x3", "conv:32/2-64/2-128/2"):
    times = {"fp32": [], "bf16": []}
    nets = {}
    for mode in times:
        torch.manual_seed(0)
        net = models.build(spec, (1, 28, 28), 10).train()
        if mode == "bf16":
            net = net.to(memory_format=torch.channels_last)
        nets[mode] = (net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step(mode):
        net, opt = nets[mode]
        xb = x.to(memory_format=torch.channels_last) if mode == "bf16" else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = F.cross_entropy(net(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for mode in times:
        for _ in range(3):
            step(mode)  # warm-up
    for _ in range(5):  # rounds, the modes interleaved
        for mode in times:
            t = time.perf_counter()
            for _ in range(5):
                step(mode)
            times[mode].append((time.perf_counter() - t) / 5 * 1e3)
    med = {m: round(statistics.median(v), 2) for m, v in times.items()}
    out[spec] = {"ms_per_step_median": med, "ratio_fp32_over_bf16": round(med["fp32"] / med["bf16"], 2),
                 "rounds_ms": {m: [round(t, 2) for t in v] for m, v in times.items()}}
print(json.dumps(out, indent=1))
