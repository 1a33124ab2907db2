"""Every Pallas kernel of issue 3 on Maverick's shapes, validated on the GPU and then timed against its floor and
XLA, in one run of at most ~8 minutes (`--budget-s`, default 400 s: no new row starts after it).

  PYTHONPATH=. python3 scripts/bench_kernels.py                  # GPU (H100 / H200); table + $OUT/bench_kernels.json
  PYTHONPATH=. python3 scripts/bench_kernels.py --budget-s 900   # more of the lower-priority rows
  PYTHONPATH=. python3 scripts/bench_kernels.py --skip attention moe fusion model --gemm-m 32 64
                                                                 # only the decode GEMM rows at 32 and 64 tokens
  python3 scripts/bench_kernels.py --dry-run                     # CPU: same flow, Pallas interpreter, tiny shapes

Shapes: Maverick (hidden 5120, 40 q / 8 kv heads of 128, dense MLP 16384, 128 routed experts of 8192) -- the
full layer ("full") and the 1/8 tensor-parallel shard one GPU of an 8-GPU deployment holds ("/8": 5 q / 1 kv
head, MLP 2048, experts of 1024; column-parallel N/8, row-parallel K/8).

Order (most important rows first, so a run cut by --budget-s still has them):
  0. device-copy bandwidth (mavjax.benchmarking.copy_bandwidth, bytes read + written): the memory floor;
     validation of every kernel on the GPU against its reference with NaN-poisoned outputs (FP8 GEMM:
     bench_fp8_gemm.validate; MoE: bench_moe.validate; split-KV attention, fusions: here). A kernel that
     fails validation is not timed.
  1. core rows: FP8 GEMM decode at M=16 and 1 (autotuned at M=16 over bench_fp8_gemm.decode_candidates plus
     the extra candidates below), split-KV attention at 8K..128K (bf16 and FP8 KV), MoE decode, the 2-layer
     Maverick-width model decode at batch 1 (kernels="pallas" vs "xla", bf16 and FP8 weights), the fusions
     at decode.
  2. the rest: the other GEMM shapes (down, k|v, down/8, o/8) at M=16 and 1, GEMM at M in {8, 64} and prefill
     (`--gemm-m`: only the M given, no prefill), more attention shapes, fusions at prefill, MoE N=64.
MoE rows time moe_fp8's default path (on Hopper up to 16 pairs the Mosaic GPU pair path, `path` column) and,
where that is the Mosaic one, the Triton pair path beside it (`triton` column).
Columns: us (best per op), TB/s (bytes that must move / time) or TFLOP/s, xfloor = time / floor (floor =
bytes / copy bandwidth, or FLOPs / the H100 dense-FP8 datasheet peak for prefill), then XLA time / Pallas time
for each baseline of the same run (> 1: Pallas faster). Timing: bench_fp8_gemm.Cell, bench_attention.time_op,
bench_moe.Cell (each a device loop, mavjax.benchmarking.device_loop, calling the op on up to 32 distinct weight
buffers per iteration, > L2 in total: no host dispatch per call) and bench_decode.decode_rows. The decode GEMM
and attention rows also give the ops' own kernel time, traced (`kern` columns, mavjax.benchmarking.kernel_time:
no loop kernels, no launch gaps), and the attention rows XLA's plain read of the same bytes beside it.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import traceback
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_attention as batt  # noqa: E402
import bench_decode as bdec  # noqa: E402
import bench_fp8_gemm as bgemm  # noqa: E402
import bench_moe as bmoe  # noqa: E402
from mavjax.atomic_write import write_json  # noqa: E402
from mavjax.benchmarking import copy_bandwidth, fmt, kernel_time  # noqa: E402
from mavjax.model import GATHER_MAX_PAIRS, apply_rope, rms_norm  # noqa: E402
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference, kernel_path  # noqa: E402
from pallas_kernels.fp8_gemm import fp8_matmul  # noqa: E402
from pallas_kernels.fused_gemm import gate_up_swiglu, gate_up_swiglu_ref, qkv_rope, qkv_rope_ref  # noqa: E402
from pallas_kernels.fused_norm import add_rms_norm, add_rms_norm_ref  # noqa: E402
from pallas_kernels import mgpu_gemv, moe_mgpu  # noqa: E402

T0 = time.perf_counter()
FP8 = jnp.float8_e4m3fn
FP8_PEAK_TFLOPS = bgemm.FP8_PEAK_TFLOPS
INTERPRET = False


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


class Plan:
    """Maverick's shapes (or tiny ones for --dry-run)."""

    def __init__(self, dry):
        self.dry = dry
        if dry:  # one row per section and one validation case per kernel: the flow, in about a minute
            self.D, self.H, self.K, self.Dh, self.Fm, self.Fe, self.E = 256, 4, 2, 32, 384, 128, 8
            self.shard = 2
            self.S_list, self.chunk, self.prefill_m = [256], 128, 96
            self.decode_m, self.moe_n = [1, 8], [1]
            self.model = dict(preset="tiny", layers=2, context=8, iters=3)
        else:
            self.D, self.H, self.K, self.Dh, self.Fm, self.Fe, self.E = 5120, 40, 8, 128, 16384, 8192, 128
            self.shard = 8
            self.S_list, self.chunk, self.prefill_m = [8192, 32768, 131072], 8192, 4096
            self.decode_m, self.moe_n = [1, 8, 16, 64], [1, 8, 64]
            self.model = dict(preset="maverick", layers=2, context=1024, iters=64)
        D, s = self.D, self.shard
        # GEMM shapes (name, K, N): the first four are core rows
        self.gemm = [(f"mlp gate|up {D}x{self.Fm}", D, self.Fm), (f"q|o {D}x{self.H * self.Dh}", D, self.H * self.Dh),
                     (f"mlp up/{s} {D}x{self.Fm // s}", D, self.Fm // s),
                     (f"q/{s} {D}x{self.H * self.Dh // s}", D, self.H * self.Dh // s),
                     (f"mlp down {self.Fm}x{D}", self.Fm, D), (f"k|v {D}x{self.K * self.Dh}", D, self.K * self.Dh),
                     (f"mlp down/{s} {self.Fm // s}x{D}", self.Fm // s, D),
                     (f"o/{s} {self.H * self.Dh // s}x{D}", self.H * self.Dh // s, D)]
        # fusion shapes: (name, F) for gate/up, (name, H, K) for QKV
        self.gate_up = [("full", self.Fm), (f"/{s}", self.Fm // s)]
        self.qkv = [("full", self.H, self.K), (f"/{s}", self.H // s, max(1, self.K // s))]
        self.moe = [(f"/{s}", self.Fe // s), ("full", self.Fe)]
        self.gemm_core = 4  # the first shapes of self.gemm: core rows at M = 16 and 1; the rest there later
        if dry:  # two core shapes and one other (the down shard)
            self.gemm, self.gate_up, self.qkv, self.moe = (self.gemm[2:4] + self.gemm[6:7], self.gate_up[1:],
                                                           self.qkv[1:], self.moe[:1])
            self.gemm_core = 2


# ---------------------------------------------------------------------------------------------------------
# Rows and timing helpers
# ---------------------------------------------------------------------------------------------------------

class Run:
    def __init__(self, budget_s, reps):
        self.budget_s, self.reps = budget_s, reps
        self.rows = {"gemm": [], "attention": [], "moe": [], "fusion": [], "model": []}
        self.validation, self.skipped, self.errors = [], [], []

    def left(self):
        return self.budget_s - (time.perf_counter() - T0)

    def guard(self, what):
        """True if a row may start; records it as skipped otherwise."""
        if self.left() > 0:
            return True
        self.skipped.append(what)
        return False

    def section(self, name, fn, *args):
        """Run one block of rows; an exception is logged and the run goes on with the next block."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            msg = f"{name}: {type(e).__name__}: {str(e)[:600]}"
            log("ERROR " + msg)
            traceback.print_exc()
            self.errors.append(msg)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def time_cells(run, cells):
    """{label: us} for bench_fp8_gemm.Cell objects (compiled in parallel first)."""
    bgemm.compile_parallel(list(cells.values()))
    out = {}
    for label, c in cells.items():
        out[label] = c.time(reps=run.reps)
        if c.error:
            log(f"    {label}: {c.error}")
    return out


def ratios(row, main="pallas_us"):
    p = row.get(main)
    return {k[:-3]: row[k] / p for k in row
            if k.startswith("xla") and k.endswith("_us") and not k.endswith("_kernel_us") and row.get(k) and p}


# ---------------------------------------------------------------------------------------------------------
# Validation (on the device, before any timing)
# ---------------------------------------------------------------------------------------------------------

def validate_fusions(run, plan):
    """Fused kernels vs their float32 references, outputs poisoned with NaN; shapes at Maverick's head
    layout, with default (split-K) and fp8_fp8 configs and ragged M / K / N. Bounds as in
    tests/test_fused_kernels.py for bf16 outputs (1e-2)."""
    key = jax.random.key(7)
    D, Dh = plan.D, plan.Dh
    qw = lambda k, K, N: bgemm.quantize_weight_per_channel(  # noqa: E731
        jax.random.normal(k, (K, N), jnp.float32) * 0.02)
    ok = True
    cases = []
    for M, K, F in ((16, D, plan.Fm // plan.shard), (100, D - 8, 600)):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, M), 3)
        x = jax.random.normal(k1, (M, K), jnp.float32).astype(jnp.bfloat16)
        (wg, sg), (wu, su) = qw(k2, K, F), qw(k3, K, F)
        cases.append((f"gate/up+SwiGLU M={M} K={K} F={F}",
                      lambda x=x, a=(wg, sg, wu, su): (gate_up_swiglu(x, *a, interpret=INTERPRET, poison_output=True),),
                      lambda x=x, a=(wg, sg, wu, su), M=M: (gate_up_swiglu_ref(
                          x, *a, mode="weight_only" if M <= 64 else "fp8_fp8"),)))
    H, Kh = plan.qkv[-1][1], plan.qkv[-1][2]  # the shard head layout
    for M, rope, norm, temp in ((1, True, True, False), (16, False, False, True), (100, True, True, False)):
        ks = jax.random.split(jax.random.fold_in(key, 1000 + M), 6)
        x = jax.random.normal(ks[0], (M, D), jnp.float32).astype(jnp.bfloat16)
        w = (*qw(ks[1], D, H * Dh), *qw(ks[2], D, Kh * Dh), *qw(ks[3], D, Kh * Dh))
        ang = jax.random.uniform(ks[4], (M, Dh // 2), maxval=100.0)
        kw = dict(head_dim=Dh, rope=(jnp.cos(ang), jnp.sin(ang)) if rope else None,
                  q_row_scale=1 + jax.random.uniform(ks[5], (M,)) if temp else None,
                  qk_norm_eps=1e-5 if norm else None)
        cases.append((f"QKV+{'RoPE+norm' if rope else 'temperature'} M={M} H={H} K={Kh}",
                      lambda x=x, w=w, kw=kw: qkv_rope(x, *w, interpret=INTERPRET, poison_output=True, **kw),
                      lambda x=x, w=w, kw=kw, M=M: qkv_rope_ref(x, *w, mode="weight_only" if M <= 64 else "fp8_fp8",
                                                                **kw)))
    for M in (16, 300):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 2000 + M), 3)
        x, h = (jax.random.normal(k, (M, D), jnp.float32).astype(jnp.bfloat16) for k in (k1, k2))
        sc = (1 + 0.1 * jax.random.normal(k3, (D,))).astype(jnp.bfloat16)
        cases.append((f"add+RMSNorm M={M} D={D}",
                      lambda x=x, h=h, sc=sc: add_rms_norm(x, h, sc, eps=1e-5, interpret=INTERPRET, poison_output=True),
                      lambda x=x, h=h, sc=sc: add_rms_norm_ref(x, h, sc, 1e-5)))
    for name, f, ref in cases[::3] if plan.dry else cases:
        try:
            got = [np.asarray(jnp.asarray(g, jnp.float32)) for g in jax.block_until_ready(f())]
            want = [np.asarray(jnp.asarray(r, jnp.float32)) for r in ref()]
            errs = [rel_err(g, w) for g, w in zip(got, want)]
            good = all(e < 1e-2 for e in errs)
            msg = f"all written & finite={all(np.isfinite(g).all() for g in got)}, err " + \
                  ", ".join(f"{e:.1e}" for e in errs) + " (bound 1e-2)"
        except Exception as e:  # noqa: BLE001
            good, msg = False, f"{type(e).__name__}: {str(e)[:800]}"
        log(f"{'PASS' if good else 'FAIL'} fusion {name}: {msg}")
        run.validation.append(dict(kernel="fusion", case=name, ok=good, msg=msg))
        ok &= good
    return ok


def validate_moe_one(key, W, res):
    """--dry-run stand-in for bench_moe.validate (7 cases, too slow in the interpreter): one poisoned call."""
    x, i, sc = bmoe.make_sets(key, 8, 1, W["fp8"][0].shape[0], k=2)[0]
    y = bmoe.pallas_op({}, poison=True)(W["fp8"], W["scales"], [(x, i, sc)])[0]
    e = rel_err(np.asarray(y, np.float32), np.asarray(bmoe.ref_fn(x, i, sc, *W["fp8"], scales=W["scales"]), np.float32))
    ok = e < bmoe.BOUND
    log(f"{'PASS' if ok else 'FAIL'} moe N=8 k=2: err {e:.1e} (bound {bmoe.BOUND})")
    res["validation"].append(dict(case="N=8 k=2", ok=ok, msg=f"err {e:.1e}"))
    return ok


def validate_attention(run, plan):
    """Split-KV attention vs the model's XLA path, NaN-free and within 2e-2 (bench_attention's bound): ragged
    cache length, chunked and global, T=1 and T=4, bf16 and FP8 KV with per-head scales."""
    key = jax.random.key(11)
    ok = True
    H, K, Dh, S = plan.H, plan.K, plan.Dh, 1000
    cases = ((jnp.bfloat16, 1, None), (jnp.bfloat16, 4, 256), (FP8, 1, 256), (FP8, 4, None))
    for kv, T, chunk in cases[2:3] if plan.dry else cases:
        k, v, ks, vs = batt.make_cache(jax.random.fold_in(key, T), 2, S, K, kv, 1)[0] if Dh == batt.Dh else \
            _small_cache(key, 2, S, K, Dh, kv)
        q = jax.random.normal(jax.random.fold_in(key, 5), (2, T, H, Dh), jnp.bfloat16)
        qp = jnp.stack([jnp.arange(S - 300 - T, S - 300), jnp.arange(S - T, S)]).astype(jnp.int32)  # ragged rows
        kp = jnp.where(jnp.arange(S)[None] <= qp[:, -1:], jnp.arange(S)[None], -1).astype(jnp.int32)
        name = f"{jnp.dtype(kv).name} T={T} chunk={chunk} S={S}"
        try:
            o = decode_attention(q, k, v, qp, kp, chunk_size=chunk, scale=Dh ** -0.5, k_scale=ks, v_scale=vs,
                                 interpret=INTERPRET)
            r = decode_attention_reference(q, k, v, qp, kp, chunk_size=chunk, scale=Dh ** -0.5, k_scale=ks,
                                           v_scale=vs)
            e = rel_err(np.asarray(o, np.float32), np.asarray(r, np.float32))
            good, msg = e < 2e-2, f"err {e:.1e} (bound 2e-2)"
        except Exception as ex:  # noqa: BLE001
            good, msg = False, f"{type(ex).__name__}: {str(ex)[:800]}"
        log(f"{'PASS' if good else 'FAIL'} attention {name}: {msg}")
        run.validation.append(dict(kernel="attention", case=name, ok=good, msg=msg))
        ok &= good
    return ok


def _small_cache(key, B, S, K, Dh, kv):
    k = jax.random.normal(key, (B, S, K, Dh), jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 1), (B, S, K, Dh), jnp.bfloat16)
    if kv != FP8:
        return k, v, None, None
    ks = jnp.max(jnp.abs(k.astype(jnp.float32)), axis=(0, 1, 3)) / 448.0
    vs = jnp.max(jnp.abs(v.astype(jnp.float32)), axis=(0, 1, 3)) / 448.0
    return (k.astype(jnp.float32) / ks[:, None]).astype(FP8), (v.astype(jnp.float32) / vs[:, None]).astype(FP8), ks, vs


# ---------------------------------------------------------------------------------------------------------
# 1. FP8 GEMM
# ---------------------------------------------------------------------------------------------------------

def extra_candidates(K, N, num_sms):
    """Beyond bench_fp8_gemm.decode_candidates: deeper K tiles with fewer stages, more split-K waves (more
    loads in flight per SM at N=640..2048), 32-wide N tiles, in both weight layouts (the model stores [K, N])."""
    out = []
    # [K, N] layout (the model's): a 64-wide fp8 tile row is half a 128-byte line; 128 / 256 wide rows are
    # whole lines, so those are the kn candidates most likely to close the gap to the nk layout.
    for block_n, block_k, waves, warps, stages in [(64, 512, 4, 4, 2), (64, 256, 4, 4, 3), (32, 512, 4, 4, 3),
                                                   (128, 256, 4, 8, 3), (64, 1024, 2, 4, 2), (128, 512, 4, 8, 2),
                                                   (256, 128, 2, 8, 3), (256, 256, 4, 8, 2)]:
        nk = -(-K // block_k)
        split = max(1, min(nk, -(-waves * num_sms // -(-N // block_n))))
        for layout in ("kn", "nk"):
            out.append(dict(block_n=block_n, block_k=block_k, split_k=split, num_warps=warps, num_stages=stages,
                            layout=layout, swap_ab=False))
    return out


def gemm_rows(run, plan, shapes, Ms, prefill, num_sms, key, tuned, ok):
    """Decode rows: autotune at M=16 per shape (once), then Pallas and the XLA baselines at each M.
    Prefill rows (fp8_fp8): bench_fp8_gemm.PREFILL_CANDIDATES, XLA bf16 / fp8 / upcast baselines."""
    for si, (name, K, N) in enumerate(shapes):
        if not run.guard(f"gemm {name}"):
            continue
        nbuf = bgemm.n_buffers(K, N, 1 if INTERPRET else 200e6)
        W = bgemm.make_weights(jax.random.fold_in(key, 100 + si), K, N, nbuf)
        X = {M: jax.random.normal(jax.random.fold_in(key, M * 7 + K), (M, K)).astype(jnp.bfloat16)
             for M in set(Ms) | {16, plan.prefill_m}}
        if ok.get(("weight_only", "channel")) and name not in tuned and Ms:
            cands = bgemm.decode_candidates(K, N, num_sms) + extra_candidates(K, N, num_sms)
            if INTERPRET:
                cands = cands[:1]
            cells = {i: bgemm.Cell(bgemm.pallas_op("weight_only", c), X[16], W) for i, c in enumerate(cands)}
            bgemm.compile_parallel(list(cells.values()))
            ts = [(cells[i].time(reps=max(3, run.reps // 3)), i) for i in range(len(cands))]
            good = sorted((t, i) for t, i in ts if t is not None)
            kn = [(t, i) for t, i in good if cands[i]["layout"] == "kn"]
            tuned[name] = (cands[good[0][1]] if good else None, cands[kn[0][1]] if kn else None)
            log(f"  tuned {name} at M=16 ({len(good)}/{len(cands)} compiled): " +
                ", ".join(f"{bgemm.fmt_cfg(cands[i])}={t:.1f}us" for t, i in good[:4]))
        best, best_kn = tuned.get(name, (None, None))
        for M in Ms:
            if not run.guard(f"gemm {name} M={M}"):
                continue
            row = dict(shape=name, K=K, N=N, M=M, mode="weight_only", cfg=bgemm.fmt_cfg(best))
            cells, cells_ops = {}, {}
            if best is not None:
                cells_ops["pallas_us"] = bgemm.pallas_op("weight_only", best)
                cells["pallas_us"] = bgemm.Cell(cells_ops["pallas_us"], X[M], W)
            if best_kn is not None and best_kn is not best:
                cells["pallas_kn_us"] = bgemm.Cell(bgemm.pallas_op("weight_only", best_kn), X[M], W)
            if not INTERPRET and mgpu_gemv.supported(M, K, (N,), compute_dtype=jnp.bfloat16) and mgpu_gemv.on_hopper():
                # the Mosaic GPU kernel (sections 18-19) on the [K, N] layout, its bfloat16 path: bf16 x read as
                # it is (no widening kernels), the weight widened to bf16 in registers; up to 64 rows
                cells_ops["mosaic_us"] = (lambda x, wq, s: fp8_matmul(x, wq, s, mode="weight_only", mosaic=True),
                                          ("kn", "s"))
                cells["mosaic_us"] = bgemm.Cell(cells_ops["mosaic_us"], X[M], W)
                # its FP8 x FP8 path (section 33) on [N, K] weights, x quantized per token by XLA inside the op
                cells_ops["mosaic_fp8_us"] = (lambda x, wq, s: fp8_matmul(x, wq, s, mode="fp8_fp8", w_transposed=True,
                                                                          mosaic=True), ("nk", "s"))
                cells["mosaic_fp8_us"] = bgemm.Cell(cells_ops["mosaic_fp8_us"], X[M], W)
            for b in ("bf16", "upcast", "fp8"):
                cells_ops[f"xla_{b}_us"] = bgemm.XLA_OPS[b]
                cells[f"xla_{b}_us"] = bgemm.Cell(bgemm.XLA_OPS[b], X[M], W)
            row.update(time_cells(run, cells))
            # the ops' own kernels, traced (GPU only): what the loop time holds beyond them is launch gaps
            for label in ("pallas_us", "mosaic_us", "mosaic_fp8_us", "xla_bf16_us"):
                if row.get(label):  # (a cell that did not compile, e.g. a tile over the shared memory, has none)
                    op, keys = cells_ops[label]
                    try:
                        t = kernel_time(op, [(X[M], *(w[k] for k in keys)) for w in W[:32]], run.reps)
                    except Exception as e:  # noqa: BLE001 - the row keeps its loop times
                        log(f"    {label} kernel time: {type(e).__name__}: {str(e)[:200]}")
                        t = None
                    row[label[:-3] + "_kernel_us"] = t and t * 1e6
            nbytes = K * N + 4 * N + 2 * M * (K + N)
            row["floor_us"] = nbytes / run.bw * 1e6
            if row.get("pallas_us"):
                row["TBps"] = nbytes / row["pallas_us"] / 1e6
                row["xfloor"] = row["pallas_us"] / row["floor_us"]
            run.rows["gemm"].append(row)
            log(f"  gemm {name} M={M}: {row.get('pallas_us')} us, xfloor {row.get('xfloor')}, {ratios(row)}")
        if prefill and (si == 0 or not plan.dry) and ok.get(("fp8_fp8", "channel")) and \
                run.guard(f"gemm prefill {name}"):
            M = plan.prefill_m
            ws = W[:3]
            cands = bgemm.PREFILL_CANDIDATES[:1 if INTERPRET else None]
            cells = {i: bgemm.Cell(bgemm.pallas_op("fp8_fp8", dict(c, layout="kn")), X[M], ws, unroll=3)
                     for i, c in enumerate(cands)}
            t = time_cells(run, cells)
            good = sorted((v, i) for i, v in t.items() if v is not None)
            row = dict(shape=name, K=K, N=N, M=M, mode="fp8_fp8",
                       cfg=bgemm.fmt_cfg(dict(cands[good[0][1]], layout="kn")) if good else "-",
                       pallas_us=good[0][0] if good else None)
            row.update(time_cells(run, {f"xla_{b}_us": bgemm.Cell(bgemm.XLA_OPS[b], X[M], ws, unroll=3)
                                        for b in ("bf16", "fp8", "upcast")}))
            if row["pallas_us"]:
                row["TFLOPs"] = 2 * M * N * K / row["pallas_us"] / 1e6
                row["xfloor"] = FP8_PEAK_TFLOPS / row["TFLOPs"]
            run.rows["gemm"].append(row)
            log(f"  gemm prefill {name} M={M}: {row.get('pallas_us')} us, {row.get('TFLOPs')} TFLOP/s, {ratios(row)}")
        del W, X


# ---------------------------------------------------------------------------------------------------------
# 2. Split-KV decode attention (bench_attention.run_config: ours, XLA, jax's pallas.ops.gpu op)
# ---------------------------------------------------------------------------------------------------------

def attention_rows(run, plan, configs, key):
    args = types.SimpleNamespace(inner=2 if INTERPRET else 8, reps=run.reps if not INTERPRET else 1, tune=False)
    kern_kw = {"interpret": True} if INTERPRET else None
    for kv, B, H, K, S, T, chunk in configs:
        if not run.guard(f"attention {kv} B={B} H={H} S={S} T={T} chunk={chunk}"):
            continue
        kv_dtype = FP8 if kv == "fp8" else jnp.bfloat16
        # copies enough that the slots a call reads (a chunked layer's window: a part of the cache) span 200 MB,
        # so no call finds them in L2 (50 MB on an H200)
        read_bytes = 2 * B * batt.visible_slots(S, T, chunk) * K * plan.Dh * jnp.dtype(kv_dtype).itemsize
        copies = 1 if INTERPRET else int(min(8, max(1, math.ceil(200e6 / read_bytes))))
        if plan.Dh == batt.Dh:
            cache = batt.make_cache(jax.random.fold_in(key, S + B), B, S, K, kv_dtype, copies)
        else:  # dry run: bench_attention's head dim is Maverick's 128
            cache = [_small_cache(jax.random.fold_in(key, c), B, S, K, plan.Dh, kv_dtype) for c in range(copies)]
        if plan.Dh != batt.Dh:
            batt.Dh = plan.Dh
        r = batt.run_config(key, cache, B, S, H, K, T, chunk, kv_dtype, run.bw, args, kern_kw=kern_kw,
                            with_others=not INTERPRET)
        path = kernel_path(T, H, K, S, plan.Dh, jnp.bfloat16, kv_dtype, chunk,
                           plain=kv_dtype == jnp.bfloat16) if not INTERPRET else "triton"
        row = dict(kv=kv, B=B, H=H, K=K, S=S, T=T, chunk=chunk or "-", path=path, MB=r["MB"], err=r["err"],
                   pallas_us=r["t_ours"] * 1e6, TBps=r["TBs"], pct_copy=r["pct_copy"],
                   xla_us=r.get("t_xla", float("nan")) * 1e6, xla_jaxop_us=r.get("t_jax", float("nan")) * 1e6)
        # the kernels' own traced time (GPU only): ours, XLA's, and XLA's plain read of the same bytes
        for name, k in (("kernel_us", "k_ours"), ("xla_kernel_us", "k_xla"), ("read_kernel_us", "k_read")):
            row[name] = r[k] * 1e6 if r.get(k) else None
        row["pct_copy_kernel"] = r.get("pct_copy_k")
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        row["xfloor"] = 100.0 / r["pct_copy"]
        row["valid"] = r["err"] <= 2e-2
        run.rows["attention"].append(row)
        log(f"  attention {kv} B={B} H={H} S={S} T={T} chunk={chunk}: {row['pallas_us']:.1f} us "
            f"{row['pct_copy']:.0f}% copy, err {row['err']:.1e}, {ratios(row)}")
        del cache


# ---------------------------------------------------------------------------------------------------------
# 3. MoE decode (bench_moe: weights, routings, ops, Cell)
# ---------------------------------------------------------------------------------------------------------

def moe_rows(run, plan, shapes, Ns, key, W_cache):
    for name, F in shapes:
        if not run.guard(f"moe {name}"):
            continue
        if name not in W_cache:
            kinds = ("bf16", "fp8") if F <= plan.Fe // plan.shard else ("fp8",)
            W_cache.clear()
            W_cache[name] = bmoe.make_weights(jax.random.fold_in(key, 300 + F), plan.E, F, kinds, dim=plan.D)
        W = W_cache[name]
        for N in Ns:
            if not run.guard(f"moe {name} N={N}"):
                continue
            G, U = (1, 2) if INTERPRET else (4, 8)
            flat = bmoe.make_sets(jax.random.fold_in(key, 10 + N), N, G * U, plan.E, dim=plan.D)
            groups = [flat[g * U:(g + 1) * U] for g in range(G)]
            hit = float(np.mean([len(np.unique(np.asarray(i))) for _, i, _ in flat]))
            row = dict(shape=name, F=F, N=N, hit=hit)
            # moe_fp8's default is the Mosaic GPU pair path where it applies (Hopper, <= 16 pairs; in the dry run
            # asked for explicitly): then the Triton pair path is timed beside it
            mosaic = bmoe.mosaic_here() and moe_mgpu.supported(N, plan.D, F, W["scales"])
            cells = {"pallas_us": bmoe.Cell(bmoe.pallas_op(dict(mosaic=True) if mosaic else {}), W["fp8"],
                                            W["scales"], groups)}
            if mosaic:
                cells["triton_us"] = bmoe.Cell(bmoe.pallas_op(dict(method="pairs")), W["fp8"], W["scales"], groups)
            row["path"] = "mosaic" if mosaic else "triton"
            if N <= GATHER_MAX_PAIRS:  # above, the model's XLA path upcasts every expert per call (32 GB full)
                cells["xla_fp8_us"] = bmoe.Cell(bmoe.xla_op, W["fp8"], W["scales"], groups)
            if "bf16" in W:
                cells["xla_bf16_us"] = bmoe.Cell(bmoe.xla_op, W["bf16"], None, groups)
            bmoe.compile_parallel(list(cells.values()))
            for k, c in cells.items():
                row[k] = c.time(run.reps)
                if c.error:
                    log(f"    moe {k}: {c.error}")
            x, i, sc = groups[0][0]
            ref = bmoe.ref_fn(x, i, sc, *W["fp8"], scales=W["scales"])
            for k, c in cells.items():
                if k in ("pallas_us", "triton_us") and c.first is not None:
                    row["err" if k == "pallas_us" else "triton_err"] = rel_err(np.asarray(c.first[0], np.float32),
                                                                              np.asarray(ref, np.float32))
            nbytes = bmoe.expert_bytes(hit, F, 1, True)
            row["floor_us"] = nbytes / run.bw * 1e6
            if row.get("pallas_us"):
                row["TBps"] = nbytes / row["pallas_us"] / 1e6
                row["xfloor"] = row["pallas_us"] / row["floor_us"]
            if row.get("triton_us"):
                row["triton_xfloor"] = row["triton_us"] / row["floor_us"]
            run.rows["moe"].append(row)
            log(f"  moe {name} N={N} ({row['path']}): {row.get('pallas_us')} us = {row.get('xfloor')} x the "
                f"active-expert bytes, err {row.get('err')}, {ratios(row)}; Triton pairs {row.get('triton_us')} us "
                f"= {row.get('triton_xfloor')} x, err {row.get('triton_err')}")


# ---------------------------------------------------------------------------------------------------------
# 4. Fusions vs their unfused Pallas and XLA versions
# ---------------------------------------------------------------------------------------------------------

def _merge_weights(key, parts, K, nbuf):
    """Rotating buffers holding several [K, N] weights: {prefix + kn/s/bf16}."""
    lists = {p: bgemm.make_weights(jax.random.fold_in(key, i), K, N, nbuf) for i, (p, N) in enumerate(parts)}
    return [{f"{p}{k}": lists[p][b][k] for p in lists for k in ("kn", "s", "bf16")} for b in range(nbuf)]


def _gate_up_ops():
    def fused(x, g, gs, u, us):
        return gate_up_swiglu(x, g, gs, u, us, interpret=INTERPRET)

    def fused128(x, g, gs, u, us):  # whole 128-byte lines per [K, N] tile row
        return gate_up_swiglu(x, g, gs, u, us, block_n=128, interpret=INTERPRET)

    def unfused(x, g, gs, u, us):  # what kernels="pallas" did before the fusion
        mm = functools.partial(fp8_matmul, interpret=INTERPRET)
        return jax.nn.silu(mm(x, g, gs)) * mm(x, u, us)

    def upcast(x, g, gs, u, us):  # kernels="xla" on FP8 weights
        return jax.nn.silu(bgemm.xla_upcast(x, g, gs)) * bgemm.xla_upcast(x, u, us)

    def bf16(x, g, u):
        return jax.nn.silu(bgemm.xla_bf16(x, g)) * bgemm.xla_bf16(x, u)
    fp8k = ("gkn", "gs", "ukn", "us")
    return {"pallas_us": (fused, fp8k), "pallas_n128_us": (fused128, fp8k), "pallas_unfused_us": (unfused, fp8k),
            "xla_upcast_us": (upcast, fp8k), "xla_bf16_us": (bf16, ("gbf16", "ubf16"))}


def _qkv_ops(M, H, K, Dh, key):
    ang = jax.random.uniform(key, (M, Dh // 2), maxval=100.0)
    cos, sin = jnp.cos(ang), jnp.sin(ang)

    def post(q, k, v):  # the model's unfused epilogue (RoPE layer with qk norm)
        q, k = q.reshape(1, M, H, Dh), k.reshape(1, M, K, Dh)
        c, s = cos[None], sin[None]
        return rms_norm(apply_rope(q, c, s), None, 1e-5), rms_norm(apply_rope(k, c, s), None, 1e-5), v

    def fused(x, q, qs, k, ks, v, vs):
        return qkv_rope(x, q, qs, k, ks, v, vs, head_dim=Dh, rope=(cos, sin), qk_norm_eps=1e-5, interpret=INTERPRET)

    def fused128(x, q, qs, k, ks, v, vs):  # whole heads per tile (the qk norm in-kernel when not split)
        return qkv_rope(x, q, qs, k, ks, v, vs, head_dim=Dh, rope=(cos, sin), qk_norm_eps=1e-5,
                        block_n=min(128, Dh), interpret=INTERPRET)

    def unfused(x, q, qs, k, ks, v, vs):
        mm = functools.partial(fp8_matmul, interpret=INTERPRET)
        return post(mm(x, q, qs), mm(x, k, ks), mm(x, v, vs))

    def upcast(x, q, qs, k, ks, v, vs):
        return post(bgemm.xla_upcast(x, q, qs), bgemm.xla_upcast(x, k, ks), bgemm.xla_upcast(x, v, vs))

    def bf16(x, q, k, v):
        return post(bgemm.xla_bf16(x, q), bgemm.xla_bf16(x, k), bgemm.xla_bf16(x, v))
    fp8k = ("qkn", "qs", "kkn", "ks", "vkn", "vs")
    return {"pallas_us": (fused, fp8k), "pallas_n128_us": (fused128, fp8k), "pallas_unfused_us": (unfused, fp8k),
            "xla_upcast_us": (upcast, fp8k), "xla_bf16_us": (bf16, ("qbf16", "kbf16", "vbf16"))}


def fusion_rows(run, plan, Ms, key, ok):
    if not ok:
        log("  fusions failed validation: not timed")
        return
    D, Dh = plan.D, plan.Dh
    kinds = getattr(plan, "fusion_kinds", ("gate_up", "qkv", "norm"))
    for name, F in plan.gate_up if "gate_up" in kinds else []:
        if not run.guard(f"fusion gate/up {name}"):
            continue
        nbuf = 1 if INTERPRET else bgemm.n_buffers(D, 2 * F, 200e6)
        W = _merge_weights(jax.random.fold_in(key, F), [("g", F), ("u", F)], D, nbuf)
        for M in Ms:
            if not run.guard(f"fusion gate/up {name} M={M}"):
                continue
            x = jax.random.normal(jax.random.fold_in(key, M), (M, D)).astype(jnp.bfloat16)
            row = dict(fusion="gate/up+SwiGLU", shape=f"{name} {D}x2x{F}", M=M)
            row.update(time_cells(run, {k: bgemm.Cell(op, x, W, unroll=32 if M <= 64 else 3)
                                        for k, op in _gate_up_ops().items()}))
            _fusion_floor(run, row, 2 * D * F + 8 * F + 2 * M * (D + F), 2 * M * D * 2 * F)
        del W
    for name, H, K in plan.qkv if "qkv" in kinds else []:
        if not run.guard(f"fusion qkv {name}"):
            continue
        N = (H + 2 * K) * Dh
        nbuf = 1 if INTERPRET else bgemm.n_buffers(D, N, 200e6)
        W = _merge_weights(jax.random.fold_in(key, N), [("q", H * Dh), ("k", K * Dh), ("v", K * Dh)], D, nbuf)
        for M in Ms:
            if not run.guard(f"fusion qkv {name} M={M}"):
                continue
            x = jax.random.normal(jax.random.fold_in(key, M), (M, D)).astype(jnp.bfloat16)
            row = dict(fusion="QKV+RoPE+qk-norm", shape=f"{name} {D}x{N}", M=M)
            row.update(time_cells(run, {k: bgemm.Cell(op, x, W, unroll=32 if M <= 64 else 3)
                                        for k, op in _qkv_ops(M, H, K, Dh, key).items()}))
            _fusion_floor(run, row, D * N + 4 * N + 2 * M * (D + N), 2 * M * D * N)
        del W
    for M in Ms if "norm" in kinds else []:
        if not run.guard(f"fusion add+RMSNorm M={M}"):
            continue
        nbuf = 1 if INTERPRET else max(3, math.ceil(200e6 / (M * D * 2)))
        ks = jax.random.split(jax.random.fold_in(key, 5000 + M), nbuf + 1)
        W = [{"h": jax.random.normal(k, (M, D)).astype(jnp.bfloat16), "w": jnp.ones((D,), jnp.bfloat16)}
             for k in ks[1:]]
        x = jax.random.normal(ks[0], (M, D)).astype(jnp.bfloat16)
        ops = {"pallas_us": (lambda x, h, w: add_rms_norm(x, h, w, eps=1e-5, interpret=INTERPRET), ("h", "w")),
               "xla_us": (lambda x, h, w: add_rms_norm_ref(x, h, w, 1e-5), ("h", "w"))}
        row = dict(fusion="add+RMSNorm", shape=f"{D}", M=M)
        row.update(time_cells(run, {k: bgemm.Cell(op, x, W) for k, op in ops.items()}))
        _fusion_floor(run, row, 4 * M * D * 2, 0)


def _fusion_floor(run, row, nbytes, flops):
    row["floor_us"] = nbytes / run.bw * 1e6
    if row.get("pallas_us"):
        row["TBps"] = nbytes / row["pallas_us"] / 1e6
        row["xfloor"] = row["pallas_us"] / row["floor_us"]
        if row["M"] > 64 and flops:
            row["TFLOPs"] = flops / row["pallas_us"] / 1e6
        if row.get("pallas_unfused_us"):
            row["v_unfused"] = row["pallas_unfused_us"] / row["pallas_us"]
    run.rows["fusion"].append(row)
    log(f"  fusion {row['fusion']} {row['shape']} M={row['M']}: {row.get('pallas_us')} us, xfloor "
        f"{row.get('xfloor')}, vs unfused {row.get('v_unfused')}, {ratios(row)}")


# ---------------------------------------------------------------------------------------------------------
# 5. Reduced-depth Maverick-width model decode (bench_decode.decode_rows)
# ---------------------------------------------------------------------------------------------------------

def model_rows(run, plan, key):
    """Random FP8 weights of the preset's width (generated as FP8, no bf16 copy), shared by both kernel paths:
    logits of the two paths compared on a prompt, then a decode step of each timed and profiled."""
    from mavjax.api import LLM
    from mavjax.bench import random_model, with_kernels
    from mavjax.config import preset

    m = plan.model
    cfg = preset(m["preset"], num_hidden_layers=m["layers"], no_rope_layer_interval=2)
    model = random_model(cfg, dtype=jnp.bfloat16, quant="fp8")
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, 24).tolist()
    lx = LLM.from_model(with_kernels(model, "xla"), max_batch_size=1).logits(ids)
    lp = LLM.from_model(with_kernels(model, "pallas"), max_batch_size=1).logits(ids)
    err = rel_err(lp, lx)
    agree = float((lx.argmax(-1) == lp.argmax(-1)).mean())
    # FP8 prefill through Pallas quantizes activations per token (fp8_fp8 above M=64; not here, M=24):
    # the paths differ by bf16 rounding placement only.
    valid = err < 3e-2
    log(f"{'PASS' if valid else 'FAIL'} model fp8: pallas vs xla logits err {err:.1e} (bound 3e-2), top-1 "
        f"agreement {agree:.2f}")
    run.validation.append(dict(kernel="model", case="quant=fp8", ok=valid, msg=f"err {err:.1e}"))
    paths = ["xla", "pallas"] if valid else ["xla"]
    for r in bdec.decode_rows(model, paths, [1], m["context"], run.bw, iters=m["iters"], reps=run.reps,
                              profile=True, log=log):
        r.update(quant="fp8", logits_err=err)
        run.rows["model"].append(r)
    del model


# ---------------------------------------------------------------------------------------------------------

def print_tables(run, res):
    f = fmt
    print(f"\n== {res['device']}, jax {res['jax']}; copy bandwidth {run.bw / 1e12:.2f} TB/s (read + write); "
          f"{time.perf_counter() - T0:.0f} s ==")
    print("validation: " + ", ".join(f"{v['kernel']}:{v['case']}={'ok' if v['ok'] else 'FAIL'}"
                                     for v in run.validation))
    print("\nFP8 GEMM (x = XLA time / Pallas time; floor = weight+scale+activation bytes / copy bw; prefill: "
          "xfloor = FP8 datasheet peak / achieved)")
    print("(kern: the op's own kernels, traced; x.bf16 kern = XLA's bf16 dot's kernels / the Mosaic GPU op's; mg8: "
          "the Mosaic GPU op's FP8 x FP8 path on [N, K] weights, x quantized in the op)")
    print(f"{'shape':26s} {'M':>5s} {'cfg':>24s} {'us':>7s} {'TB/s':>5s} {'TF/s':>5s} {'xfloor':>6s} {'kn us':>7s} "
          f"{'x.bf16':>6s} {'x.upc':>6s} {'x.fp8':>6s} {'mgpu us':>7s} {'mgpu xfl':>8s} {'mgpu x.bf16':>11s} "
          f"{'pl kern':>7s} {'mg kern':>7s} {'bf16 kern':>9s} {'x.bf16 kern':>11s} {'mg8 us':>7s} {'mg8 kern':>8s} "
          f"{'x.bf16 kern8':>12s}")
    for r in run.rows["gemm"]:
        x = ratios(r)
        mk, xk, mk8 = r.get("mosaic_kernel_us"), r.get("xla_bf16_kernel_us"), r.get("mosaic_fp8_kernel_us")
        print(f"{r['shape'][:26]:26s} {r['M']:5d} {r['cfg'][:24]:>24s} {f(r.get('pallas_us'), 7)} "
              f"{f(r.get('TBps'), 5, 2)} {f(r.get('TFLOPs'), 5, 0)} {f(r.get('xfloor'), 6, 2)} "
              f"{f(r.get('pallas_kn_us'), 7)} {f(x.get('xla_bf16'), 6, 2)} {f(x.get('xla_upcast'), 6, 2)} "
              f"{f(x.get('xla_fp8'), 6, 2)} {f(r.get('mosaic_us'), 7)} "
              f"{f(r.get('mosaic_us') and r['mosaic_us'] / r['floor_us'], 8, 2)} "
              f"{f(ratios(r, 'mosaic_us').get('xla_bf16'), 11, 2)} {f(r.get('pallas_kernel_us'), 7)} "
              f"{f(r.get('mosaic_kernel_us'), 7)} {f(r.get('xla_bf16_kernel_us'), 9)} "
              f"{f(mk and xk and xk / mk, 11, 2)} {f(r.get('mosaic_fp8_us'), 7)} {f(mk8, 8)} "
              f"{f(mk8 and xk and xk / mk8, 12, 2)}")
    print("\nsplit-KV decode attention (TB/s over the visible K/V bytes; x = other time / ours; loop-timed, then "
          "the kernels' own traced time: ours, XLA's, XLA's plain read of the same bytes; path: decode_attention's "
          "kernel, mosaic = decode_attention_mgpu)")
    print(f"{'kv':>4s} {'B':>2s} {'H':>2s} {'K':>2s} {'S':>6s} {'T':>2s} {'chunk':>5s} {'path':>6s} {'us':>8s} "
          f"{'TB/s':>5s} {'%copy':>5s} {'x.xla':>6s} {'x.jax':>6s} {'err':>7s} {'kern us':>8s} {'%copy':>5s} "
          f"{'x.xla':>6s} {'read us':>8s}")
    for r in run.rows["attention"]:
        x = ratios(r)
        k = r.get("kernel_us")
        print(f"{r['kv']:>4s} {r['B']:2d} {r['H']:2d} {r['K']:2d} {r['S']:6d} {r['T']:2d} {str(r['chunk']):>5s} "
              f"{r.get('path', '-'):>6s} {f(r['pallas_us'], 8)} {f(r['TBps'], 5, 2)} {f(r['pct_copy'], 5, 0)} "
              f"{f(x.get('xla'), 6, 2)} {f(x.get('xla_jaxop'), 6, 2)} {r['err']:7.1e} {f(k, 8)} "
              f"{f(r.get('pct_copy_kernel'), 5, 0)} {f(k and r.get('xla_kernel_us') and r['xla_kernel_us'] / k, 6, 2)} "
              f"{f(r.get('read_kernel_us'), 8)}")
    print("\nMoE decode, FP8 experts (floor = bytes of the experts hit / copy bw; target xfloor <= 1.3; path: "
          "moe_fp8's default, mosaic = the pairs on the Mosaic GPU kernel; triton = the Triton pair path beside it)")
    print(f"{'shape':8s} {'N':>4s} {'hit':>5s} {'path':>6s} {'us':>8s} {'TB/s':>5s} {'xfloor':>6s} {'x.bf16':>6s} "
          f"{'x.fp8':>6s} {'err':>7s} {'triton':>8s} {'xfloor':>6s}")
    for r in run.rows["moe"]:
        x = ratios(r)
        print(f"{r['shape'][:8]:8s} {r['N']:4d} {r['hit']:5.1f} {r.get('path', '-'):>6s} {f(r.get('pallas_us'), 8)} "
              f"{f(r.get('TBps'), 5, 2)} {f(r.get('xfloor'), 6, 2)} {f(x.get('xla_bf16'), 6, 2)} "
              f"{f(x.get('xla_fp8'), 6, 2)} {fmt(r.get('err'), 7, 4)} {f(r.get('triton_us'), 8)} "
              f"{f(r.get('triton_xfloor'), 6, 2)}")
    print("\nfusions (v.unf = unfused Pallas time / fused; x = XLA time / fused)")
    print(f"{'fusion':17s} {'shape':20s} {'M':>5s} {'us':>7s} {'n128 us':>7s} {'TB/s':>5s} {'xfloor':>6s} "
          f"{'v.unf':>6s} {'x.upc':>6s} {'x.bf16':>6s} {'x.xla':>6s}")
    for r in run.rows["fusion"]:
        x = ratios(r)
        print(f"{r['fusion'][:17]:17s} {r['shape'][:20]:20s} {r['M']:5d} {f(r.get('pallas_us'), 7)} "
              f"{f(r.get('pallas_n128_us'), 7)} "
              f"{f(r.get('TBps'), 5, 2)} {f(r.get('xfloor'), 6, 2)} {f(r.get('v_unfused'), 6, 2)} "
              f"{f(x.get('xla_upcast'), 6, 2)} {f(x.get('xla_bf16'), 6, 2)} {f(x.get('xla'), 6, 2)}")
    print(f"\n{plan_model_line(res)} decode at batch 1 (floor = bytes one step reads / copy bw)")
    print(f"{'weights':>7s} {'kernels':>7s} {'ms/token':>9s} {'floor ms':>9s} {'xfloor':>7s} {'kern/step':>9s} "
          f"{'busy ms':>8s}")
    for r in run.rows["model"]:
        p = r.get("profile") or {}
        print(f"{r['quant']:>7s} {r['kernels']:>7s} {r['ms_per_token']:9.3f} {r['floor_ms']:9.3f} {r['ratio']:7.2f} "
              f"{f(p.get('kernels_per_step'), 9, 0)} {f((p.get('busy_us') or 0) / 1e3 or None, 8, 3)}")
    if run.skipped:
        print(f"\nbudget reached: {len(run.skipped)} rows not run (raise --budget-s): {run.skipped[:12]}")
    if run.errors:
        print(f"\nerrors: {run.errors}")


def plan_model_line(res):
    m = res.get("model_plan", {})
    return f"{m.get('preset', '?')} width, {m.get('layers', '?')} layers, FP8, context {m.get('context', '?')},"


def main():
    global INTERPRET
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no new row after this many seconds")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip", nargs="*", default=[], choices=["gemm", "attention", "moe", "fusion", "model"])
    ap.add_argument("--gemm-m", type=int, nargs="+", default=None, metavar="M",
                    help="only these decode GEMM rows (tokens), and no prefill GEMM rows")
    ap.add_argument("--fusion-kinds", nargs="+", default=["gate_up", "qkv", "norm"],
                    choices=["gate_up", "qkv", "norm"], help="which fusions the fusion section times")
    ap.add_argument("--cache-dir", default="/tmp/jax_cache_bench_kernels", help="persistent compile cache ('' = off)")
    ap.add_argument("--dry-run", action="store_true", help="CPU flow check: Pallas interpreter, tiny shapes")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_kernels.json"))
    a = ap.parse_args()
    plan = Plan(a.dry_run)
    plan.fusion_kinds = tuple(a.fusion_kinds)
    if a.dry_run:
        INTERPRET = bgemm.INTERPRET = bmoe.INTERPRET = True
        bmoe.E, bmoe.D = plan.E, plan.D
        bmoe.VAL = dict(ragged=(200, 120), nan=(96, 48), big_n=32)
        bgemm.VALIDATION = [v[:2] + (256, 200) + v[4:] for v in bgemm.VALIDATION[:1] + bgemm.VALIDATION[7:8]]
        a.reps = 2
    elif a.cache_dir:
        jax.config.update("jax_compilation_cache_dir", a.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    dev = jax.devices()[0]
    num_sms = getattr(dev, "core_count", None) or 132
    run = Run(a.budget_s, a.reps)
    res = dict(device=dev.device_kind, jax=jax.__version__, dry_run=a.dry_run, model_plan=plan.model)
    log(f"jax {jax.__version__}, {dev.device_kind}, {num_sms} SMs, budget {a.budget_s:.0f} s")
    run.bw = copy_bandwidth(int((1 / 64 if a.dry_run else 2) * (1 << 30)), reps=3 if a.dry_run else 20)
    res["copy_bw"] = run.bw
    log(f"copy bandwidth {run.bw / 1e12:.3f} TB/s (read + write)")
    key = jax.random.key(0)

    # ---- 0. validation of every kernel ----
    gres = {"validation": []}
    # a skipped section is neither validated nor timed
    ok_gemm = bgemm.validate(key, gres) if "gemm" not in a.skip else False
    run.validation += [dict(kernel="fp8_gemm", **v) for v in gres["validation"]]
    ok_att = validate_attention(run, plan) if "attention" not in a.skip else False
    ok_fus = validate_fusions(run, plan) if "fusion" not in a.skip else False
    moe_w = {}
    shard_name = f"/{plan.shard}"
    mres = {"validation": []}
    try:
        if "moe" in a.skip:
            raise RuntimeError("skipped")
        moe_w[shard_name] = bmoe.make_weights(jax.random.fold_in(key, 300 + plan.Fe // plan.shard), plan.E,
                                              plan.Fe // plan.shard, ("bf16", "fp8"), dim=plan.D)
        ok_moe = (validate_moe_one if a.dry_run else bmoe.validate)(key, moe_w[shard_name], mres)
    except Exception as e:  # noqa: BLE001
        ok_moe = False
        if "moe" not in a.skip:
            mres["validation"].append(dict(case="setup", ok=False, msg=f"{type(e).__name__}: {str(e)[:400]}"))
    run.validation += [dict(kernel="moe", **v) for v in mres["validation"]]
    log(f"validation: gemm {ok_gemm}, attention {ok_att}, fusions {ok_fus}, moe {ok_moe}")

    # ---- 1. core rows, then 2. the rest ----
    tuned = {}
    H, K = plan.H, plan.K
    S_hi = plan.S_list[-1]
    att_core = [(kv, 1, H, K, S, 1, None) for kv in ("bf16", "fp8") for S in plan.S_list] + \
               [(kv, 1, H, K, S_hi, 1, plan.chunk) for kv in ("bf16", "fp8")]
    att_more = [(kv, B, h, k, S, T, c) for S in plan.S_list[::-1] for (h, k) in ((H, K), (H // plan.shard, 1))
                for B, T, c in ((8, 1, None), (1, 4, None), (8, 4, plan.chunk)) for kv in ("bf16", "fp8")]
    core_m = [16, 1] if not plan.dry else [1]
    gemm_core = [M for M in core_m if a.gemm_m is None or M in a.gemm_m]
    gemm_more = [M for M in (plan.decode_m if a.gemm_m is None else a.gemm_m) if M not in core_m]
    if plan.dry:
        att_core, att_more = att_core[1:2], att_more[-1:]
    steps = [
        ("gemm", "gemm core", gemm_rows, run, plan, plan.gemm[:plan.gemm_core], gemm_core, False, num_sms, key,
         tuned, ok_gemm),
        ("attention", "attention core", attention_rows, run, plan, att_core if ok_att else [], key),
        ("moe", "moe core", moe_rows, run, plan, plan.moe, plan.moe_n[:2] if ok_moe else [], key, moe_w),
        ("model", "model", model_rows, run, plan, key),
        ("fusion", "fusion core", fusion_rows, run, plan, core_m, key, ok_fus),
        ("gemm", "gemm core, other shapes", gemm_rows, run, plan, plan.gemm[plan.gemm_core:], gemm_core, False,
         num_sms, key, tuned, ok_gemm),
        ("gemm", "gemm more", gemm_rows, run, plan, plan.gemm, gemm_more, a.gemm_m is None, num_sms, key, tuned,
         ok_gemm),
        ("fusion", "fusion prefill", fusion_rows, run, plan, [] if plan.dry else [plan.prefill_m], key, ok_fus),
        ("attention", "attention more", attention_rows, run, plan, att_more if ok_att else [], key),
        ("moe", "moe more", moe_rows, run, plan, plan.moe, plan.moe_n[2:] if ok_moe else [], key, moe_w),
    ]
    for kind, name, fn, *args in steps:
        if kind in a.skip:
            continue
        if kind == "model":
            moe_w.clear()  # the model needs the memory
        log(f"--- {name} ---")
        run.section(name, fn, *args)
        res.update(rows=run.rows, validation=run.validation, skipped=run.skipped, errors=run.errors)
        try:  # after every block, so a killed run still leaves its rows
            write_json(a.json, res, indent=1, default=str)
        except OSError as e:
            log(f"cannot write {a.json}: {e}")
    print_tables(run, res)
    log(f"done; json in {a.json}")


if __name__ == "__main__":
    main()
