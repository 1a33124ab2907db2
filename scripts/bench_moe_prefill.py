"""The MoE's routed experts for many tokens (prefill, large batches) on its two sorted paths, kernel time traced
(`kernel_time`): Triton's grouped GEMMs (`moe_gemm.moe_fp8(mosaic=False)`: the tokens sorted into row blocks,
`moe_gemm.default_config`'s tiles) and the Mosaic GPU kernel over the same row blocks
(`moe_mgpu.moe_fp8_mgpu_sorted`, at `sorted_config`'s tiles and the block_m x tile_n given). Maverick's routed
experts (128 x 5120 x 8192 FP8) at full width and the 1/8 shard (F = 1024), N tokens top-1 uniform random
routing. Per cell: us; the floors (the routed experts' bytes over the copy bandwidth, the FLOPs over the bf16
rate XLA's dot reaches in the same process on a [4096, 5120] x [5120, 16384] product) and the time over the
larger; each output's difference from the Triton path's (e) and, on its first 64 tokens, from `moe_reference` in
float32 (r). Needs a GPU.

  python3 scripts/bench_moe_prefill.py [--n 32 512 4096 16384] [--shapes full shard] [--tiles 32x128 64x256x64 ...]
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mavjax.benchmarking import copy_bandwidth, kernel_time  # noqa: E402
from pallas_kernels import moe_mgpu  # noqa: E402
from pallas_kernels.moe_gemm import FP8, moe_fp8, moe_reference  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, nargs="+", default=[32, 512, 4096, 16384])
ap.add_argument("--shapes", nargs="+", default=["full", "shard"], choices=["full", "shard"])
ap.add_argument("--tiles", nargs="*", default=["32x128", "64x128", "64x64", "128x128"],
                help="block_m x tile_n [x tile_k] of the Mosaic GPU path besides sorted_config's")
args = ap.parse_args()
E, D = 128, 5120
copy = copy_bandwidth()
a = jnp.ones((4096, 5120), jnp.bfloat16)
b = jnp.ones((5120, 16384), jnp.bfloat16)
dot_rate = 2 * 4096 * 5120 * 16384 / kernel_time(jnp.dot, [(a, b)] * 3, 3)
del a, b
print(f"copy {copy / 1e12:.2f} TB/s, bf16 dot {dot_rate / 1e12:.0f} TFLOP/s", flush=True)
mk = jax.jit(lambda k, s: (jax.random.normal(k, s, jnp.bfloat16) * 32).clip(-448, 448).astype(FP8), static_argnums=1)
for shape in args.shapes:
    F = 8192 if shape == "full" else 1024
    ks = jax.random.split(jax.random.key(F), 3)
    ws = mk(ks[0], (E, D, F)), mk(ks[1], (E, D, F)), mk(ks[2], (E, F, D))
    scales = (jnp.full((E, F), 1 / 256, jnp.float32), jnp.full((E, F), 1 / 256, jnp.float32),
              jnp.full((E, D), 1 / 256, jnp.float32))
    for N in args.n:
        rng = np.random.default_rng(N)
        ids = rng.integers(0, E, (N, 1))
        x = jax.random.normal(jax.random.key(N), (N, D), jnp.bfloat16)
        idx, sc = jnp.asarray(ids, jnp.int32), jnp.asarray(rng.uniform(0.1, 1, (N, 1)), jnp.bfloat16)
        op_args = (x, idx, sc, *ws, scales)
        floor_b = len(np.unique(ids)) * 3 * D * F / copy
        floor_f = 2 * N * 3 * D * F / dot_rate
        floor = max(floor_b, floor_f)
        variants = {"triton": lambda *o: moe_fp8(*o, mosaic=False), "mosaic": moe_mgpu.moe_fp8_mgpu_sorted}
        for t in args.tiles:  # block_m x tile_n [x tile_k]
            bm, tn, tk = ([int(v) for v in t.split("x")] + [None])[:3]
            variants[f"mosaic {t}"] = lambda *o, bm=bm, tn=tn, tk=tk: moe_mgpu.moe_fp8_mgpu_sorted(
                *o, block_m=bm, tile_n=tn, tile_k=tk)
        n = min(N, 64)  # the reference on the first tokens (each token's output depends on its own row only)
        ref = moe_reference(x[:n], idx[:n], sc[:n], *ws, scales=scales).astype(jnp.float32)
        base, row = None, []
        for name, f in variants.items():
            try:
                y = jax.jit(f)(*op_args).astype(jnp.float32)
                base = y if base is None else base
                err = float(jnp.linalg.norm(y - base) / jnp.linalg.norm(base))
                err_ref = float(jnp.linalg.norm(y[:n] - ref) / jnp.linalg.norm(ref))
                t = kernel_time(f, [op_args], 3)
                row.append(f"{name} {t * 1e6:7.0f}us {t / floor:4.2f}x e{err:.0e} r{err_ref:.0e}")
            except Exception as e:  # noqa: BLE001 - reported in the row (shared memory, registers, ...)
                row.append(f"{name} ERR {type(e).__name__}: {str(e)[:160]}")
        print(f"{shape} N={N:5d} floor {floor * 1e6:.0f}us ({'bytes' if floor_b > floor_f else 'FLOPs'}) | "
              + " | ".join(row), flush=True)
    del ws
