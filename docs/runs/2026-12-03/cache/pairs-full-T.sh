#!/bin/sh
# mlp:128 students of the 100-class task from the full float32 cache (pairs.sh) at other temperatures.
# Usage: pairs-full-T.sh T SEEDS
set -e
D=${D:-distill}
P=data/prepared/fashion-pairs.h5
R=docs/runs/2026-12-03/cache
for s in $2; do
  name=pairs-full32-T$1-s$s
  [ -f $R/students/$name.metrics.json ] || nice -n 10 $D student --cache data/c23/pairs-full32.h5 --transfer-set $P \
    --out data/c23s/students/$name.ckpt --metrics $R/students/$name.metrics.json --threads 1 --alpha 0.5 \
    --temperature $1 --seed $s 2> $R/students/$name.log
done
