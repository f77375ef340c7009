#!/bin/sh
# The 100-class task again (pairs.sh made its teacher, full cache and even-rule students): top-k caches
# with the tail's spread stored (pipeline/topk.py's spread rule), each verified, and mlp:128 students
# from them. Run from the repository root after pairs.sh, niced, one thread, one at a time.
# Usage: pairs-spread.sh T SEEDS K...
set -e
D=${D:-distill}
P=data/prepared/fashion-pairs.h5
T=data/teachers/fashion-pairs/ensemble.onnx
C=data/c23s
R=docs/runs/2026-12-03/cache
temp=$1; seeds=$2; shift 2
mkdir -p $C/students $R/students
for k in "$@"; do
  [ -f $C/pairs-top$k.h5 ] || { nice -n 10 $D cache --teacher $T --transfer-set $P --out $C/pairs-top$k.h5 \
    --threads 1 --top-k $k 2> $R/pairs-spread-top$k.cache.log &&
    nice -n 10 $D cache verify $C/pairs-top$k.h5 --teacher $T --transfer-set $P --threads 1 \
      2> $R/pairs-spread-top$k.verify.log; }
  for s in $seeds; do
    name=pairs-spread-top$k-T$temp-s$s
    [ -f $C/students/$name.ckpt ] || nice -n 10 $D student --cache $C/pairs-top$k.h5 --transfer-set $P \
      --out $C/students/$name.ckpt --metrics $R/students/$name.metrics.json --threads 1 --alpha 0.5 \
      --temperature $temp --seed $s 2> $R/students/$name.log
  done
done
