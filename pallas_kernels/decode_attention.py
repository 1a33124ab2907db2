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
Grid (B, K, num_splits), one launch. One program owns one (batch row, kv head) pair and one share of the cache:
  * GQA packing: the G query heads of the kv head and the T query positions are the R rows of one block
    (row = t * G + g, R padded to a power of two >= 16 with rows whose q_pos = -1), so each K/V tile is read
    from memory once per kv head, not once per query head. The rows are gathered straight from q (viewed as
    [B, T*H, Dh], a free reshape: row r is q row t * H + h * G + g) with a masked load, and q_pos likewise;
    no padded copy is made.
  * Tile skipping: each batch row has a slot range [lo, hi) that holds every visible key (default: derived
    in the kernel from the row's q_pos assuming slot i holds position i, as `mavjax.kv_cache` does:
    hi = max q_pos + 1, lo = start of the chunk of the smallest q_pos on chunked layers, else 0; or passed
    as `kv_range`). Only the block_s tiles overlapping [lo, hi) are visited, and they are divided evenly
    among the num_splits programs of the row, so at long contexts on chunked layers (most of the cache
    invisible) all splits still share the visible chunk. Inside a visited tile, visibility is decided by
    k_pos alone.
  * Each program runs an online softmax over its tiles (m = -inf safe: an all-masked tile or an empty range
    leaves the neutral partial o = 0, m = -inf, l = 0) and stores float32 partials o [R, Dh], m [R], l [R]
    (combine="kernel": only the G*T real rows, and no o for an empty split).
  * combine="kernel" (default): the program that arrives last at its pair's counter (`split_k.arrive`)
    merges the pair's partials with log-sum-exp, as `combine_partials` does (splits with m = -inf weigh 0;
    l = 0 -> 0), and stores the G*T rows in q.dtype straight into the output [B, T, H, Dh] (masked scatter
    of rows t * H + h * G + g), so the wrapper's only ops are free reshapes. num_splits = 1 skips the
    partials. combine="xla": the partials are returned and merged by `combine_partials` plus a transpose
    (two more XLA kernels; kept for A/B runs).
  * S not a multiple of block_s: the last tile's load is shifted back to end at S and slots it shares with
    the previous tile are masked by slot index, so the cache is never padded or copied (only S < 16 pads).
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

from pallas_kernels import upcast
from pallas_kernels.split_k import default_reduce, arrive, counters, load_partial

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


# Long spans (>= LONG_SPAN slots a query can see) with one row block of queries per pair (G * T <= 16: decode)
# are read by one program per SM (bf16 cache; FP8: two, whose conversions need the extra warps), each streaming
# its share through a 3-deep pipeline of TILE_BYTES tiles (bf16, Dh = 128: 64 slots; FP8: 128). On an H200
# (docs/benchmarks.md section 11: every split count x tile x depth swept at 8K-128K, batch 1 and 8) that beat
# 4 programs per SM over 2-deep 128-slot tiles by 9-21%: the 2-deep loop left each program's dependent chain
# (load, QK dot, exp, PV dot) waiting on memory. Short spans (one 8-way rank at 1K: 9 splits of one tile) and
# verification's wider row blocks (4 queries x 5 heads: one program per SM was 18-39% slower at 128K) keep the
# old shape.
LONG_SPAN = 4096
TILE_BYTES = 16 << 10


def _span(num_slots, chunk_size, block_s, queries=None):
    """Slots a row's queries can see: the whole cache on global layers, about a chunk on chunked ones: the
    chunk, plus queries - 1 where consecutive queries straddle a chunk boundary, plus a tile where the chunk
    start is not tile-aligned (queries None: a whole tile for both)."""
    if chunk_size is None:
        return num_slots
    if queries is None:
        return min(num_slots, chunk_size + block_s)
    return min(num_slots, chunk_size + queries - 1 + (block_s if block_s and chunk_size % block_s else 0))


def _long_stream(num_slots, chunk_size, rows):
    return _span(num_slots, chunk_size, 0) >= LONG_SPAN and rows <= _MIN_DIM


def default_tiles(num_slots, chunk_size, head_dim, kv_itemsize, rows):
    """(block_s, num_stages) decode_attention uses when not told (see LONG_SPAN); rows: G * T."""
    if not _long_stream(num_slots, chunk_size, rows):
        return 128, 2
    return max(_MIN_DIM, _prev_pow2(TILE_BYTES // (head_dim * kv_itemsize))), 3


def default_num_splits(batch, kv_heads, num_slots, chunk_size, block_s, num_sms=None, *, rows=16,
                       kv_itemsize=2, merge_in_kernel=True, queries=None):
    """Programs per (batch row, kv head) pair. rows: partial rows stored per split (G * T when the kernel
    merges, R when XLA does); kv_itemsize: bytes per KV element; queries: T, the positions per row, which
    bounds a chunked layer's window (`_span`; None: as if the window always straddled a tile more).

    With the merge inside the kernel a split costs little (one partial, rows x Dh float32, stored once and
    read once through L2), so the count is set by filling the GPU; the smallest of:
      * ~4 programs per SM over the B * K pairs (long spans of at most 16 rows: 1, FP8 2; see LONG_SPAN; at
        small B * K, down to a single tile per split);
      * the block_s tiles of the span a query can see (the chunk on chunked layers, the whole cache on global
        ones): at least a tile per split;
      * partial traffic <= 1/8 of the KV bytes: 2 * NS * rows * Dh * 4 <= span * 2 * Dh * kv_itemsize / 8;
      * with the merge in the kernel (merge_in_kernel), the last program's merge (NS * rows * Dh * 4 bytes,
        read by that one program) <= one split's share of the KV (span / NS * 2 * Dh * kv_itemsize bytes), so
        the serial tail it adds stays below a program's time;
      * 256.
    Then lowered to the fewest splits with the same tiles per split, so rounding leaves no split empty, and, for
    long spans past one wave of programs, to the nearest whole number of waves. (A context shorter than the
    cache leaves splits empty at run time: they store no o and the merge skips it.)"""
    if num_sms is None:
        try:
            num_sms = int(getattr(jax.devices()[0], "core_count", 0)) or 132
        except Exception:  # pragma: no cover
            num_sms = 132
    span = _span(num_slots, chunk_size, block_s, queries)
    tiles = pl.cdiv(span, block_s)
    rows = max(1, rows)
    if _long_stream(num_slots, chunk_size, rows):  # whole waves: a 17th split of 8 pairs (136 programs on 132
        # SMs) ran as a second wave and cost 15-20% at 32K-128K (docs/benchmarks.md section 11)
        want = (1 if kv_itemsize >= 2 else 2) * num_sms // (batch * kv_heads)
    else:
        want = pl.cdiv(4 * num_sms, batch * kv_heads)
    traffic = span * kv_itemsize // (32 * rows)
    tail = math.isqrt(span * kv_itemsize // (2 * rows)) if merge_in_kernel else 256
    ns = int(max(1, min(want, tiles, traffic, tail, 256)))
    ns = pl.cdiv(tiles, pl.cdiv(tiles, ns))
    pairs = batch * kv_heads
    if _long_stream(num_slots, chunk_size, rows) and ns * pairs > num_sms:
        # a limit above can leave a part of a wave: FP8 at 8K, cut by the merge's tail to 22 splits of 8 pairs
        # (176 programs: 1.33 waves) took 16.1 us, one wave of 16 splits 13.2 (docs/benchmarks.md section 25);
        # so round to the nearest whole number of waves (never up: the limits hold)
        whole = max(1, round(ns * pairs / num_sms)) * num_sms // pairs
        ns = pl.cdiv(tiles, pl.cdiv(tiles, max(1, min(ns, whole))))
    return ns


# The in-kernel merge is one program reading all of its pair's partials; past this many bytes per pair the
# two-stage path (XLA's combine over all pairs at once) is faster. On an H200 (docs/benchmarks.md section 9)
# the one-launch kernel won where its merge read <= ~150 KB (one 8-way rank of Maverick at 1K context: 9 splits,
# 37 KB; 40/8 heads at 8K: 32 splits, 131 KB, 30.3 -> 25.6 us) and lost where it read more (40/8 heads at
# 32K: 64 splits, 262 KB, 55 -> 58 us; 5/1 heads at 128K, 4 queries: 79 splits, 1.3 MB, 44 -> 84 us).
MERGE_MAX_BYTES = 160 << 10


def plan(batch, T, H, K, num_slots, chunk_size, block_s, head_dim, kv_itemsize, combine=None):
    """(combine, num_splits) decode_attention uses when not told. combine None: split_k.default_reduce
    ("attention"); "kernel" then falls back to "xla" where the merge would read more than MERGE_MAX_BYTES."""
    G = H // K
    bs = min(block_s, _prev_pow2(max(num_slots, _MIN_DIM)))
    given = combine
    combine = combine or default_reduce("attention")
    if combine == "kernel":
        ns = default_num_splits(batch, K, num_slots, chunk_size, bs, rows=G * T, kv_itemsize=kv_itemsize,
                                queries=T)
        if given is not None or ns * _next_pow2(G * T) * head_dim * 4 <= MERGE_MAX_BYTES:
            return "kernel", ns
        combine = "xla"
    return combine, default_num_splits(batch, K, num_slots, chunk_size, bs, rows=_row_block(G * T), queries=T,
                                       kv_itemsize=kv_itemsize, merge_in_kernel=False)


# --------------------------------------------------------------------------------------------------------------
# Kernel


def _kernel(*refs, names, block_s, num_splits, num_slots, range_slots, chunk_size, scale, compute_dtype, ragged,
            T, H, K, G, combine, merge_splits, interpret):
    """names: the role of each ref (inputs, then outputs), see `_call`."""
    refs = dict(zip(names, refs))
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q_ref = refs["q"]
    Dh = q_ref.shape[-1]
    rows = G * T
    R = _row_block(rows)
    div, rem = lax.div, lax.rem  # truncating: every operand here is >= 0 (cheaper than floor division)

    # Rows r = t * G + g of this kv head: query head h * G + g at position t; rows >= G * T are padding.
    r = jnp.arange(R, dtype=jnp.int32)
    real = r < rows  # [R]
    col = jnp.arange(Dh, dtype=jnp.int32)[None, :]
    q_row = jnp.where(real, div(r, G) * H + h * G + rem(r, G), T * H)  # row of q viewed [T*H, Dh]
    qp = plgpu.load(refs["q_pos"].at[jnp.minimum(div(r, G), T - 1)], mask=real, other=-1)  # [R]
    q = plgpu.load(q_ref.at[q_row[:, None], col], mask=real[:, None], other=0)  # [R, Dh]

    if "range" in refs:
        lo, hi = refs["range"][0], refs["range"][1]
    else:  # kv_range_from_q_pos, on this row's queries
        valid = qp >= 0
        hi = jnp.max(jnp.where(valid, qp, -1)) + 1
        if chunk_size is None:
            lo = jnp.int32(0)
        else:
            lo = div(jnp.min(jnp.where(valid, qp, jnp.iinfo(jnp.int32).max)), jnp.int32(chunk_size)) * chunk_size
    lo = jnp.clip(lo, 0, range_slots)
    hi = jnp.clip(hi, 0, range_slots)
    lo_t = div(lo, block_s)
    hi_t = div(hi + (block_s - 1), block_s)
    n_t = jnp.maximum(hi_t - lo_t, 0)
    per = div(n_t + (num_splits - 1), num_splits)
    t0 = lo_t + split * per
    t1 = jnp.minimum(t0 + per, hi_t)

    cd = compute_dtype
    prec = lax.Precision.HIGHEST if jnp.dtype(cd) == jnp.float32 else None
    q, q_scale = upcast.to_compute(q, cd)  # f16: each row rescaled by a power of two (undone on the logits)
    if chunk_size is None:
        q_lo = jnp.zeros_like(qp)
    else:  # same chunk and causal  <=>  chunk_start(q) <= k <= q  (for k >= 0, q >= 0)
        q_lo = div(jnp.maximum(qp, 0), jnp.int32(chunk_size)) * chunk_size
    q_lo = jnp.maximum(q_lo, 0)[:, None]  # [R, 1]; also enforces k_pos >= 0
    q_hi = qp[:, None]

    def kv_scale(name):
        if name not in refs:
            return 1.0
        s_ref = refs[name]
        return s_ref[h if s_ref.shape[0] > 1 else 0]

    s_scale = scale * kv_scale("k_scale")
    if q_scale is not None:
        s_scale = (s_scale * q_scale)[:, None]  # [R, 1]
    kpos_ref, k_ref, v_ref = refs["k_pos"], refs["k"], refs["v"]

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

    init = (jnp.zeros((R, Dh), jnp.float32), jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32))
    o, m, l = lax.fori_loop(t0, t1, body, init)
    o = o * kv_scale("v_scale")

    if combine == "xla":  # every row, for combine_partials
        refs["po"][split] = o
        refs["pm"][split] = m
        refs["pl"][split] = l
        return

    def write(O, L):  # merged [n, Dh] float32 and [n] -> rows 0..n-1 of the output, in q.dtype
        out_ref = refs["out"]
        n = O.shape[0]
        rn = jnp.arange(n, dtype=jnp.int32)
        keep = rn < rows
        # padding rows point past the end: masked on the GPU, dropped by the interpreter's scatter
        o_row = jnp.where(keep, div(rn, G) * H + h * G + rem(rn, G), T * H)
        out = jnp.where(L[:, None] > 0, O / jnp.where(L > 0, L, 1.0)[:, None], 0.0).astype(out_ref.dtype)
        plgpu.store(out_ref.at[o_row[:, None], col], out, mask=keep[:, None])

    if num_splits == 1:
        write(o, l)
        return

    # Empty splits (m = -inf everywhere) store no o: the merge gives them weight 0 and does not read it.
    live = real & (m > -jnp.inf)  # [R]
    plgpu.store(refs["po"].at[split], o, mask=live[:, None])
    plgpu.store(refs["pm"].at[split], m, mask=real)
    plgpu.store(refs["pl"].at[split], l, mask=real)
    last = arrive(refs["cnt"], b * K + h, num_splits, interpret=interpret)

    @pl.when(last)
    def _combine():
        write(*_merge(refs["po"], refs["pm"], refs["pl"], num_splits=num_splits, rows=rows, chunk=merge_splits))


def _merge(po_ref, pm_ref, pl_ref, *, num_splits, rows, chunk):
    """combine_partials inside the kernel: log-sum-exp merge of the num_splits partials of this pair, read
    `chunk` splits at a time as [chunk, Rr, Dh] tiles (Rr = the real rows rounded up to a power of two) with an
    online rescale between chunks. Returns O [Rr, Dh], L [Rr] float32 (out = O / L; L = 0 -> 0)."""
    Dh = po_ref.shape[-1]
    Rr = _next_pow2(rows)
    sp = jnp.arange(chunk, dtype=jnp.int32)[:, None]  # [C, 1]
    row_ok = jnp.arange(Rr, dtype=jnp.int32)[None, :] < rows  # [1, Rr]

    def step(c, carry):
        M, L, O = carry
        s0 = c * chunk
        mask = (s0 + sp < num_splits) & row_ok  # [C, Rr]
        idx = (pl.ds(s0, chunk), pl.ds(0, Rr))
        m = jnp.where(mask, load_partial(pm_ref.at[idx], mask), -jnp.inf)  # [C, Rr]
        l = load_partial(pl_ref.at[idx], mask)
        live = mask & (m > -jnp.inf)  # empty splits stored no o
        o = load_partial(po_ref.at[idx], jnp.broadcast_to(live[:, :, None], (chunk, Rr, Dh)))  # [C, Rr, Dh]
        M_new = jnp.maximum(M, jnp.max(m, axis=0))  # [Rr]
        M_use = jnp.where(M_new == -jnp.inf, 0.0, M_new)
        a = jnp.exp(M - M_use)
        w = jnp.exp(m - M_use[None, :])  # [C, Rr]; 0 for empty or masked splits
        return M_new, a * L + jnp.sum(w * l, axis=0), a[:, None] * O + jnp.sum(w[:, :, None] * o, axis=0)

    carry = (jnp.full((Rr,), -jnp.inf, jnp.float32), jnp.zeros((Rr,), jnp.float32),
             jnp.zeros((Rr, Dh), jnp.float32))
    n = pl.cdiv(num_splits, chunk)
    if n <= 2:  # straight-line: the loads of both chunks can be in flight together
        for c in range(n):
            carry = step(c, carry)
    else:
        carry = lax.fori_loop(0, n, step, carry)
    _, L, O = carry
    return O, L


def _row_block(rows):
    return max(_MIN_DIM, _next_pow2(rows))


def _merge_splits(num_splits, rows, Dh, budget=8192):
    """Splits per merge step: [C, Rr, Dh] float32 tiles of at most `budget` elements (64 registers a thread at
    4 warps)."""
    return max(1, min(_next_pow2(num_splits), _prev_pow2(max(1, budget // (_next_pow2(rows) * Dh)))))


def _scale_arg(s, K):
    """A scalar or [K] float32 scale as a [1] or [K] vector (a free reshape)."""
    s = jnp.asarray(s, jnp.float32)
    assert s.ndim == 0 or s.shape == (K,), s.shape
    return s.reshape(-1)


def _call(q, k, v, q_pos, k_pos, kv_range, k_scale, v_scale, poison, *, chunk_size, scale, block_s, num_splits,
          num_warps, num_stages, interpret, combine, compute_dtype=None):
    """The pallas_call. combine="xla": returns the partials (o, m, l); "kernel": the output [B, T, H, Dh]."""
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    assert H % K == 0 and v.shape == k.shape and q_pos.shape == (B, T) and k_pos.shape == (B, S)
    assert combine in ("kernel", "xla"), combine
    G = H // K
    R = _row_block(G * T)
    range_slots = S

    if S < _MIN_DIM:  # tiny caches only (tests): pad to one minimal tile; never taken at real sizes
        pad = _MIN_DIM - S
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=-1)
        S = _MIN_DIM
    bs = min(block_s, _prev_pow2(S))
    ragged = S % bs != 0

    if compute_dtype is not None:
        cd = jnp.dtype(compute_dtype)
    elif _is_fp8(k.dtype) or _is_fp8(v.dtype):
        cd = upcast.compute_dtype()  # float16: see pallas_kernels/upcast.py
    else:
        cd = jnp.promote_types(q.dtype, jnp.promote_types(k.dtype, v.dtype))

    NS = num_splits
    zero2 = lambda b, h, s: (b, 0)  # noqa: E731
    names, args, in_specs = [], [], []

    def arg(name, x, spec):
        names.append(name)
        args.append(x)
        in_specs.append(spec)

    # Only free reshapes and dtype no-ops here: the kernel reads q, q_pos and the range in place.
    if kv_range is not None:
        arg("range", kv_range.astype(jnp.int32), pl.BlockSpec((None, 2), zero2))
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None:
            s = _scale_arg(s, K)
            arg(name, s, pl.BlockSpec(s.shape, lambda b, h, i: (0,)))
    arg("q_pos", q_pos.astype(jnp.int32), pl.BlockSpec((None, T), zero2))
    arg("q", q.reshape(B, T * H, Dh), pl.BlockSpec((None, T * H, Dh), lambda b, h, s: (b, 0, 0)))
    arg("k_pos", k_pos.astype(jnp.int32), pl.BlockSpec((None, S), zero2))
    arg("k", k, pl.BlockSpec((None, S, None, Dh), lambda b, h, s: (b, 0, h, 0)))
    arg("v", v, pl.BlockSpec((None, S, None, Dh), lambda b, h, s: (b, 0, h, 0)))

    # Outputs. Partials [B, K, NP, R(, Dh)] float32, a program's block holding all splits of its pair; in-kernel
    # merging reads them merge_splits at a time, so NP rounds NS up to a multiple of that (the rest unused).
    merge_splits = _merge_splits(NS, G * T, Dh)
    NP = NS if combine == "xla" else pl.cdiv(NS, merge_splits) * merge_splits
    o_spec = pl.BlockSpec((None, None, NP, R, Dh), lambda b, h, s: (b, h, 0, 0, 0))
    ml_spec = pl.BlockSpec((None, None, NP, R), lambda b, h, s: (b, h, 0, 0))
    part_shapes = [jax.ShapeDtypeStruct((B, K, NP, R, Dh), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, NP, R), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, NP, R), jnp.float32)]
    out_names, out_shape, out_specs = [], [], []
    if combine == "kernel":  # the output as [B, T*H, Dh]: row t * H + head, a free reshape of [B, T, H, Dh]
        out_names.append("out")
        out_shape.append(jax.ShapeDtypeStruct((B, T * H, Dh), q.dtype))
        out_specs.append(pl.BlockSpec((None, T * H, Dh), lambda b, h, s: (b, 0, 0)))
    if combine == "xla" or NS > 1:
        out_names += ["po", "pm", "pl"]
        out_shape += part_shapes
        out_specs += [o_spec, ml_spec, ml_spec]
    if combine == "kernel" and NS > 1:
        cnt = counters(B * K)
        arg("cnt", cnt, pl.BlockSpec(cnt.shape, lambda b, h, s: (0,)))

    aliases = {}
    if poison is not None:  # aliased to the outputs the caller checks: out ("kernel") or (o, m, l) ("xla")
        poison = [poison.reshape(B, T * H, Dh)] if combine == "kernel" else list(poison)
        for i, x in enumerate(poison):
            aliases[len(args)] = i
            arg(f"poison{i}", x, out_specs[i])

    kernel = functools.partial(
        _kernel, names=tuple(names + out_names), block_s=bs, num_splits=NS, num_slots=S, range_slots=range_slots,
        chunk_size=chunk_size, scale=float(scale), compute_dtype=cd, ragged=ragged, T=T, H=H, K=K, G=G,
        combine=combine, merge_splits=merge_splits, interpret=interpret)
    if num_warps is None:
        num_warps = 4 if R <= 32 else 8
    params = dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)) \
        if plgpu is not None else {}
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(B, K, NS), in_specs=in_specs, out_specs=out_specs,
                          input_output_aliases=aliases, interpret=interpret, name="split_kv_decode_attention",
                          **params)(*args)


@functools.partial(jax.jit, static_argnames=("chunk_size", "scale", "block_s", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def decode_attention_partials(q, k, v, q_pos, k_pos, kv_range=None, k_scale=None, v_scale=None, poison=None, *,
                              chunk_size, scale, block_s, num_splits, num_warps=None, num_stages=2,
                              interpret=False):
    """The split kernel alone (the combine="xla" path). Returns float32 partials o [B, K, NS, R, Dh], m, l
    [B, K, NS, R] (rows r = t * G + g for r < G * T; rows up to R = max(16, next power of two) are padding).
    `poison`: optional (o, m, l) buffers of those shapes, aliased to the outputs, so a test can check that the
    kernel writes every element."""
    o, m, l = _call(q, k, v, q_pos, k_pos, kv_range, k_scale, v_scale, poison, chunk_size=chunk_size, scale=scale,
                    block_s=block_s, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                    interpret=interpret, combine="xla")
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


def kernel_path(T, H, K, S, Dh, q_dtype, kv_dtype, chunk_size, mosaic=None, plain=True) -> str:
    """Which kernel `decode_attention` runs: "mosaic" (pallas_kernels/decode_attention_mgpu.py) or "triton" (this
    module's). mosaic False: Triton's; True: the Mosaic GPU one (a ValueError where it does not take the problem,
    or where the call is not `plain`: kv_range, FP8 scales, compute_dtype or poison given); None: the Mosaic GPU
    one where it takes the problem on a Hopper GPU and a query can see LONG_SPAN slots or more (where it was
    measured faster: docs/benchmarks.md section 34)."""
    if mosaic is False:
        return "triton"
    if mosaic and not plain:
        raise ValueError("the Mosaic GPU attention takes no kv_range, FP8 scales, compute_dtype or poison")
    from pallas_kernels import decode_attention_mgpu as mg

    long = _span(S, chunk_size, 0) >= LONG_SPAN
    take = plain and (mosaic or long) and mg.wanted(mosaic, T, H, K, S, Dh, q_dtype, kv_dtype)
    return "mosaic" if take else "triton"


@functools.partial(jax.jit, static_argnames=("chunk_size", "scale", "block_s", "num_splits", "num_warps",
                                             "num_stages", "interpret", "combine", "compute_dtype", "mosaic"))
def decode_attention(q, k, v, q_pos, k_pos, *, chunk_size, scale, block_s=None, num_splits=None, k_scale=None,
                     v_scale=None, kv_range=None, num_warps=None, num_stages=None, interpret=False, combine=None,
                     poison=None, compute_dtype=None, mosaic=None):
    """Split-KV attention of q [B, T, H, Dh] over the cache k, v [B, S, K, Dh] -> [B, T, H, Dh] in q.dtype.

    chunk_size: static, None for global layers. scale: softmax scale (static float). block_s: slots per tile
    (a power of two >= 16; lowered to the largest power of two <= S for short caches); num_stages: the tile
    loop's pipeline depth; None: `default_tiles` (128 and 2; long spans at decode: 16 KB tiles 3 deep). num_splits:
    programs per (batch row, kv head); None picks `default_num_splits`. k_scale / v_scale: scalar or [K] float32
    dequantization scales (FP8 KV). kv_range: optional [B, 2] int32 slot range [lo, hi) containing every
    visible key of each row; default assumes slot i holds position i (mavjax.kv_cache) and derives it from
    q_pos; pass `kv_range_from_k_pos(...)` or [[0, S]] * B for other layouts. combine: "kernel" (one launch:
    the last split of each pair merges the partials and writes the output) or "xla" (the partials, then
    combine_partials and a transpose in XLA; for A/B runs); None: split_k.default_reduce("attention")
    (split_k.DEFAULTS: "kernel"; MAVJAX_SPLIT_K_REDUCE overrides); left None with num_splits None, `plan`
    also falls back to "xla" where the in-kernel merge would read more than MERGE_MAX_BYTES. compute_dtype: of the
    in-register dots (default: q's, promoted with the cache's; an FP8 cache: float16, pallas_kernels/upcast.py,
    q rows rescaled by powers of two). poison: testing hook ("kernel" only), a
    [B, T, H, Dh] buffer aliased to the output, so a test can check that every element is written.
    mosaic: the Mosaic GPU kernel (pallas_kernels/decode_attention_mgpu.py: bf16 cache, TMA pipeline, WGMMA, its
    own merge) instead of Triton's, as `kernel_path` decides: False never, True always (a ValueError where it does
    not take the problem), None where it takes it on a Hopper GPU and a query can see LONG_SPAN slots or more. It
    takes block_s, num_splits and num_stages as its own tiles and combine as its merge (None: in the kernel where
    it fits); not kv_range, FP8 scales, compute_dtype or poison."""
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    plain = kv_range is None and k_scale is None and v_scale is None and compute_dtype is None and poison is None
    if kernel_path(T, H, K, S, Dh, q.dtype, k.dtype, chunk_size, mosaic, plain) == "mosaic":
        from pallas_kernels import decode_attention_mgpu as mg
        from pallas_kernels.mgpu_gemv import interpret_params

        return mg.decode_attention_mgpu(q, k, v, q_pos, k_pos, chunk_size=chunk_size, scale=scale,
                                        block_s=block_s or mg.BLOCK_S, num_splits=num_splits, stages=num_stages,
                                        merge=combine, interpret=interpret_params(interpret))
    tiles = default_tiles(S, chunk_size, Dh, jnp.dtype(k.dtype).itemsize, G * T)
    block_s = tiles[0] if block_s is None else block_s
    num_stages = tiles[1] if num_stages is None else num_stages
    if poison is not None and combine is None:  # the hook is the one-launch path's
        combine = "kernel"
    if num_splits is None:
        combine, num_splits = plan(B, T, H, K, S, chunk_size, block_s, Dh, jnp.dtype(k.dtype).itemsize, combine)
    combine = combine or default_reduce("attention")
    kw = dict(chunk_size=chunk_size, scale=scale, block_s=block_s, num_splits=num_splits, num_warps=num_warps,
              num_stages=num_stages, interpret=interpret, compute_dtype=compute_dtype)
    if combine == "kernel":
        out = _call(q, k, v, q_pos, k_pos, kv_range, k_scale, v_scale, poison, combine="kernel", **kw)[0]
        return out.reshape(B, T, H, Dh)
    if combine != "xla":
        raise ValueError(f"combine must be 'kernel' or 'xla', got {combine!r}")
    if poison is not None:
        raise ValueError("poison is for combine='kernel'; decode_attention_partials takes the partials' buffers")
    o, m, l = _call(q, k, v, q_pos, k_pos, kv_range, k_scale, v_scale, None, combine="xla", **kw)
    out = combine_partials(o, m, l)[:, :, :T * G]  # [B, K, T*G, Dh]
    out = out.reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)
    return out.astype(q.dtype)
