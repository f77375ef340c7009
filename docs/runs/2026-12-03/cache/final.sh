#!/bin/sh
# The Fashion-MNIST caches again with the final code (chunks as even as the rows allow) for their bytes; a merge of
# two shards of a 1000-class top-10 cache, timed; float16 against float32 logits.
# Run from the repository root, niced, one thread, one at a time.
set -e
D=${D:-distill}
PY=${PY:-python}
P=data/prepared/fashion-mnist.h5
T=data/teachers/fashion-mnist/ensemble.onnx
C=data/c23
F=$C/final
R=docs/runs/2026-12-03/cache
mkdir -p $F
build() { name=$1; shift; [ -f $F/fm-$name.h5 ] || nice -n 10 $D cache --teacher $T --transfer-set $P \
  --out $F/fm-$name.h5 --threads 1 "$@" 2> $R/final-fm-$name.cache.log; }
build full32 --logits-dtype float32 --store-soft
build compact
for k in 1 2 3 5; do build top$k --top-k $k; done
build views4-top3 --views 4 --top-k 3
[ -f $F/fm-views4.h5 ] || ln $C/fm-views4.h5 $F/fm-views4.h5  # bench.sh built it with this code
$PY scripts/cache_report.py --runs $R --caches $F > /dev/null
# merge: two shards of 200,000 rows of a synthetic 3-member, 1000-class teacher's top-10 cache
W=$C/merge-work
mkdir -p $W
[ -f $W/set.h5 ] || nice -n 10 $PY -c "
from pathlib import Path
from stages.cache.measure import linear_teacher, synthetic_prepared
synthetic_prepared(Path('$W/set.h5'), 200000, (784,), 1000)
linear_teacher(Path('$W/t.onnx'), 784, classes=1000, members=3, hidden=32)"
for i in 0 1; do [ -f $W/c.part${i}of2.h5 ] || nice -n 10 $D cache --teacher $W/t.onnx --transfer-set $W/set.h5 \
  --out $W/c.h5 --shard $i/2 --top-k 10 --no-gate --threads 1 2> $R/merge-part$i.log; done
rm -f $W/m.h5
( time nice -n 10 $D cache merge --part $W/c.part0of2.h5 --part $W/c.part1of2.h5 --out $W/m.h5 ) \
  > $R/merge-1000.log 2>&1
ls -l $W/c.part0of2.h5 $W/c.part1of2.h5 $W/m.h5 >> $R/merge-1000.log
# float16 against float32 logits: targets and the two seed-0 mlp:128 students at T = 4 (and the targets at 1, 20)
for t in 1 4 20; do
  nice -n 10 $PY scripts/fp16_logits_effect.py --prepared $P --teacher $T --cache32 $C/fm-full32.h5 \
    --cache16 $C/fm-compact.h5 --student32 $C/students/mlp-full32-T4-s0.ckpt \
    --student16 $C/students/mlp-compact-T4-s0.ckpt --temperature $t --out $R/fp16-logits-T$t.json > /dev/null
done
# the edge CNN from the full and the compact cache: strong-compact.sh (3 seeds, the strong teacher)
