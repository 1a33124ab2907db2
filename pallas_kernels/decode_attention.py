"""Split-KV ("flash-decoding") attention for decode and speculative verification, in Pallas (Triton lowering).

Computes what `mavjax.model.attend(q, k, v, attention_mask(q_pos, k_pos, chunk_size), scale)` computes, for a
few query positions per sequence (T = 1 for decode, T = K+1 for speculative verification) against a KV cache.

Shapes: B batch, T query positions, H query heads, K kv heads, G = H // K, Dh head dim, S cache slots.

  q        [B, T, H, Dh]   bf16 / float32
  k, v     [B, S, K, Dh]   bf16 / float32 / float8_e4m3fn (FP8: dequantized in registers, see scales below)
  q_pos    [B, T] int32    absolute position of each query (negative: padding query, sees nothing -> 0)
  k_pos    [B, S] int32    position held by each cache slot (-1: empty)

A key is visible to a query iff k_pos >= 0, k_pos <= q_pos and, on chunked layers, k_pos // C == q_pos // C.
Masking always uses k_pos. Rows with no visible key give 0, as the reference does.

FP8 KV scales: `k_scale` / `v_scale` are float32, either a scalar (per tensor) or shape [K] (per kv head);
dequantized value = stored value * scale. They are folded in exactly: k_scale into the score scale
(s = (q . k8) * scale * k_scale[kv]), v_scale into the partial output (o = (p . v8) * v_scale[kv]); the FP8
tiles are only converted to the query dtype in registers before the dot products.

Design
------
Grid (B, K, num_splits). One program owns one (batch row, kv head) pair and one share of the cache:
  * GQA packing: the G query heads of the kv head and the T query positions are the R rows of one block
    (row = t * G + g, R padded to a power of two >= 16 with rows whose q_pos = -1), so each K/V tile is read
    from memory once per kv head, not once per query head.
  * Tile skipping: each batch row has a slot range [lo, hi) that holds every visible key (default: derived
    from q_pos assuming slot i holds position i, as `mavjax.kv_cache` does: hi = max q_pos + 1, lo = start of
    the chunk of the smallest q_pos on chunked layers, else 0; or passed as `kv_range`). Only the block_s
    tiles overlapping [lo, hi) are visited, and they are divided evenly among the num_splits programs of the
    row, so at long contexts on chunked layers (most of the cache invisible) all splits still share the
    visible chunk. Inside a visited tile, visibility is decided by k_pos alone.
  * Each program runs an online softmax over its tiles (m = -inf safe: an all-masked tile or an empty range
    leaves the neutral partial o = 0, m = -inf, l = 0) and writes float32 partials o [R, Dh], m [R], l [R].
  * A small jnp epilogue merges the partials with log-sum-exp (splits with m = -inf weigh 0; l = 0 -> 0).
  * S not a multiple of block_s: the last tile's load is shifted back to end at S and slots it shares with
    the previous tile are masked by slot index, so the cache is never padded or copied (only S < 16 pads).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton compiler params (GPU); absent from CPU-only installs of some versions.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

FP8_DTYPES = (jnp.float8_e4m3fn,)
_MIN_DIM = 16  # Triton dot operands need every dim >= 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _is_fp8(dtype) -> bool:
    return any(jnp.dtype(dtype) == jnp.dtype(d) for d in FP8_DTYPES)


# --------------------------------------------------------------------------------------------------------------
# Reference


def dequantize_kv(x, scale):
    """[B, S, K, Dh] stored KV (any dtype) and a scalar or [K] float32 scale -> float32 values."""
    x = x.astype(jnp.float32)
    if scale is None:
        return x
    scale = jnp.asarray(scale, jnp.float32)
    return x * (scale[:, None] if scale.ndim == 1 else scale)


def decode_attention_reference(q, k, v, q_pos, k_pos, *, chunk_size, scale, k_scale=None, v_scale=None,
                               compute_dtype=None):
    """The project's XLA path (`mavjax.model.attend` with `attention_mask`) on dequantized KV cast to
    compute_dtype (default: q.dtype, what the model does with its cache)."""
    from mavjax.model import attend, attention_mask
    cd = q.dtype if compute_dtype is None else compute_dtype
    if _is_fp8(k.dtype) or k_scale is not None:
        k = dequantize_kv(k, k_scale)
    if _is_fp8(v.dtype) or v_scale is not None:
        v = dequantize_kv(v, v_scale)
    mask = attention_mask(q_pos, k_pos, chunk_size)
    return attend(q.astype(cd), k.astype(cd), v.astype(cd), mask, scale).astype(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Slot ranges


def kv_range_from_q_pos(q_pos, chunk_size, num_slots):
    """[B, 2] int32 slot range [lo, hi) holding every visible key, assuming slot i holds position i."""
    valid = q_pos >= 0
    qmax = jnp.max(jnp.where(valid, q_pos, -1), axis=1)
    hi = jnp.clip(qmax + 1, 0, num_slots)
    if chunk_size is None:
        lo = jnp.zeros_like(hi)
    else:
        qmin = jnp.min(jnp.where(valid, q_pos, jnp.iinfo(jnp.int32).max), axis=1)
        lo = jnp.clip((qmin // chunk_size) * chunk_size, 0, num_slots)
    return jnp.stack([lo, hi], axis=1).astype(jnp.int32)


def kv_range_from_k_pos(q_pos, k_pos, chunk_size):
    """[B, 2] int32 tightest slot range [lo, hi) holding every visible key, for any slot layout (reads k_pos)."""
    from mavjax.model import attention_mask
    S = k_pos.shape[1]
    vis = jnp.any(attention_mask(q_pos, k_pos, chunk_size), axis=1)  # [B, S]
    idx = jnp.arange(S, dtype=jnp.int32)
    lo = jnp.min(jnp.where(vis, idx, S), axis=1)
    hi = jnp.max(jnp.where(vis, idx + 1, 0), axis=1)
    return jnp.stack([lo, hi], axis=1).astype(jnp.int32)


def default_num_splits(batch, kv_heads, num_slots, chunk_size, block_s, num_sms=None):
    """Enough programs to fill the GPU (~4 per SM) without giving a split fewer than ~4 tiles of the span a
    query can see (the chunk on chunked layers, the whole cache on global ones)."""
    if num_sms is None:
        try:
            num_sms = int(getattr(jax.devices()[0], "core_count", 0)) or 132
        except Exception:  # pragma: no cover
            num_sms = 132
    span = num_slots if chunk_size is None else min(num_slots, chunk_size + block_s)
    tiles = pl.cdiv(span, block_s)
    want = pl.cdiv(4 * num_sms, batch * kv_heads)
    return int(max(1, min(want, pl.cdiv(tiles, 4), 256)))


# --------------------------------------------------------------------------------------------------------------
# Kernel


def _kernel(range_ref, scales_ref, qpos_ref, q_ref, kpos_ref, k_ref, v_ref, *rest, block_s, num_splits,
            num_slots, chunk_size, scale, compute_dtype, ragged):
    o_ref, m_ref, l_ref = rest[-3:]  # (poison inputs aliased to the outputs, if any, come first and are unused)
    split = pl.program_id(2)
    R = q_ref.shape[0]

    lo, hi = range_ref[0], range_ref[1]
    div = lax.div  # truncating division: every operand here is >= 0 (cheaper than floor division)
    lo_t = div(lo, block_s)
    hi_t = div(hi + (block_s - 1), block_s)
    n_t = jnp.maximum(hi_t - lo_t, 0)
    per = div(n_t + (num_splits - 1), num_splits)
    t0 = lo_t + split * per
    t1 = jnp.minimum(t0 + per, hi_t)

    cd = compute_dtype
    prec = lax.Precision.HIGHEST if jnp.dtype(cd) == jnp.float32 else None
    q = q_ref[...].astype(cd)  # [R, Dh]
    qp = qpos_ref[...]  # [R]
    if chunk_size is None:
        q_lo = jnp.zeros_like(qp)
    else:  # same chunk and causal  <=>  chunk_start(q) <= k <= q  (for k >= 0, q >= 0)
        q_lo = div(jnp.maximum(qp, 0), jnp.int32(chunk_size)) * chunk_size
    q_lo = jnp.maximum(q_lo, 0)[:, None]  # [R, 1]; also enforces k_pos >= 0
    q_hi = qp[:, None]
    s_scale = scale * scales_ref[0]

    def body(t, carry):
        o, m, l = carry
        start = t * block_s
        if ragged:
            ld = jnp.minimum(start, num_slots - block_s)
        else:
            ld = pl.multiple_of(start, block_s)
        kp = kpos_ref[pl.ds(ld, block_s)][None, :]  # [1, bs]
        kt = k_ref[pl.ds(ld, block_s), :].astype(cd)  # [bs, Dh]
        s = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=prec) * s_scale  # [R, bs]
        vis = (kp >= q_lo) & (kp <= q_hi)
        if ragged:  # slots below `start` belong to the previous tile
            vis &= (ld + jnp.arange(block_s, dtype=jnp.int32))[None, :] >= start
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no (-inf) - (-inf)
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        vt = v_ref[pl.ds(ld, block_s), :].astype(cd)
        pv = lax.dot_general(p.astype(cd), vt, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                             precision=prec)
        return alpha[:, None] * o + pv, m_new, l

    Dh = q_ref.shape[1]
    init = (jnp.zeros((R, Dh), jnp.float32), jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32))
    o, m, l = lax.fori_loop(t0, t1, body, init)
    o_ref[...] = o * scales_ref[1]
    m_ref[...] = m
    l_ref[...] = l


def _scales(s, K):
    if s is None:
        return jnp.ones((K,), jnp.float32)
    return jnp.broadcast_to(jnp.asarray(s, jnp.float32), (K,))


@functools.partial(jax.jit, static_argnames=("chunk_size", "scale", "block_s", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def decode_attention_partials(q, k, v, q_pos, k_pos, kv_range=None, k_scale=None, v_scale=None, poison=None, *,
                              chunk_size, scale, block_s, num_splits, num_warps=None, num_stages=2,
                              interpret=False):
    """The split kernel alone. Returns float32 partials o [B, K, NS, R, Dh], m, l [B, K, NS, R] (rows
    r = t * G + g for r < G * T; rows up to R = max(16, next power of two) are padding). `poison`: optional (o, m, l) buffers of those shapes,
    aliased to the outputs, so a test can check that the kernel writes every element."""
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    assert H % K == 0 and v.shape == k.shape and q_pos.shape == (B, T) and k_pos.shape == (B, S)
    G = H // K
    rows = G * T
    R = max(_MIN_DIM, _next_pow2(rows))

    if kv_range is None:
        kv_range = kv_range_from_q_pos(q_pos, chunk_size, S)
    kv_range = jnp.clip(kv_range.astype(jnp.int32), 0, S)

    if S < _MIN_DIM:  # tiny caches only (tests): pad to one minimal tile; never taken at real sizes
        pad = _MIN_DIM - S
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=-1)
        S = _MIN_DIM
    bs = min(block_s, _prev_pow2(S))
    ragged = S % bs != 0

    # Rows: [B, K, R, Dh], row t * G + g holds query head k * G + g at position t.
    qr = q.reshape(B, T, K, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, K, rows, Dh)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, R - rows), (0, 0)))
    qpr = jnp.pad(jnp.repeat(q_pos.astype(jnp.int32), G, axis=1), ((0, 0), (0, R - rows)), constant_values=-1)
    scales = jnp.stack([_scales(k_scale, K), _scales(v_scale, K)], axis=1)  # [K, 2]
    k_pos = k_pos.astype(jnp.int32)

    if _is_fp8(k.dtype) or _is_fp8(v.dtype):
        cd = q.dtype
    else:
        cd = jnp.promote_types(q.dtype, jnp.promote_types(k.dtype, v.dtype))

    NS = num_splits
    kernel = functools.partial(_kernel, block_s=bs, num_splits=NS, num_slots=S, chunk_size=chunk_size,
                               scale=float(scale), compute_dtype=cd, ragged=ragged)
    o_spec = pl.BlockSpec((None, None, None, R, Dh), lambda b, h, s: (b, h, s, 0, 0))
    ml_spec = pl.BlockSpec((None, None, None, R), lambda b, h, s: (b, h, s, 0))
    out_specs = [o_spec, ml_spec, ml_spec]
    out_shape = [jax.ShapeDtypeStruct((B, K, NS, R, Dh), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, NS, R), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, NS, R), jnp.float32)]
    in_specs = [
        pl.BlockSpec((None, 2), lambda b, h, s: (b, 0)),  # kv_range
        pl.BlockSpec((None, 2), lambda b, h, s: (h, 0)),  # scales
        pl.BlockSpec((None, R), lambda b, h, s: (b, 0)),  # row q_pos
        pl.BlockSpec((None, None, R, Dh), lambda b, h, s: (b, h, 0, 0)),  # q rows
        pl.BlockSpec((None, S), lambda b, h, s: (b, 0)),  # k_pos
        pl.BlockSpec((None, S, None, Dh), lambda b, h, s: (b, 0, h, 0)),  # k
        pl.BlockSpec((None, S, None, Dh), lambda b, h, s: (b, 0, h, 0)),  # v
    ]
    args = [kv_range, scales, qpr, qr, k_pos, k, v]
    aliases = {}
    if poison is not None:
        aliases = {len(args) + i: i for i in range(3)}
        in_specs += out_specs
        args += list(poison)
    if num_warps is None:
        num_warps = 4 if R <= 32 else 8
    params = dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)) \
        if plgpu is not None else {}
    o, m, l = pl.pallas_call(kernel, out_shape=out_shape, grid=(B, K, NS), in_specs=in_specs,
                             out_specs=out_specs, input_output_aliases=aliases, interpret=interpret,
                             name="split_kv_decode_attention", **params)(*args)
    return o, m, l


def combine_partials(o, m, l):
    """Log-sum-exp merge over the split axis 2: o [B, K, NS, R, Dh], m, l [B, K, NS, R] -> [B, K, R, Dh]
    float32. Splits with m = -inf weigh 0; rows with l = 0 everywhere (no visible key) give 0."""
    M = jnp.max(m, axis=2, keepdims=True)
    M = jnp.where(M == -jnp.inf, 0.0, M)
    w = jnp.exp(m - M)  # [B, K, NS, R]
    L = jnp.sum(w * l, axis=2)
    O = jnp.sum(w[..., None] * o, axis=2)
    return jnp.where(L[..., None] > 0, O / jnp.where(L > 0, L, 1.0)[..., None], 0.0)


@functools.partial(jax.jit, static_argnames=("chunk_size", "scale", "block_s", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def decode_attention(q, k, v, q_pos, k_pos, *, chunk_size, scale, block_s=128, num_splits=None, k_scale=None,
                     v_scale=None, kv_range=None, num_warps=None, num_stages=2, interpret=False):
    """Split-KV attention of q [B, T, H, Dh] over the cache k, v [B, S, K, Dh] -> [B, T, H, Dh] in q.dtype.

    chunk_size: static, None for global layers. scale: softmax scale (static float). block_s: slots per tile
    (a power of two >= 16; lowered to the largest power of two <= S for short caches). num_splits: programs per
    (batch row, kv head); None picks `default_num_splits`. k_scale / v_scale: scalar or [K] float32
    dequantization scales (FP8 KV). kv_range: optional [B, 2] int32 slot range [lo, hi) containing every
    visible key of each row; default assumes slot i holds position i (mavjax.kv_cache) and derives it from
    q_pos; pass `kv_range_from_k_pos(...)` or [[0, S]] * B for other layouts."""
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    if num_splits is None:
        num_splits = default_num_splits(B, K, S, chunk_size, min(block_s, _prev_pow2(max(S, _MIN_DIM))))
    o, m, l = decode_attention_partials(q, k, v, q_pos, k_pos, kv_range, k_scale, v_scale,
                                              chunk_size=chunk_size, scale=scale, block_s=block_s,
                                              num_splits=num_splits, num_warps=num_warps,
                                              num_stages=num_stages, interpret=interpret)
    G = H // K
    out = combine_partials(o, m, l)[:, :, :T * G]  # [B, K, T*G, Dh]
    out = out.reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)
    return out.astype(q.dtype)
