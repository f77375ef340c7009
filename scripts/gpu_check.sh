#!/usr/bin/env bash
# The one prepared GPU session: install the onnxruntime-gpu wheel (carried in parts, since one call
# carries at most 64 MiB and the wheel is 244 MiB), then the cache check and the edge-bench check.
#   OUT=/some/folder bash scripts/gpu_check.sh PARTS_DIR STUDENT.onnx STUDENT.fp16.onnx
set -uo pipefail
OUT=${OUT:-data/gpu-check}; mkdir -p "$OUT"
PARTS=${1:?parts folder}; FP32=${2:?student onnx}; FP16=${3:?student fp16 onnx}
WHL=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat "$PARTS"/ortgpu.part* > "$WHL"
echo "wheel sha256 $(sha256sum "$WHL" | cut -c1-16) (expected 05d548956197b9d0)" | tee "$OUT/setup.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL" 2>&1 | tail -2
export PYTHONPATH=/tmp/site
nvidia-smi -L | tee -a "$OUT/setup.txt"
( set -e; OUT="$OUT/cache" W=/tmp/gw ROWS=${ROWS:-100000} SCALE_SIZES=${SCALE_SIZES-} bash scripts/gpu_cache_check.sh ) \
  > "$OUT/cache.log" 2>&1; echo "cache check rc=$?" | tee -a "$OUT/setup.txt"
tail -n 25 "$OUT/cache.log"
bash scripts/gpu_bench_check.sh "$FP32" "$FP16" "" "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench.txt"
echo "bench check rc=${PIPESTATUS[0]}" | tee -a "$OUT/setup.txt"
