#!/usr/bin/env bash
# GPU check of the edge benchmark: the student fp32 and fp16 on onnxruntime's CUDA execution provider
# (inputs bound once with IOBinding, outputs left on the device), each (model, batch) in a fresh
# process by stages.bench.worker, with the CPU provider at batch 1 and 256 alongside for a ratio
# measured in the same run.
#
#   scripts/gpu_bench_check.sh STUDENT.onnx STUDENT.fp16.onnx [POOL.npy] [OUT.jsonl]
#
# POOL.npy: real input rows (float32 [n, ...]); without it, normal(0, 1) rows of the model's input
# shape are used (timing an MLP does not depend on the values).  Needs python3 with numpy, onnx and
# onnxruntime-gpu; PYTHON overrides the interpreter.  Exit 5 (and a one-line reason) when onnxruntime
# cannot run CUDA here: a CPU-only onnxruntime wheel, no driver, or CUDA/cuDNN libraries missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FP32=${1:?usage: $0 STUDENT.onnx STUDENT.fp16.onnx [POOL.npy] [OUT.jsonl]}
FP16=${2:?usage: $0 STUDENT.onnx STUDENT.fp16.onnx [POOL.npy] [OUT.jsonl]}
POOL=${3:-}
OUT=${4:-gpu_bench_check.jsonl}
BATCHES=${BATCHES:-"1 16 256"}
TIMING=${TIMING:-"--warmup-count 50 --warmup-s 0.5 --min-count 200 --min-s 0.5 --trials 5"}

"$PY" - <<'PY' || exit 5
import sys
import onnxruntime as ort
print(f"python {sys.version.split()[0]}, onnxruntime {ort.__version__} ({ort.get_device()}), "
      f"providers {ort.get_available_providers()}", file=sys.stderr)
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print("gpu_bench_check: CUDAExecutionProvider is not available in this onnxruntime build "
          "(install onnxruntime-gpu, not onnxruntime); nothing measured", file=sys.stderr)
    sys.exit(5)
PY

if [ -z "$POOL" ]; then
  POOL=$(mktemp --suffix=.npy)
  "$PY" - "$FP32" "$POOL" <<'PY'
import sys, numpy as np, onnx
shape = [d.dim_value for d in onnx.load(sys.argv[1]).graph.input[0].type.tensor_type.shape.dim][1:]
np.save(sys.argv[2], np.random.default_rng(0).standard_normal((1024, *shape)).astype(np.float32))
PY
fi

: > "$OUT"
run() {  # model label provider batch
  if ! "$PY" -m stages.bench.worker --model "$1" --inputs "$POOL" --threads 1 --batch "$4" --provider "$3" \
       $TIMING > "$OUT.one" 2> "$OUT.err"; then
    echo "gpu_bench_check: $2 on $3 (batch $4) failed: $(tail -n 1 "$OUT.err")" >&2
    [ "$3" = cuda ] && exit 5 || return 0
  fi
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); r.pop('latencies_s'); r.pop('trial_latencies_s', None); r['label']=sys.argv[2]; print(json.dumps(r))" "$OUT.one" "$2" >> "$OUT"
}
for b in $BATCHES; do
  run "$FP32" fp32 cuda "$b"
  run "$FP16" fp16 cuda "$b"
done
run "$FP32" fp32 cpu 1
run "$FP32" fp32 cpu 256
rm -f "$OUT.one" "$OUT.err"

"$PY" - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'model':6} {'provider':24} {'batch':>5} {'p50 us':>10} {'p99 us':>10} {'rows/s':>14} {'load ms':>8} valid")
for r in rows:
    s = r["steady"]
    print(f"{r['label']:6} {r['providers_used'][0]:24} {r['batch']:>5} {s['p50']:>10.1f} {s['p99']:>10.1f} "
          f"{s['throughput_rows_s']:>14,.0f} {r['load']['session_create_s'] * 1e3:>8.1f} "
          f"{'yes' if s['valid'] else 'noisy: ' + s['reason']}")
def p50(label, prov, b):
    return next((r["steady"]["p50"] for r in rows if r["label"] == label and r["provider_requested"] == prov
                 and r["batch"] == b), None)
for b in (1, 256):
    a, h, c = p50("fp32", "cuda", b), p50("fp16", "cuda", b), p50("fp32", "cpu", b)
    if a and h:
        print(f"batch {b}: fp16/fp32 on CUDA p50 ratio {h / a:.2f}" + (f"; CUDA fp32 / CPU fp32 {a / c:.2f}" if c else ""))
PY
echo "every result: $OUT" >&2
