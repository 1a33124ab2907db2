"""Top-1 MoE routing in one Pallas launch (Triton lowering), beside its plain jax.numpy reference.

    logits = x @ w                      (bf16 inputs, float32 accumulation, rounded to x's dtype: XLA's dot)
    idx    = argmax(logits)             (ties: the lowest expert id, as lax.top_k and jnp.argmax)
    score  = sigmoid(logits[idx])       (float32, cast to x's dtype)

exactly mavjax.model.route for top_k = 1 (Llama 4 Maverick). XLA runs this as four kernels at decode (the
[N, D] x [D, E] product as a two-stage reduction, the argmax, the sigmoid): ~6 us per MoE layer on an H200
for 1.3 MB of router weights. Here the K dimension is split over programs (the router is 5120 deep and only
E = 128 wide), each stores its float32 partial, and the last program to finish (pallas_kernels.split_k) sums
them and picks the expert.

Shapes: x [N, D], w [D, E] -> idx [N, 1] int32, score [N, 1] x.dtype. For decode-sized N (<= 64 rows, one
block); E and D need not be powers of two (masked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.fp8_gemm import _compiler_params, _in_bounds, _load, _mask2, _next_pow2, _store
from pallas_kernels.split_k import arrive, counters, sum_partials

__all__ = ["route_top1_ref", "route_top1", "MAX_ROWS"]

MAX_ROWS = 64  # one block of rows (decode, speculative verification); more rows route through XLA


def route_top1_ref(x, w):
    """What mavjax.model.route computes for top_k = 1."""
    logits = jnp.einsum("nd,de->ne", x, w)  # [N, E] in x's dtype
    idx = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)  # [N, 1]
    vals = jnp.take_along_axis(logits, idx, axis=-1)  # [N, 1]
    return idx, jax.nn.sigmoid(vals.astype(jnp.float32)).astype(x.dtype)


def _kernel(x_ref, w_ref, cnt_ref, part_ref, idx_ref, score_ref, *, n, d, e, block_m, block_e, block_k,
            kb_per_split, num_splits, interpret):
    pid = pl.program_id(0)
    m_in = _in_bounds(0, block_m, n)
    e_in = _in_bounds(0, block_e, e)
    kb_lo = pid * kb_per_split
    kb_hi = jnp.minimum(kb_lo + kb_per_split, pl.cdiv(d, block_k))

    def body(kb, acc):
        k0 = pl.multiple_of(kb * block_k, block_k)
        k_in = _in_bounds(k0, block_k, d)
        xt = _load(x_ref.at[pl.ds(0, block_m), pl.ds(k0, block_k)], _mask2(m_in, k_in))   # [bm, bk]
        wt = _load(w_ref.at[pl.ds(k0, block_k), pl.ds(0, block_e)], _mask2(k_in, e_in))   # [bk, be]
        prec = lax.Precision.HIGHEST if xt.dtype == jnp.float32 else None  # f32 models: no TF32
        return acc + lax.dot_general(xt, wt, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                                     precision=prec)                                    # [bm, be]

    acc = lax.fori_loop(kb_lo, kb_hi, body, jnp.zeros((block_m, block_e), jnp.float32))
    tile = (pl.ds(0, block_m), pl.ds(0, block_e))
    mask = _mask2(m_in, e_in)
    _store(part_ref.at[(pid, *tile)], acc, mask)

    @pl.when(arrive(cnt_ref, 0, num_splits, interpret=interpret))
    def _pick():
        logits = sum_partials(part_ref, num_splits, tile, (block_m, block_e), mask)
        logits = logits.astype(x_ref.dtype).astype(jnp.float32)  # the dot's output dtype, as XLA rounds it
        col = lax.broadcasted_iota(jnp.int32, (block_m, block_e), 1)
        if e != block_e:
            logits = jnp.where(col < e, logits, -jnp.inf)
        best = jnp.max(logits, axis=1)                                                   # [bm]
        idx = jnp.min(jnp.where(logits == best[:, None], col, block_e), axis=1)          # lowest id of the max
        score = (1.0 / (1.0 + jnp.exp(-best))).astype(score_ref.dtype)
        _store(idx_ref.at[pl.ds(0, block_m), pl.ds(0, 1)], idx[:, None], _mask2(m_in, None))
        _store(score_ref.at[pl.ds(0, block_m), pl.ds(0, 1)], score[:, None], _mask2(m_in, None))


@functools.partial(jax.jit, static_argnames=("block_k", "split_k", "num_warps", "interpret"))
def route_top1(x, w, *, block_k=64, split_k=None, num_warps=4, interpret=False):
    """(idx [N, 1] int32, score [N, 1] x.dtype) of top-1 sigmoid routing (route_top1_ref) in one launch.
    x [N, D] with N <= MAX_ROWS, w [D, E] (x's dtype). split_k: programs over D (default ~2 K steps each)."""
    N, D = x.shape
    if w.ndim != 2 or w.shape[0] != D:
        raise ValueError(f"router weight must be [D={D}, E], got {w.shape}")
    if N > MAX_ROWS:
        raise ValueError(f"route_top1 takes at most {MAX_ROWS} rows, got {N}")
    E = w.shape[1]
    block_m, block_e = max(16, _next_pow2(N)), max(16, _next_pow2(E))
    nk = pl.cdiv(D, block_k)
    split = max(1, min(split_k or pl.cdiv(nk, 2), nk))
    kb_per_split = pl.cdiv(nk, split)
    split = pl.cdiv(nk, kb_per_split)  # no empty splits
    kernel = functools.partial(_kernel, n=N, d=D, e=E, block_m=block_m, block_e=block_e, block_k=block_k,
                               kb_per_split=kb_per_split, num_splits=split, interpret=interpret)
    out_shape = (jax.ShapeDtypeStruct((split, N, E), jnp.float32), jax.ShapeDtypeStruct((N, 1), jnp.int32),
                 jax.ShapeDtypeStruct((N, 1), x.dtype))
    _, idx, score = pl.pallas_call(kernel, out_shape=out_shape, grid=(split,), interpret=interpret,
                                   compiler_params=_compiler_params(num_warps, 2),
                                   name=f"moe_router_top1_s{split}")(x, w.astype(x.dtype), counters(1))
    return idx, score
