"""Block-size sweep of the weight-streaming decode kernels at one shape set (default: one rank of an 8-way
Maverick, batch 1), timed the way the model runs them: many calls back to back inside one jitted loop.

For each op (FP8 GEMM, gate/up+SwiGLU, QKV+RoPE, the MoE pair kernels) every candidate (block_n, block_k,
split_k, num_stages) is compiled (in parallel threads) and timed over `--unroll` distinct weight buffers per
loop iteration (so that L2 holds none of them), next to the kernel's own default config. Prints, per op, the
default's time, the best candidate and the bytes-read floor (weights + scales over the measured copy
bandwidth); writes every candidate's time to --json. The defaults in pallas_kernels/ are set from these runs.

  python scripts/tune_decode_kernels.py --shard 8 --m 1 --json $OUT/tune.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mavjax.atomic_write import write_json  # noqa: E402
from mavjax.benchmarking import DeviceLoop, copy_bandwidth  # noqa: E402
from pallas_kernels.fp8_gemm import FP8, fp8_matmul, fp8_matmul_add_rms_norm  # noqa: E402
from pallas_kernels.fused_gemm import gate_up_swiglu, qkv_rope  # noqa: E402
from pallas_kernels.moe_gemm import moe_fp8_pairs  # noqa: E402

SMEM_LIMIT = 200 * 1024
NUM_SMS = 132


def _w(key, shape):
    return (jax.random.normal(key, shape, jnp.bfloat16) * 32).clip(-448, 448).astype(FP8)


def _s(key, n):
    return jax.random.uniform(key, (n,), jnp.float32, 1e-3, 2e-3)


def candidates(K, N, tiles, x_rows=16):
    """(block_n, block_k, split_k, num_stages) with staged tiles in shared memory and split-K sized to
    about 0.5, 1, 2 and 4 programs per SM."""
    out = []
    for bn, bk, st in itertools.product((32, 64, 128), (64, 128, 256), (2, 4)):
        if st * (x_rows * bk * 2 + tiles * bk * bn) > SMEM_LIMIT:
            continue
        nb, nk = math.ceil(N / bn), math.ceil(K / bk)
        splits = sorted({max(1, min(nk, math.ceil(f * NUM_SMS / nb))) for f in (0.5, 1, 2, 4)})
        out += [dict(block_n=bn, block_k=bk, split_k=s, num_stages=st) for s in splits]
    return out


class Op:
    """name, the op as f(x, weights_i, **cfg), U weight sets, bytes per call, and its candidates."""

    def __init__(self, name, fn, x, weights, nbytes, cands, shared=()):
        self.name, self.fn, self.x, self.weights, self.nbytes, self.cands = name, fn, x, weights, nbytes, cands
        self.shared = shared  # arrays every call reads (arguments, never captured as constants)
        self.results = []


def loop_program(op, cfg, iters):
    """The op over all its weight sets, `iters` times in a device loop (mavjax.benchmarking.DeviceLoop)."""
    def calls(x, ws, shared):
        return [op.fn(x, w, *shared, **cfg) for w in ws]
    return DeviceLoop(calls, (op.x, op.weights, op.shared), iters, calls_per_iter=len(op.weights))


def build_ops(a, key):
    D, H, Kh, Dh, Fm, Fe, E = 5120, 40, 8, 128, 16384, 8192, a.experts
    s = a.shard
    H, Kh, Fm, Fe = H // s, max(1, Kh // s), Fm // s, Fe // s
    M, U = a.m, a.unroll
    x = lambda K: jax.random.normal(jax.random.fold_in(key, K), (M, K), jnp.bfloat16)  # noqa: E731
    ks = iter(jax.random.split(key, 4096))
    ops = []

    def mm(name, K, N):
        ws = [(_w(next(ks), (K, N)), _s(next(ks), N)) for _ in range(U)]
        ops.append(Op(name, lambda x, w, **c: fp8_matmul(x, *w, **c), x(K), ws, K * N + 4 * N,
                      candidates(K, N, 1)))

    mm(f"o {H * Dh}x{D}", H * Dh, D)
    mm(f"mlp down {Fm}x{D}", Fm, D)
    mm(f"shared down {Fe}x{D}", Fe, D)

    def mm_norm(name, K, N):
        """An output projection with the residual add and the next RMSNorm, as the model runs it
        (mavjax.model.dense_add_norm). The default: the GEMM (XLA's split-K sum) then the add + norm kernel;
        the candidates: one launch (reduce="kernel": the last split of a tile sums, the last tile normalizes),
        every split count, and 16-wide tiles without split-K (a program per 16 columns, no partials)."""
        ws = [(_w(next(ks), (K, N)), _s(next(ks), N)) for _ in range(U)]
        res, g = jax.random.normal(next(ks), (M, N), jnp.bfloat16), jnp.ones((N,), jnp.bfloat16)
        cands = [dict(c, reduce="kernel") for c in candidates(K, N, 1)] + [
            dict(block_n=16, block_k=bk, split_k=1, num_stages=st, reduce="kernel")
            for bk in (64, 128, 256) for st in (2, 3, 4)]
        ops.append(Op(name, lambda x, w, r, g, **c: fp8_matmul_add_rms_norm(x, *w, r, g, eps=1e-5, **c),
                      x(K), ws, K * N + 4 * N, cands, shared=(res, g)))

    mm_norm(f"o+add+norm {H * Dh}x{D}", H * Dh, D)
    mm_norm(f"mlp down+add+norm {Fm}x{D}", Fm, D)
    for name, F in ((f"mlp gate/up {D}x2x{Fm}", Fm), (f"shared gate/up {D}x2x{Fe}", Fe)):
        ws = [(_w(next(ks), (D, F)), _s(next(ks), F), _w(next(ks), (D, F)), _s(next(ks), F)) for _ in range(U)]
        ops.append(Op(name, lambda x, w, **c: gate_up_swiglu(x, *w, **c), x(D), ws, 2 * (D * F + 4 * F),
                      candidates(D, F, 2)))
    ang = jax.random.uniform(next(ks), (M, Dh // 2), maxval=100.0)
    rope = (jnp.cos(ang), jnp.sin(ang))
    ws = [(_w(next(ks), (D, H * Dh)), _s(next(ks), H * Dh), _w(next(ks), (D, Kh * Dh)), _s(next(ks), Kh * Dh),
           _w(next(ks), (D, Kh * Dh)), _s(next(ks), Kh * Dh)) for _ in range(U)]
    # a QKV tile never straddles two heads
    qkv_cands = [c for c in candidates(D, (H + 2 * Kh) * Dh, 1) if c["block_n"] <= Dh]
    ops.append(Op(f"qkv+rope+norm {D}x{(H + 2 * Kh) * Dh}",
                  lambda x, w, cos, sin, **c: qkv_rope(x, *w, head_dim=Dh, rope=(cos, sin), qk_norm_eps=1e-5, **c),
                  x(D), ws, D * (H + 2 * Kh) * Dh,
                  qkv_cands, shared=rope))
    # The same with the KV cache write (the model's decode): the kernel then always sums its splits itself
    # and stores k, v into the caches (one cache pair per weight set; 16 slots: the caches are aliased in
    # place, so XLA copies these loop-invariant ones each call, the same ~2 small copies for every candidate).
    start = jnp.zeros((M,), jnp.int32)
    ws_c = [w + ((jnp.zeros((M, 16, Kh, Dh), jnp.bfloat16),) * 2,) for w in ws]
    ops.append(Op(f"qkv+rope+norm+cache {D}x{(H + 2 * Kh) * Dh}",
                  lambda x, w, cos, sin, st, **c: qkv_rope(x, *w[:6], head_dim=Dh, rope=(cos, sin), qk_norm_eps=1e-5,
                                                           cache=(*w[6], st), **c),
                  x(D), ws_c, D * (H + 2 * Kh) * Dh,
                  qkv_cands, shared=(*rope, start)))
    # Split-KV decode attention: one query token per row over a bf16 cache of `ctx` visible positions (the
    # rank's 1 kv head, or all 8 at full width), every split count and tile size.
    from pallas_kernels.decode_attention import decode_attention

    for kv_dtype, ctx in itertools.product(a.kv, a.contexts):
        S = ctx + 64
        Ba = M
        fp8_kv = kv_dtype == "fp8"
        q = jax.random.normal(next(ks), (Ba, 1, H, Dh), jnp.bfloat16)
        q_pos = jnp.full((Ba, 1), ctx, jnp.int32)
        k_pos = jnp.broadcast_to(jnp.where(jnp.arange(S) <= ctx, jnp.arange(S), -1), (Ba, S)).astype(jnp.int32)
        item = 1 if fp8_kv else 2
        caches = [tuple((_w(next(ks), (Ba, S, Kh, Dh)) if fp8_kv else
                         jax.random.normal(next(ks), (Ba, S, Kh, Dh), jnp.bfloat16)) for _ in range(2))
                  for _ in range(max(2, min(U, int(400e6 // (2 * item * Ba * S * Kh * Dh)))))]
        kv_scales = (jnp.float32(0.01), jnp.float32(0.01)) if fp8_kv else (None, None)

        def att(q, kv, q_pos, k_pos, _s=kv_scales, **c):
            return decode_attention(q, *kv, q_pos, k_pos, chunk_size=None, scale=Dh ** -0.5, k_scale=_s[0],
                                    v_scale=_s[1], **c)

        # pipeline depth too: each program's tile loop is a dependent chain (load, QK dot, exp, PV dot), and at
        # 32K XLA's attention beat every split count at the default 2 stages (docs/benchmarks.md section 10)
        cands = [dict(num_splits=ns, block_s=bs, num_stages=st) for st in (2, 3, 4) for bs in (64, 128, 256)
                 for ns in (1, 2, 4, 8, 16, 32, 64, 128) if ns * bs <= S and not (st > 2 and bs == 256)]
        ops.append(Op(f"attention {kv_dtype} {H}/{Kh} heads ctx {ctx}", att, q, caches,
                      2 * item * Ba * (ctx + 1) * Kh * Dh, cands, shared=(q_pos, k_pos)))
    # MoE pairs: one expert per call (op i routes its tokens to expert i: no weight is read twice per loop)
    wg, wu, wd = (jnp.stack([_w(next(ks), shp) for _ in range(E)]) for shp in ((D, Fe), (D, Fe), (Fe, D)))
    sc = (jnp.stack([_s(next(ks), Fe) for _ in range(E)]), jnp.stack([_s(next(ks), Fe) for _ in range(E)]),
          jnp.stack([_s(next(ks), D) for _ in range(E)]))
    moe_w = [(jnp.full((M, 1), i, jnp.int32),) for i in range(U)]
    scores = jnp.full((M, 1), 0.7, jnp.bfloat16)

    def moe(x, w, wg, wu, wd, sc, **c):
        return moe_fp8_pairs(x, w[0], scores, wg, wu, wd, sc, **c)

    gu = [dict(block_n=c["block_n"], block_k=c["block_k"], split_k=c["split_k"], num_stages=c["num_stages"])
          for c in candidates(D, Fe, 2)]
    dn = [dict(block_n_down=c["block_n"], block_k_down=c["block_k"], split_k_down=c["split_k"],
               num_stages_down=c["num_stages"]) for c in candidates(Fe, D, 1)]
    shared = (wg, wu, wd, sc)
    ops.append(Op(f"moe pair gate/up {D}x2x{Fe} (down at default)", moe, x(D), moe_w, 2 * D * Fe * M, gu, shared))
    ops.append(Op(f"moe pair down {Fe}x{D} (gate/up at default)", moe, x(D), moe_w, Fe * D * M, dn, shared))
    # The decode MoE layer as the model runs it: routed pairs plus the shared expert as one more row per token
    # in the same two launches (moe_fp8_pairs(shared=...)), default tiles. Op i's shared expert is stack entry
    # U + i (distinct from every routed one, so no weight is an L2 hit); compare with the pair op's time plus
    # the "shared" gate/up and down ops above.
    if E >= 2 * U:
        moe_sh_w = [(jnp.full((M, 1), i, jnp.int32), (wg[U + i], wu[U + i], wd[U + i],
                                                      (sc[0][U + i], sc[1][U + i], sc[2][U + i])))
                    for i in range(U)]

        def moe_sh(x, w, wg, wu, wd, sc, **c):
            return moe_fp8_pairs(x, w[0], scores, wg, wu, wd, sc, shared=w[1], **c)

        # candidates: where kernel 1's split-K partials are reduced (in kernel 2's loads, or one XLA fusion),
        # and fewer kernel-1 splits (fewer partials for kernel 2 to re-read)
        variants = [dict(gu_epilogue=e) for e in ("down", "xla")] + [
            dict(split_k=s, gu_epilogue=e) for s in (4, 8, 16) for e in ("down", "xla")]
        ops.append(Op(f"moe pairs + shared expert {D}x3x{Fe}", moe_sh, x(D), moe_sh_w,
                      3 * D * Fe * (M + 1), variants, shared))
    return ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", type=int, default=8)
    ap.add_argument("--m", type=int, default=1, help="rows (batch) of the activations")
    ap.add_argument("--unroll", type=int, default=16, help="distinct weight sets per loop iteration")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=14)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--only", nargs="*", default=None, help="op name prefixes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--max-cands", type=int, default=None, help="first N candidates per op (smoke tests)")
    ap.add_argument("--interpret", action="store_true", help="CPU smoke test: Pallas interpreter")
    ap.add_argument("--experts", type=int, default=128, help="experts held (the pair op reads --unroll of them)")
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192],
                    help="cache lengths of the split-KV attention op (none: no attention op)")
    ap.add_argument("--kv", nargs="*", default=["bf16"], choices=["bf16", "fp8"],
                    help="KV-cache dtypes of the attention op")
    ap.add_argument("--compute-dtypes", nargs="*", default=None,
                    help="in-register dot dtypes: each op's default tiles once per dtype "
                         "(e.g. bfloat16 float16), then the sweep in each: the FP8 upcast's cost")
    ap.add_argument("--profile", action="store_true",
                    help="then each op's default once more under the profiler: its kernels, us per call")
    ap.add_argument("--same-weights", action="store_true",
                    help="all --unroll calls read one weight set (L2-resident weights: the kernels' fixed cost)")
    a = ap.parse_args()
    T0 = time.perf_counter()
    bw = copy_bandwidth(16 << 20 if a.interpret else 2 << 30)
    print(f"{jax.devices()[0].device_kind}: copy {bw / 1e12:.2f} TB/s", flush=True)
    ops = build_ops(a, jax.random.key(0))
    if a.only:
        ops = [o for o in ops if any(o.name.startswith(p) for p in a.only)]
    for op in ops:
        if a.compute_dtypes is not None:  # every dtype's default tiles first, then the sweep in each dtype
            op.cands = ([dict(compute_dtype=d) for d in a.compute_dtypes]
                        + [dict(c, compute_dtype=d) for c in op.cands for d in a.compute_dtypes])
        op.cands = op.cands[:a.max_cands]
        if a.same_weights:  # every call reads the first weight set: after the first call, from L2
            op.weights = [op.weights[0]] * len(op.weights)
        if a.interpret:
            fn = op.fn
            op.fn = lambda x, w, *sh, _fn=fn, **c: _fn(x, w, *sh, interpret=True, **c)
    # defaults first, then the ops' candidates round-robin (a budget cut leaves every op some candidates)
    jobs = [(op, None) for op in ops] + [(op, c) for group in itertools.zip_longest(*[op.cands for op in ops])
                                         for op, c in zip(ops, group) if c is not None]
    print(f"{len(jobs)} programs to compile", flush=True)

    def compile_one(job):
        op, cfg = job
        if time.perf_counter() - T0 > a.budget_s:
            return job, None
        return job, loop_program(op, cfg or {}, a.iters).compile()

    with cf.ThreadPoolExecutor(a.threads) as pool:
        compiled = list(pool.map(compile_one, jobs))
    print(f"compiled in {time.perf_counter() - T0:.0f} s", flush=True)
    for (op, cfg), loop in compiled:
        us = None if loop is None or loop.error else loop.time(a.reps) * 1e6
        op.results.append(dict(cfg=cfg or "default", us=us, error="budget" if loop is None else loop.error))
    rows = []
    print(f"\n{'op':44s} {'floor us':>8s} {'default':>8s} {'best':>8s} {'xfloor':>7s}  best config")
    for op in ops:
        floor = op.nbytes / bw * 1e6
        ok = [r for r in op.results if r["us"]]
        d = next((r["us"] for r in op.results if r["cfg"] == "default"), None)
        best = min(ok, key=lambda r: r["us"]) if ok else None
        print(f"{op.name:44s} {floor:8.2f} {d or float('nan'):8.2f} {best['us'] if best else float('nan'):8.2f} "
              f"{(best['us'] / floor) if best else float('nan'):7.2f}  {best['cfg'] if best else '-'}")
        top = sorted(ok, key=lambda r: r["us"])[:6]
        for r in top[1:]:
            print(f"{'':44s} {'':8s} {'':8s} {r['us']:8.2f} {r['us'] / floor:7.2f}  {r['cfg']}")
        rows.append(dict(op=op.name, floor_us=floor, default_us=d, results=op.results))
    if a.profile:  # where each op's default time goes: its kernels (Pallas, XLA's sums and glue) per call
        from mavjax.profiling import format_profile, profile_kernels

        for (op, cfg), loop in compiled:
            if cfg is None and loop is not None and loop.compiled is not None:
                p = profile_kernels(lambda: loop.time(1), steps=2 * loop.calls)  # warm-up + one timed loop
                print(format_profile(p, f"\nprofile of {op.name} (default tiles), per call"))
                rows[ops.index(op)]["profile"] = p
    if a.json:
        write_json(a.json, dict(device=jax.devices()[0].device_kind, copy_tb_s=bw / 1e12, m=a.m, shard=a.shard,
                                rows=rows), indent=1, default=str)
    print(f"done in {time.perf_counter() - T0:.0f} s")


if __name__ == "__main__":
    main()
