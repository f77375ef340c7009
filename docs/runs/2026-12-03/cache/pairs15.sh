#!/bin/sh
# The 100-class task with a stronger teacher than pairs.sh's (the same 2 x cnn:32-64-128, 15 epochs instead
# of 5): its full cache, top-k caches (spread rule), each verified, and mlp:128 students from each.
# Run from the repository root after pairs.sh (its prepared set), niced, one thread.
# Usage: pairs15.sh T SEEDS [CACHES]   (CACHES: which students, default "full32 top10 top5 top20")
set -e
D=${D:-distill}
P=data/prepared/fashion-pairs.h5
T=data/teachers/fashion-pairs-e15/ensemble.onnx
C=data/c23s/e15
R=docs/runs/2026-12-03/cache/pairs15
mkdir -p $C/students $R/students
[ -f $T ] || nice -n 10 $D teacher --prepared $P --out $T --members 2 --arch cnn:32-64-128 --epochs 15 \
  --max-shift 1 --precision auto --threads 1 2> $R/teacher.log
cache() {  # name, extra options
  name=$1; shift
  [ -f $C/$name.h5 ] || { nice -n 10 $D cache --teacher $T --transfer-set $P --out $C/$name.h5 --threads 1 "$@" \
    2> $R/$name.cache.log &&
    nice -n 10 $D cache verify $C/$name.h5 --teacher $T --transfer-set $P --threads 1 2> $R/$name.verify.log; }
}
cache full32 --logits-dtype float32
for k in 5 10 20; do cache top$k --top-k $k; done
for s in $2; do
  for c in ${3:-full32 top10 top5 top20}; do
    name=$c-T$1-s$s
    [ -f $R/students/$name.metrics.json ] || nice -n 10 $D student --cache $C/$c.h5 --transfer-set $P \
      --out $C/students/$name.ckpt --metrics $R/students/$name.metrics.json --threads 1 --alpha 0.5 \
      --temperature $1 --seed $s 2> $R/students/$name.log
  done
done
