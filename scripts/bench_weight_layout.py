"""The FP8 dense projections the model runs, with the weight stored [K, N] against [N, K] (K contiguous: the
Hugging Face layout, and what FP8 tensor cores - cuBLASLt's FP8 GEMM, WGMMA - read), kernel time traced
(`kernel_time`, six distinct weights per program so that L2 serves no repeat).

Decode (M token rows, default 1 4 8 16): the Triton kernels kernels="pallas" runs up to 64 rows - `fp8_matmul`
(the output and down projections), `qkv_rope` (q | k | v in one launch) and `gate_up_swiglu` (Triton's, mosaic=False)
- each with w_transposed False / True. Prefill (default 512 4096 rows): XLA's upcast + dot on [K, N] (what
kernels="pallas" runs above 64 rows before the layout change), XLA's FP8 x FP8 dot (x quantized per token) on
[N, K], and Triton's FP8 x FP8 kernel on both layouts. Maverick's full width and the 1/8 shard. Each cell's
error against a float32 dot of the dequantized weight. Needs a GPU.

  python3 scripts/bench_weight_layout.py --decode-m 1 4 8 16 --prefill-m 512 4096
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mavjax.benchmarking import copy_bandwidth, kernel_time  # noqa: E402
from pallas_kernels.fp8_gemm import FP8, fp8_matmul, quantize_activation_per_token  # noqa: E402
from pallas_kernels.fused_gemm import gate_up_swiglu, qkv_rope  # noqa: E402

# (name, K, [N per output]): the dense projections of one Maverick layer, full width and the 1/8 shard
SHAPES = {
    "full": [("o", 5120, [5120]), ("down", 16384, [5120]), ("qkv", 5120, [5120, 1024, 1024]),
             ("gate|up", 5120, [8192, 8192])],
    "shard": [("o/8", 640, [5120]), ("down/8", 2048, [5120]), ("qkv/8", 5120, [640, 128, 128]),
              ("gate|up/8", 5120, [1024, 1024])],
}
COPIES = 6


def xla_upcast(x, w, s):  # w [K, N]
    return (jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32) * s).astype(x.dtype)


def xla_fp8_nk(x, w, s):  # w [N, K]: cuBLASLt's FP8 GEMM
    xq, xs = quantize_activation_per_token(x)
    y = jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [M, N]
    return (y * xs[:, None] * s).astype(x.dtype)


def variants(name, nk, prefill):
    """{variant: fn(x, *weights)}; weights are (w, s) per output, each w [K, N] or, with nk, [N, K]."""
    if prefill:
        if len(nk) != 1:
            return {}
        return {"xla_up kn": (False, lambda x, w, s: xla_upcast(x, w, s)),
                "xla_fp8 nk": (True, lambda x, w, s: xla_fp8_nk(x, w, s)),
                "tri_fp8 kn": (False, lambda x, w, s: fp8_matmul(x, w, s, mode="fp8_fp8")),
                "tri_fp8 nk": (True, lambda x, w, s: fp8_matmul(x, w, s, mode="fp8_fp8", w_transposed=True))}
    out = {}
    for t in (False, True):
        lay = "nk" if t else "kn"
        if name.startswith("qkv"):
            out[f"qkv_rope {lay}"] = (t, lambda x, *ws, t=t: qkv_rope(x, *ws, head_dim=128, w_transposed=t))
        elif name.startswith("gate"):
            out[f"gate_up {lay}"] = (t, lambda x, *ws, t=t: gate_up_swiglu(x, *ws, mosaic=False, w_transposed=t))
        else:
            out[f"fp8_matmul {lay}"] = (t, lambda x, w, s, t=t: fp8_matmul(x, w, s, w_transposed=t))
    return out


def reference(x, ws, name):
    ys = [jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32) * s) for w, s in ws]
    if name.startswith("gate"):
        return [jax.nn.silu(ys[0]) * ys[1]]
    return ys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-m", type=int, nargs="*", default=[1, 4, 8, 16])
    ap.add_argument("--prefill-m", type=int, nargs="*", default=[512, 4096])
    ap.add_argument("--widths", nargs="+", default=["full", "shard"], choices=list(SHAPES))
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy {bw / 1e12:.2f} TB/s", flush=True)
    key = jax.random.key(0)
    for width in a.widths:
        for name, K, Ns in SHAPES[width]:
            # COPIES distinct weight sets, each (w [K, N] e4m3, s [N]) per output, and their [N, K] copies
            sets = []
            for c in range(COPIES):
                ws = []
                for j, N in enumerate(Ns):
                    k = jax.random.fold_in(key, 100 * c + j)
                    w = (jax.random.normal(k, (K, N), jnp.bfloat16) * 32).clip(-448, 448).astype(FP8)
                    ws.append((w, jnp.full((N,), 1 / 64, jnp.float32)))
                sets.append(ws)
            nk_sets = [[(w.T, s) for w, s in ws] for ws in sets]
            wbytes = sum(K * N for N in Ns)
            for prefill, Ms in ((False, a.decode_m), (True, a.prefill_m)):
                for M in Ms:
                    x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
                    ref = reference(x, sets[0], name)
                    cells = []
                    for vn, (t, fn) in variants(name, Ns, prefill).items():
                        use = nk_sets if t else sets
                        args = [(x, *[a for ws in one for a in ws]) for one in use]
                        try:
                            y = jax.jit(fn)(*args[0])
                            ys = y if isinstance(y, (tuple, list)) else [y]
                            err = max(float(jnp.linalg.norm(yy.astype(jnp.float32) - r) / jnp.linalg.norm(r))
                                      for yy, r in zip(ys, ref))
                            us = kernel_time(fn, args, 5) * 1e6
                            rate = (f"{wbytes / us / 1e6 / (bw / 1e12):4.2f}copy" if not prefill
                                    else f"{2 * M * wbytes / us / 1e6:5.0f}TF")
                            cells.append(f"{vn} {us:8.1f}us {rate} e{err:.0e}")
                        except Exception as e:  # noqa: BLE001 - reported in the row
                            cells.append(f"{vn} ERR {type(e).__name__}: {str(e)[:100]}")
                    if cells:
                        print(f"{name:9s} K={K:5d} N={'+'.join(map(str, Ns)):15s} M={M:5d} | " + " | ".join(cells),
                              flush=True)
            del sets, nk_sets


if __name__ == "__main__":
    main()
