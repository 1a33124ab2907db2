"""Residual add + RMSNorm in one pass (Pallas, Triton lowering), beside its plain jax.numpy reference.

    s = x + h                                   (in x's dtype: the model's residual stream)
    y = rms_norm(s, scale, eps)                 (mavjax.model.rms_norm: float32 statistics, cast, then * scale)

Returns (s, y). Unfused, XLA reads x and h, writes s, then reads s again for the norm (or fuses the two but
still materialises s and y separately); here one program reads a block of rows of x and h once and writes
both outputs, so the pair costs exactly 2 reads + 2 writes of [M, D].

Shapes: x, h [..., D] (same shape and dtype), scale [D]. Grid: one program per `block_m` rows; each holds
whole rows (D lanes padded to a power of two, the pad masked), since the statistic is over all of D.
Rows and lanes past the ends are masked loads/stores (no padding copies).

With `router` [D, E] (a top-1 MoE's router weights) the kernel also gives the router's logits y @ router as
P = ceil(D / router_block) float32 partials [P, M, E], one per slice of D: program (rows, p) computes the
rows' statistic from the whole rows, then normalizes, stores and multiplies only its own D slice, so the
router's bytes are spread over P programs. The MoE pair kernels sum the partials as they route
(pallas_kernels.moe_gemm.top1_of_logits): the router's XLA dot, two reduction kernels, is not launched.
With `pad_rows` (and a router) it also writes y padded with zero rows to the Mosaic GPU MoE path's operand
(pallas_kernels.moe_mgpu, x_padded): no XLA pad kernel before that path's first launch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import upcast
from pallas_kernels.split_k import sum_in_xla
from pallas_kernels.fp8_gemm import _compiler_params, _in_bounds, _load, _mask2, _next_pow2, _store, interpreted

__all__ = ["add_rms_norm_ref", "add_rms_norm", "sum_router_partials"]


def add_rms_norm_ref(x, h, scale, eps, router=None):
    """(x + h, rms_norm(x + h) * scale), exactly as mavjax.model computes the residual and the next norm;
    with router [D, E] also the router's logits of the normed rows [..., E] (mavjax.model.router_logits)."""
    from mavjax.model import rms_norm, router_logits

    s = x + h
    y = rms_norm(s, scale, eps)
    if router is None:
        return s, y
    return s, y, router_logits(y.reshape(-1, y.shape[-1]), router).reshape(*y.shape[:-1], router.shape[1])


def sum_router_partials(partials, dtype):
    """The logits [M, E] of add_rms_norm(router=...)'s partials [P, M, E]: summed in float32 and rounded to
    `dtype` (the router's output dtype on the XLA path) once, as the pair kernels do; as a chain of adds
    (split_k.sum_in_xla), so that XLA takes the sum into the routing's reduction instead of a kernel of its own."""
    return sum_in_xla(partials).astype(dtype)


def _kernel(x_ref, h_ref, w_ref, s_ref, y_ref, *widened, m, d, block_m, block_d, eps):
    """widened: () or (yc_ref [Mp, D] float16, rs_ref [Mp] float32), y widened as upcast.to_compute does; the
    grid then covers Mp >= m rows, those past m (masked loads: zeros) written only there."""
    pid = pl.program_id(0)
    m0 = pl.multiple_of(pid * block_m, block_m)
    # widened, the grid covers mp >= m rows: the programs past m mask their rows even where m is a multiple of
    # block_m (unmasked, they read past x and h and wrote past the end of s and y: docs/benchmarks.md section 20)
    r_in = _in_bounds(m0, block_m, m, extent=widened[0].shape[0] if widened else None)
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
    if widened:  # the Mosaic GPU GEMM's x (pallas_kernels.mgpu_gemv): no widening kernels of XLA's before it
        yc_ref, rs_ref = widened
        mp = yc_ref.shape[0]
        yw = y.astype(y_ref.dtype)                                                   # y as stored
        mul, rs = upcast.row_scales_of([yw], yc_ref.dtype)                           # [bm] powers of two
        w_in = _in_bounds(m0, block_m, mp)
        _store(yc_ref.at[pl.ds(m0, block_m), pl.ds(0, block_d)], upcast.scaled(yw, mul, yc_ref.dtype),
               _mask2(w_in, c_in))
        _store(rs_ref.at[pl.ds(m0, block_m)], rs, w_in)


def _router_kernel(x_ref, h_ref, w_ref, r_ref, s_ref, y_ref, lg_ref, *padded, m, d, e, block_m, block_d, block_k,
                   block_e, eps):
    """_kernel's rows, but program (i, p) stores only columns [p * block_k, +block_k) of s and y, and that
    slice's share of the router logits y @ router into lg_ref[p] [M, E] (f32). padded: () or (yp_ref [Mp, D]),
    y's columns again with rows m .. Mp - 1 zero (written by the programs of the first rows)."""
    pid, p = pl.program_id(0), pl.program_id(1)
    m0 = pl.multiple_of(pid * block_m, block_m)
    k0 = pl.multiple_of(p * block_k, block_k)
    r_in = _in_bounds(m0, block_m, m)
    c_in, k_in, e_in = _in_bounds(0, block_d, d), _in_bounds(k0, block_k, d), _in_bounds(0, block_e, e)
    rows = pl.ds(m0, block_m)
    full = _mask2(r_in, c_in)
    sf = (_load(x_ref.at[rows, pl.ds(0, block_d)], full) + _load(h_ref.at[rows, pl.ds(0, block_d)], full))
    sf = sf.astype(s_ref.dtype).astype(jnp.float32)                                  # [bm, bd] whole rows
    r = jax.lax.rsqrt(jnp.sum(sf * sf, axis=1) / d + eps)                            # [bm]
    mask = _mask2(r_in, k_in)
    cols = pl.ds(k0, block_k)
    s = (_load(x_ref.at[rows, cols], mask) + _load(h_ref.at[rows, cols], mask)).astype(s_ref.dtype)  # [bm, bk]
    w = _load(w_ref.at[cols], k_in)                                                  # [bk]
    y = ((s.astype(jnp.float32) * r[:, None]).astype(s_ref.dtype) * w[None, :]).astype(y_ref.dtype)
    _store(s_ref.at[rows, cols], s, mask)
    _store(y_ref.at[rows, cols], y, mask)
    if padded:
        yp_ref, = padded
        _store(yp_ref.at[rows, cols], y, mask)
        mp = yp_ref.shape[0]
        if mp > m:  # the zero rows, from rows 0 up (in bounds); the programs of the first rows write them
            r2 = _next_pow2(mp)
            tail = (jnp.arange(r2) >= m) & (jnp.arange(r2) < mp)
            pl.when(pid == 0)(lambda: _store(yp_ref.at[pl.ds(0, r2), cols], jnp.zeros((r2, block_k), yp_ref.dtype),
                                             _mask2(tail, k_in)))
    router = _load(r_ref.at[cols, pl.ds(0, block_e)], _mask2(k_in, e_in)).astype(jnp.float32)       # [bk, be]
    # [bm, bk, 1] * [1, bk, be] summed over bk: a few rows (decode), below the 16 an MMA needs
    lg = jnp.sum(y.astype(jnp.float32)[:, :, None] * router[None, :, :], axis=1)    # [bm, be]
    _store(lg_ref.at[p, rows, pl.ds(0, block_e)], lg, _mask2(r_in, e_in))


@functools.partial(jax.jit, static_argnames=("eps", "block_m", "router_block", "widen_rows", "pad_rows", "num_warps",
                                             "interpret", "poison_output"))
def add_rms_norm(x, h, scale, *, eps, router=None, block_m=None, router_block=128, widen_rows=None, pad_rows=None,
                 num_warps=None, interpret=False, poison_output=False):
    """(x + h, rms_norm(x + h, scale, eps)) in one kernel. x, h [..., D]; scale [D].
    router: None, or a router's weights [D, E]: then (s, y, partials), partials [P, M, E] float32 whose sum
    over P is y @ router for the M = prod(lead) rows (P = ceil(D / router_block); `sum_router_partials`).
    widen_rows (no router): Mp >= M rows; then (s, y, yc, rs), y widened for a float16 dot as
    upcast.to_compute does (y = yc[:M] * rs[:M, None] exactly; yc [Mp, D] float16, rs [Mp] float32, rows past
    M zero): the x of the Mosaic GPU GEMM (mgpu_gemv.fp8_gemv_multi(widened=...)).
    pad_rows (with router): Mp >= M rows; then (s, y, partials, yp), yp [Mp, D] y's rows then zeros, in y's
    dtype: the x of the Mosaic GPU MoE path (moe_mgpu.moe_fp8_mgpu(x_padded=...)).
    block_m: rows per program (a power of two; default 4, with a router 1). poison_output: outputs start
    as NaN (aliased in), so an element the kernel does not write shows up (tests)."""
    if x.shape != h.shape or x.dtype != h.dtype:
        raise ValueError(f"x {x.shape} {x.dtype} and h {h.shape} {h.dtype} must have the same shape and dtype")
    D = x.shape[-1]
    if scale.shape != (D,):
        raise ValueError(f"scale must be [{D}], got {scale.shape}")
    if router is not None and (router.ndim != 2 or router.shape[0] != D):
        raise ValueError(f"router must be [D={D}, E], got {router.shape}")
    if widen_rows is not None and (router is not None or widen_rows < max(1, x.size // max(D, 1))):
        raise ValueError(f"widen_rows={widen_rows} needs no router and at least the {x.size // max(D, 1)} rows")
    if pad_rows is not None and (router is None or pad_rows < max(1, x.size // max(D, 1))):
        raise ValueError(f"pad_rows={pad_rows} needs a router and at least the {x.size // max(D, 1)} rows")
    block_m = block_m or (4 if router is None else 1)
    for name, v in (("block_m", block_m), ("router_block", router_block)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")
    lead = x.shape[:-1]
    x2, h2 = x.reshape(-1, D), h.reshape(-1, D)
    M = x2.shape[0]
    y_dtype = jnp.promote_types(x.dtype, scale.dtype)
    block_d = _next_pow2(D)
    out_shape = [jax.ShapeDtypeStruct((M, D), x.dtype), jax.ShapeDtypeStruct((M, D), y_dtype)]
    args = [x2, h2, scale]
    grid = (pl.cdiv(M if widen_rows is None else widen_rows, block_m),)
    if router is None:
        kernel = functools.partial(_kernel, m=M, d=D, block_m=block_m, block_d=block_d, eps=float(eps))
        if widen_rows is not None:
            out_shape += [jax.ShapeDtypeStruct((widen_rows, D), jnp.float16),
                          jax.ShapeDtypeStruct((widen_rows,), jnp.float32)]
    else:
        E = router.shape[1]
        grid += (pl.cdiv(D, router_block),)
        kernel = functools.partial(_router_kernel, m=M, d=D, e=E, block_m=block_m, block_d=block_d,
                                   block_k=min(router_block, block_d), block_e=_next_pow2(E), eps=float(eps))
        out_shape.append(jax.ShapeDtypeStruct((grid[1], M, E), jnp.float32))
        if pad_rows is not None:
            out_shape.append(jax.ShapeDtypeStruct((pad_rows, D), y_dtype))
        args.append(router)
    if M == 0 and widen_rows is None:  # nothing to launch
        return (x, x.astype(y_dtype), *[jnp.zeros(o.shape, o.dtype) for o in out_shape[2:]])
    n_in = len(args)
    aliases = {}
    if poison_output:
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        aliases = {n_in + i: i for i in range(len(out_shape))}
        inner = kernel

        def kernel(*refs):  # the aliased inputs are the outputs' own refs
            return inner(*refs[:n_in], *refs[n_in + len(out_shape):])
    if num_warps is None:  # whole rows of D lanes per program: more warps for wide rows
        num_warps = 4 if block_m * block_d <= 4096 else 8 if block_m * block_d <= 16384 else 16
    with interpreted(interpret):
        out = pl.pallas_call(kernel, out_shape=tuple(out_shape), grid=grid, input_output_aliases=aliases,
                             interpret=interpret, compiler_params=_compiler_params(num_warps, 1),
                             name=f"add_rms_norm_m{block_m}_d{block_d}" + ("" if router is None else "_router")
                             + ("" if widen_rows is None else "_widen"))(*args)
    s, y = out[0].reshape(*lead, D), out[1].reshape(*lead, D)
    return (s, y) if router is None and widen_rows is None else (s, y, *out[2:])
