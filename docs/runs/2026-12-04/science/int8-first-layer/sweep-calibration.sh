# Calibration and weight-scale sweep of the seed-0 ResNet-8 of recipe.sh nols-res8-e40 (raw pixels, --force to
# see every drop); run from a clone root. Stopped after the fifth export (entropy with 10,000 rows ran over
# five minutes); its output: sweep-calibration-s0.txt.
set -e
N=recipe-nols-res8-e40-s0; S=data/students; T=data/teachers/fashion-mnist-nols/ensemble.onnx
for m in minmax entropy percentile; do for w in channel tensor; do for a in uint8; do for r in 2000 10000; do
  nice -n 5 .venv/bin/distill export --raw-input --checkpoint $S/$N.ckpt --transfer-set data/prepared/fashion-mnist.h5 \
    --out /tmp/sw-$m-$w-$a-$r.onnx --int8 /tmp/sw-$m-$w-$a-$r.int8.onnx --report /tmp/sw-$m-$w-$a-$r.json \
    --teacher $T --no-mobile --int8-activations $a --calibration-method $m --weight-scales $w --calibration-rows $r --force 2>&1 | tail -1
done; done; done; done
