"""Prefill-shaped FP8 projections on the paths the model can take, kernel time traced (`kernel_time`): the
Triton kernels through `fp8_matmul` (mode "fp8_fp8": x quantized per token, FP8 x FP8 dot - what kernels="pallas"
ran above 64 rows before docs/benchmarks.md section 29; "weight_only": bf16 x, the weight upcast in registers),
XLA's upcast + dot (the FP8 weight converted to bf16 inside XLA's GEMM fusion: the XLA path, and the Pallas path
above `mavjax.model.PALLAS_GEMM_MAX_ROWS` since section 29), XLA's bf16 dot on a bf16 copy of the weight (the
FLOP baseline) and XLA's own FP8 x FP8 dot (`xla_fp8`: cuBLASLt's FP8 GEMM) on the weight as the model stores it
([K, N]) and transposed ([N, K], section 31). Maverick's full-width and 1/8-shard shapes, M rows each (default
128 512 2048 8192); us and TFLOP/s per cell, and each output's error against a float32 dot (the bf16 cell against
the unscaled one). Needs a GPU (kernel time is traced).

  python3 scripts/bench_prefill_gemm.py 128 512 2048 8192
"""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mavjax.benchmarking import kernel_time, copy_bandwidth  # noqa: E402
from pallas_kernels.fp8_gemm import fp8_matmul, FP8, quantize_activation_per_token  # noqa: E402



def xla_fp8(x, w, s, w_layout):
    """XLA's own FP8 x FP8 dot: x quantized per token to e4m3, w [K, N] ("kn", the model's layout) or [N, K] ("nk",
    K contiguous: what cuBLASLt's FP8 GEMM takes; from [K, N] XLA transposes the weight on every call), the two
    scales applied to the float32 product."""
    xq, xs = quantize_activation_per_token(x)  # [M, K] e4m3, [M]
    dims = (((1,), (0 if w_layout == "kn" else 1,)), ((), ()))
    y = jax.lax.dot_general(xq, w, dims, preferred_element_type=jnp.float32)  # [M, N]
    return (y * xs[:, None] * s).astype(x.dtype)


SHAPES = [("gate|up", 5120, 16384), ("o", 5120, 5120), ("down", 16384, 5120), ("gate|up/8", 5120, 4096),
          ("down/8", 2048, 5120), ("qkv/8", 5120, 896), ("o/8", 640, 5120)]
MS = [int(m) for m in sys.argv[1:]] or [128, 512, 2048, 8192]
print("copy", copy_bandwidth() / 1e12, flush=True)
key = jax.random.key(0)
for name, K, N in SHAPES:
    w = (jax.random.normal(key, (K, N), jnp.bfloat16) * 32).clip(-448, 448).astype(FP8)
    s = jnp.full((N,), 1 / 64, jnp.float32)
    wb = w.astype(jnp.bfloat16)
    for M in MS:
        x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
        ref = jnp.dot(x, wb, preferred_element_type=jnp.float32) / 64
        fl = 2 * M * K * N
        variants = {
            "tri_fp8": lambda x, w, s: fp8_matmul(x, w, s, mode="fp8_fp8"),
            "tri_wo": lambda x, w, s: fp8_matmul(x, w, s, mode="weight_only"),
            "xla_up": lambda x, w, s: (jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32) * s).astype(
                x.dtype),
            "xla_bf16": lambda x, wb, s: jnp.dot(x, wb),
            "xla_fp8_kn": lambda x, w, s: xla_fp8(x, w, s, w_layout="kn"),
            "xla_fp8_nk": lambda x, wt, s: xla_fp8(x, wt, s, w_layout="nk"),
        }
        row = []
        for vn, f in variants.items():
            try:
                wa = wb if vn == "xla_bf16" else w.T if vn == "xla_fp8_nk" else w
                y = jax.jit(f)(x, wa, s).astype(jnp.float32)
                want = ref * 64 if vn == "xla_bf16" else ref  # the bf16 weight carries no scale
                err = float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want))
                t = kernel_time(f, [(x, wa, s)] * 3, 3) * 1e6
                row.append(f"{vn} {t:8.1f}us {fl / t / 1e6:6.0f}TF e{err:.0e}")
            except Exception as e:  # noqa: BLE001 - reported in the row (weight_only above ~128 rows: shared memory)
                row.append(f"{vn} ERR {type(e).__name__}: {str(e)[:80]}")
        print(f"{name:10s} {K}x{N} M={M:5d} | " + " | ".join(row), flush=True)
    del w, wb
