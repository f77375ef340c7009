#!/bin/bash
# Student recipe search for the edge CNN (docs/results.md, "A teacher worth distilling"): the strong
# teacher's views cache (8 views of every row: shifts of up to 2 px and horizontal flips, view 0 the
# row itself), built with
#   distill cache --teacher data/teachers/fashion-mnist-strong/ensemble.onnx --transfer-set data/prepared/fashion-mnist.h5 \
#     --out data/cache/fashion-mnist-strong-views-sf8.h5 --views 8 --view-max-shift 2 --view-flip 0.5 --temperatures 1,2,4 --threads 1
# Usage: recipe.sh NAME SEED STUDENT-ARGS...   (writes docs/runs/2026-12-03/science/recipe-NAME-s<seed>.*;
# an --arch among the ARGS replaces the CNN: the last one given wins)
set -euo pipefail
name=$1; seed=$2; shift 2
R=docs/runs/2026-12-03/science
out=recipe-$name-s$seed
[ -f $R/$out.metrics.json ] && exit 0
mkdir -p data/science
nice -n 5 .venv/bin/distill student train --cache data/cache/fashion-mnist-strong-views-sf8.h5 \
  --transfer-set data/prepared/fashion-mnist.h5 --out data/science/$out.ckpt --metrics data/science/$out.metrics.json \
  --arch conv:32/2-64/2-128/2 --lr 0.003 --seed $seed --threads 1 "$@" 2> $R/$out.log
cp data/science/$out.metrics.json $R/$out.metrics.json
