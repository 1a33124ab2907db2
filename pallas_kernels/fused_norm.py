"""Residual add + RMSNorm in one pass (Pallas, Triton lowering), beside its plain jax.numpy reference.

    s = x + h                                   (in x's dtype: the model's residual stream)
    y = rms_norm(s, scale, eps)                 (mavjax.model.rms_norm: float32 statistics, cast, then * scale)

Returns (s, y). Unfused, XLA reads x and h, writes s, then reads s again for the norm (or fuses the two but
still materialises s and y separately); here one program reads a block of rows of x and h once and writes
both outputs, so the pair costs exactly 2 reads + 2 writes of [M, D].

Shapes: x, h [..., D] (same shape and dtype), scale [D]. Grid: one program per `block_m` rows; each holds
whole rows (D lanes padded to a power of two, the pad masked), since the statistic is over all of D.
Rows and lanes past the ends are masked loads/stores (no padding copies).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.fp8_gemm import _compiler_params, _in_bounds, _load, _mask2, _next_pow2, _store

__all__ = ["add_rms_norm_ref", "add_rms_norm"]


def add_rms_norm_ref(x, h, scale, eps):
    """(x + h, rms_norm(x + h) * scale), exactly as mavjax.model computes the residual and the next norm."""
    from mavjax.model import rms_norm

    s = x + h
    return s, rms_norm(s, scale, eps)


def _kernel(x_ref, h_ref, w_ref, s_ref, y_ref, *, m, d, block_m, block_d, eps):
    pid = pl.program_id(0)
    m0 = pl.multiple_of(pid * block_m, block_m)
    r_in = _in_bounds(m0, block_m, m)
    c_in = _in_bounds(0, block_d, d)
    mask = _mask2(r_in, c_in)
    x = _load(x_ref.at[pl.ds(m0, block_m), pl.ds(0, block_d)], mask)                 # [bm, bd]
    h = _load(h_ref.at[pl.ds(m0, block_m), pl.ds(0, block_d)], mask)                 # [bm, bd]
    s = (x + h).astype(s_ref.dtype)                                                  # residual, rounded as XLA does
    sf = s.astype(jnp.float32)                                                       # masked lanes are 0
    r = jax.lax.rsqrt(jnp.sum(sf * sf, axis=1) / d + eps)                            # [bm]
    w = _load(w_ref.at[pl.ds(0, block_d)], c_in)                                     # [bd]
    y = (sf * r[:, None]).astype(s_ref.dtype) * w[None, :]                           # cast before the scale
    _store(s_ref.at[pl.ds(m0, block_m), pl.ds(0, block_d)], s, mask)
    _store(y_ref.at[pl.ds(m0, block_m), pl.ds(0, block_d)], y.astype(y_ref.dtype), mask)


@functools.partial(jax.jit, static_argnames=("eps", "block_m", "num_warps", "interpret", "poison_output"))
def add_rms_norm(x, h, scale, *, eps, block_m=4, num_warps=None, interpret=False, poison_output=False):
    """(x + h, rms_norm(x + h, scale, eps)) in one kernel. x, h [..., D]; scale [D].
    block_m: rows per program (a power of two). poison_output: outputs start as NaN (aliased in), so an
    element the kernel does not write shows up (tests)."""
    if x.shape != h.shape or x.dtype != h.dtype:
        raise ValueError(f"x {x.shape} {x.dtype} and h {h.shape} {h.dtype} must have the same shape and dtype")
    D = x.shape[-1]
    if scale.shape != (D,):
        raise ValueError(f"scale must be [{D}], got {scale.shape}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two")
    lead = x.shape[:-1]
    x2, h2 = x.reshape(-1, D), h.reshape(-1, D)
    M = x2.shape[0]
    if M == 0:
        return x, x
    y_dtype = jnp.promote_types(x.dtype, scale.dtype)
    block_d = _next_pow2(D)
    kernel = functools.partial(_kernel, m=M, d=D, block_m=block_m, block_d=block_d, eps=float(eps))
    out_shape = (jax.ShapeDtypeStruct((M, D), x.dtype), jax.ShapeDtypeStruct((M, D), y_dtype))
    args, aliases = [x2, h2, scale], {}
    if poison_output:
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        aliases = {3: 0, 4: 1}
        inner = kernel

        def kernel(*refs):  # the aliased inputs are the outputs' own refs
            return inner(*refs[:3], *refs[5:])
    if num_warps is None:  # whole rows of D lanes per program: more warps for wide rows
        num_warps = 4 if block_m * block_d <= 4096 else 8 if block_m * block_d <= 16384 else 16
    s, y = pl.pallas_call(kernel, out_shape=out_shape, grid=(pl.cdiv(M, block_m),), input_output_aliases=aliases,
                          interpret=interpret, compiler_params=_compiler_params(num_warps, 1),
                          name=f"add_rms_norm_m{block_m}_d{block_d}")(*args)
    return s.reshape(*lead, D), y.reshape(*lead, D)
