#!/bin/sh
# Fashion-MNIST caches of every layout from one teacher, each verified, then mlp:128 students from them.
# Run from the repository root; one torch / onnxruntime thread each, niced, one at a time.
set -e
D=${D:-distill}
P=data/prepared/fashion-mnist.h5
T=data/teachers/fashion-mnist/ensemble.onnx
C=data/c23
R=docs/runs/2026-12-03/cache
mkdir -p $C/students $R/students
cache() {  # name, extra options
  name=$1; shift
  [ -f $C/fm-$name.h5 ] || nice -n 10 $D cache --teacher $T --transfer-set $P --out $C/fm-$name.h5 --threads 1 "$@" \
    2> $R/fm-$name.cache.log
  nice -n 10 $D cache verify $C/fm-$name.h5 --teacher $T --transfer-set $P --threads 1 2> $R/fm-$name.verify.log
}
cache full32 --logits-dtype float32 --store-soft
cache compact
for k in 1 2 3 5; do cache top$k --top-k $k; done
student() {  # name, cache, extra options
  name=$1; cache=$2; shift 2
  [ -f $C/students/$name.ckpt ] || nice -n 10 $D student --cache $C/fm-$cache.h5 --transfer-set $P \
    --out $C/students/$name.ckpt --metrics $R/students/$name.metrics.json --threads 1 --alpha 0.5 "$@" \
    2> $R/students/$name.log
}
for s in 0 1 2; do
  student mlp-full32-T4-s$s full32 --temperature 4 --seed $s
  student mlp-compact-T4-s$s compact --temperature 4 --seed $s
done
for T in 1 20; do student mlp-compact-T$T-s0 compact --temperature $T --seed 0; done
for k in 1 2 3 5; do for T in 1 4 20; do student mlp-top$k-T$T-s0 top$k --temperature $T --seed 0; done; done
