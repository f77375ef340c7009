#!/bin/sh
# The 100-class task (Fashion pairs, scripts/fashion_pairs.py): its own teacher, a full and top-k caches, each
# verified, and mlp:128 students from each (3 seeds). Run from the repository root, niced, one thread, one at a time.
set -e
D=${D:-distill}
P=data/prepared/fashion-pairs.h5
T=data/teachers/fashion-pairs/ensemble.onnx
C=data/c23
R=docs/runs/2026-12-03/cache
mkdir -p $C/students $R/students
[ -f $P ] || { python scripts/fashion_pairs.py --out data/pairs.npz &&
  $D prepare --npz data/pairs.npz --layout nchw --classes 100 --out $P; }
[ -f $T ] || nice -n 10 $D teacher --prepared $P --out $T --members 2 --arch cnn:32-64-128 --epochs 5 --max-shift 1 \
  --precision auto --threads 1 2> $R/pairs-teacher.log
cache() {  # name, extra options
  name=$1; shift
  [ -f $C/pairs-$name.h5 ] || nice -n 10 $D cache --teacher $T --transfer-set $P --out $C/pairs-$name.h5 \
    --threads 1 "$@" 2> $R/pairs-$name.cache.log
  nice -n 10 $D cache verify $C/pairs-$name.h5 --teacher $T --transfer-set $P --threads 1 2> $R/pairs-$name.verify.log
}
cache full32 --logits-dtype float32 --store-soft
cache compact
for k in 5 10 20; do cache top$k --top-k $k; done
student() {  # name, cache, extra options
  name=$1; cache=$2; shift 2
  [ -f $C/students/$name.ckpt ] || nice -n 10 $D student --cache $C/pairs-$cache.h5 --transfer-set $P \
    --out $C/students/$name.ckpt --metrics $R/students/$name.metrics.json --threads 1 --alpha 0.5 "$@" \
    2> $R/students/$name.log
}
for s in 0 1 2; do
  for c in full32 top5 top10 top20; do student pairs-$c-T4-s$s $c --temperature 4 --seed $s; done
done
