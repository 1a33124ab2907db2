#!/bin/bash
# The GPU benchmarks of docs/benchmarks.md in as few device calls as possible: full logs and JSON under $OUT,
# the tables on stdout. Each step has its own time limit so that one slow step cannot take the others' time.
#   bash scripts/gpu_benchmarks.sh                      the single-GPU steps: tune rank decode kernels (~9 min)
#   bash scripts/gpu_benchmarks.sh allreduce sharded mesh   the steps that need 2+ GPUs of one host
#   bash scripts/gpu_benchmarks.sh bisect (then check, check_mesh: one per call) where the Pallas mesh path fails
# Steps: tune (decode tile sweep), rank (one 8-GPU rank, section 6), rank_sep (the same, shared expert in its
# own launches: MAVJAX_PALLAS_DISABLE=moe_shared), split_k (the rank with split-K sums in the kernels or in XLA,
# section 9), dtype (the rank with bf16 or f16 dots, section 10), pdl / pdl_kernels (the rank and its kernels
# with XLA's programmatic dependent launch off and on, section 11), kernel_profile (each op's kernels under
# the profiler, section 12), k_loop_check / k_loop_kernels / k_loop (the dense kernels' K-loop orders,
# MAVJAX_K_LOOP, checked, then the rank's kernels and step per order in $K_LOOP_MODES, section 14),
# attn_stages (the attention's split x tile x pipeline-depth sweep at 8K / 32K, section 11), decode (2-layer
# model, section 5),
# kernels (bench_kernels, section 5), allreduce (psum variants and the one-shot kernel), sharded (2-layer
# model over expert/tensor meshes, bench_sharded_decode), mesh (mavjax bench over a tensor mesh, FP8 + Pallas,
# with and without a forced-acceptance draft: issue 7's commands at reduced depth), check (every Pallas kernel
# against its reference at prefill/decode shard shapes, alone and inside shard_map), bisect (the 2-layer mesh
# model with one Pallas kernel family at a time switched off by MAVJAX_PALLAS_DISABLE).
set -u
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
# NVLink multicast stays off on the shared hosts (KINDS.md): never rely on a default
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/mavjax_bench}
mkdir -p "$OUT"
T0=$(date +%s)
STEPS=${*:-tune rank decode kernels}
NGPU=$(nvidia-smi -L | wc -l)
MESH_LAYERS=${MESH_LAYERS:-8}
step() {  # step NAME LIMIT_S COMMAND...: run if NAME was asked for, log to $OUT/NAME.log, print rc and time
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 1 ;; esac
  echo "=== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc $? at $(( $(date +%s) - T0 ))s"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
[ "$NGPU" -gt 1 ] && nvidia-smi topo -m | head -$((NGPU + 1))
step tune 150 python3 scripts/tune_decode_kernels.py --budget-s 90 --contexts 1024 8192 --json "$OUT/tune.json" \
  && sed -n '/^op /,$p' "$OUT/tune.log" | grep -v "^ \{40\}"
step rank 200 python3 scripts/benchmark.py --random-weights --preset maverick --rank-slice 8 \
  --rank-kernels pallas xla --rank-batch-sizes 1 8 --profile --json "$OUT/rank.json" \
  && { grep -E "B=[0-9]+ T=|copy|profile of" "$OUT/rank.log"; sed -n '/^PROJECTION/,$p' "$OUT/rank.log"; }
# the same rank with the shared expert in its own launches (before 2026-11-29's fusion into the MoE pair kernels)
step rank_sep 150 env MAVJAX_PALLAS_DISABLE=moe_shared python3 scripts/benchmark.py --random-weights \
  --preset maverick --rank-slice 8 --rank-kernels pallas --rank-batch-sizes 1 8 --json "$OUT/rank_sep.json" \
  && grep -E "B=[0-9]+ T=|copy" "$OUT/rank_sep.log"
# where split-K partials are summed (docs/benchmarks.md section 9): the defaults, then every family in its kernel,
# then every family in XLA (pallas_kernels/split_k.py, MAVJAX_SPLIT_K_REDUCE)
step split_k 200 bash -c 'for v in "" kernel xla; do MAVJAX_SPLIT_K_REDUCE=$v python3 scripts/benchmark.py \
  --random-weights --preset maverick --rank-slice 8 --rank-kernels pallas --rank-batch-sizes 1 \
  | sed "s/^/[${v:-defaults}] /"; done' && grep -E "B=[0-9]+ T=|copy" "$OUT/split_k.log"
# the dtype FP8 operands are widened to in the kernels (pallas_kernels/upcast.py, docs/benchmarks.md section 10):
# the earlier bf16 against the f16 default, on the rank
step dtype 200 bash -c 'for v in bfloat16 float16; do MAVJAX_FP8_COMPUTE_DTYPE=$v python3 scripts/benchmark.py \
  --random-weights --preset maverick --rank-slice 8 --rank-kernels pallas --rank-batch-sizes 1 8 \
  | sed "s/^/[$v] /"; done' && grep -E "B=[0-9]+ T=|copy" "$OUT/dtype.log"
# Programmatic dependent launch (XLA's --xla_gpu_enable_pdl, Hopper+): a kernel launches while its predecessor
# drains and waits (griddepcontrol.wait) before reading what it produced. The rank at batch 1, off and on twice,
# alternating; then the rank's kernels alone (default tiles, loop-timed) off and on. mavjax turns it on by
# default (mavjax/xla_flags.py); a value in XLA_FLAGS, as here, wins.
step pdl 300 bash -c 'for p in false true false true; do XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_pdl=$p" \
  python3 scripts/benchmark.py --random-weights --preset maverick --rank-slice 8 --rank-kernels pallas \
  --rank-batch-sizes 1 2>&1 | sed "s/^/[pdl=$p] /"; done' && grep -E "B=[0-9]+ T=|copy|rror" "$OUT/pdl.log"
step pdl_kernels 120 bash -c 'for p in false true; do XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_pdl=$p" \
  python3 scripts/tune_decode_kernels.py --max-cands 0 --contexts 1024 --budget-s 50 2>&1 | sed "s/^/[pdl=$p] /"; \
  done' && grep -E "copy|floor us|^\[pdl=[a-z]+\] [a-zA-Z]" "$OUT/pdl_kernels.log"
# Where each op's time goes (section 12): the rank's ops and the full-width ones at their default tiles, each
# once more under the profiler (its kernels per call: the Pallas kernel, XLA's sums and glue)
step kernel_profile 200 bash -c 'python3 scripts/tune_decode_kernels.py --max-cands 0 --contexts 1024 --profile \
  && python3 scripts/tune_decode_kernels.py --shard 1 --experts 16 --unroll 4 --max-cands 0 --contexts \
  --only "moe pair gate" "moe pairs" "mlp" "o " --profile' && grep -E "copy|^profile|^ +[0-9.]+ +1\.0 " \
  "$OUT/kernel_profile.log"
# The weight kernels' K loop (pallas_kernels/k_loop.py, docs/benchmarks.md section 14): every load of a program
# issued first ("unroll") or the scale pre-pass then a pipelined loop ("loop"). Correctness at the rank's shapes
# with the default, then the rank's kernels alone and the rank's step, alternating.
step k_loop_check 300 python3 scripts/check_kernels_gpu.py --shard 8 --tokens 1 16 --checks gemm_wo gate_up qkv_rope \
  moe model --timeout 200 && grep -E "shard 1/|FAIL|rror" "$OUT/k_loop_check.log"
step k_loop_kernels 400 bash -c 'for v in ${K_LOOP_MODES:-loop unroll}; do MAVJAX_K_LOOP=$v python3 scripts/tune_decode_kernels.py \
  --max-cands 0 --contexts 1024 --budget-s 60 2>&1 | sed "s/^/[$v] /"; done' \
  && grep -E "copy|floor us|^\[[a-z:0-9]+\] [a-zA-Z]" "$OUT/k_loop_kernels.log"
step k_loop 560 bash -c 'for v in ${K_LOOP_MODES:-loop unroll loop unroll}; do MAVJAX_K_LOOP=$v python3 scripts/benchmark.py \
  --random-weights --preset maverick --rank-slice 8 --rank-kernels pallas --rank-batch-sizes 1 2>&1 \
  | sed "s/^/[$v] /"; done' && grep -E "B=[0-9]+ T=|copy|rror" "$OUT/k_loop.log"
# The split-KV attention's pipeline depth at 8K and 32K (docs/benchmarks.md section 10: XLA won at 32K, bf16)
step attn_stages 160 python3 scripts/tune_decode_kernels.py --shard 1 --only attention --contexts 8192 32768 \
  --kv bf16 fp8 --unroll 2 --budget-s 100 --json "$OUT/attn_stages.json" && sed -n '/^op /,$p' "$OUT/attn_stages.log"
step decode 120 python3 scripts/bench_decode.py --preset maverick --layers 2 --batch 1 8 --kernels xla pallas \
  --quantize fp8 --profile --json "$OUT/decode.json" && grep -E "copy|^ +(xla|pallas) " "$OUT/decode.log"
step kernels 240 python3 scripts/bench_kernels.py --skip model --budget-s 200 --reps 10 --json "$OUT/kernels.json" \
  && { grep -E "FAIL|ERROR" "$OUT/kernels.log" | head; sed -n '/^FP8 GEMM/,$p' "$OUT/kernels.log" | grep -v "^validation"; }
step allreduce 150 python3 scripts/bench_allreduce.py --json "$OUT/allreduce.json" && tail -14 "$OUT/allreduce.log"
step sharded 200 python3 scripts/bench_sharded_decode.py --layers 2 --batch 1 64 --exchange all_to_all ragged \
  --oneshot --json "$OUT/sharded.json" && sed -n '/ms\/token/,$p' "$OUT/sharded.log"
MESH=${MESH:-expert=1,tensor=$NGPU}
BENCH="python3 -m mavjax.cli bench --random-weights --preset maverick --layers $MESH_LAYERS --quantize fp8 \
  --kernels pallas --mesh $MESH --iters 2 --output-len 128"
# each run on its own (one failing does not stop the others); the log holds all their tables
step mesh 330 bash -c "$BENCH --batch-sizes 1 --input-len 1024 8192 --max-model-len 8448 --profile --json $OUT/mesh_b1.json; \
  $BENCH --batch-sizes 1 --input-len 1024 --max-model-len 1280 --random-draft --num-draft-tokens 3 \
  --forced-acceptance 3.11 --json $OUT/mesh_draft.json; \
  $BENCH --batch-sizes 1 --input-len 1024 --max-model-len 1280 --allreduce oneshot --json $OUT/mesh_oneshot.json; \
  $BENCH --batch-sizes max --max-num-seqs 512 --input-len 1024 --max-model-len 1280 --json $OUT/mesh_bmax.json" \
  && grep -E "^ *[0-9]+ +[0-9]+ +[0-9]+ |^random|Error" "$OUT/mesh.log"
# Where a Pallas mesh run fails (the 2026-11-29 illegal memory access was JAX's int32 addressing of large FP8
# arrays, fixed: docs/benchmarks.md section 8); each of check / check_mesh / bisect fills most of one device call
step check 560 python3 scripts/check_kernels_gpu.py --shard $NGPU --tokens 16 1024 --checks moe model \
  --timeout 260 && grep -E "shard 1/" "$OUT/check.log"
step check_mesh 560 python3 scripts/check_kernels_gpu.py --shard 8 --tokens 16 --mesh $NGPU \
  --checks moe gate_up attention --timeout 250 && grep -E "shard 1/" "$OUT/check_mesh.log"
# The 2-layer mesh model without XLA's command buffers (CUDA graphs), then with each Pallas family switched off
# in turn.
step bisect 560 bash -c 'for off in nocb "" moe attention qkv gate_up gemm norm moe,attention,qkv,gate_up,gemm,norm; do
  flags=${XLA_FLAGS:-}; tag=${off:-none}; [ "$off" = nocb ] && flags="$flags --xla_gpu_enable_command_buffer=" && off=
  XLA_FLAGS=$flags MAVJAX_PALLAS_DISABLE=$off timeout 60 python3 -m mavjax.cli bench --random-weights \
    --preset maverick --layers 2 --quantize fp8 --kernels pallas --mesh '"$MESH"' --batch-sizes 1 --input-len 8 \
    --output-len 8 --iters 1 > '"$OUT"'/bisect_$tag.log 2>&1
  echo "XLA_FLAGS [$flags] pallas off: [${off:-none}] rc $?: $(grep -E "^ +1 |Error" '"$OUT"'/bisect_$tag.log | head -1)"
  done' && cat "$OUT/bisect.log"
exit 0
