#!/bin/bash
T=/work/runs/data/teachers/fashion-mnist-strong/member0.ckpt
for arch in res:16x1-32x1-64x1 conv:16-32/2-64/2-96/2 dws:32-64/2-128-128/2-256/2 conv:32/2-64/2-128/2; do
  nice -n 5 /work/wt-20/.venv/bin/python spilot.py --arch $arch --epochs 20 --teachers $T --alpha 0.9 --T 4 | grep -E "^\{" >> spilots1.jsonl
done
