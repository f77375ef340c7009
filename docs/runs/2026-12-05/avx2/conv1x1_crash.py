"""Which convolutions PyTorch's CPU kernels crash on in channels-last training: each case trains one
Conv2d (batch 64, 28x28 input, 30 steps of forward and backward, the input's gradient too) in a fresh
process and reports how the process ended. Written after the test suite's ResNet fixture
(`res:4x1-8x1`) died with a segmentation fault on an AVX2-only AMD EPYC (2026-12-05).

    python docs/runs/2026-12-05/avx2/conv1x1_crash.py > docs/runs/2026-12-05/avx2/conv1x1_crash.txt
"""
import signal
import subprocess
import sys

import torch

CASE = """
import sys, torch
from torch import nn
torch.set_num_threads({threads})
m = nn.Conv2d({cin}, 2 * {cin}, {k}, stride={stride}, padding={k} // 2, bias=False)
x0 = torch.randn(64, {cin}, 28, 28)
if "{layout}" == "channels_last":
    m, x0 = m.to(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
for _ in range(30):
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="{precision}" == "bf16"):
        y = m(x)
    y.float().sum().backward()
"""


def ended(rc: int | None) -> str:
    if rc is None:
        return "hung (killed after 60 s)"
    if rc < 0:
        return f"died: {signal.Signals(-rc).name}"
    return "ran" if rc == 0 else f"exit {rc}"


print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
      f"native bfloat16 {torch.cpu._is_avx512_bf16_supported()}")
print("| kernel | stride | input channels | layout | precision | threads | process |")
print("|---|---:|---:|---|---|---:|---|")
cases = [(1, 2, c, "channels_last", "fp32", 1) for c in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 32)]
cases += [(1, 2, 4, "contiguous", "fp32", 1), (1, 2, 4, "channels_last", "bf16", 1),
          (1, 1, 4, "channels_last", "fp32", 1), (3, 2, 4, "channels_last", "fp32", 1),
          (1, 2, 4, "channels_last", "fp32", 2)]
for k, stride, cin, layout, precision, threads in cases:
    code = CASE.format(k=k, stride=stride, cin=cin, layout=layout, precision=precision, threads=threads)
    try:
        rc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode
    except subprocess.TimeoutExpired:
        rc = None
    print(f"| {k}x{k} | {stride} | {cin} | {layout} | {precision} | {threads} | {ended(rc)} |", flush=True)
