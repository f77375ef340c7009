#!/bin/sh
# ResNet-8's int8 export with uint8 against int8 activations, and the fp32 export, side by side.
# Run from a clone's root after make all and recipe.sh views8-e60 0. Usage: [TEACHER=<ensemble.onnx>] res8-int8.sh NAME
# (e.g. recipe-views8-e60-s0; TEACHER=data/teachers/fashion-mnist-nols/ensemble.onnx for recipe-nols-res8-e40-s0)
# Writes $R/NAME-int8.{json,md,log} (bench), $R/NAME-{uint8,int8}.raw.export.json and $R/NAME-ops.txt (onnxruntime's
# optimised graphs: which kernels run).
set -e
R=docs/runs/2026-12-04/science
N=$1; S=data/students; D=.venv/bin/distill; T=${TEACHER:-data/teachers/fashion-mnist/ensemble.onnx}
for a in uint8 int8; do
  nice -n 5 $D export --raw-input --checkpoint $S/$N.ckpt --transfer-set data/prepared/fashion-mnist.h5 \
    --out $S/$N-$a.raw.onnx --int8 $S/$N-$a.raw.int8.onnx --report $R/$N-$a.raw.export.json \
    --teacher $T --no-mobile --int8-activations $a
done
.venv/bin/python scripts/ort_ops.py $S/$N-uint8.raw.onnx $S/$N-uint8.raw.int8.onnx $S/$N-int8.raw.int8.onnx > $R/$N-ops.txt
nice -n 5 $D bench --teacher $T --candidate res8-fp32-raw=$S/$N-uint8.raw.onnx \
  --candidate res8-int8-u8-raw=$S/$N-uint8.raw.int8.onnx --candidate res8-int8-s8-raw=$S/$N-int8.raw.int8.onnx \
  --prepared data/prepared/fashion-mnist.h5 --threads 1 --batches 1 --out $R/$N-int8.json --markdown $R/$N-int8.md \
  --csv data/bench/$N-int8.csv --plot-accuracy data/bench/$N-int8.png --plot-throughput data/bench/$N-int8.tp.png \
  2> $R/$N-int8.log
