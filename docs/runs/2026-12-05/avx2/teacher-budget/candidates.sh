#!/usr/bin/env bash
# The default teacher for an AVX2-only host: candidates that train in float32 in about 15 minutes of both cores,
# so that a fresh clone's `make all` fits 30 minutes there. Each ran with one torch thread under nice, two at a time
# on this 2-core host (2026-12-05, AMD EPYC Zen 2), from the repository root after `make prepare`:
#   docs/runs/2026-12-05/avx2/teacher-budget/candidates.sh NAME OUT_DIR
# then `python scripts/teacher_report.py --teacher OUT_DIR/ensemble.onnx --prepared data/prepared/fashion-mnist.h5
# --out NAME.report.json` (val and test accuracy of each member and of the ensemble).
set -euo pipefail
RECIPE="--optimizer sgd --lr 0.1 --weight-decay 5e-4 --label-smoothing 0.1 --max-shift 2 --flip 0.5 --precision auto --threads 1"
case "$1" in
  res20-1x7)          ARGS="--members 1 --arch res:16x3-32x3-64x3 --epochs 7 --erase 0.5" ;;
  res8-2x10)          ARGS="--members 2 --arch res:16x1-32x1-64x1 --epochs 10 --erase 0.5" ;;
  res14-1x10)         ARGS="--members 1 --arch res:16x2-32x2-64x2 --epochs 10 --erase 0.5" ;;
  res20-1x7-noerase)  ARGS="--members 1 --arch res:16x3-32x3-64x3 --epochs 7 --erase 0" ;;
  res14-1x10-noerase) ARGS="--members 1 --arch res:16x2-32x2-64x2 --epochs 10 --erase 0" ;;
  *) echo "unknown candidate $1" >&2; exit 2 ;;
esac
mkdir -p "$2"
nice -n 5 .venv/bin/distill teacher --prepared data/prepared/fashion-mnist.h5 --out "$2/ensemble.onnx" $ARGS $RECIPE
