#!/bin/sh
# The strong teacher (3 members) as a compact cache (kd-cache/2, float16 logits: the default), verified, and
# the science table's students from it (docs/runs/2026-12-03/science/run.sh strong-compact), against the
# same students from its float32 cache. Run from the repository root (with the strong teacher and its
# float32 cache), niced, one thread.
set -e
D=${D:-distill}
P=data/prepared/fashion-mnist.h5
T=data/teachers/fashion-mnist-strong/ensemble.onnx
C=data/cache/fashion-mnist-strong-compact.h5
R=docs/runs/2026-12-03/cache
[ -f $C ] || nice -n 10 $D cache --teacher $T --transfer-set $P --out $C --threads 1 2> $R/strong-compact.cache.log
nice -n 10 $D cache verify $C --teacher $T --transfer-set $P --threads 1 2> $R/strong-compact.verify.log
bash docs/runs/2026-12-03/science/run.sh strong-compact conv:32/2-64/2-128/2 0 1 2
bash docs/runs/2026-12-03/science/run.sh strong-compact mlp:128 0 1 2
