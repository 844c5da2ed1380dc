#!/usr/bin/env bash
# One-shot GPU session (under 10 minutes on one H100/H200): build the CUDA backend, run its tests,
# time bench.py on the GPU, then adapt SmolLM2 for at most 8 minutes; everything lands in OUT.
#
#   bash experiments/gpu_run.sh OUT            # on a machine with a GPU
#   bash experiments/gpu_run.sh --dry-run OUT  # the same steps at toy size on the CPU (CI runs this)
#
# Ship what it produced: OUT/adapt/model is the adapted model (fp16 deltas over the GGUF); copy it to
# data/smollm2-vqt and record OUT/adapt/result.json in the README's frontier table.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: gpu_run.sh [--dry-run] OUT}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0
step() {  # name, then the command; its output goes to OUT/name.log, its exit status to OUT/status.txt
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
: > "$OUT/status.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.txt"
if [ $DRY -eq 1 ]; then
  step build "$PY" -c "from vqt.ops import cuda; print('cuda backend:', cuda.available())"
  step cuda_tests "$PY" -m pytest -q -m cuda tests/test_backends.py
  step bench "$PY" experiments/bench.py --model demo --data tests/fixtures/mediawiki/marrowby_tide_mill_2.json \
    --windows 128 --max-edits 3 --single-token 3 --threads 1
  step adapt "$PY" experiments/adapt.py --dry-run --out "$OUT/adapt" --threads 2
else
  step build "$PY" -c "from vqt.ops import cuda; ok, why = cuda.available(); print(ok, why); assert ok, why"
  step cuda_tests timeout 180 "$PY" -m pytest -q -m cuda tests/test_backends.py
  step bench timeout 120 "$PY" experiments/bench.py --device cuda --windows 1024 --max-edits 40 --single-token 30
  step adapt timeout 540 "$PY" experiments/adapt.py --out "$OUT/adapt" --device cuda --time-limit 8 --steps 100000 \
    --batch-size 16 --seq-len 512 --window 128 --codebook-size 256 --eval-tokens 16384
fi
exit $status
