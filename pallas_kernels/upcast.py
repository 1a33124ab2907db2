"""The dtype that FP8 operands are widened to for the tensor-core dots of the weight-streaming kernels (weight-only
FP8 GEMM, the fused gate/up and QKV, the MoE kernels, and the split-KV attention over an FP8 cache), and the
activation scaling that makes that dtype safe.

Why float16 and not bfloat16: e4m3 -> f16 is one PTX conversion per two values (cvt.rn.f16x2.e4m3x2);
e4m3 -> bf16 goes through f16 and costs three. At decode these kernels convert every byte they stream, and on an
H200 that ALU work, not memory, bounded them: with f16 dots the full-width FP8 GEMM at M = 1 went 38.6 -> 30.2
us (1.46x -> 1.22x its byte floor), the fused gate/up + SwiGLU 82 -> 70 us, the down projection 46 -> 40 us, the
split-KV attention over a 128K FP8 cache 165 -> 122 us (docs/benchmarks.md section 10). e4m3 values are exact
in f16 (as in bf16).

Why the scaling: f16 ends at 65504 and is subnormal below 2^-14, while the bf16 activations span f32's range.
Each activation row is multiplied by a power of two that puts its largest |value| in [2^13, 2^14) (rows whose
largest is below 2^-100: at least 2^-6) - over a program's whole K range where the kernel streams x
(`row_scales`, a pre-pass, or `row_scales_of` over blocks already loaded: pallas_kernels/k_loop.py), per
loaded block (`to_compute`) where it sees one block at a time (the MoE down kernels' h, the attention's q) -
exactly: bf16's 8 significant bits fit f16's 11, and the f32 dot result is multiplied back.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from jax import lax

# Default dtype of the in-register dots when FP8 values are widened (callers may still pass bf16 or f32);
# MAVJAX_FP8_COMPUTE_DTYPE=bfloat16 brings back the earlier default for A/B runs (read at trace time).
FP8_COMPUTE_DTYPE = jnp.dtype(jnp.float16)
# ... for kernels whose programs hold at most this many activation rows. Above it the scale pre-pass's running
# max ([rows, block_k] f32 registers) spills and costs more than f16 saves (H200, M = 64: the 16384x5120 down
# projection 73 us in bf16, 138 us in f16; q/o 34 against 49); at M <= 16 f16 won everywhere (section 10).
F16_MAX_ROWS = 16

# A scaled row's largest |value| lands in [2^(T-1), 2^T) with T = _TARGET_EXP: far below 65504, and 27
# binades above f16's subnormals.
_TARGET_EXP = 14


def compute_dtype(requested=None, rows=None):
    """The dtype of the in-register dots of a kernel that widens FP8 operands: `requested` if given, else
    $MAVJAX_FP8_COMPUTE_DTYPE if set, else float16 for programs of at most F16_MAX_ROWS activation rows (rows:
    the kernel's row block; None for kernels without the pre-pass) and bfloat16 above."""
    if requested is None:
        requested = os.environ.get("MAVJAX_FP8_COMPUTE_DTYPE") or (
            FP8_COMPUTE_DTYPE if rows is None or rows <= F16_MAX_ROWS else jnp.bfloat16)
    cdt = jnp.dtype(requested)
    if cdt not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise ValueError(f"FP8 compute dtype must be float16, bfloat16 or float32, got {cdt}")
    return cdt


def to_compute(x, cdt):
    """x [..., n] (any float dtype) -> (xc, s): xc = x / s in cdt and s [...] float32 (a power of two per row:
    the last axis is the row), so that x = xc * s[..., None] exactly; for cdt other than float16 a plain cast
    and s None (nothing to undo)."""
    if jnp.dtype(cdt) != jnp.float16:
        return x.astype(cdt), None
    mul, s = _scales(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1))
    return scaled(x, mul, cdt), s


def row_scales(load_x, lo, hi, shape, cdt):
    """The scales of to_compute taken over several K blocks at once: (mul, s) [rows] float32 for the rows of
    load_x(kb) [rows, cols] over kb in [lo, hi) (a kernel's whole K range: one scale per row for all its steps,
    so the K loop only multiplies, and s is applied once to the accumulator), or (None, None) for cdt other
    than float16. The pre-pass keeps an elementwise running max, reduced across the row once at the end: a
    reduction per K step (cross-thread, with a barrier) cost half of f16's gain in the loop (section 10)."""
    if jnp.dtype(cdt) != jnp.float16:
        return None, None
    amax = lax.fori_loop(lo, hi, lambda kb, a: jnp.maximum(a, jnp.abs(load_x(kb).astype(jnp.float32))),
                          jnp.zeros(shape, jnp.float32))
    return _scales(jnp.max(amax, axis=-1))


def row_scales_of(blocks, cdt):
    """row_scales over blocks already loaded (a list of [rows, cols] or [cols] arrays): (mul, s), or (None, None)
    for cdt other than float16."""
    if jnp.dtype(cdt) != jnp.float16:
        return None, None
    amax = jnp.abs(blocks[0].astype(jnp.float32))
    for b in blocks[1:]:
        amax = jnp.maximum(amax, jnp.abs(b.astype(jnp.float32)))
    return _scales(jnp.max(amax, axis=-1))


def scaled(x, mul, cdt):
    """x [rows, cols] in cdt, each row multiplied by mul [rows] first (None: a plain cast)."""
    if mul is None:
        return x.astype(cdt)
    return (x.astype(jnp.float32) * mul[..., None]).astype(cdt)


def _scales(amax):
    """(mul, s) = (2^(T - e), 2^(e - T)) per row for its largest |value| amax, e = floor(log2(amax)) + 1."""
    # e from the exponent bits (exact; no transcendental), clipped so that 2^(T - e) stays a normal f32: rows
    # below 2^-100 (never met in practice) keep f16's digits down to 2^-9 of their largest value instead of
    # 2^-27; an all-zero row gets e = -100 (any scale would do); inf / NaN rows stay inf / NaN
    e = jnp.clip(((lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF) - 126, -100, 128)
    return _pow2(_TARGET_EXP - e), _pow2(e - _TARGET_EXP)


def _pow2(n):
    """2.0 ** n as float32, exactly, for int32 n in [-126, 127] (the exponent field)."""
    return lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def storage_dtype(cdt):
    """The dtype an intermediate activation (the MoE kernels' h) is stored in between two kernels that compute in
    cdt: bf16 for float16 (its range; the reader rescales it with to_compute), else cdt itself."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(cdt) == jnp.float16 else jnp.dtype(cdt)
