#!/bin/sh
# Student-side mixup (--mixup, a teacher-free approximation of mixed views) against a views cache's
# mixed views (function matching: the teacher run on each mixed image), mlp:800-800, 2026-12-05, on
# the 2-core AVX2 host, one torch thread each, niced. Run from a clone's root after `make prepare`.
# The teacher: the AVX2 default recipe without label smoothing (1 x ResNet-20, 7 epochs, float32):
#   distill teacher --members 1 --arch res:16x3-32x3-64x3 --epochs 7 --optimizer sgd --lr 0.1 --weight-decay 5e-4 \
#     --label-smoothing 0 --max-shift 2 --flip 0.5 --erase 0 --precision auto --threads 1 \
#     --prepared data/prepared/fashion-mnist.h5 --out data/teachers/fashion-mnist-nols/ensemble.onnx
# Its caches (run.sh cache NAME VIEWS MIXUP): s32 = 32 shifted views, m32 = 32 shifted views, half mixed.
# Students: run.sh student NAME CACHE SEED [extra args], e.g. run.sh student s32-mix05 s32 0 --mixup 0.5
# Extra args come last, so they override the defaults below (click keeps an option's last value):
#   run.sh student s32-mix05-e700 s32 0 --mixup 0.5 --epochs 700
set -e
R=docs/runs/2026-12-05/mixup
T=data/teachers/fashion-mnist-nols/ensemble.onnx
P=data/prepared/fashion-mnist.h5
case $1 in
cache)
  [ -f data/cache/fashion-mnist-nols-$2.h5 ] && exit 0
  nice -n 5 .venv/bin/distill cache build --teacher $T --transfer-set $P --out data/cache/fashion-mnist-nols-$2.h5 \
    --views $3 --view-max-shift 2 --view-flip 0 --view-mixup $4 --temperatures 1,2,4,8,20 --threads 1 \
    > $R/$2.cache.log 2>&1 ;;
student)
  NAME=$2; CACHE=data/cache/fashion-mnist-nols-$3.h5; SEED=$4; shift 4
  [ -f $R/$NAME-s$SEED.metrics.json ] && exit 0
  # A killed run leaves data/students/mixup-NAME-sSEED.state (since 50e81b3) and the same command resumes
  # it: its log is then continued, not restarted.
  if [ -f data/students/mixup-$NAME-s$SEED.state ]; then echo "# resumed: cache $CACHE; args: $*" >> $R/$NAME-s$SEED.log
  else echo "# cache $CACHE; args: $*" > $R/$NAME-s$SEED.log; fi
  nice -n 5 .venv/bin/distill student train --cache $CACHE --transfer-set $P \
    --out data/students/mixup-$NAME-s$SEED.ckpt --metrics $R/$NAME-s$SEED.metrics.json \
    --arch mlp:800-800 --alpha 0.5 --temperature 20 --epochs 300 --lr 0.001 --precision fp32 --seed $SEED \
    --threads 1 "$@" 2>> $R/$NAME-s$SEED.log ;;
*) echo "usage: run.sh cache NAME VIEWS MIXUP | run.sh student NAME CACHE SEED [args]" >&2; exit 2 ;;
esac
