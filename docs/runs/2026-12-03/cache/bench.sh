#!/bin/sh
# The cache's and the student's measurements of themselves. Run from the repository root, niced, one thread,
# one at a time.
set -e
D=${D:-distill}
P=data/prepared/fashion-mnist.h5
T=data/teachers/fashion-mnist/ensemble.onnx
C=data/c23
R=docs/runs/2026-12-03/cache
# a student's epoch from the compact cache (held, streamed) and from a 4-view compact cache, against the same
# rows in memory, interleaved (and online: the teacher run on every batch)
[ -f $C/fm-views4.h5 ] || nice -n 10 $D cache --teacher $T --transfer-set $P --out $C/fm-views4.h5 --views 4 \
  --threads 1 2> $R/fm-views4.cache.log
nice -n 10 $D student bench --cache $C/fm-compact.h5 --views-cache $C/fm-views4.h5 --transfer-set $P --teacher $T \
  --out $R/bench-student-compact.json --threads 1 2> $R/bench-student-compact.log
# memory flat in K at 10 classes (the 1.43x of before), and a synthetic 1000-class, 3-member teacher's top-10
# cache at 100k and 1M rows and views, K = 1..64
nice -n 10 $D cache bench-scale --sizes "" --views 1,4,16,64 --view-rows 10000 --threads 1 \
  --work $C/bench-work --out $R/cache-scale-10.json 2> $R/cache-scale-10.log
nice -n 10 $D cache bench-scale --sizes 100000,1000000 --classes 1000 --members 3 --hidden 32 --top-k 10 \
  --views 1,4,16,64 --view-totals 100000,1000000 --threads 1 --work $C/bench-work \
  --out $R/cache-scale-1000.json 2> $R/cache-scale-1000.log
