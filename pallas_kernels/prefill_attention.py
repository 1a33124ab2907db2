"""Blockwise ("flash") attention for prefill, in Pallas (Triton lowering).

Computes what `mavjax.model.attend(q, k, v, attention_mask(q_pos, k_pos, chunk_size), scale)` computes, for many
query positions (a prompt) against many keys, without the [.., T, S] score matrix that XLA materializes: at 4096
tokens of Maverick's full width that matrix is 2.7 GB of float32 a layer and its transposes and reductions took
~15 ms of a 44 ms prefill (docs/benchmarks.md section 29); at 32K tokens it is 170 GB, more than a GPU holds.

Shapes: B batch, T query positions, H query heads, K kv heads, G = H // K, Dh head dim, S key slots.

  q        [B, T, H, Dh]   bf16 / float16 / float32
  k, v     [B, S, K, Dh]   q's dtype (the model hands over a FP8 cache's keys already decoded, as XLA reads them)
  q_pos    [B, T] int32    absolute position of each query (negative: padding query, sees nothing -> 0)
  k_pos    [B, S] int32    position held by each key slot (-1: empty)

A key is visible to a query iff k_pos >= 0, k_pos <= q_pos and, on chunked layers, k_pos // C == q_pos // C
(the chunked-attention window of Llama 4's RoPE layers). Rows with no visible key give 0, as the reference does.

Design
------
Grid (T / block_q, B, H): one program owns block_q query rows of one head and runs an online softmax
(FlashAttention-2) over the key tiles of its kv head (GQA: query head h reads kv head h // G; the programs of
one head's query blocks run next to each other, so each K/V tile comes from L2 after the first).
  * Tile skipping, exact for any slot layout: `tile_ranges` gives each (batch row, query block) the range of
    key tiles [lo, hi) outside which no tile holds a visible key, from each tile's smallest and largest
    position (the range is an envelope: visibility inside it is still decided per element from the
    positions). Causal prefill visits the lower triangle only, a chunked layer only its query block's chunk.
  * Inside it, the run of tiles [flo, fhi) whose every key every query of the block sees runs without a mask
    (no position loads, compares or selects): a causal prefill masks only the tiles crossing the diagonal
    (and a chunk's start).
  * Query blocks are visited in reverse (the longest rows of a causal prefill first), so the short ones fill
    the last wave.
  * Probabilities are cast to v's dtype before the P.V product, as `attend` does.
  * T or S not a multiple of its block: padded in the wrapper with q_pos = -1 / k_pos = -1 (the engines' prompt
    buckets are powers of two, so the model's prefill never pads).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton compiler params (GPU); absent from CPU-only installs of some versions.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

# Triton's dot needs every block dimension >= 16.
_MIN_BLOCK = 16
# The running max starts finite: a tile where a row sees nothing (scores -inf) must not give (-inf) - (-inf).
_NEG = -1e30
_LOG2E = math.log2(math.e)


def prefill_attention_reference(q, k, v, q_pos, k_pos, *, chunk_size, scale):
    """The project's XLA path: `mavjax.model.attend` with `attention_mask` (the [.., T, S] scores materialized)."""
    from mavjax.model import attend, attention_mask
    return attend(q, k, v, attention_mask(q_pos, k_pos, chunk_size), scale)


def tile_ranges(q_pos, k_pos, chunk_size, block_q, block_k):
    """[B, T / block_q, 4] int32: for each batch row and query block, (lo, flo, fhi, hi) over key tiles:
      * [lo, hi): outside it no tile holds a key visible to any of the block's queries (lo = hi = 0 when none
        does); for slot i holding position i (a prefill), the causal (and chunk) envelope of the block;
      * [flo, fhi) within it: tiles whose every key is visible to every query of the block (the first run of
        them; empty: flo = fhi = lo), which the kernel computes without a mask - below a causal prefill's
        diagonal, all but the tiles crossing it or a chunk's start.
    Holds for any slot layout (visibility elsewhere in [lo, hi) is decided per element from the positions).
    T and S must be multiples of block_q and block_k."""
    B, T = q_pos.shape
    S = k_pos.shape[1]
    big = jnp.iinfo(jnp.int32).max
    qp = q_pos.reshape(B, T // block_q, block_q)
    kp = k_pos.reshape(B, S // block_k, block_k)
    q_ok, k_ok = qp >= 0, kp >= 0
    q_max = jnp.max(jnp.where(q_ok, qp, -1), axis=-1)[:, :, None]  # [B, nq, 1]; -1: no real query
    q_min = jnp.min(jnp.where(q_ok, qp, big), axis=-1)[:, :, None]
    k_min = jnp.min(jnp.where(k_ok, kp, big), axis=-1)[:, None, :]  # [B, 1, nk]; big: no key
    k_max = jnp.max(jnp.where(k_ok, kp, -1), axis=-1)[:, None, :]
    hit = k_min <= q_max  # some key at or before some query  [B, nq, nk]
    full = (k_max <= q_min) & jnp.all(k_ok, axis=-1)[:, None, :] & jnp.all(q_ok, axis=-1)[:, :, None]
    if chunk_size is not None:  # a chunk starts at a multiple of chunk_size
        hit &= k_max >= (q_min // chunk_size) * chunk_size  # some key at or after the first query's chunk
        full &= k_min >= (q_max // chunk_size) * chunk_size  # every key in the last query's chunk
    nk = S // block_k
    tiles = jnp.arange(nk)
    any_hit = jnp.any(hit, axis=-1)
    lo = jnp.where(any_hit, jnp.argmax(hit, axis=-1), 0)
    hi = jnp.where(any_hit, nk - jnp.argmax(hit[..., ::-1], axis=-1), 0)
    any_full = jnp.any(full, axis=-1)
    flo = jnp.where(any_full, jnp.argmax(full, axis=-1), lo)
    past = (tiles >= flo[..., None]) & ~full  # the first tile after the run that is not full
    fhi = jnp.where(any_full, jnp.where(jnp.any(past, axis=-1), jnp.argmax(past, axis=-1), nk), lo)
    return jnp.stack([lo, flo, fhi, hi], axis=-1).astype(jnp.int32)


def _kernel(range_ref, q_pos_ref, q_ref, k_pos_ref, k_ref, v_ref, out_ref, *, block_k, chunk_size, scale):
    bq, Dh = q_ref.shape
    lo, flo, fhi, hi = range_ref[0], range_ref[1], range_ref[2], range_ref[3]
    qp = q_pos_ref[...][:, None]  # [bq, 1]
    if chunk_size is None:
        q_lo = jnp.zeros_like(qp)
    else:  # same chunk and causal  <=>  chunk_start(q) <= k <= q  (for k >= 0, q >= 0)
        q_lo = lax.div(jnp.maximum(qp, 0), jnp.int32(chunk_size)) * chunk_size
    q = q_ref[...]  # [bq, Dh]
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s_scale = scale * _LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))

    def tiles(masked):
        def body(t, carry):
            o, m, l = carry
            start = pl.multiple_of(t * block_k, block_k)
            kt = k_ref[pl.ds(start, block_k), :]  # [bk, Dh]
            s = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                precision=prec) * s_scale  # [bq, bk]
            if masked:  # -inf: exp2 gives 0, and m stays finite (it starts at _NEG), so a row seeing nothing is 0
                kp = k_pos_ref[pl.ds(start, block_k)][None, :]  # [1, bk]; q_lo >= 0 also rejects k_pos = -1
                s = jnp.where((kp >= q_lo) & (kp <= qp), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            l = alpha * l + jnp.sum(p, axis=1)
            vt = v_ref[pl.ds(start, block_k), :]
            pv = lax.dot_general(p.astype(vt.dtype), vt, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32, precision=prec)  # [bq, Dh]
            return alpha[:, None] * o + pv, m_new, l
        return body

    carry = (jnp.zeros((bq, Dh), jnp.float32), jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(lo, flo, tiles(True), carry)  # (a chunk's first tiles)
    carry = lax.fori_loop(flo, fhi, tiles(False), carry)  # every key visible: no mask
    o, _, l = lax.fori_loop(fhi, hi, tiles(True), carry)  # the diagonal
    out_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(out_ref.dtype)  # no visible key -> 0


def _pad_to(x, axis, multiple, value):
    n = x.shape[axis]
    extra = -n % multiple
    if not extra:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads, constant_values=value)


def _block(block, n):
    """The block size actually used: at most the next power of two >= n, at least Triton's minimum."""
    return max(_MIN_BLOCK, min(block, pl.next_power_of_2(n)))


@functools.partial(jax.jit, static_argnames=("chunk_size", "scale", "block_q", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def prefill_attention(q, k, v, q_pos, k_pos, *, chunk_size, scale, block_q=64, block_k=64, num_warps=4,
                      num_stages=3, interpret=False):
    """Flash attention of q [B, T, H, Dh] over k, v [B, S, K, Dh] -> [B, T, H, Dh] in q.dtype, masked by positions
    as `prefill_attention_reference` is. chunk_size: static, None for global layers; scale: softmax scale.
    block_q / block_k: query rows / key slots per tile (powers of two >= 16; lowered to the next power of two of
    short T / S); num_warps / num_stages: Triton's. The defaults were the fastest of five tilings at every Maverick
    shape from 2048 tokens on one H200 (docs/benchmarks.md section 30)."""
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    if H % K or k.shape != (B, S, K, Dh) or v.shape != k.shape:
        raise ValueError(f"prefill_attention: q {q.shape} needs k, v [B, S, K, Dh] with H % K == 0, "
                         f"got k {k.shape}, v {v.shape}")
    if q_pos.shape != (B, T) or k_pos.shape != (B, S):
        raise ValueError(f"prefill_attention: q_pos {q_pos.shape} / k_pos {k_pos.shape} must be {(B, T)} / {(B, S)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"prefill_attention: k, v must have q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")
    G = H // K
    bq, bk = _block(block_q, T), _block(block_k, S)
    qp = _pad_to(q_pos.astype(jnp.int32), 1, bq, -1)
    kp = _pad_to(k_pos.astype(jnp.int32), 1, bk, -1)
    qx = _pad_to(q, 1, bq, 0)
    kx, vx = _pad_to(k, 1, bk, 0), _pad_to(v, 1, bk, 0)
    Tp, Sp = qx.shape[1], kx.shape[1]
    nq = Tp // bq
    ranges = tile_ranges(qp, kp, chunk_size, bq, bk)  # [B, nq, 4]

    rev = lambda i: nq - 1 - i  # noqa: E731  (longest causal rows first)
    kernel = functools.partial(_kernel, block_k=bk, chunk_size=chunk_size, scale=float(scale))
    params = dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)) \
        if plgpu is not None else {}
    out = pl.pallas_call(
        kernel,
        grid=(nq, B, H),
        in_specs=[
            pl.BlockSpec((None, None, 4), lambda i, b, h: (b, rev(i), 0)),
            pl.BlockSpec((None, bq), lambda i, b, h: (b, rev(i))),
            pl.BlockSpec((None, bq, None, Dh), lambda i, b, h: (b, rev(i), h, 0)),
            pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, Sp, None, Dh), lambda i, b, h: (b, 0, h // G, 0)),
            pl.BlockSpec((None, Sp, None, Dh), lambda i, b, h: (b, 0, h // G, 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, Dh), lambda i, b, h: (b, rev(i), h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, Dh), q.dtype),
        interpret=interpret, name="prefill_flash_attention", **params,
    )(ranges, qp, qx, kp, kx, vx)
    return out[:, :T]
