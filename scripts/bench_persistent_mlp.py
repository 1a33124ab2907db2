"""Validate and time the persistent dense-MLP kernel (pallas_kernels/persistent_mlp.py) against the launches it
replaces and against XLA, on one GPU, at one 8-way rank's shape of Maverick's dense MLP (D=5120, F=2048) and at
full width (F=16384), for 1 and 8 tokens.

  PYTHONPATH=. python3 scripts/bench_persistent_mlp.py [--json out.json] [--validate-only]
  python3 scripts/bench_persistent_mlp.py --dry-run        # CPU: interpreter, tiny shapes, the script's flow

Rows (us per call, loop-timed: mavjax.benchmarking.DeviceLoop over G weight copies so that L2 never serves a
repeat): persistent = mlp_add_rms_norm, one launch; pallas = the model's other Pallas path (fused gate/up +
SwiGLU, then the FP8 GEMM + residual add + RMSNorm, with XLA's split-K sums in between); xla = upcast-then-dot
gate/up, SwiGLU, down, add, RMSNorm. floor = weight + scale bytes / measured copy bandwidth. Every variant is
checked against mlp_add_rms_norm_ref (float32 GEMMs on the dequantized weights) before it is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mavjax.benchmarking import DeviceLoop, copy_bandwidth  # noqa: E402
from pallas_kernels.fp8_gemm import fp8_matmul_add_rms_norm, quantize_weight_per_channel  # noqa: E402
from pallas_kernels.fused_gemm import gate_up_swiglu  # noqa: E402
from pallas_kernels.persistent_mlp import mlp_add_rms_norm, mlp_add_rms_norm_ref  # noqa: E402

EPS = 1e-5


def weights(key, D, F):
    ks = jax.random.split(key, 3)
    q = lambda k, a, b: quantize_weight_per_channel(jax.random.normal(k, (a, b), jnp.float32) * 0.02)  # noqa: E731
    (wg, sg), (wu, su), (wd, sd) = q(ks[0], D, F), q(ks[1], D, F), q(ks[2], F, D)
    return wg, sg, wu, su, wd, sd


def persistent(interpret, **kw):
    def f(x, w, res, nw):
        return mlp_add_rms_norm(x, *w, res, nw, eps=EPS, interpret=interpret, **kw)
    return f


def pallas_path(interpret):
    def f(x, w, res, nw):
        wg, sg, wu, su, wd, sd = w
        h = gate_up_swiglu(x, wg, sg, wu, su, out_dtype=x.dtype, interpret=interpret)
        return fp8_matmul_add_rms_norm(h, wd, sd, res, nw, eps=EPS, interpret=interpret)
    return f


def xla_path(x, w, res, nw):
    from mavjax.model import rms_norm

    wg, sg, wu, su, wd, sd = w
    up = lambda a, q, s: (jnp.dot(a, q.astype(a.dtype), preferred_element_type=jnp.float32) * s)  # noqa: E731
    h = (jax.nn.silu(up(x, wg, sg)) * up(x, wu, su)).astype(x.dtype)
    s = res + up(h, wd, sd).astype(res.dtype)
    return s, rms_norm(s, nw, EPS)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--validate-only", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", help="time only the variants whose name contains this (rank shape, M = 1)")
    ap.add_argument("--pps", type=int, nargs="+", default=[],
                    help="persistent variants with this many programs per SM (all must be resident at once: a "
                         "count that does not fit hangs at the first barrier, so run it under a timeout)")
    a = ap.parse_args()
    interpret = a.dry_run
    shapes = [("rank 1/8", 64, 48), ("full", 96, 160)] if a.dry_run else [("rank 1/8", 5120, 2048),
                                                                          ("full", 5120, 16384)]
    bw = None if a.dry_run else copy_bandwidth()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, SMs {getattr(dev, 'core_count', '?')}; copy bandwidth "
          f"{'-' if bw is None else f'{bw / 1e12:.2f} TB/s'}", flush=True)
    variants = {"persistent": persistent(interpret), "pallas": pallas_path(interpret), "xla": xla_path}
    if not a.dry_run and not a.validate_only:  # a few tilings of the persistent kernel at the rank's shape
        for nw, bk1, bk2, st, vol in ((4, 128, 64, 3, False), (8, 128, 64, 3, True), (16, 128, 64, 3, False),
                                      (8, 128, 64, 2, False), (8, 128, 128, 3, False), (8, 64, 64, 4, False),
                                      (16, 128, 128, 2, False)):
            variants[f"persistent w{nw} k{bk1}/{bk2} s{st}{' vol' if vol else ''}"] = persistent(
                False, num_warps=nw, block_k1=bk1, block_k2=bk2, num_stages=st, volatile=vol)
        for pps in a.pps:
            for nw, bk1, bk2, st in ((4, 64, 64, 2), (4, 64, 64, 3), (8, 64, 64, 4)):
                variants[f"persistent w{nw} k{bk1}/{bk2} s{st} pps{pps}"] = persistent(
                    False, num_warps=nw, block_k1=bk1, block_k2=bk2, num_stages=st, programs_per_sm=pps)
    if a.only:
        variants = {k: v for k, v in variants.items() if a.only in k}
        shapes = shapes[:1]
    rows = []
    for name, D, F in shapes:
        wbytes = 3 * D * F + 4 * (2 * F + D)
        G = 1 if a.dry_run else max(2, math.ceil(150e6 / wbytes))  # weight copies: no L2 repeats
        ws = [weights(jax.random.key(g), D, F) for g in range(G)]
        for M in ((1,) if a.only else (1, 8)):
            k = jax.random.split(jax.random.key(100 + M), 3)
            x = jax.random.normal(k[0], (M, D), jnp.bfloat16)
            res = jax.random.normal(k[1], (M, D), jnp.bfloat16)
            nw = (1 + 0.1 * jax.random.normal(k[2], (D,))).astype(jnp.bfloat16)
            s_ref, y_ref = mlp_add_rms_norm_ref(x, *ws[0], res, nw, eps=EPS)
            for vname, fn in variants.items():
                if vname.startswith("persistent k") and (name != "rank 1/8" or M != 1):
                    continue
                try:
                    s, y = jax.jit(fn)(x, ws[0], res, nw)
                except Exception as e:  # noqa: BLE001 - e.g. a tiling over the shared-memory limit
                    print(f"{name:9s} M={M:2d} {vname:28s} did not run: {type(e).__name__}: {str(e)[:160]}")
                    continue
                err = max(rel(s, s_ref), rel(y, y_ref))
                ok = err < 2e-2 and bool(jnp.isfinite(y).all())
                t = None
                if ok and not a.validate_only:
                    def many(x, wss, res, nw, fn=fn):
                        return [fn(x, w, res, nw) for w in wss]
                    t = DeviceLoop(many, (x, ws, res, nw), iters=2 if a.dry_run else a.iters,
                                   calls_per_iter=G).time(reps=2 if a.dry_run else 5)
                row = dict(shape=name, D=D, F=F, M=M, variant=vname, err=err, ok=ok,
                           us=None if t is None else t * 1e6,
                           floor_us=None if bw is None else wbytes / bw * 1e6)
                rows.append(row)
                us = "-" if row["us"] is None else f"{row['us']:8.2f}"
                xf = "-" if row["us"] is None or bw is None else f"{row['us'] / row['floor_us']:5.2f}"
                print(f"{name:9s} D={D} F={F} M={M:2d} {vname:28s} err {err:.1e} {'ok  ' if ok else 'FAIL'} "
                      f"us {us} x floor {xf}", flush=True)
    by = {(r["shape"], r["M"], r["variant"]): r for r in rows}
    print("\nshape      M   floor us  persistent us  pallas us  xla us  pers x floor  pallas/pers  xla/pers")
    for name, D, F in shapes:
        for M in (1, 8):
            p, q, r = (by.get((name, M, v), {}).get("us") for v in ("persistent", "pallas", "xla"))
            fl = by.get((name, M, "persistent"), {}).get("floor_us")
            f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            ratio = lambda u, v: "-" if u is None or v is None else f"{u / v:.2f}"  # noqa: E731
            print(f"{name:9s} {M:2d} {f(fl):>9s} {f(p):>14s} {f(q):>10s} {f(r):>7s} {ratio(p, fl):>13s} "
                  f"{ratio(q, p):>12s} {ratio(r, p):>9s}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(device=dev.device_kind, copy_bw=bw, rows=rows), fh, indent=1)
    base = [r for r in rows if not r["variant"].startswith("persistent w")]
    return 0 if base and all(r["ok"] for r in base) else 1


if __name__ == "__main__":
    sys.exit(main())
