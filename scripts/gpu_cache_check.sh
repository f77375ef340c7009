#!/usr/bin/env bash
# GPU check of the cache stage: `distill cache --device cuda` with IOBinding, resume after
# SIGKILL, verify on CUDA against the stored logits, and the bench-cache JSON with the stage on CUDA.
# Needs only python3 with torch, onnx, onnxruntime-gpu, h5py, click, numpy (tqdm optional). Run from
# the repository root:   OUT=/some/folder bash scripts/gpu_cache_check.sh
set -euo pipefail
OUT=${OUT:-data/gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
W=${W:-$OUT/work}; mkdir -p "$W"  # big synthetic files: keep W outside a folder you copy back
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import onnxruntime as ort, torch, sys
print("python", sys.version.split()[0], "| onnxruntime", ort.__version__, "| torch", torch.__version__)
print("available providers:", ort.get_available_providers())
try:
    ort.preload_dlls(); print("preload_dlls: ok")
except Exception as e:
    print("preload_dlls:", e)
PY
# tqdm may be missing on a bare machine: a stand-in keeps the progress bar a no-op
if ! "$PY" -c "import tqdm" 2>/dev/null; then
  mkdir -p "$W/shim/tqdm"; printf 'class tqdm:\n    def __init__(self, it=None, **k): self.it = it\n    def __iter__(self): return iter(self.it)\n    def update(self, n=1): pass\n    def close(self): pass\n    def __enter__(self): return self\n    def __exit__(self, *a): pass\n' > "$W/shim/tqdm/auto.py"; touch "$W/shim/tqdm/__init__.py"
  export PYTHONPATH="$W/shim"
fi
D() { PYTHONPATH=".:${PYTHONPATH:-}" "$PY" -m commands "$@"; }
# 200k synthetic rows of 1x28x28 and a 3-member CNN ensemble (random weights), made by the bench helpers
ROWS=${ROWS:-200000}  # synthetic transfer-set rows
SCALE_SIZES=${SCALE_SIZES-10000,100000,1000000}  # empty: skip bench-cache-scale
PYTHONPATH=".:${PYTHONPATH:-}" "$PY" - "$W" "$ROWS" <<'PY'
import sys, torch
from pathlib import Path
from stages.cache.measure import synthetic_prepared, _ensemble, CacheBenchConfig
w = Path(sys.argv[1])
synthetic_prepared(w / "p.h5", int(sys.argv[2]), (1, 28, 28))
_ensemble(CacheBenchConfig(), (1, 28, 28), w / "ens.onnx")
PY
set -x
PLOT=(); "$PY" -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/diagnostics.png")
D cache --teacher "$W/ens.onnx" --transfer-set "$W/p.h5" --out "$W/cuda.h5" --device cuda --batch-size 4096 \
  --no-gate --temperatures 1,2,4,8,20 "${PLOT[@]}" 2>&1 | tail -n 12 | tee "$OUT/runs.txt"
D cache --teacher "$W/ens.onnx" --transfer-set "$W/p.h5" --out "$W/cpu.h5" --device cpu --batch-size 4096 \
  --no-gate --temperatures 1,2,4,8,20 2>&1 | tail -n 2 | tee -a "$OUT/runs.txt"
# SIGKILL a CUDA run once 10 batches are committed (polled from outside), resume, compare with the uninterrupted run
PYTHONPATH=".:${PYTHONPATH:-}" "$PY" - "$W" "$PY" <<'PY' 2>&1 | tee "$OUT/resume.txt"
import os, signal, subprocess, sys, time, h5py
w, py = sys.argv[1], sys.argv[2]
args = ["cache", "--teacher", f"{w}/ens.onnx", "--transfer-set", f"{w}/p.h5", "--out",
        f"{w}/killed.h5", "--device", "cuda", "--batch-size", "4096", "--temperatures", "1,2,4,8,20", "--no-gate"]
cmd = [py, "-m", "commands", *args]
# 0.1 s per batch (tests/throttled_cli.py, a test-side hook) so the poll can kill at batch 10
p = subprocess.Popen([py, "-m", "tests.throttled_cli", "0.1", *args], stderr=subprocess.DEVNULL)
done, t0 = 0, time.time()
while p.poll() is None and done < 10 * 4096 and time.time() - t0 < 120:
    try:
        with h5py.File(f"{w}/killed.h5.partial", "r", locking=False) as f:
            done = int(f.attrs["committed_rows"])
    except (OSError, KeyError):
        pass
    time.sleep(0.02)
p.send_signal(signal.SIGKILL); p.wait()
print("killed at committed_rows", done)
r = subprocess.run(cmd, capture_output=True, text=True)
print("\n".join(l for l in r.stderr.splitlines() if "resuming" in l or "rows x" in l), "rc", r.returncode)
PY
PYTHONPATH=".:${PYTHONPATH:-}" "$PY" - "$W" <<'PY' 2>&1 | tee "$OUT/compare.txt"
import sys, h5py, numpy as np
from pathlib import Path
sys.path.insert(0, ".")
from tests.cache_helpers import digest
w = Path(sys.argv[1])
print("resumed == uninterrupted (digest):", digest(w / "killed.h5") == digest(w / "cuda.h5"))
with h5py.File(w / "cuda.h5") as g, h5py.File(w / "cpu.h5") as c:
    print("provider:", g.attrs["provider"], "| io_binding in provenance:", '"io_binding": true' in g.attrs["provenance"])
    d = np.abs(g["logits"][:] - c["logits"][:]).max(); s = np.abs(g["soft/4"][:] - c["soft/4"][:]).max()
    print(f"CUDA vs CPU: max |logit diff| {d:.3g}, max |soft T=4 diff| {s:.3g}")
PY
D cache verify "$W/cuda.h5" --teacher "$W/ens.onnx" --transfer-set "$W/p.h5" --device cuda 2>&1 | grep "^verify" | tee "$OUT/verify.txt"
D cache bench --work "$W" --out "$OUT/bench-cache-cuda.json" --rows 16384 --batch-size 1024 --device cuda --threads 4 2>&1 | tail -n 3
[ -z "$SCALE_SIZES" ] || D cache bench-scale --work "$W" --out "$OUT/bench-cache-scale-cuda.json" --device cuda \
  --threads 4 --sizes "$SCALE_SIZES" 2>&1 | grep bench
