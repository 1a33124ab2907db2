"""FP8 MoE grouped GEMM in Pallas (Triton lowering): all local experts of a Llama 4 MoE layer in two launches,
with the plain jax.numpy reference side by side.

Computes what `mavjax.model.moe_experts` computes: the sigmoid router score scales the expert's *input*,

    y[n] = sum_j  down_e( silu(xs @ gate_e) * (xs @ up_e) ),   xs = x[n] * score[n, j],  e = expert_idx[n, j]

Shapes: N tokens, k experts per token (P = N*k (token, expert) pairs), E experts, D hidden, F expert hidden.

  x                 [N, D]     bf16 / f16 / f32
  expert_idx        [N, k]     int32 in [0, E); a pair with an id outside is dropped: it contributes
                               nothing and reads no weights (the sorted path gives it no row, the pair
                               path's programs for it store zeros)
  scores            [N, k]     x's dtype (as `mavjax.model.route` returns them)
  w_gate, w_up      [E, D, F]  float8_e4m3fn (with scales) or bf16 / f32 (scales=None)
  w_down            [E, F, D]
  scales            None or (s_gate [E, F], s_up [E, F], s_down [E, D]) float32, one per (expert, output
                    channel): w = w_fp8 * s[e, None, :] (`quantize_experts` makes them)

Design
------
1. Sorting (`sort_tokens`, jnp): the P pairs are stably sorted by expert; expert e's group is padded to a
   multiple of block_m rows, so every row block of the sorted buffer belongs to exactly one expert. Outputs:
   the buffer row of every pair, the pair of every row (padding rows: P), group sizes / padded group offsets
   [E], the expert of every row block (block -> expert table, int32 array input of the kernels) and the number
   of active row blocks. Buffer sizing (static, never drops a token whatever the skew): a group of s_e > 0
   pairs takes ceil(s_e / bm) * bm <= s_e + bm - 1 rows and at most min(E, P) groups are non-empty, so

        R = round_up(P + min(E, P) * (block_m - 1), block_m)   rows,   R / block_m row blocks

   (decode, P = 1: one block of block_m rows; all P pairs on one expert: ceil(P / bm) active blocks).
2. x is gathered into sorted order in jnp (x_sorted [R, D], padding rows repeat token 0 and get score 0);
   the kernels read it with plain block loads.
3. Kernel 1, gate/up + SwiGLU: grid (row blocks, F blocks, split-K). Program (r, j) reads its expert
   e = block_expert[r], multiplies its x rows by their router scores in x's dtype (exactly the reference's
   rounding), casts to bf16 and runs the D loop over the gate and up tiles of expert e (FP8 upcast to bf16 in
   registers: exact), two f32 accumulators; then per-channel scales, h = silu(g) * u, stored bf16 [R, F].
4. Kernel 2, down: grid (row blocks, D blocks, split-K): y_sorted = h @ down_e * s_down_e.
5. Combine (jnp): y[n] = sum_j y_sorted[row of pair (n, j)], i.e. the scatter-add back to token order written
   as a gather by the inverse permutation plus a sum over the k slots (deterministic: no atomics; f32 sum).
Programs whose row block is >= the active count exit at once (pl.when around the whole body): they read
and write nothing, so at decode only the experts that received tokens are streamed from memory (the test
fills the other experts' weights with NaN). Their rows of h / y_sorted stay unwritten and are never read.
Split-K (decode: few active blocks x few N blocks would leave most SMs idle): each split writes an f32
partial (scale applied) and a jnp epilogue sums them (and, for kernel 1, applies the SwiGLU).
D and F need not be multiples of the blocks: the ragged edges are masked loads/stores, as in fp8_gemm.
Block sizes must be powers of two and >= 16 (Triton dot operands need every dimension >= 16).

Decode path (few pairs, P <= PAIRS_MAX): no sorting at all. Sorting costs a dozen small XLA ops (argsort,
bincount, searchsorted, scatters: ~60-120 us measured on an H100, more than the expert bytes take to stream)
and pads each pair to block_m rows. Instead `moe_fp8_pairs` runs one program row per (token, expert) pair:
kernel 1 (grid (P, F blocks, split-K)) reads that pair's expert's gate/up tiles straight from the [E, D, F]
weights by the expert id, kernel 2 (grid (P, D blocks, split-K)) its down tiles. Both finish their own split-K
sums (reduce="kernel", the protocol of pallas_kernels/split_k.py): every split stores an f32 partial and counts
its arrival on its tile's atomic counter; the last split of each h tile sums the tile's partials and stores
h = silu(g) * u, and the last of the (k + shared rows) x splits programs feeding a [token, D block] output tile
sums them and stores the final output, so no XLA op follows the two launches (reduce="xla" / gu_epilogue keep
the earlier reductions, in kernel 2's loads or XLA, for A/B runs); the token's row is the only
non-zero row of a 16-row dot operand (Triton dots need >= 16 rows; the tensor cores have time to spare, the
weights' bytes are the cost), and the k pairs of a token are summed at the end. Only the routed experts are
read; two pairs on one expert read it twice (at Maverick's 128 experts and top-1, rare at decode batch sizes,
and the second read is likely an L2 hit). `shared=` adds Llama 4's shared expert as one more program row per
token in the same two launches (rows P.. of both grids read the shared weights instead of an expert's).
On a Hopper GPU `moe_fp8` gives up to 16 such rows to the same design on the Mosaic GPU weight-only GEMM
instead (pallas_kernels/moe_mgpu.py, `mosaic=`): 20-31% less time (docs/benchmarks.md section 21).

Everything runs under interpret=True on CPU (tests/test_moe_gemm.py); scripts/bench_moe.py validates both
paths on the GPU before timing (sorted path: validated and timed on an H100, JAX 0.11.2).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import mgpu_gemv, moe_mgpu, upcast
from pallas_kernels import split_k as _split_k
from pallas_kernels.fp8_gemm import (
    FP8, NUM_SMS_H100, plgpu, _call, _silu, _exact_upcast, _in_bounds, _load, _mask2, _next_pow2, _store,
    quantize_weight_per_channel, swiglu_of_partials, weight_only_blocks)

__all__ = ["MoERouting", "sort_tokens", "num_buffer_rows", "quantize_experts", "dequantize_experts",
           "moe_reference", "moe_fp8", "moe_fp8_sorted", "moe_fp8_pairs", "default_config", "pairs_config",
           "PAIRS_MAX"]

_MIN_BLOCK = 16  # Triton dot operands: every dimension >= 16


# ----------------------------------------------------------------------------------------------------------
# Quantization (per expert, per output channel) and the plain jnp reference
# ----------------------------------------------------------------------------------------------------------

def quantize_experts(w_gate, w_up, w_down, *, batch_size=None):
    """Expert weights -> FP8 weights + scales: ((wg, wu, wd) float8_e4m3fn, (s_gate [E, F], s_up [E, F],
    s_down [E, D]) float32), `quantize_weight_per_channel` per expert (amax over the contracted axis / 448).
    batch_size: quantize that many experts at a time (lax.map) to bound the float32 temporaries (the full
    Maverick tensors are 21 GB each in float32); None vmaps over all experts at once."""
    def q(w):
        if batch_size is None:
            return jax.vmap(quantize_weight_per_channel)(w)
        return lax.map(quantize_weight_per_channel, w, batch_size=batch_size)
    (wg, sg), (wu, su), (wd, sd) = q(w_gate), q(w_up), q(w_down)
    return (wg, wu, wd), (sg, su, sd)


def dequantize_experts(w, scale):
    """[E, K, M] FP8 weights and [E, M] scales -> float32 (scale None: just the float32 cast)."""
    if scale is None:
        return w.astype(jnp.float32)
    return _exact_upcast(w) * scale.astype(jnp.float32)[:, None, :]


def moe_reference(x, expert_idx, scores, w_gate, w_up, w_down, *, scales=None):
    """`mavjax.model.moe_experts` semantics in float32 at HIGHEST precision on the dequantized weights: the
    score multiplies the input in x's dtype (as the model does), everything after it is float32; cast to x's
    dtype at the end. A loop over experts (each expert's weights dequantized inside the loop, so no float32
    copy of all experts is made) over all token slots, masked: fine for tests and GPU validation sizes."""
    N, D = x.shape
    E = w_gate.shape[0]
    sg, su, sd = scales if scales is not None else (None, None, None)
    hi = lax.Precision.HIGHEST
    xs = (x[:, None, :] * scores[..., None].astype(x.dtype)).astype(jnp.float32)  # [N, k, D]

    def expert(e, acc):
        def deq(w, s):
            w_e = lax.dynamic_index_in_dim(w, e, keepdims=False)
            s_e = None if s is None else lax.dynamic_index_in_dim(s, e, keepdims=True)
            return dequantize_experts(w_e[None], s_e)[0]
        g = jnp.einsum("nkd,df->nkf", xs, deq(w_gate, sg), precision=hi)
        u = jnp.einsum("nkd,df->nkf", xs, deq(w_up, su), precision=hi)
        y = jnp.einsum("nkf,fd->nkd", jax.nn.silu(g) * u, deq(w_down, sd), precision=hi)
        return acc + jnp.where((expert_idx == e)[..., None], y, 0.0)

    y = lax.fori_loop(0, E, expert, jnp.zeros((*expert_idx.shape, D), jnp.float32))
    return jnp.sum(y, axis=1).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Token sorting
# ----------------------------------------------------------------------------------------------------------

class MoERouting(NamedTuple):
    """Sorted-buffer layout of one routing (all int32). P = N*k pairs, pair p = (token p // k, slot p % k);
    R buffer rows (static, `num_buffer_rows`), R / block_m row blocks."""
    pair_row: jax.Array           # [P] buffer row of each pair (>= R: a dropped pair, id outside [0, E))
    row_pair: jax.Array           # [R] pair held by each row; P on padding rows
    group_sizes: jax.Array        # [E] pairs routed to each expert
    group_offsets: jax.Array      # [E] first row of each expert's group (multiples of block_m)
    block_expert: jax.Array       # [R / block_m] expert of each row block (E - 1 past the active ones)
    num_active_blocks: jax.Array  # [1] row blocks holding at least one pair: sum_e ceil(size_e / block_m)


def num_buffer_rows(num_pairs, num_experts, block_m):
    """Static sorted-buffer size that fits any routing: P + min(E, P) * (block_m - 1), rounded up to block_m."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return max(block_m, pl.cdiv(rows, block_m) * block_m)


def sort_tokens(expert_idx, num_experts, block_m):
    """Stable sort of the (token, expert) pairs by expert, every group padded to a multiple of block_m rows.
    expert_idx [N, k] int -> MoERouting. A pair whose id is outside [0, E) (e.g. the expert-parallel exchange's
    empty slots, id E) is dropped: it gets no row (its pair_row is >= R) and contributes nothing."""
    flat_e = expert_idx.reshape(-1).astype(jnp.int32)
    P, E, bm = flat_e.shape[0], num_experts, block_m
    R = num_buffer_rows(P, E, bm)
    flat_e = jnp.where((flat_e >= 0) & (flat_e < E), flat_e, E)  # dropped pairs: id E, sorted last
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)   # (bincount ignores ids >= E)
    blocks = (sizes + bm - 1) // bm
    ends = jnp.cumsum(sizes)
    block_ends = jnp.cumsum(blocks)
    offsets = ((block_ends - blocks) * bm).astype(jnp.int32)   # padded group starts
    order = jnp.argsort(flat_e, stable=True)                   # sorted position i -> pair
    e_sorted = flat_e[order]
    ec = jnp.minimum(e_sorted, E - 1)
    pos = jnp.arange(P, dtype=jnp.int32)
    rank = pos - (ends - sizes)[ec]                            # index within its group
    # dropped pairs: distinct rows past the buffer (R + position), so the scatters below stay unique and drop them
    rows_sorted = jnp.where(e_sorted < E, offsets[ec] + rank, R + pos)
    pair_row = jnp.zeros((P,), jnp.int32).at[order].set(rows_sorted, unique_indices=True)
    row_pair = jnp.full((R,), P, jnp.int32).at[rows_sorted].set(order.astype(jnp.int32), unique_indices=True,
                                                                 mode="drop")
    blk = jnp.arange(R // bm, dtype=jnp.int32)
    block_expert = jnp.minimum(jnp.searchsorted(block_ends, blk, side="right"), E - 1).astype(jnp.int32)
    return MoERouting(pair_row, row_pair, sizes, offsets, block_expert, block_ends[-1:].astype(jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

def _k_range(pid_s, nk, kb_per_split):
    lo = pid_s * kb_per_split
    return lo, jnp.minimum(lo + kb_per_split, nk)


def _gate_up_kernel(*refs, d, f, block_m, block_n, block_k, kb_per_split, partial, has_scales, cdt, evict):
    be_ref, na_ref, x_ref, rs_ref, wg_ref, wu_ref, *rest = refs
    sg_ref, su_ref, *outs = rest if has_scales else (None, None, *rest)
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(pid_m < na_ref[0])  # inactive row block: no load, no store
    def _():
        e = be_ref[pid_m]
        m0 = pl.multiple_of(pid_m * block_m, block_m)
        n0 = pl.multiple_of(pid_n * block_n, block_n)
        n_in = _in_bounds(n0, block_n, f)
        kb_lo, kb_hi = _k_range(pid_s, pl.cdiv(d, block_k), kb_per_split)
        score = rs_ref[pl.ds(m0, block_m)]                                                  # [bm], x dtype
        hint_x, hint_w = ("evict_last", "evict_first") if evict else (None, None)

        def load_x(kb):  # router score on the input (x's dtype)
            k0 = pl.multiple_of(kb * block_k, block_k)
            xt = _load(x_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)], _mask2(None, _in_bounds(k0, block_k, d)),
                       hint_x)
            return xt * score[:, None]                                                      # [bm, bk]

        x_mul, x_s = upcast.row_scales(load_x, kb_lo, kb_hi, (block_m, block_k), cdt)  # f16: per row scales

        def body(kb, acc):
            g, u = acc
            k0 = pl.multiple_of(kb * block_k, block_k)
            k_in = _in_bounds(k0, block_k, d)
            xt = upcast.scaled(load_x(kb), x_mul, cdt)
            wmask = _mask2(k_in, n_in)
            wg = _load(wg_ref.at[e, pl.ds(k0, block_k), pl.ds(n0, block_n)], wmask, hint_w).astype(cdt)
            wu = _load(wu_ref.at[e, pl.ds(k0, block_k), pl.ds(n0, block_n)], wmask, hint_w).astype(cdt)
            return (g + jnp.dot(xt, wg, preferred_element_type=jnp.float32),    # [bm, bk] x [bk, bn]
                    u + jnp.dot(xt, wu, preferred_element_type=jnp.float32))

        zero = jnp.zeros((block_m, block_n), jnp.float32)
        g, u = lax.fori_loop(kb_lo, kb_hi, body, (zero, zero))
        if x_s is not None:
            g, u = g * x_s[:, None], u * x_s[:, None]
        if has_scales:
            g = g * _load(sg_ref.at[e, pl.ds(n0, block_n)], n_in)[None, :]
            u = u * _load(su_ref.at[e, pl.ds(n0, block_n)], n_in)[None, :]
        omask = _mask2(None, n_in)
        if partial:
            g_ref, u_ref = outs
            _store(g_ref.at[pid_s, pl.ds(m0, block_m), pl.ds(n0, block_n)], g, omask)
            _store(u_ref.at[pid_s, pl.ds(m0, block_m), pl.ds(n0, block_n)], u, omask)
        else:
            (h_ref,) = outs
            _store(h_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)], (_silu(g) * u).astype(h_ref.dtype), omask)


def _down_kernel(*refs, f, d, block_m, block_n, block_k, kb_per_split, partial, has_scales, cdt, evict):
    be_ref, na_ref, h_ref, wd_ref, *rest = refs
    sd_ref, o_ref = rest if has_scales else (None, *rest)
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(pid_m < na_ref[0])
    def _():
        e = be_ref[pid_m]
        m0 = pl.multiple_of(pid_m * block_m, block_m)
        n0 = pl.multiple_of(pid_n * block_n, block_n)
        n_in = _in_bounds(n0, block_n, d)
        kb_lo, kb_hi = _k_range(pid_s, pl.cdiv(f, block_k), kb_per_split)
        hint_x, hint_w = ("evict_last", "evict_first") if evict else (None, None)

        def body(kb, acc):
            k0 = pl.multiple_of(kb * block_k, block_k)
            k_in = _in_bounds(k0, block_k, f)
            ht = _load(h_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)], _mask2(None, k_in), hint_x)
            ht, hs = upcast.to_compute(ht, cdt)
            wt = _load(wd_ref.at[e, pl.ds(k0, block_k), pl.ds(n0, block_n)], _mask2(k_in, n_in), hint_w)
            part = jnp.dot(ht, wt.astype(cdt), preferred_element_type=jnp.float32)  # [bm, bk] x [bk, bn]
            return acc + (part if hs is None else part * hs[:, None])

        y = lax.fori_loop(kb_lo, kb_hi, body, jnp.zeros((block_m, block_n), jnp.float32))
        if has_scales:
            y = y * _load(sd_ref.at[e, pl.ds(n0, block_n)], n_in)[None, :]
        omask = _mask2(None, n_in)
        if partial:
            _store(o_ref.at[pid_s, pl.ds(m0, block_m), pl.ds(n0, block_n)], y, omask)
        else:
            _store(o_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)], y.astype(o_ref.dtype), omask)


def _pair_rows(v, rows=_MIN_BLOCK):
    """[bk] -> [rows, bk] with v in row 0 and zeros below: a Triton dot operand (>= 16 rows) for one token."""
    return jnp.where(jnp.arange(rows)[:, None] == 0, v[None, :], jnp.zeros((), v.dtype))


def top1_of_logits(lg_ref, t, num_experts, dtype):
    """Top-1 sigmoid routing of token t inside a kernel, as mavjax.model.route does it from the same logits:
    the lowest id among the largest logits of token t, and the sigmoid of that logit in float32 cast to
    `dtype`. lg_ref: the logits [N, E], or float32 partials [P, N, E] whose sum over P rounded to `dtype`
    is the logits (fused_norm.add_rms_norm(router=...), summed here). One load per program: no XLA kernel
    (the router's dot, its argmax, the sigmoid) between the norm and the MoE kernels."""
    e2 = _next_pow2(num_experts)
    ids = jnp.arange(e2, dtype=jnp.int32)
    ok = ids < num_experts
    if lg_ref.ndim == 2:
        lg = plgpu.load(lg_ref.at[t, pl.ds(0, e2)], mask=ok, other=-jnp.inf)                          # [E]
    else:
        n_parts = lg_ref.shape[0]
        p2 = _next_pow2(n_parts)
        parts = plgpu.load(lg_ref.at[pl.ds(0, p2), t, pl.ds(0, e2)], mask=_mask2(_in_bounds(0, p2, n_parts), ok),
                           other=0.0)                                                                   # [P, E]
        lg = jnp.where(ok, jnp.sum(parts, axis=0), -jnp.inf)                                            # [E]
    lg = lg.astype(dtype).astype(jnp.float32)  # the logits as the XLA path rounds them
    top = jnp.max(lg)
    e = jnp.min(jnp.where((lg == top) & ok, ids, e2))
    return e, (1.0 / (1.0 + jnp.exp(-top))).astype(dtype)


def _pair_row(p, pick, num_experts, num_pairs, has_shared, routed, dropped, shared):
    """The work of program row p in both pair kernels: rows < num_pairs are (token, expert) pairs; pick(p)
    gives the pair's (expert id, router score): routed(e, score) for an id e in [0, E) and dropped() (zeros,
    no weight read) otherwise; rows >= num_pairs (has_shared) are the shared expert, shared()."""
    def pair():
        e, score = pick(p)
        valid = (e >= 0) & (e < num_experts)
        pl.when(valid)(lambda: routed(e, score))
        pl.when(jnp.logical_not(valid))(dropped)

    if not has_shared:
        pair()
        return
    pl.when(p < num_pairs)(pair)
    pl.when(p >= num_pairs)(shared)


def _pair_gate_up_kernel(*refs, k, d, f, num_pairs, block_n, block_k, kb_per_split, num_splits, finish,
                         has_scales, has_shared, logits_dtype, cdt, evict, interpret):
    """Program rows p < num_pairs: (token p // k, its expert idx[p]), input scaled by the router score
    (logits_dtype not None: idx_ref is the router's logits or their partials and sc_ref unused,
    top1_of_logits). With has_shared, rows p >= num_pairs are the shared expert on token p - num_pairs (score
    1): the same loop over the shared weights' refs ([1, D, F], scales [1, F]), so the shared expert costs no
    launch of its own.
    num_splits == 1: h [rows, F] is the output. Split-K: f32 partials g, u [S, rows, F] (scales applied); with
    finish, the last split of each (row, F block) tile also sums them and stores h [rows, F]
    (counter p * F blocks + n)."""
    if finish:
        cnt_ref, *refs = refs
    idx_ref, sc_ref, x_ref, wg_ref, wu_ref, *rest = refs  # then (sg, su), shared (wg, wu, (sg, su)), outputs
    sg_ref = su_ref = wgs_ref = wus_ref = sgs_ref = sus_ref = None
    if has_scales:
        sg_ref, su_ref, *rest = rest
    if has_shared:
        wgs_ref, wus_ref, *rest = rest
        if has_scales:
            sgs_ref, sus_ref, *rest = rest
    outs = rest
    p, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = pl.multiple_of(pid_n * block_n, block_n)
    n_in = _in_bounds(n0, block_n, f)
    kb_lo, kb_hi = _k_range(pid_s, pl.cdiv(d, block_k), kb_per_split)
    hint_w = "evict_first" if evict else None

    def run(e, row, score, wg_ref, wu_ref, sg_ref, su_ref):
        def load_x(kb):
            k0 = pl.multiple_of(kb * block_k, block_k)
            xt = _load(x_ref.at[row, pl.ds(k0, block_k)], _in_bounds(k0, block_k, d))          # [bk]
            return xt if score is None else xt * score     # router score on the input (x's dtype)

        x_mul, x_s = upcast.row_scales(load_x, kb_lo, kb_hi, (block_k,), cdt)  # f16: the row's scale (scalars)

        def body(kb, acc):
            g, u = acc
            k0 = pl.multiple_of(kb * block_k, block_k)
            k_in = _in_bounds(k0, block_k, d)
            xt = _pair_rows(upcast.scaled(load_x(kb), x_mul, cdt))                            # [16, bk]
            wmask = _mask2(k_in, n_in)
            wg = _load(wg_ref.at[e, pl.ds(k0, block_k), pl.ds(n0, block_n)], wmask, hint_w).astype(cdt)
            wu = _load(wu_ref.at[e, pl.ds(k0, block_k), pl.ds(n0, block_n)], wmask, hint_w).astype(cdt)
            return (g + jnp.dot(xt, wg, preferred_element_type=jnp.float32),    # [16, bk] x [bk, bn]
                    u + jnp.dot(xt, wu, preferred_element_type=jnp.float32))

        zero = jnp.zeros((_MIN_BLOCK, block_n), jnp.float32)
        g, u = lax.fori_loop(kb_lo, kb_hi, body, (zero, zero))
        g, u = jnp.sum(g, axis=0), jnp.sum(u, axis=0)  # rows 1.. are exact zeros: this is row 0, [bn]
        if x_s is not None:
            g, u = g * x_s, u * x_s
        if has_scales:
            g = g * _load(sg_ref.at[e, pl.ds(n0, block_n)], n_in)
            u = u * _load(su_ref.at[e, pl.ds(n0, block_n)], n_in)
        store(g, u)

    def store(g, u):
        if num_splits > 1:
            g_ref, u_ref = outs[:2]
            _store(g_ref.at[pid_s, p, pl.ds(n0, block_n)], g, n_in)
            _store(u_ref.at[pid_s, p, pl.ds(n0, block_n)], u, n_in)
        else:
            (h_ref,) = outs
            _store(h_ref.at[p, pl.ds(n0, block_n)], (_silu(g) * u).astype(h_ref.dtype), n_in)

    zero = jnp.zeros((block_n,), jnp.float32)
    num_experts = wg_ref.shape[0]
    pick = ((lambda q: top1_of_logits(idx_ref, q, num_experts, logits_dtype)) if logits_dtype is not None else
            (lambda q: (idx_ref[q], sc_ref[q])))
    _pair_row(p, pick, num_experts, num_pairs, has_shared,
              routed=lambda e, score: run(e, p // k, score, wg_ref, wu_ref, sg_ref, su_ref),
              dropped=lambda: store(zero, zero),  # (dropped rows still arrive: their h is 0)
              shared=lambda: run(jnp.int32(0), p - num_pairs, None, wgs_ref, wus_ref, sgs_ref, sus_ref))
    if finish:
        g_ref, u_ref, h_ref = outs

        @pl.when(_split_k.arrive(cnt_ref, p * pl.cdiv(f, block_n) + pid_n, num_splits, interpret=interpret))
        def _():
            tile = (p, pl.ds(n0, block_n))
            g, u = (_split_k.sum_partials(r, num_splits, tile, (block_n,), n_in) for r in (g_ref, u_ref))
            _store(h_ref.at[tile], (_silu(g) * u).astype(h_ref.dtype), n_in)


def _pair_down_kernel(*refs, f, d, k, num_pairs, block_n, block_k, kb_per_split, num_splits, n_gu_splits,
                      token_rows, has_scales, has_shared, logits_dtype, cdt, evict, interpret):
    """n_gu_splits == 0: h [P, F] (cdt) is kernel 1's finished SwiGLU output. n_gu_splits > 0: kernel 1 left f32
    split-K partials g, u [n_gu_splits, P, F]; they are summed and the SwiGLU applied here, on load (they sit
    in L2: a few KB per pair), which saves an XLA epilogue launch and a round trip of h through memory.
    has_shared: rows p >= num_pairs use the shared expert's down weights ([1, F, D], scales [1, D]).
    token_rows == 0: the output is y per row, f32 ([S, rows, D] partials if split-K), summed by XLA. token_rows
    (k + has_shared) > 0: the output is [N, D] in its final dtype; with more than one arrival per (token, D block)
    tile (token_rows x S), each program stores an f32 partial [S, rows, D] and the tile's last arrival (counter
    token * D blocks + n) sums the token's rows and splits into it; with one, the program stores it directly."""
    arrivals = token_rows * num_splits
    finish = arrivals > 1
    if finish:
        cnt_ref, *refs = refs
    if n_gu_splits:
        idx_ref, g_ref, u_ref, wd_ref, *rest = refs
    else:
        idx_ref, h_ref, wd_ref, *rest = refs
    sd_ref = wds_ref = sds_ref = None
    if has_scales:
        sd_ref, *rest = rest
    if has_shared:
        wds_ref, *rest = rest
        if has_scales:
            sds_ref, *rest = rest
    outs = rest
    p, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = pl.multiple_of(pid_n * block_n, block_n)
    n_in = _in_bounds(n0, block_n, d)
    kb_lo, kb_hi = _k_range(pid_s, pl.cdiv(f, block_k), kb_per_split)
    hint_w = "evict_first" if evict else None

    def h_tile(k0, k_in):
        if not n_gu_splits:
            return _load(h_ref.at[p, pl.ds(k0, block_k)], k_in)                               # [bk]

        def add_split(i, gu):  # a loop, not unrolled: 27 unrolled partial reads took Triton minutes to compile
            return (gu[0] + _load(g_ref.at[i, p, pl.ds(k0, block_k)], k_in),
                    gu[1] + _load(u_ref.at[i, p, pl.ds(k0, block_k)], k_in))

        zero = jnp.zeros((block_k,), jnp.float32)
        g, u = lax.fori_loop(0, n_gu_splits, add_split, (zero, zero))
        return (_silu(g) * u).astype(upcast.storage_dtype(cdt))  # rounded as a stored h would be     # [bk]

    def run(e, wd_ref, sd_ref):
        def body(kb, acc):
            k0 = pl.multiple_of(kb * block_k, block_k)
            k_in = _in_bounds(k0, block_k, f)
            ht, hs = upcast.to_compute(h_tile(k0, k_in), cdt)  # hs: a scalar (f16) or None
            ht = _pair_rows(ht)                                                               # [16, bk]
            wt = _load(wd_ref.at[e, pl.ds(k0, block_k), pl.ds(n0, block_n)], _mask2(k_in, n_in), hint_w)
            part = jnp.dot(ht, wt.astype(cdt), preferred_element_type=jnp.float32)  # [16, bk] x [bk, bn]
            return acc + (part if hs is None else part * hs)

        y = jnp.sum(lax.fori_loop(kb_lo, kb_hi, body, jnp.zeros((_MIN_BLOCK, block_n), jnp.float32)), axis=0)
        if has_scales:
            y = y * _load(sd_ref.at[e, pl.ds(n0, block_n)], n_in)
        store(y)

    def store(y):
        if finish or (not token_rows and num_splits > 1):
            _store(outs[0].at[pid_s, p, pl.ds(n0, block_n)], y, n_in)
        else:  # one row and split per output row (reduce="kernel": p is the token)
            _store(outs[0].at[p, pl.ds(n0, block_n)], y.astype(outs[0].dtype), n_in)

    num_experts = wd_ref.shape[0]
    pick = ((lambda q: top1_of_logits(idx_ref, q, num_experts, logits_dtype)) if logits_dtype is not None else
            (lambda q: (idx_ref[q], None)))
    _pair_row(p, pick, num_experts, num_pairs, has_shared,
              routed=lambda e, score: run(e, wd_ref, sd_ref),
              dropped=lambda: store(jnp.zeros((block_n,), jnp.float32)),  # (still arrives: a zero partial)
              shared=lambda: run(jnp.int32(0), wds_ref, sds_ref))  # int32 index, as for routed
    if finish:
        part_ref, o_ref = outs
        if not has_shared:
            t = p // k
        elif k == 0:
            t = p - num_pairs
        else:
            t = jnp.where(p < num_pairs, p // k, p - num_pairs)

        @pl.when(_split_k.arrive(cnt_ref, t * pl.cdiv(d, block_n) + pid_n, arrivals, interpret=interpret))
        def _():
            def add_row(j, acc):  # the token's k pair rows, then its shared row
                r = t * k + j if not has_shared else jnp.where(j < k, t * k + j, num_pairs + t)
                return acc + _split_k.sum_partials(part_ref, num_splits, (r, pl.ds(n0, block_n)), (block_n,), n_in)

            y = lax.fori_loop(0, token_rows, add_row, jnp.zeros((block_n,), jnp.float32))
            _store(o_ref.at[t, pl.ds(n0, block_n)], y.astype(o_ref.dtype), n_in)


def _splits(K, block_k, split_k):
    nk = pl.cdiv(K, block_k)
    split_k = max(1, min(split_k, nk))
    kb_per_split = pl.cdiv(nk, split_k)
    return pl.cdiv(nk, kb_per_split), kb_per_split  # no empty splits


def _gate_up(x_sorted, row_score, routing, w_gate, w_up, s_gate, s_up, *, block_m, block_n, block_k, split_k,
             num_warps, num_stages, cdt, evict, interpret, poison_output):
    R, D = x_sorted.shape
    F = w_gate.shape[2]
    split_k, kbps = _splits(D, block_k, split_k)
    partial = split_k > 1
    has_scales = s_gate is not None
    grid = (R // block_m, pl.cdiv(F, block_n), split_k)
    kernel = functools.partial(_gate_up_kernel, d=D, f=F, block_m=block_m, block_n=block_n, block_k=block_k,
                               kb_per_split=kbps, partial=partial, has_scales=has_scales, cdt=cdt, evict=evict)
    args = [routing.block_expert, routing.num_active_blocks, x_sorted, row_score, w_gate, w_up]
    if has_scales:
        args += [s_gate.astype(jnp.float32), s_up.astype(jnp.float32)]
    outs = ([jax.ShapeDtypeStruct((split_k, R, F), jnp.float32)] * 2 if partial
            else [jax.ShapeDtypeStruct((R, F), upcast.storage_dtype(cdt))])
    res = _call(kernel, args, outs, grid, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                poison_output=poison_output, name=f"moe_gate_up_m{block_m}_n{block_n}_k{block_k}_s{split_k}")
    if partial:  # epilogue of the split-K partials (decode: R is a few blocks)
        return swiglu_of_partials(res[0], res[1], upcast.storage_dtype(cdt))
    return res[0]


def _down(h, routing, w_down, s_down, *, block_m, block_n, block_k, split_k, num_warps, num_stages, out_dtype,
          cdt, evict, interpret, poison_output):
    R, F = h.shape
    D = w_down.shape[2]
    split_k, kbps = _splits(F, block_k, split_k)
    partial = split_k > 1
    has_scales = s_down is not None
    grid = (R // block_m, pl.cdiv(D, block_n), split_k)
    kernel = functools.partial(_down_kernel, f=F, d=D, block_m=block_m, block_n=block_n, block_k=block_k,
                               kb_per_split=kbps, partial=partial, has_scales=has_scales, cdt=cdt, evict=evict)
    args = [routing.block_expert, routing.num_active_blocks, h, w_down]
    if has_scales:
        args.append(s_down.astype(jnp.float32))
    out = jax.ShapeDtypeStruct((split_k, R, D) if partial else (R, D), jnp.float32 if partial else out_dtype)
    (y,) = _call(kernel, args, [out], grid, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                 poison_output=poison_output, name=f"moe_down_m{block_m}_n{block_n}_k{block_k}_s{split_k}")
    return jnp.sum(y, axis=0) if partial else y


# ----------------------------------------------------------------------------------------------------------
# Configuration and public API
# ----------------------------------------------------------------------------------------------------------

def _stages(bytes_per_stage, budget=160 * 1024):
    """Software-pipelining depth that keeps the staged tiles within ~160 KB of shared memory (H100: 227 KB)."""
    return int(max(2, min(4, budget // max(1, bytes_per_stage))))


# From this many pairs per expert on average (prefill: 4096 tokens over 128 experts is 32) the sorted path is
# compute-bound and takes PREFILL_TILES. On one H200 at Maverick's full width, 4096 tokens top-1 (docs/benchmarks.md
# section 29): 11.0 ms against 20.1 ms with the decode-tuned rule's tiles (32 x 64 x 256, 4 warps); 32 or 16 rows a
# block 13.7 / 15.1 ms, 128 rows 37.5 ms, 4 warps 20.0 ms, 512 wide 22.3 ms, 128 deep 11.7 ms.
PREFILL_PAIRS_PER_EXPERT = 32
PREFILL_TILES = dict(block_m=64, block_n=256, block_k=64, num_warps=8)
# From this many (16384 tokens over 128 experts), 128-row tiles: at 16384 tokens 24.8 ms against PREFILL_TILES'
# 27.3 (docs/benchmarks.md section 30; 64 x 128 x 128 31.5, 64 x 256 x 128 28.2); at 8192 tokens (64 per expert)
# PREFILL_TILES stay faster, 15.9 against 16.7 ms.
LONG_PREFILL_PAIRS_PER_EXPERT = 128
LONG_PREFILL_TILES = dict(block_m=128, block_n=128, block_k=64, num_warps=8)


def default_config(num_pairs, num_experts, D, F, weight_itemsize=1, num_sms=NUM_SMS_H100):
    """Heuristic blocks. From PREFILL_PAIRS_PER_EXPERT pairs per expert on average: PREFILL_TILES (64 rows, 256
    wide, 64 deep, 8 warps), from LONG_PREFILL_PAIRS_PER_EXPERT LONG_PREFILL_TILES (128 rows, 128 wide). Below
    (decode, small batches: the weights' bytes matter): block_m the average pairs per expert as a power of two in
    [16, 64], tiles 64 wide and 256 deep (fp8_gemm's H100 weight-only sweep), 4
    warps. Split-K when (an upper bound of the active row blocks) x (N blocks) would leave SMs idle, aiming at ~2
    programs per SM with >= 2 K steps per split. Stages from a shared-memory estimate (kernel 1 stages an x tile
    and two weight tiles)."""
    P, E = num_pairs, num_experts
    per_expert = pl.cdiv(P, E)
    if per_expert >= PREFILL_PAIRS_PER_EXPERT:
        tiles = LONG_PREFILL_TILES if per_expert >= LONG_PREFILL_PAIRS_PER_EXPERT else PREFILL_TILES
        bm, bn, bk, warps = (tiles[k] for k in ("block_m", "block_n", "block_k", "num_warps"))
    else:
        bm, bn, bk, warps = min(64, max(_MIN_BLOCK, _next_pow2(pl.cdiv(P, E)))), 64, 256, 4
    est_blocks = min(E, P) + P // bm  # active row blocks are <= this (and about min(E, P) at decode)

    def split(n_out, K):
        programs = est_blocks * pl.cdiv(n_out, bn)
        if programs >= num_sms:
            return 1
        return int(max(1, min(pl.cdiv(2 * num_sms, programs), pl.cdiv(K, bk) // 2)))

    x_bytes = bm * bk * 2
    return dict(block_m=bm, block_n=bn, block_k=bk, split_k=split(F, D), block_n_down=bn, block_k_down=bk,
                split_k_down=split(D, F), num_warps=warps,
                num_stages=_stages(x_bytes + 2 * bk * bn * weight_itemsize),
                num_stages_down=_stages(x_bytes + bk * bn * weight_itemsize))


def _check_block(name, v):
    if v < _MIN_BLOCK or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of two >= {_MIN_BLOCK} (Triton blocks / dot operands)")


def _check_args(x, expert_idx, scores, w_gate, w_up, w_down, scales):
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got {x.shape}")
    N, D = x.shape
    if w_gate.ndim != 3 or w_gate.shape[1] != D or w_up.shape != w_gate.shape:
        raise ValueError(f"w_gate / w_up must both be [E, D={D}, F], got {w_gate.shape} / {w_up.shape}")
    E, _, F = w_gate.shape
    if w_down.shape != (E, F, D):
        raise ValueError(f"w_down must be [E={E}, F={F}, D={D}], got {w_down.shape}")
    if expert_idx.ndim != 2 or expert_idx.shape[0] != N or scores.shape != expert_idx.shape:
        raise ValueError(f"expert_idx / scores must both be [N={N}, k], got {expert_idx.shape} / {scores.shape}")
    fp8 = [w.dtype == FP8 for w in (w_gate, w_up, w_down)]
    if scales is None:
        if any(fp8):
            raise ValueError("FP8 expert weights need scales (s_gate [E, F], s_up [E, F], s_down [E, D])")
    else:
        want = ((E, F), (E, F), (E, D))
        if len(scales) != 3 or tuple(tuple(s.shape) for s in scales) != want:
            raise ValueError(f"scales must be (s_gate, s_up, s_down) of shapes {want}, got "
                             f"{[getattr(s, 'shape', None) for s in scales]}")
    return N, D, E, F


_STATIC = ("method", "block_m", "block_n", "block_k", "split_k", "block_n_down", "block_k_down", "split_k_down",
           "num_warps", "num_stages", "num_stages_down", "evict", "compute_dtype", "interpret", "poison_output",
           "reduce", "gu_epilogue", "mosaic")


@functools.partial(jax.jit, static_argnames=_STATIC)
def moe_fp8(x, expert_idx, scores, w_gate, w_up, w_down, scales=None, *, shared=None, method="auto", block_m=None,
            block_n=None, block_k=None, split_k=None, block_n_down=None, block_k_down=None, split_k_down=None,
            num_warps=None, num_stages=None, num_stages_down=None, evict=True, compute_dtype=None, interpret=False,
            poison_output=False, reduce=None, gu_epilogue=None, mosaic=None):
    """Routed experts of a Llama 4 MoE layer: `moe_reference` semantics, two Pallas launches over all experts.

    x [N, D]; expert_idx, scores [N, k]; w_gate, w_up [E, D, F]; w_down [E, F, D]: FP8 (e4m3fn) with
    scales = (s_gate [E, F], s_up [E, F], s_down [E, D]) float32 per (expert, output channel), or bf16 /
    f32 with scales=None. Returns [N, D] in x's dtype.
    Blocks (powers of two >= 16; None = `default_config`): block_m rows per row block (each row block holds
    pairs of one expert), kernel 1 (gate/up) block_n over F / block_k over D / split_k, kernel 2 (down)
    block_n_down over D / block_k_down over F / split_k_down. num_warps / num_stages (kernel 1) /
    num_stages_down (kernel 2): Triton compiler parameters. evict: L2 hints (stream weights, keep x / h).
    compute_dtype: dtype of the in-register dots (default: upcast.compute_dtype; the pair path's one-row programs
      use float16, row blocks above 16 rows bfloat16; f16 activations are rescaled by powers of two in the
      kernel); h is stored in upcast.storage_dtype of it (bf16 for f16).
    poison_output: debugging aid, every kernel output starts as NaN (aliased in).
    interpret: Pallas interpreter (CPU tests).
    method: "sorted" (grouped GEMM over expert-sorted row blocks), "pairs" (`moe_fp8_pairs`: one program row
    per (token, expert) pair, no sort) or "auto": pairs up to PAIRS_MAX pairs (decode), sorted beyond.
    mosaic: the pairs on the Mosaic GPU weight-only GEMM instead (`moe_mgpu.moe_fp8_mgpu`: up to 16 pairs, FP8
    with per-channel scales; the score applied to the gate and up products), and above 16 pairs its sorted path
    (`moe_mgpu.moe_fp8_mgpu_sorted`: bf16 x, no shared expert): False never; True always (a ValueError where it
    does not apply); None with method "auto" and no Triton tile given, where `moe_mgpu.wanted` /
    `moe_mgpu.sorted_wanted` (on a Hopper GPU): 20-30% under the Triton pair path at the 8-way shard and full
    width, 1 and 8 tokens (docs/benchmarks.md section 21); 1.7-3.0x under the Triton sorted path at full width
    from 32 to 16384 tokens (section 31).
    shared: the shared expert, run inside the pair path's launches (`moe_fp8_pairs`, or the Mosaic GPU path's);
    the result is then routed + shared. The sorted path does not take it (at prefill sizes the shared expert is
    a GEMM of its own).
    reduce, gu_epilogue: the pair path's (`moe_fp8_pairs`): where split-K partials are summed (default: in the
    kernels that made them); the sorted path always sums its partials in XLA."""
    N, D, E, F = _check_args(x, expert_idx, scores, w_gate, w_up, w_down, scales)
    P = expert_idx.size
    if method not in ("auto", "pairs", "sorted"):
        raise ValueError(f"method must be 'auto', 'pairs' or 'sorted', got {method!r}")
    triton_args = (block_m, block_n, block_k, split_k, block_n_down, block_k_down, split_k_down, num_warps,
                   num_stages, num_stages_down, compute_dtype, reduce, gu_epilogue)
    auto = method == "auto" and not poison_output and all(v is None for v in triton_args)
    if (mosaic and P <= moe_mgpu.MAX_PAIRS) or (mosaic is None and auto and moe_mgpu.wanted(P, D, F, scales)):
        return moe_mgpu.moe_fp8_mgpu(x, expert_idx, scores, w_gate, w_up, w_down, scales, shared=shared,
                                     interpret=mgpu_gemv.interpret_params(interpret))
    if shared is None and (mosaic or (mosaic is None and auto and moe_mgpu.sorted_wanted(P, E, D, F, scales, x.dtype))):
        return moe_mgpu.moe_fp8_mgpu_sorted(x, expert_idx, scores, w_gate, w_up, w_down, scales,
                                            interpret=mgpu_gemv.interpret_params(interpret))
    pairs = method == "pairs" or (method == "auto" and P <= PAIRS_MAX and block_m is None)
    if shared is not None and not pairs:
        raise ValueError(f"shared= runs on the pair path only (method 'pairs', or 'auto' with at most "
                         f"{PAIRS_MAX} pairs and no block_m); got method {method!r} with {P} pairs")
    if P == 0 and shared is None:
        return jnp.zeros((N, D), x.dtype)
    if pairs:
        return moe_fp8_pairs(
            x, expert_idx, scores, w_gate, w_up, w_down, scales, shared=shared, block_n=block_n, block_k=block_k,
            split_k=split_k, block_n_down=block_n_down, block_k_down=block_k_down, split_k_down=split_k_down,
            num_warps=num_warps, num_stages=num_stages, num_stages_down=num_stages_down, evict=evict,
            compute_dtype=compute_dtype, reduce=reduce, gu_epilogue=gu_epilogue, interpret=interpret,
            poison_output=poison_output)
    cfg = default_config(P, E, D, F, jnp.dtype(w_gate.dtype).itemsize)
    block_m = block_m or cfg["block_m"]
    _check_block("block_m", block_m)
    routing = sort_tokens(expert_idx, E, block_m)
    return moe_fp8_sorted(
        x, routing, scores, w_gate, w_up, w_down, scales, block_n=block_n, block_k=block_k, split_k=split_k,
        block_n_down=block_n_down, block_k_down=block_k_down, split_k_down=split_k_down, num_warps=num_warps,
        num_stages=num_stages, num_stages_down=num_stages_down, evict=evict, compute_dtype=compute_dtype,
        interpret=interpret, poison_output=poison_output)


def moe_fp8_sorted(x, routing: MoERouting, scores, w_gate, w_up, w_down, scales=None, *, block_n=None,
                   block_k=None, split_k=None, block_n_down=None, block_k_down=None, split_k_down=None,
                   num_warps=None, num_stages=None, num_stages_down=None, evict=True, compute_dtype=None,
                   interpret=False, poison_output=False):
    """`moe_fp8` after `sort_tokens` (block_m is the routing's: R / number of row blocks): gather, the two
    kernels, combine. Arguments as `moe_fp8`."""
    N, D = x.shape
    E, _, F = w_gate.shape
    P = routing.pair_row.shape[0]
    k = P // N
    R = routing.row_pair.shape[0]
    block_m = R // routing.block_expert.shape[0]
    cfg = default_config(P, E, D, F, jnp.dtype(w_gate.dtype).itemsize)
    pick = lambda v, key: cfg[key] if v is None else v  # noqa: E731
    block_n, block_k, split_k = pick(block_n, "block_n"), pick(block_k, "block_k"), pick(split_k, "split_k")
    block_n_down, block_k_down = pick(block_n_down, "block_n_down"), pick(block_k_down, "block_k_down")
    split_k_down, num_warps = pick(split_k_down, "split_k_down"), pick(num_warps, "num_warps")
    num_stages, num_stages_down = pick(num_stages, "num_stages"), pick(num_stages_down, "num_stages_down")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k),
                    ("block_n_down", block_n_down), ("block_k_down", block_k_down)):
        _check_block(name, v)
    compute_dtype = upcast.compute_dtype(compute_dtype, rows=block_m)
    sg, su, sd = scales if scales is not None else (None, None, None)

    # Sorted input rows; padding rows (row_pair == P) read token 0 with score 0.
    row_token = jnp.minimum(routing.row_pair // k, N - 1)
    row_score = jnp.concatenate([scores.reshape(-1).astype(x.dtype), jnp.zeros((1,), x.dtype)])[routing.row_pair]
    x_sorted = x[row_token]                                                                    # [R, D]
    common = dict(block_m=block_m, num_warps=num_warps, evict=evict, interpret=interpret,
                  poison_output=poison_output)
    h = _gate_up(x_sorted, row_score, routing, w_gate, w_up, sg, su, block_n=block_n, block_k=block_k,
                 split_k=split_k, num_stages=num_stages, cdt=jnp.dtype(compute_dtype), **common)  # [R, F]
    y_sorted = _down(h, routing, w_down, sd, block_n=block_n_down, block_k=block_k_down, split_k=split_k_down,
                     num_stages=num_stages_down, out_dtype=x.dtype if k == 1 else jnp.float32,
                     cdt=jnp.dtype(compute_dtype), **common)
    # Back to token order: each pair's row (zero for dropped pairs, whose row is past the buffer), summed over
    # the k slots of its token.
    y = jnp.take(y_sorted, routing.pair_row, axis=0, mode="fill", fill_value=0).reshape(N, k, D)
    return (y[:, 0] if k == 1 else jnp.sum(y.astype(jnp.float32), axis=1)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Decode path: one program row per (token, expert) pair, no sorting
# ----------------------------------------------------------------------------------------------------------

# moe_fp8 takes the pair path up to this many (token, expert) pairs (decode and small verify batches): beyond
# it, reading each pair's expert separately costs more than sorting pairs into shared row blocks.
PAIRS_MAX = 16


def pairs_config(num_pairs, D, F, num_sms=NUM_SMS_H100):
    """Blocks of the pair path: fp8_gemm.weight_only_blocks over the pairs' output blocks (each program row
    is one pair), for kernel 1 (two [block_k, block_n] tiles per step: gate and up) and kernel 2 (down)."""
    gu = weight_only_blocks(num_pairs * F, D, tiles=2, num_sms=num_sms)
    dn = weight_only_blocks(num_pairs * D, F, tiles=1, num_sms=num_sms)
    return dict(block_n=gu["block_n"], block_k=gu["block_k"], split_k=gu["split_k"], block_n_down=dn["block_n"],
                block_k_down=dn["block_k"], split_k_down=dn["split_k"], num_warps=4, num_stages=gu["num_stages"],
                num_stages_down=dn["num_stages"])


def moe_fp8_pairs(x, expert_idx, scores, w_gate, w_up, w_down, scales=None, *, shared=None, router_logits=None,
                  block_n=None, block_k=None, split_k=None, block_n_down=None, block_k_down=None,
                  split_k_down=None, num_warps=None, num_stages=None, num_stages_down=None, evict=True,
                  compute_dtype=None, reduce=None, gu_epilogue=None, interpret=False, poison_output=False):
    """`moe_fp8` for few pairs: each (token, expert) pair reads its expert's weights directly (see the module
    docstring). Arguments as `moe_fp8` (no block_m: one row per pair).

    router_logits: None, or the router's logits [N, E] (rounded to x's dtype), or float32 partials [P, N, E]
    of them (fused_norm.add_rms_norm(router=...): summed, then rounded), with expert_idx = scores = None:
    Llama 4's top-1 sigmoid routing (mavjax.model.route with k = 1) is done by the kernels' programs
    themselves (`top1_of_logits`), so no XLA argmax or sigmoid kernel runs between the router and these
    launches.

    reduce: who finishes kernel 2's sums (its split-K partials, a token's k pair rows and its shared row) and the
    cast: "kernel" (the last arriving program of each output tile, `pallas_kernels/split_k.py`'s protocol: the
    output leaves kernel 2 final, no XLA op after it) or "xla" (kernel 2 writes f32 rows, one XLA fusion sums
    and casts: the earlier path, kept for A/B runs); None: `split_k.default_reduce("moe")`
    (split_k.DEFAULTS: "xla", measured faster; MAVJAX_SPLIT_K_REDUCE overrides).
    gu_epilogue: where kernel 1's split-K partials are summed and the SwiGLU applied, when kernel 1 splits K:
    "kernel" (the last split of each h tile, which writes h [rows, F] (upcast.storage_dtype): no launch in between
    and kernel 2 reads h once), "down" (in kernel 2, as it loads its h tiles: each of kernel 2's D blocks re-reads
    all partials of its K range from L2) or "xla" (one small XLA fusion writes h). None: "kernel" with
    reduce="kernel"; with reduce="xla", "xla" when the shared expert rides along (the model's decode: 4-7%
    faster than "down" at the 8-way rank's and at full width, section 12) and "down" otherwise. Which is
    fastest depends on the split counts and the GPU: scripts/tune_decode_kernels.py times them.

    shared: None, or Llama 4's shared expert (w_gate [D, F], w_up [D, F], w_down [F, D], scales), scales None
    or (s_gate [F], s_up [F], s_down [D]), in the routed experts' dtypes and with their F: it runs as one more
    program row per token in the same two launches (input not scaled by a router score), and the result is
    routed + shared, what `mavjax.model.MoE` computes. At decode this saves the shared expert's own launches
    (the gate/up + SwiGLU kernel, the down GEMM, their split-K reductions)."""
    N, D = x.shape
    E, _, F = w_gate.shape
    route_in_kernel = router_logits is not None
    if route_in_kernel and (expert_idx is not None or scores is not None or router_logits.shape[-2:] != (N, E)
                            or router_logits.ndim not in (2, 3)
                            or (router_logits.ndim == 3 and router_logits.dtype != jnp.float32)):
        raise ValueError(f"router_logits must be [N={N}, E={E}] (or float32 partials [P, N, E]) with expert_idx "
                         f"and scores None, got {router_logits.shape} {router_logits.dtype} with expert_idx "
                         f"{getattr(expert_idx, 'shape', None)}")
    k = 1 if route_in_kernel else expert_idx.shape[1]
    logits_dtype = jnp.dtype(x.dtype) if route_in_kernel else None  # the XLA path's logits: the model's dtype
    P = N * k
    has_shared = shared is not None
    if has_shared:
        wgs, wus, wds, s_sh = shared
        if wgs.shape != (D, F) or wus.shape != (D, F) or wds.shape != (F, D):
            raise ValueError(f"shared expert must be w_gate/w_up [D={D}, F={F}] and w_down [F, D] (the routed "
                             f"experts' F), got {wgs.shape} / {wus.shape} / {wds.shape}")
        if (s_sh is None) != (scales is None) or any(w.dtype != w_gate.dtype for w in (wgs, wus, wds)):
            raise ValueError("the shared expert must be stored like the routed experts (same dtype, and scales "
                             "exactly when they have them)")
        if s_sh is not None and tuple(tuple(v.shape) for v in s_sh) != ((F,), (F,), (D,)):
            raise ValueError(f"shared expert scales must be [F={F}], [F], [D={D}], got "
                             f"{[tuple(v.shape) for v in s_sh]}")
    rows = P + (N if has_shared else 0)  # program rows: the routed pairs, then one shared row per token
    cfg = pairs_config(rows, D, F)
    pick = lambda v, key: cfg[key] if v is None else v  # noqa: E731
    block_n, block_k, split_k = pick(block_n, "block_n"), pick(block_k, "block_k"), pick(split_k, "split_k")
    block_n_down, block_k_down = pick(block_n_down, "block_n_down"), pick(block_k_down, "block_k_down")
    split_k_down, num_warps = pick(split_k_down, "split_k_down"), pick(num_warps, "num_warps")
    num_stages, num_stages_down = pick(num_stages, "num_stages"), pick(num_stages_down, "num_stages_down")
    for name, v in (("block_n", block_n), ("block_k", block_k), ("block_n_down", block_n_down),
                    ("block_k_down", block_k_down)):
        _check_block(name, v)
    cdt = upcast.compute_dtype(compute_dtype)
    h_dtype = upcast.storage_dtype(cdt)  # of h between the two kernels
    sg, su, sd = scales if scales is not None else (None, None, None)
    has_scales = scales is not None
    if route_in_kernel:  # the logits in place of the ids; the scores come from them too (sc unread)
        idx, sc = router_logits, jnp.zeros((1,), x.dtype)
    else:
        idx = expert_idx.reshape(-1).astype(jnp.int32)                                          # [P]
        sc = scores.reshape(-1).astype(x.dtype)                                                 # [P]
    # a pair whose id is outside [0, E) is dropped: its programs store zeros and read no weights
    common = dict(num_warps=num_warps, interpret=interpret, poison_output=poison_output)

    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    # the shared expert as a one-expert stack ([1, D, F] ...: free reshapes), indexed like the routed ones
    sh1 = sh2 = []
    if has_shared:
        sh1 = [wgs[None], wus[None]] + ([f32(s_sh[0])[None], f32(s_sh[1])[None]] if has_scales else [])
        sh2 = [wds[None]] + ([f32(s_sh[2])[None]] if has_scales else [])

    reduce = _split_k.default_reduce("moe", reduce)
    if gu_epilogue is None:  # measured (docs/benchmarks.md section 12): with the shared expert's row, XLA's sum
        gu_epilogue = "kernel" if reduce == "kernel" else "xla" if has_shared else "down"
    if gu_epilogue not in ("kernel", "down", "xla"):
        raise ValueError(f"gu_epilogue must be 'kernel', 'down' or 'xla', got {gu_epilogue!r}")

    # Kernel 1: h [rows, F] = silu(xs @ gate_e) * (xs @ up_e), xs = x[token] * score (shared rows: x[token]).
    split1, kbps1 = _splits(D, block_k, split_k)
    finish1 = split1 > 1 and gu_epilogue == "kernel"
    # Kernel 2: out [N, D] = sum over each token's rows (k pairs, shared) of h @ down_e.
    split2, kbps2 = _splits(F, block_k_down, split_k_down)
    token_rows = k + has_shared if reduce == "kernel" else 0
    finish2 = token_rows * split2 > 1
    nf, nd = pl.cdiv(F, block_n), pl.cdiv(D, block_n_down)
    # One set of tile counters for both launches (zero between them): see split_k.counters.
    cnt = [_split_k.counters(max(rows * nf if finish1 else 0, N * nd if finish2 else 0))]

    kern1 = functools.partial(_pair_gate_up_kernel, k=k, d=D, f=F, num_pairs=P, block_n=block_n, block_k=block_k,
                              kb_per_split=kbps1, num_splits=split1, finish=finish1, has_scales=has_scales,
                              has_shared=has_shared, logits_dtype=logits_dtype, cdt=cdt, evict=evict,
                              interpret=interpret)
    args1 = (cnt if finish1 else []) + [idx, sc, x, w_gate, w_up] + ([f32(sg), f32(su)] if has_scales else []) + sh1
    part1 = jax.ShapeDtypeStruct((split1, rows, F), jnp.float32)
    outs1 = ([part1] * 2 if split1 > 1 else []) + ([jax.ShapeDtypeStruct((rows, F), h_dtype)]
                                                  if split1 == 1 or finish1 else [])
    res = _call(kern1, args1, outs1, (rows, nf, split1), num_stages=num_stages,
                name=f"moe_gate_up_pairs_n{block_n}_k{block_k}_s{split1}{'_fin' if finish1 else ''}"
                     f"{'_route' if route_in_kernel else ''}", **common)
    # h [rows, F] (split1 == 1 or finish1), else the f32 partials of g and u: summed + SwiGLU'd by XLA or kernel 2
    if finish1:
        res = res[2:]
    elif split1 > 1 and gu_epilogue == "xla":
        res = (swiglu_of_partials(res[0], res[1], h_dtype),)  # h [rows, F]
    n_gu_splits = split1 if len(res) == 2 else 0

    kern2 = functools.partial(_pair_down_kernel, f=F, d=D, k=k, num_pairs=P, block_n=block_n_down,
                              block_k=block_k_down, kb_per_split=kbps2, num_splits=split2, n_gu_splits=n_gu_splits,
                              token_rows=token_rows, has_scales=has_scales, has_shared=has_shared,
                              logits_dtype=logits_dtype, cdt=cdt, evict=evict, interpret=interpret)
    args2 = (cnt if finish2 else []) + [idx, *res, w_down] + ([f32(sd)] if has_scales else []) + sh2
    if token_rows:
        outs2 = ([jax.ShapeDtypeStruct((split2, rows, D), jnp.float32)] if finish2 else []) + [
            jax.ShapeDtypeStruct((N, D), x.dtype)]
    else:
        outs2 = [jax.ShapeDtypeStruct((split2, rows, D) if split2 > 1 else (rows, D), jnp.float32)]
    y = _call(kern2, args2, outs2, (rows, nd, split2), num_stages=num_stages_down,
              name=f"moe_down_pairs_n{block_n_down}_k{block_k_down}_s{split2}{'_fin' if token_rows else ''}"
                   f"{'_route' if route_in_kernel else ''}",
              **common)[-1]
    if token_rows:
        return y                                                                                # [N, D] final
    y = jnp.sum(y, axis=0) if split2 > 1 else y                                                 # [rows, D] f32
    out = jnp.sum(y[:P].reshape(N, k, D), axis=1)                                               # [N, D]
    if has_shared:
        out = out + y[P:]
    return out.astype(x.dtype)
