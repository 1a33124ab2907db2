"""The Mosaic GPU weight-only FP8 GEMM (`pallas_kernels.mgpu_gemv`) against the Triton one the model uses
(`pallas_kernels.fp8_gemm.fp8_matmul`, weight-only, its default tiles) and XLA's bf16 dot, at decode shapes:
one rank of an 8-way Maverick (the output, down, gate|up and QKV projections) and the full-width ones.

Each variant is checked against `mgpu_gemv.reference` on the GPU, then loop-timed (`mavjax.benchmarking`:
enough distinct weight copies per loop iteration that L2 serves none, us per call of the whole op, its XLA
glue included: every call reads its own x, so nothing is computed once for several calls) and the best of each
kind profiled once (the op's kernels, us per call). Floor: weight + scale bytes over the process's copy
bandwidth. Mosaic kinds: x widened to float16 by XLA (`mgpuf16`) or taken as bf16 with the weight converted to
bf16 in registers (`mgpubf16`).

  python scripts/bench_mgpu_gemv.py --m 1 8 16

`--layouts kn nk tiled` instead compares the weight's layouts at the shapes `--only` names: the model's
[K, N], [N, K], and `mgpu_gemv.tile_weight`'s tile-contiguous one, on the float16 path with x handed over widened
(what the add + norm kernel gives the model's dense gate/up) and the bfloat16 path, each variant's kernel time
traced (the op's kernels, its XLA split sum included: `mavjax.benchmarking.kernel_time`) against XLA's bf16 dot
kernel's in the same process (docs/benchmarks.md section 28); for the K-major layouts also the FP8 x FP8 path
(`--paths`: "f8" with x handed over quantized per token, as a kernel before it could write it; "f8q" with the
quantization in XLA inside the op; section 33):

  python scripts/bench_mgpu_gemv.py --layouts kn nk tiled --m 8 16 --only "gate/up" down o
  python scripts/bench_mgpu_gemv.py --layouts nk tiled --m 1 8 16 --paths f16 bf16 f8 f8q
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mavjax.benchmarking import DeviceLoop, copy_bandwidth, kernel_time  # noqa: E402
from pallas_kernels import mgpu_gemv, upcast  # noqa: E402
from pallas_kernels.split_k import sum_in_xla  # noqa: E402
from pallas_kernels.fp8_gemm import FP8, fp8_matmul, quantize_activation_per_token  # noqa: E402

NUM_SMS = 132
# (name, K, N): the rank's projections at 1/8 of Maverick (5120 wide, 40/8 heads of 128, dense MLP 16384), and
# the full-width ones
SHAPES = [("o/8", 640, 5120), ("down/8", 2048, 5120), ("gate|up/8", 5120, 4096), ("qkv/8", 5120, 896),
          ("o", 5120, 5120), ("gate/up half", 5120, 16384), ("down", 16384, 5120)]


def mgpu_configs(K, N):
    """(tile_n, split_k, stages): split-K for about 1, 2 and 4 programs per SM, 3 and 6 stages (at most a
    split's K steps)."""
    out = []
    tk = mgpu_gemv.tile_k_for(K)
    for tn in (64, 128) if N >= 4096 else (64,):
        nt, nk = N // tn, K // tk
        divisors = [d for d in range(1, nk + 1) if nk % d == 0]
        splits = sorted({max(d for d in divisors if d <= max(1, round(f * NUM_SMS / nt))) for f in (1, 2, 4)})
        for s in splits:
            for st in sorted({min(3, nk // s), min(6, nk // s)}):
                out.append(dict(tile_n=tn, split_k=s, stages=st))
    return out


def layout_configs(K, N, M, layouts, paths=("f16", "bf16", "f8", "f8q")):
    """(layout, tile_k, tile_n, split_k, stages, path) for the layout table: 64- and 128-wide tiles, the splits that
    give one to three programs per SM, 4 stages (and 6 for the tiled layout at the widest N), both 16-bit paths for
    the tiled layout, the float16 path for the others (above 16 rows the bfloat16 path for all); the FP8 x FP8
    path (x handed over quantized, "f8", or quantized inside the op, "f8q") for the K-major layouts. Only the
    paths named."""
    out = []
    for layout in layouts:
        for tk in [t for t in ((128, 256) if layout == "tiled" else (128,)) if K % t == 0]:
            for tn in (64, 128):
                for split in (1, 2, 4, 8):
                    if (K // tk) % split or not NUM_SMS <= (N // tn) * split <= 3.1 * NUM_SMS:
                        continue
                    for st in (4, 6) if layout == "tiled" and N >= 16384 else (4,):
                        st = min(st, K // tk // split)
                        if mgpu_gemv.resident(tn, tk, mgpu_gemv.padded_rows(M), st) < 1:
                            continue
                        ps = ("f16", "bf16") if layout == "tiled" and st == 4 else ("f16",)
                        if M > mgpu_gemv.MAX_ROWS:  # beyond the float16 path's rows: the bfloat16 one
                            ps = ("bf16",)
                        ps += ("f8", "f8q") if layout != "kn" else ()
                        for path in (p for p in ps if p in paths):
                            out.append(dict(layout=layout, tile_k=tk, tile_n=tn, split_k=split, stages=st, path=path))
    return out


def layout_table(a, bw):
    """`--layouts`: kernel time of every layout_configs variant and of XLA's bf16 dot, per shape and M."""
    if not mgpu_gemv.on_hopper():
        sys.exit("--layouts times the Mosaic GPU kernel by tracing it: it needs a Hopper GPU")
    key = jax.random.key(0)
    copies = 6  # distinct weights per traced program: 6 x >= 26 MB, beyond L2
    for name, K, N in [s for s in SHAPES if not a.only or any(s[0].startswith(p) for p in a.only)]:
        ks = jax.random.split(jax.random.fold_in(key, K + N), copies + 1)
        w_nk = [(jax.random.normal(k, (N, K), jnp.bfloat16) * 32).clip(-448, 448).astype(FP8) for k in ks[:copies]]
        w_bf = [w.T.astype(jnp.bfloat16) for w in w_nk]
        floor = K * N / bw * 1e6
        for M in a.m:
            Mp = mgpu_gemv.padded_rows(M)
            x = jax.random.normal(jax.random.fold_in(ks[-1], M), (M, K), jnp.bfloat16)
            xc, rs = upcast.to_compute(x, jnp.float16)  # what the norm kernel hands over (widen_rows)
            xq, qs = quantize_activation_per_token(x)  # what a norm kernel could hand over to the FP8 path
            xs = dict(f16=(jnp.pad(xc, ((0, Mp - M), (0, 0))), rs), bf16=(jnp.pad(x, ((0, Mp - M), (0, 0))), None),
                      f8=(jnp.pad(xq, ((0, Mp - M), (0, 0))), qs), f8q=(x, None))
            ref = jnp.dot(x.astype(jnp.float32), w_nk[0].astype(jnp.float32).T)  # [M, N], unit scales
            xla = kernel_time(lambda x, w: jnp.dot(x, w), [(x, w) for w in w_bf], a.reps) * 1e6
            print(f"\n{name} {K}x{N} M={M}: floor {floor:.2f} us; XLA's bf16 dot kernel {xla:.2f} us "
                  f"({2 * K * N / xla / 1e6:.2f} TB/s)\n{'path':4s} {'layout':6s} {'tk':>3s} {'tn':>3s} {'split':>5s} "
                  f"{'st':>2s} {'kern us':>8s} {'xfloor':>6s} {'TB/s':>5s} {'x.xla':>5s} {'err':>7s}", flush=True)

            def build(c):
                xp, r = xs[c["path"]]
                cdt = dict(f16=jnp.float16, bf16=jnp.bfloat16, f8=FP8)[c["path"]] if c["path"] != "f8q" else None

                @jax.jit
                def op(xp, w):  # the op as fp8_gemv_multi runs it, its tiles fixed
                    if cdt is None:  # "f8q": the whole op, x's quantization included
                        return mgpu_gemv.fp8_gemv(xp, w, jnp.ones((N,), jnp.float32), w_layout=c["layout"],
                                                  tile_n=None if c["layout"] == "tiled" else c["tile_n"],
                                                  split_k=c["split_k"], stages=c["stages"], compute_dtype=FP8)
                    p = mgpu_gemv.gemv_partials(xp, [w], w_layout=c["layout"], tile_n=c["tile_n"],
                                                tile_k=c["tile_k"], split_k=c["split_k"], stages=c["stages"],
                                                compute_dtype=cdt)
                    yt = sum_in_xla(p)[:, :M]  # [N, M]
                    return (yt if r is None else yt * r[None, :]).T.astype(jnp.bfloat16)
                try:
                    ws = [w.T if c["layout"] == "kn" else w if c["layout"] == "nk" else
                          mgpu_gemv.tile_weight(w, c["tile_n"], c["tile_k"], "nk") for w in w_nk]
                    y = op(xp, ws[0]).astype(jnp.float32)
                    return c, op, xp, ws, float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
                except Exception as e:  # noqa: BLE001 - reported in the table
                    return c, None, None, None, f"{type(e).__name__}: {str(e)[:150]}"

            configs = layout_configs(K, N, M, a.layouts, a.paths)
            if not configs:
                print("(no variant: no split of these tiles gives one to three programs per SM)")
            with cf.ThreadPoolExecutor(a.threads) as pool:
                built = list(pool.map(build, configs))
            best = None
            for c, op, xp, ws, err in built:
                head = (f"{c['path']:4s} {c['layout']:6s} {c['tile_k']:3d} {c['tile_n']:3d} {c['split_k']:5d} "
                        f"{c['stages']:2d}")
                if op is None:
                    print(f"{head} {err}")
                    continue
                us = kernel_time(op, [(xp, w) for w in ws], a.reps) * 1e6
                best = min(best or (us, head), (us, head))
                print(f"{head} {us:8.2f} {us / floor:6.2f} {K * N / us / 1e6:5.2f} {xla / us:5.2f} {err:7.1e}",
                      flush=True)
            if best:
                print(f"best: {best[1]}: {best[0]:.2f} us, {best[0] / floor:.2f}x floor, {xla / best[0]:.2f}x XLA")
        del w_nk, w_bf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="*", default=[1, 8, 16])
    ap.add_argument("--only", nargs="*", default=None, help="shape name prefixes")
    ap.add_argument("--unroll-mb", type=float, default=256, help="weight MB streamed per loop iteration")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=12)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--layouts", nargs="*", choices=("kn", "nk", "tiled"),
                    help="compare these weight layouts by kernel time instead (module docstring)")
    ap.add_argument("--reps", type=int, default=3, help="--layouts: traced runs per variant")
    ap.add_argument("--paths", nargs="*", default=["f16", "bf16", "f8", "f8q"], choices=("f16", "bf16", "f8", "f8q"),
                    help="--layouts: the kernel paths timed (f8: FP8 x FP8, x handed over quantized; f8q: quantized "
                         "in the op)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    bw = copy_bandwidth()
    print(f"{jax.devices()[0].device_kind}: copy {bw / 1e12:.2f} TB/s", flush=True)
    if a.layouts:
        layout_table(a, bw)
        print(f"done in {time.perf_counter() - t0:.0f} s")
        return
    shapes = [s for s in SHAPES if not a.only or any(s[0].startswith(p) for p in a.only)]
    jobs = []
    key = jax.random.key(0)
    for name, K, N in shapes:
        U = max(2, min(32, int(a.unroll_mb * 2**20 // (K * N))))
        ks = jax.random.split(key, U + 2)
        key = ks[-1]
        w_nk = [(jax.random.normal(k, (N, K), jnp.bfloat16) * 32).clip(-448, 448).astype(FP8) for k in ks[:U]]
        w_kn = [w.T for w in w_nk]
        scale = jax.random.uniform(ks[U], (N,), jnp.float32, 1e-3, 2e-3)
        w_bf = [(w.astype(jnp.float32) * scale[None, :]).astype(jnp.bfloat16) for w in w_kn]
        for M in a.m:
            xs = [jax.random.normal(jax.random.fold_in(ks[U], M * 100 + u), (M, K), jnp.bfloat16) for u in range(U)]
            x = xs[0]
            ref = mgpu_gemv.reference(x, w_kn[0], scale).astype(jnp.float32)
            base = dict(name=name, K=K, N=N, M=M, U=U, ref=ref, floor_us=(K * N + 4 * N) / bw * 1e6)
            jobs.append(dict(base, var="triton", fn=lambda x, w, s: fp8_matmul(x, w, s, mode="weight_only"),
                             args=(xs, w_kn, scale)))
            jobs.append(dict(base, var="xla bf16", fn=lambda x, w, s: jnp.dot(x, w), args=(xs, w_bf, scale)))
            cfgs = mgpu_configs(K, N)
            # the model's [K, N] weights, every config, x widened to f16 (XLA) or taken as bf16 (the weight
            # converted to bf16); [N, K] at two configs
            for kind, layout, ws, cs, kw in (
                    ("f16", "kn", w_kn, cfgs, dict(compute_dtype=jnp.float16)),
                    ("bf16", "kn", w_kn, cfgs, dict(compute_dtype=jnp.bfloat16)),
                    ("f16", "nk", w_nk, [c for c in cfgs if c["stages"] > 3][:2], dict(compute_dtype=jnp.float16))):
                for cfg in cs:
                    jobs.append(dict(base, var=f"mgpu{kind}-{layout} " + " ".join(f"{k}={v}" for k, v in cfg.items()),
                                     fn=lambda x, w, s, _c=cfg, _l=layout, _kw=kw: mgpu_gemv.fp8_gemv(
                                         x, w, s, w_layout=_l, **_c, **_kw),
                                     args=(xs, ws, scale)))

    def build(job):
        fn, (xs, ws, s) = job["fn"], job["args"]
        try:
            y = jax.jit(fn)(xs[0], ws[0], s).astype(jnp.float32)
            job["err"] = float(jnp.linalg.norm(y - job["ref"]) / jnp.linalg.norm(job["ref"]))
        except Exception as e:  # noqa: BLE001 - reported in the table
            job["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            return job
        loop = DeviceLoop(lambda xs, ws, s: [fn(x, w, s) for x, w in zip(xs, ws)], (xs, ws, s), a.iters,
                          calls_per_iter=len(ws))
        job["loop"] = loop.compile()
        return job

    print(f"{len(jobs)} variants", flush=True)
    with cf.ThreadPoolExecutor(a.threads) as pool:
        jobs = list(pool.map(build, jobs))
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"\n{'shape':13s} {'M':>2s} {'floor':>6s} {'op us':>7s} {'xfloor':>6s} {'err':>8s}  variant")
    best = {}
    for j in jobs:
        loop = j.get("loop")
        if loop is None or loop.error:
            print(f"{j['name']:13s} {j['M']:2d}  {j['var']}: {j.get('error') or loop.error}")
            continue
        j["us"] = loop.time(5) * 1e6
        print(f"{j['name']:13s} {j['M']:2d} {j['floor_us']:6.2f} {j['us']:7.2f} {j['us'] / j['floor_us']:6.2f} "
              f"{j['err']:8.1e}  {j['var']}", flush=True)
        k = (j["name"], j["M"], j["var"].split()[0])
        if k not in best or j["us"] < best[k]["us"]:
            best[k] = j
    if a.no_profile:
        return
    from mavjax.profiling import profile_kernels

    print("\nprofiles (the best variant of each kind per shape): the op's kernels, us per call")
    for (name, M, kind), j in best.items():
        loop = j["loop"]
        p = profile_kernels(lambda: loop.time(1), steps=2 * loop.calls)
        ks = ", ".join(f"{r['name'][:40]} {r['us_per_step'] / max(r['per_step'], 1e-9):.2f}" for r in p["rows"][:4])
        print(f"{name:13s} {M:2d} {kind:8s} {j['us']:7.2f} us, {p['kernels_per_step']:.1f} kernels: {ks}",
              flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
