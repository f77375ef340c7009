#!/bin/sh
# ResNet-8 (res:16x1-32x1-64x1) recipe runs from make all's default teacher, one thread each, niced.
# Run from a clone's root after make all and the views cache:
#   distill cache --teacher data/teachers/fashion-mnist/ensemble.onnx --transfer-set data/prepared/fashion-mnist.h5 \
#     --out data/cache/fashion-mnist-views-sf8.h5 --views 8 --view-max-shift 2 --view-flip 0.5 --temperatures 1,2,4 --threads 1
# (its log: views-sf8.cache.log). Usage: CACHE=<cache> recipe.sh NAME SEED [extra student args]
# The teacher without label smoothing and its cache (nols-* runs; logs nols-teacher.train.log, nols.cache.log):
#   distill teacher --members 2 --arch res:16x3-32x3-64x3 --epochs 10 --optimizer sgd --lr 0.1 --weight-decay 5e-4 \
#     --label-smoothing 0 --max-shift 2 --flip 0.5 --erase 0.5 --precision auto --threads 1 \
#     --prepared data/prepared/fashion-mnist.h5 --out data/teachers/fashion-mnist-nols/ensemble.onnx
#   distill cache --teacher data/teachers/fashion-mnist-nols/ensemble.onnx --transfer-set data/prepared/fashion-mnist.h5 \
#     --out data/cache/fashion-mnist-nols.h5 --temperatures 1,2,4,8,20 --threads 1
# Its 32 shifted views, half of them mixed with a partner row (nols-mlp800-mix32-* runs; nols-views-m32.cache.log, 2,317 s):
#   distill cache build --teacher data/teachers/fashion-mnist-nols/ensemble.onnx --transfer-set data/prepared/fashion-mnist.h5 \
#     --out data/cache/fashion-mnist-nols-views-m32.h5 --views 32 --view-max-shift 2 --view-flip 0 --view-mixup 0.5 \
#     --temperatures 1,2,4,8,20 --threads 1
# Its 64 shifted views, every one mixed (nols-mlp800-mixall64-* runs; nols-views-x64.cache.log, 3,985 s):
#   distill cache build --teacher data/teachers/fashion-mnist-nols/ensemble.onnx --transfer-set data/prepared/fashion-mnist.h5 \
#     --out data/cache/fashion-mnist-nols-views-x64.h5 --views 64 --view-max-shift 2 --view-flip 0 --view-mixup 1.0 \
#     --temperatures 1,2,4,8,20 --threads 1
# The base recipe is res8.sh's (T 4, alpha 0.5, lr 0.003, bf16 autocast); extra args override it
# (later options win), e.g. --epochs 60, --alpha 0 for the hard-label twin on the same views.
set -e
R=docs/runs/2026-12-04/science
NAME=$1; SEED=$2; shift 2
CACHE=${CACHE:-data/cache/fashion-mnist.h5}
[ -f $R/recipe-$NAME-s$SEED.metrics.json ] && exit 0
echo "# cache $CACHE; args: $*" > $R/recipe-$NAME-s$SEED.log
nice -n 5 .venv/bin/distill student train --cache $CACHE --transfer-set data/prepared/fashion-mnist.h5 \
  --out data/students/recipe-$NAME-s$SEED.ckpt --metrics $R/recipe-$NAME-s$SEED.metrics.json \
  --arch res:16x1-32x1-64x1 --alpha 0.5 --temperature 4 --epochs 40 --lr 0.003 --precision auto --seed $SEED \
  --threads 1 "$@" 2>> $R/recipe-$NAME-s$SEED.log
