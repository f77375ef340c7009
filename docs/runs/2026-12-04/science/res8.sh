#!/bin/sh
# ResNet-8 students distilled from make all's default teacher (2 x ResNet-20, the plain compact cache), as the
# strong teacher's were (docs/runs/2026-12-03/science/recipe.sh res8-v1-T4-a05-e40-bf16). Seed 0 came from
#   make bench-edge EDGE_ARCHS=res:16x1-32x1-64x1 EDGE_EPOCHS=40 'EDGE_STUDENT_ARGS=--precision auto'
# on the fresh clone after make all (its int8 export and benchmark: fashion-mnist-edge.md); this runs the
# same student at other seeds (default-res8-e60-s*: the same with --epochs 60 and names default-res8-e60-s<seed>).
# Run from a clone's root after make all. Usage: res8.sh SEEDS
set -e
R=docs/runs/2026-12-04/science
for s in $1; do
  [ -f $R/default-res8-s$s.metrics.json ] || nice -n 5 .venv/bin/distill student --cache data/cache/fashion-mnist.h5 \
    --transfer-set data/prepared/fashion-mnist.h5 --out data/students/res8-s$s.ckpt --metrics $R/default-res8-s$s.metrics.json \
    --arch res:16x1-32x1-64x1 --alpha 0.5 --temperature 4 --epochs 40 --lr 0.003 --precision auto --seed $s \
    2> $R/default-res8-s$s.log
done
