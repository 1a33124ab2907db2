#!/bin/bash
# Every single-GPU benchmark of docs/benchmarks.md sections 5 and 6 in one device call (about 9 minutes on an
# H100): full logs and JSON under $OUT, the tables on stdout. Each step has its own time limit so that one
# slow step cannot take the others' time.
#   bash scripts/gpu_benchmarks.sh            (on the device machine, from the repository root)
set -u
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
OUT=${OUT:-/tmp/mavjax_bench}
mkdir -p "$OUT"
T0=$(date +%s)
step() {  # step NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.log, print rc and elapsed time
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc $? at $(( $(date +%s) - T0 ))s"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
step tune 150 python3 scripts/tune_decode_kernels.py --budget-s 90 --contexts 1024 8192 --json "$OUT/tune.json"
sed -n '/^op /,$p' "$OUT/tune.log" | grep -v "^ \{40\}"
step rank 200 python3 scripts/benchmark.py --random-weights --preset maverick --rank-slice 8 \
  --rank-kernels pallas xla --rank-batch-sizes 1 8 --profile --json "$OUT/rank.json"
grep -E "B=[0-9]+ T=|copy|profile of" "$OUT/rank.log"
sed -n '/^PROJECTION/,$p' "$OUT/rank.log"
step decode 120 python3 scripts/bench_decode.py --preset maverick --layers 2 --batch 1 8 --kernels xla pallas \
  --quantize fp8 --profile --json "$OUT/decode.json"
grep -E "copy|^ +(xla|pallas) " "$OUT/decode.log"
step kernels 330 python3 scripts/bench_kernels.py --skip model --budget-s 270 --reps 10 --json "$OUT/kernels.json"
grep -E "FAIL|ERROR" "$OUT/kernels.log" | head
sed -n '/^FP8 GEMM/,$p' "$OUT/kernels.log" | grep -v "^validation"
