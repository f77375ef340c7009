#!/bin/bash
# The science table of docs/results.md ("A teacher worth distilling"): students of three sizes, hard
# labels against distilled from the default and the strong teacher, seeds 0-2, one torch thread each.
# Usage (from a clone where `make all` and `make TEACHER=strong cache` have run):
#   docs/runs/2026-12-03/science/run.sh TEACHER ARCH SEED...
#   TEACHER: hard | default | strong | strong-tta | strong-compact (the strong teacher's kd-cache/2, float16
#   logits, docs/runs/2026-12-03/cache/strong-compact.sh; the others are float32 caches)
# Each run writes data/science/<teacher>-<arch>-s<seed>.{ckpt,metrics.json} and keeps its metrics and log
# under docs/runs/2026-12-03/science/. A run whose metrics exist is skipped.
set -euo pipefail
teacher=$1; arch=$2; shift 2
R=docs/runs/2026-12-03/science
P=data/prepared/fashion-mnist.h5
case $teacher in
  hard|strong) C=data/cache/fashion-mnist-strong.h5 ;;   # hard labels do not read the targets
  strong-tta) C=data/cache/fashion-mnist-strong-tta.h5 ;;
  strong-compact) C=data/cache/fashion-mnist-strong-compact.h5 ;;
  default) C=data/cache/fashion-mnist.h5 ;;
esac
alpha=0.5; [ "$teacher" = hard ] && alpha=0
# the settings of make all's students: mlp:128 as `make student`, the CNN as `make student-edge`
case $arch in
  mlp:128) args="--temperature 2 --epochs 30" ;;
  mlp:800-800) args="--temperature 4 --epochs 30" ;;
  conv:*) args="--temperature 4 --epochs 20 --lr 0.003" ;;
esac
mkdir -p data/science
for seed in "$@"; do
  name=$teacher-$(echo "$arch" | tr ':/' '-s')-s$seed
  [ -f $R/$name.metrics.json ] && continue
  nice -n 5 .venv/bin/distill student train --cache $C --transfer-set $P --out data/science/$name.ckpt \
    --metrics data/science/$name.metrics.json --arch $arch --alpha $alpha --seed $seed --threads 1 $args \
    2> $R/$name.log
  cp data/science/$name.metrics.json $R/$name.metrics.json
done
