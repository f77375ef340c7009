#!/bin/sh
# The 100-class task's top-k caches: the spread rule's (as on 2026-12-03) and the prior rule's (--tail-prior-rows),
# and the spread rule's read by the student as a tail bucket (--topk-tail bucket: the kept classes and the tail's
# total mass only).
# The teacher, caches and rebuilt-target students repeat docs/runs/2026-12-03/cache/pairs15.sh on this
# machine. Run from the repository root, niced, one thread.
# Usage: [TEMP=T] run.sh SEEDS [STUDENTS]   (STUDENTS: cache-rule names, default "full32-rebuilt top10-rebuilt
# top10-bucket"; TEMP: the students' temperature, default 4)
set -e
D=${D:-distill}
P=data/prepared/fashion-pairs.h5
T=data/teachers/fashion-pairs-e15/ensemble.onnx
C=data/pairs
R=docs/runs/2026-12-04/pairs
mkdir -p $C/students $R/students
[ -f $P ] || { python scripts/fashion_pairs.py --out data/pairs.npz &&
  $D prepare --npz data/pairs.npz --layout nchw --classes 100 --out $P; }
[ -f $T ] || nice -n 10 $D teacher --prepared $P --out $T --members 2 --arch cnn:32-64-128 --epochs 15 \
  --max-shift 1 --precision auto --threads 1 2> $R/teacher.log
cache() {  # name, extra options
  name=$1; shift
  [ -f $C/$name.h5 ] || { nice -n 10 $D cache --teacher $T --transfer-set $P --out $C/$name.h5 --threads 1 "$@" \
    2> $R/$name.cache.log &&
    nice -n 10 $D cache verify $C/$name.h5 --teacher $T --transfer-set $P --threads 1 2> $R/$name.verify.log; }
}
cache full32 --logits-dtype float32
for k in 5 10 20; do cache top$k --top-k $k; done
for k in 5 10 20; do cache top$k-prior --top-k $k --tail-prior-rows 20000; done
for s in $1; do
  for cr in ${2:-full32-rebuilt top10-rebuilt top10-bucket}; do
    c=${cr%-*}; rule=${cr##*-}
    name=$cr-T${TEMP:-4}-s$s
    [ -f $R/students/$name.metrics.json ] || nice -n 10 $D student --cache $C/$c.h5 --transfer-set $P \
      --out $C/students/$name.ckpt --metrics $R/students/$name.metrics.json --threads 1 --alpha 0.5 \
      --temperature ${TEMP:-4} --seed $s --topk-tail $rule 2> $R/students/$name.log
  done
done
