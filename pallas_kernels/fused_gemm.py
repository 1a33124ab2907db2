"""FP8 GEMMs with fused epilogues (Pallas, Triton lowering), beside their plain jax.numpy references.

Two fusions of pallas_kernels/fp8_gemm.py's kernels (same arithmetic: FP8 e4m3 weights with a float32 scale
per output channel, [K, N] layout or [N, K] with w_transposed (the Hugging Face layout, K contiguous, as
fp8_gemm's kernels take it); "weight_only" = bf16 activations x weights upcast in registers, the
decode path; "fp8_fp8" = activations quantized per token, FP8 tensor-core dot, the prefill path; "auto"
picks as fp8_matmul does, weight_only for M <= 64):

  * `gate_up_swiglu`: h = silu(x @ Wg) * (x @ Wu). One program reads the w_gate and w_up tiles of the same
    output columns against one x tile, keeps two f32 accumulators and writes silu(g) * u: the [M, F] g and
    u never go to memory (the dense MLP and the MoE shared expert).
  * `qkv_rope`: q, k, v = x @ Wq, x @ Wk, x @ Wv with, in the epilogue, RoPE on q and k (Meta's interleaved
    pairs, as mavjax.model.apply_rope), the qk L2 norm (RoPE layers with use_qk_norm) and the NoPE layers'
    per-position attention-temperature scale of q. One launch covers the three weights: the column blocks
    of q, k and v are one grid axis and each program picks its weight by program id (pl.when branches), so
    the weights are read where they lie - no [D, (H+2K)*Dh] concatenation, neither at load time (which would
    change the parameter tree that checkpoints, quantization and sharding rules name) nor per call (which
    would copy every weight byte once more per step, doubling the traffic this kernel exists to save).

RoPE in registers: output column c (within a head) pairs with c ^ 1. The accumulator tile's partner
columns are produced by one exact permutation matmul (f32 x a 0/1 matrix, IEEE precision: each output is
one input times 1), then out = acc * cos2 + partner * sin2, where cos2[c] = cos(pos * f[c // 2]) and
sin2[c] = -sin(.) on even c, +sin(.) on odd c ([M, Dh] tables built once per call from the model's
rope tables). Block_n must divide Dh, so a tile never straddles two heads.

Split-K (decode: few N blocks would leave most SMs idle): RoPE and the temperature are linear, so each
split applies them to its partial and stores it (f32). With reduce="kernel" (split_k.default_reduce(family)) the
kernel finishes the sum itself (pallas_kernels/split_k.py): the last split of each output tile - for the qk
norm, of each head, whose column blocks (block_n < Dh) are programs too - sums the partials and runs what is
not linear, SwiGLU or the norm, so the GEMM's launch is the only one. reduce="xla" keeps the older epilogue,
a jnp sum plus SwiGLU / norm (1-2 more small kernels), for A/B runs. Ragged M, N, K are masked loads/stores,
as in fp8_gemm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.fp8_gemm import (
    FP8, plgpu, _call, _silu, _exact_upcast, _in_bounds, _load, _mask2, _next_pow2, _store, default_config,
    quantize_activation_per_token, swiglu_of_partials)
from pallas_kernels import mgpu_gemv, upcast
from pallas_kernels.k_loop import stream_k
from pallas_kernels.split_k import arrive, counters, default_reduce, sum_partials

__all__ = ["gate_up_swiglu_ref", "gate_up_swiglu", "qkv_rope_ref", "qkv_rope", "rope_columns"]


# ----------------------------------------------------------------------------------------------------------
# References (plain jnp, float32 at HIGHEST precision on the dequantized weights)
# ----------------------------------------------------------------------------------------------------------

def _deq(w, s):
    return _exact_upcast(w) * s.astype(jnp.float32)[None, :]


def _x_for(x, mode):
    """The activations each mode actually multiplies: x itself, or x through per-token e4m3 quantization."""
    if mode == "fp8_fp8":
        xq, xs = quantize_activation_per_token(x)
        return _exact_upcast(xq) * xs[:, None]
    return x.astype(jnp.float32)


def gate_up_swiglu_ref(x, wg, sg, wu, su, *, mode="weight_only", out_dtype=None):
    """silu(x @ deq(wg)) * (x @ deq(wu)) in float32, cast. x [M, D], wg/wu [D, F] FP8, sg/su [F]."""
    hi = lax.Precision.HIGHEST
    xx = _x_for(x, mode)
    g = jnp.dot(xx, _deq(wg, sg), precision=hi)  # [M, D] x [D, F] -> [M, F]
    u = jnp.dot(xx, _deq(wu, su), precision=hi)  # [M, D] x [D, F] -> [M, F]
    return (_silu(g) * u).astype(out_dtype or x.dtype)


def rope_columns(cos, sin):
    """Model rope tables cos, sin [M, Dh/2] -> per-column tables [M, Dh]: cos2[c] = cos[c // 2], sin2[c] =
    -sin[c // 2] on even c and +sin[c // 2] on odd c, so rope(x) = x * cos2 + x[c ^ 1] * sin2."""
    cos2 = jnp.repeat(cos.astype(jnp.float32), 2, axis=-1)
    sin2 = jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], -1).astype(jnp.float32)
    return cos2, sin2


def _rope_ref(y, cos2, sin2, Dh):
    M, N = y.shape
    yh = y.reshape(M, N // Dh, Dh)
    partner = yh.reshape(M, N // Dh, Dh // 2, 2)[..., ::-1].reshape(M, N // Dh, Dh)  # column c ^ 1
    return (yh * cos2[:, None] + partner * sin2[:, None]).reshape(M, N)


def _l2norm_heads(y, Dh, eps):
    M, N = y.shape
    yh = y.reshape(M, N // Dh, Dh)
    return (yh * lax.rsqrt(jnp.mean(yh * yh, axis=-1, keepdims=True) + eps)).reshape(M, N)


def qkv_rope_ref(x, wq, sq, wk, sk, wv, sv, *, head_dim, rope=None, q_row_scale=None, qk_norm_eps=None,
                 mode="weight_only", out_dtype=None):
    """q, k, v [M, N*] of the fused kernel, in float32 then cast. rope: None or (cos, sin) [M, Dh/2] (the
    model's tables, flattened over tokens); q_row_scale: None or [M] (attention temperature); qk_norm_eps:
    None or the eps of the L2 norm of q and k (after RoPE, rounded to out_dtype first, as the model does)."""
    hi = lax.Precision.HIGHEST
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    xx = _x_for(x, mode)
    q = jnp.dot(xx, _deq(wq, sq), precision=hi)  # [M, D] x [D, H*Dh]
    k = jnp.dot(xx, _deq(wk, sk), precision=hi)  # [M, D] x [D, K*Dh]
    v = jnp.dot(xx, _deq(wv, sv), precision=hi)  # [M, D] x [D, K*Dh]
    if rope is not None:
        cos2, sin2 = rope_columns(*rope)
        q, k = _rope_ref(q, cos2, sin2, head_dim), _rope_ref(k, cos2, sin2, head_dim)
    if qk_norm_eps is not None:
        rnd = lambda y: y.astype(out_dtype).astype(jnp.float32)  # noqa: E731
        q, k = _l2norm_heads(rnd(q), head_dim, qk_norm_eps), _l2norm_heads(rnd(k), head_dim, qk_norm_eps)
    if q_row_scale is not None:
        q = q * q_row_scale.astype(jnp.float32)[:, None]
    return q.astype(out_dtype), k.astype(out_dtype), v.astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Shared kernel pieces
# ----------------------------------------------------------------------------------------------------------

def _k_loop(x_ref, w_refs, n0s, n_ins, *, m0, m_in, k, block_m, block_n, block_k, kb_lo, kb_hi, steps, x_fp8,
            cdt, evict, w_transposed=False):
    """f32 accumulators x[m0:m0+bm] @ w[:, n0:n0+bn] for each (w, n0) over K blocks [kb_lo, kb_hi) (at most
    `steps`): the x tile is loaded once per K step and shared by every weight (pallas_kernels/k_loop.py).
    w_transposed: each w is stored [N, K] (its tiles [bn, bk], K contiguous), as fp8_gemm's kernels take it."""
    hint_x, hint_w = ("evict_last", "evict_first") if (evict and not x_fp8) else (None, None)

    def load_x(kb):
        k0 = pl.multiple_of(kb * block_k, block_k)
        return _load(x_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)], _mask2(m_in, _in_bounds(k0, block_k, k)),
                     hint_x)                                                                    # [bm, bk]

    def load_ws(kb):
        k0 = pl.multiple_of(kb * block_k, block_k)
        k_in = _in_bounds(k0, block_k, k)
        if w_transposed:
            return tuple(_load(w_ref.at[pl.ds(n0, block_n), pl.ds(k0, block_k)], _mask2(n_in, k_in), hint_w)
                         for w_ref, n0, n_in in zip(w_refs, n0s, n_ins))                       # [bn, bk] each
        return tuple(_load(w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], _mask2(k_in, n_in), hint_w)
                     for w_ref, n0, n_in in zip(w_refs, n0s, n_ins))                           # [bk, bn] each

    dims = (((1,), (1 if w_transposed else 0,)), ((), ()))  # x [bm, bk] against w's K axis

    def step(kb, xt, ws, accs):  # xt [bm, bk]: FP8 as loaded, else in cdt (f16: scaled per row)
        # e4m3 -> f16 / bf16 is exact
        return tuple(acc + lax.dot_general(xt, w if x_fp8 else w.astype(cdt), dims,
                                           preferred_element_type=jnp.float32)
                     for w, acc in zip(ws, accs))                                              # [bm, bn]

    zero = jnp.zeros((block_m, block_n), jnp.float32)
    accs, x_s = stream_k(load_x, load_ws, step, tuple(zero for _ in w_refs), kb_lo, kb_hi, steps,
                         (block_m, block_k), cdt, block_n=block_n, tiles=len(w_refs), scale_x=not x_fp8)
    return accs if x_s is None else tuple(a * x_s[:, None] for a in accs)


def _scale_acc(acc, s_ref, xs, n0, n_in, block_n):
    acc = acc * _load(s_ref.at[pl.ds(n0, block_n)], n_in)[None, :]  # per output channel
    return acc if xs is None else acc * xs[:, None]                  # per token (fp8_fp8)


def _pair_swap(acc):
    """acc[:, c ^ 1] for every column c, as matmuls with a 0/1 permutation matrix on the tensor cores: acc split
    into three bf16 parts (hi + mid + lo holds all 24 bits of an f32 mantissa), each part moved exactly (one
    nonzero term per output). An f32 dot at IEEE precision would be exact too, but Triton unrolls it into
    scalar FMAs: bn^2 * block_m / threads of them per thread, which took minutes to compile at block_m = 128."""
    bn = acc.shape[1]
    r = lax.broadcasted_iota(jnp.int32, (bn, bn), 0)
    c = lax.broadcasted_iota(jnp.int32, (bn, bn), 1)
    perm = (r == jnp.where(c % 2 == 0, c + 1, c - 1)).astype(jnp.bfloat16)  # [bn, bn]
    out, rest = None, acc
    for _ in range(3):
        part = rest.astype(jnp.bfloat16)
        rest = rest - part.astype(jnp.float32)
        moved = jnp.dot(part, perm, preferred_element_type=jnp.float32)  # [bm, bn] x [bn, bn]
        out = moved if out is None else out + moved
    return out


def _l2norm_tiles(tiles, dtype, head_dim, eps):
    """The qk L2 norm of one head given as column tiles [bm, bn] (f32), of the values rounded to the output
    dtype first (as the model, which norms the stored q / k)."""
    tiles = [a.astype(dtype).astype(jnp.float32) for a in tiles]
    ss = functools.reduce(jnp.add, [jnp.sum(a * a, axis=1) for a in tiles])  # [bm]
    return [a * lax.rsqrt(ss / head_dim + eps)[:, None] for a in tiles]


def _n_of(w, w_transposed):
    """Output columns of a weight stored [K, N] (or [N, K] with w_transposed); 0 for a malformed one (the
    checks of `_setup` name it)."""
    return w.shape[0 if w_transposed else 1] if w.ndim == 2 else 0


def _setup(x, weights, scales, mode, N_total, block_m, block_n, block_k, split_k, num_warps, num_stages,
           compute_dtype, tiles_per_step, w_transposed=False):
    """Argument checks, mode, config and the activations as the kernel reads them."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got {x.shape}")
    M, K = x.shape
    for name, w in weights.items():
        if w.ndim != 2 or w.shape[1 if w_transposed else 0] != K:
            want = f"[N, K={K}] (w_transposed)" if w_transposed else f"[K={K}, N]"
            raise ValueError(f"{name} must be {want}, got {w.shape}")
        if w.dtype != FP8:
            raise TypeError(f"{name} must be float8_e4m3fn, got {w.dtype}")
        s, n = scales[name], _n_of(w, w_transposed)
        if s.shape != (n,):
            raise ValueError(f"the scale of {name} must be per output channel [{n}], got {s.shape}")
    if mode == "auto":
        mode = "weight_only" if M <= 64 else "fp8_fp8"
    if mode not in ("weight_only", "fp8_fp8"):
        raise ValueError(f"unknown mode {mode!r}")
    cfg = default_config(mode, M, N_total, K, tiles=tiles_per_step)
    block_n, block_k = block_n or cfg["block_n"], block_k or cfg["block_k"]
    split_k, num_warps = split_k or cfg["split_k"], num_warps or cfg["num_warps"]
    if mode == "weight_only":
        block_m = max(16, _next_pow2(M)) if block_m is None else block_m  # MMA needs >= 16 rows
    else:
        block_m = max(16, min(block_m or cfg["block_m"], _next_pow2(M)))
    if num_stages is None:  # pipeline depth that keeps the staged x tile + one tile per weight in ~160 KB
        x_bytes = block_m * block_k * (1 if mode == "fp8_fp8" else 2)
        per_stage = x_bytes + tiles_per_step * block_k * block_n  # FP8 weight tiles (H100: 227 KB shared memory)
        num_stages = int(max(2, min(cfg["num_stages"], (160 * 1024) // per_stage)))
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16 (Triton dot operands)")
    nk = pl.cdiv(K, block_k)
    split_k = max(1, min(split_k, nk))
    kb_per_split = pl.cdiv(nk, split_k)
    split_k = pl.cdiv(nk, kb_per_split)  # no empty splits
    if mode == "fp8_fp8":
        xk, xs = quantize_activation_per_token(x)
    else:
        xk, xs = x, jnp.ones((M,), jnp.float32)  # cast (f16: rescaled) inside the kernel
    cdt = upcast.compute_dtype(compute_dtype, rows=block_m)
    return dict(mode=mode, M=M, K=K, xk=xk, xs=xs, block_m=block_m, block_n=block_n, block_k=block_k,
                split_k=split_k, kb_per_split=kb_per_split, num_warps=num_warps, num_stages=num_stages, cdt=cdt)


# ----------------------------------------------------------------------------------------------------------
# gate/up + SwiGLU
# ----------------------------------------------------------------------------------------------------------

def _gate_up_kernel(x_ref, xs_ref, wg_ref, sg_ref, wu_ref, su_ref, *refs, m, n, k, block_m, block_n, block_k,
                    kb_per_split, num_splits, reduce, x_fp8, cdt, evict, interpret, w_transposed):
    """refs: reduce None (no split) -> h; "xla" -> g, u partials [S, M, F]; "kernel" -> counters, g, u, h."""
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0 = pl.multiple_of(pid_m * block_m, block_m)
    n0 = pl.multiple_of(pid_n * block_n, block_n)
    m_in, n_in = _in_bounds(m0, block_m, m), _in_bounds(n0, block_n, n)
    kb_lo = pid_s * kb_per_split
    kb_hi = jnp.minimum(kb_lo + kb_per_split, pl.cdiv(k, block_k))
    g, u = _k_loop(x_ref, (wg_ref, wu_ref), (n0, n0), (n_in, n_in), m0=m0, m_in=m_in, k=k, block_m=block_m,
                   block_n=block_n, block_k=block_k, kb_lo=kb_lo, kb_hi=kb_hi, steps=kb_per_split, x_fp8=x_fp8,
                   cdt=cdt, evict=evict, w_transposed=w_transposed)
    xs = _load(xs_ref.at[pl.ds(m0, block_m)], m_in) if x_fp8 else None
    g = _scale_acc(g, sg_ref, xs, n0, n_in, block_n)  # [bm, bn] f32
    u = _scale_acc(u, su_ref, xs, n0, n_in, block_n)
    mask = _mask2(m_in, n_in)
    tile = (pl.ds(m0, block_m), pl.ds(n0, block_n))
    if reduce is None:
        (h_ref,) = refs
        _store(h_ref.at[tile], (_silu(g) * u).astype(h_ref.dtype), mask)
        return
    # SwiGLU is not linear: it follows the sum of the splits' partials
    cnt_ref, g_ref, u_ref, h_ref = refs if reduce == "kernel" else (None, *refs, None)
    _store(g_ref.at[(pid_s, *tile)], g, mask)
    _store(u_ref.at[(pid_s, *tile)], u, mask)
    if reduce == "kernel":
        last = arrive(cnt_ref, pid_m * pl.cdiv(n, block_n) + pid_n, num_splits, interpret=interpret)

        @pl.when(last)
        def _epilogue():
            gs = sum_partials(g_ref, num_splits, tile, (block_m, block_n), mask)
            us = sum_partials(u_ref, num_splits, tile, (block_m, block_n), mask)
            _store(h_ref.at[tile], (_silu(gs) * us).astype(h_ref.dtype), mask)


_STATIC = ("mode", "block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "out_dtype",
           "compute_dtype", "evict", "interpret", "poison_output", "reduce", "w_transposed")


@functools.partial(jax.jit, static_argnames=_STATIC + ("mosaic",))
def gate_up_swiglu(x, wg, sg, wu, su, *, mode="auto", block_m=None, block_n=None, block_k=None, split_k=None,
                   num_warps=None, num_stages=None, out_dtype=None, compute_dtype=None, evict=True,
                   interpret=False, poison_output=False, reduce=None, mosaic=None, x_widened=None, w_transposed=False):
    """h [M, F] = silu(x @ deq(wg)) * (x @ deq(wu)) in one kernel. x [M, D] (bf16 / f16 / f32), wg, wu [D, F]
    float8_e4m3fn (or [F, D] with w_transposed: the Hugging Face layout, K contiguous), sg, su [F] float32.
    Arguments as fp8_gemm.fp8_matmul (mode, blocks, split_k, warps, stages, compute_dtype, evict, interpret,
    poison_output). reduce (split_k > 1): "kernel" - the last split
    of each tile sums the partials and applies SwiGLU; "xla" - a jnp epilogue does (two more launches); None:
    split_k.default_reduce("gate_up") (split_k.DEFAULTS: "xla", measured faster). mosaic: gate and up through
    one launch of the Mosaic GPU kernel (pallas_kernels.mgpu_gemv), the SwiGLU in XLA's epilogue of its split-K
    sums: True - always (interpret=True: Pallas' GPU interpreter); False - never; None (default) - where
    `mgpu_gemv.wanted` says so, no Triton tile is asked for and either x_widened is given (x already in that
    kernel's float16 form, mgpu_gemv.fp8_gemv_multi(widened=...), from fused_norm.add_rms_norm(widen_rows=...))
    or x is bf16 with more than 16 rows (the bf16 path, up to 64 rows). In the model the first is within 1% of
    Triton's gate/up at decode and verification (docs/benchmarks.md section 20, five alternating pairs; section
    18's "7% faster" was a bug's); at 32 and 64 rows the Mosaic op's kernels take 1.3-2.1x less time than Triton's
    at the gate/up shapes (section 26). Up to 16 rows without x_widened it is not chosen (f16 x widened by XLA:
    two kernels more, section 18; bf16 x read as it is: no faster, sections 19-20)."""
    reduce = default_reduce("gate_up", reduce)
    if wg.shape != wu.shape:
        raise ValueError(f"w_gate {wg.shape} and w_up {wu.shape} must have the same shape")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    F = _n_of(wg, w_transposed)
    triton_tiles = (block_m, block_n, block_k, split_k, num_warps, num_stages, compute_dtype) != (None,) * 7
    if (mode in ("auto", "weight_only") and x.ndim == 2 and wg.ndim == 2
            and mgpu_gemv.wanted(mosaic, x.shape[0], x.shape[1], (F, F),
                                 "channel" if sg.shape == su.shape == (F,) else "block",
                                 auto=not triton_tiles and (x_widened is not None or x.shape[0] > mgpu_gemv.MAX_ROWS),
                                 compute_dtype=mgpu_gemv.path_dtype(x.dtype, x_widened is not None))):
        g, u = mgpu_gemv.fp8_gemv_multi(x, (wg, wu), (sg, su), widened=x_widened, out_dtype=jnp.float32,
                                        w_layout="nk" if w_transposed else "kn",
                                        interpret=mgpu_gemv.interpret_params(interpret))  # [M, F] each
        return (_silu(g) * u).astype(out_dtype)
    c = _setup(x, {"w_gate": wg, "w_up": wu}, {"w_gate": sg, "w_up": su}, mode, F, block_m, block_n, block_k,
               split_k, num_warps, num_stages, compute_dtype, tiles_per_step=2, w_transposed=w_transposed)
    M, K = c["M"], c["K"]
    if M == 0 or F == 0 or K == 0:
        return jnp.zeros((M, F), out_dtype)
    bm, bn, S = c["block_m"], c["block_n"], c["split_k"]
    red = None if S == 1 else reduce
    kernel = functools.partial(
        _gate_up_kernel, m=M, n=F, k=K, block_m=bm, block_n=bn, block_k=c["block_k"],
        kb_per_split=c["kb_per_split"], num_splits=S, reduce=red, x_fp8=c["mode"] == "fp8_fp8", cdt=c["cdt"],
        evict=evict, interpret=interpret, w_transposed=w_transposed)
    args = [c["xk"], c["xs"], wg, sg.astype(jnp.float32), wu, su.astype(jnp.float32)]
    partials = [jax.ShapeDtypeStruct((S, M, F), jnp.float32)] * 2
    final = [jax.ShapeDtypeStruct((M, F), out_dtype)]
    if red == "kernel":  # one counter per output tile
        args.append(counters(pl.cdiv(M, bm) * pl.cdiv(F, bn)))
    outs = {None: final, "xla": partials, "kernel": partials + final}[red]
    res = _call(kernel, args, outs, (pl.cdiv(M, bm), pl.cdiv(F, bn), S), num_warps=c["num_warps"],
                num_stages=c["num_stages"], interpret=interpret, poison_output=poison_output,
                name=f"fp8_gate_up_swiglu_{c['mode']}_m{bm}_n{bn}_k{c['block_k']}_s{S}")
    if red == "xla":
        return swiglu_of_partials(res[0], res[1], out_dtype)  # [S, M, F] x 2 -> [M, F]
    return res[-1]


# ----------------------------------------------------------------------------------------------------------
# QKV + RoPE / qk-norm / temperature
# ----------------------------------------------------------------------------------------------------------

def _qkv_kernel(x_ref, xs_ref, cos_ref, sin_ref, rs_ref, wq_ref, sq_ref, wk_ref, sk_ref, wv_ref, sv_ref, *refs,
                m, k, ns, nbs, head_dim, block_m, block_n, block_k, kb_per_split, num_splits, reduce, groups,
                x_fp8, cdt, evict, rope, norm_eps, q_scaled, cache, interpret, w_transposed):
    """refs: reduce None -> q, k, v; "xla" -> their partials [S, M, N*]; "kernel" -> counters, the partials,
    q, k, v. With a cache (None, or (T, S, encode): see qkv_rope) the inputs end with the start
    slots [B] and the two caches [B * S, N], and k, v are the aliased caches ("xla" never). norm_eps: the qk
    norm is done here (None: not at all, or by the caller). q_scaled: q's row scale is applied here (after
    the norm, if any). groups: column blocks per counter of q, k, v (a head's, Dh // block_n, where the norm
    needs the whole head; else 1)."""
    pid_m, pid_j, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0 = pl.multiple_of(pid_m * block_m, block_m)
    m_in = _in_bounds(m0, block_m, m)
    kb_lo = pid_s * kb_per_split
    kb_hi = jnp.minimum(kb_lo + kb_per_split, pl.cdiv(k, block_k))
    xs = _load(xs_ref.at[pl.ds(m0, block_m)], m_in) if x_fp8 else None
    rows = pl.ds(m0, block_m)
    if reduce == "kernel":
        cnt_ref, refs = refs[0], refs[1:]
    if cache is not None:
        start_ref, refs = refs[0], refs[3:]  # the start slots; the caches' input refs alias their outputs
    if reduce == "kernel":
        parts, finals = refs[:3], refs[3:]
    else:
        parts, finals = (refs, (None,) * 3) if reduce == "xla" else ((None,) * 3, refs)
    out_dtype = finals[0].dtype if finals[0] is not None else None  # q's: the dtype k and v are rounded to

    def put(t, o_ref, n0, a, mask):  # a [bm, bn] final values of output t at columns n0..n0+bn-1
        if cache is None or t == 0:
            _store(o_ref.at[rows, pl.ds(n0, block_n)], a.astype(o_ref.dtype), mask)
            return
        T, S, encode = cache  # row r = b * T + i goes to slot start[b] + i of sequence b
        r = m0 + jnp.arange(block_m, dtype=jnp.int32)
        live = r < m
        b = lax.div(jnp.minimum(r, m - 1), jnp.int32(T))
        start = plgpu.load(start_ref.at[b], mask=live, other=0)
        slot = jnp.clip(start, 0, S - T) + lax.rem(r, jnp.int32(T))  # dynamic_update_slice's clamp
        col = n0 + jnp.arange(block_n, dtype=jnp.int32)
        full = live[:, None] if mask is None else live[:, None] & mask
        # masked-off lanes point past the end: masked on the GPU, dropped by the interpreter's scatter (which
        # would otherwise write their old values back over a live row's, e.g. padding rows of the last sequence)
        dst = jnp.where(full, (b * S + slot)[:, None], o_ref.shape[0])
        plgpu.store(o_ref.at[dst, col[None, :]], encode(a.astype(out_dtype), o_ref.dtype), mask=full)
    ngs = [nb // g for nb, g in zip(nbs, groups)]  # counters per M block of q, k, v
    n_m = pl.cdiv(m, block_m)
    bases = (0, n_m * ngs[0], n_m * (ngs[0] + ngs[1]))  # counters: q's, then k's, then v's, each M-block major

    def row_scale(a):
        return a * _load(rs_ref.at[rows], m_in)[:, None]

    def branch(t, w_ref, s_ref, j):
        n, part_ref, o_ref = ns[t], parts[t], finals[t]
        do_norm = norm_eps is not None and t < 2
        n0 = pl.multiple_of(j * block_n, block_n)
        n_in = _in_bounds(n0, block_n, n)
        (acc,) = _k_loop(x_ref, (w_ref,), (n0,), (n_in,), m0=m0, m_in=m_in, k=k, block_m=block_m,
                         block_n=block_n, block_k=block_k, kb_lo=kb_lo, kb_hi=kb_hi, steps=kb_per_split,
                         x_fp8=x_fp8, cdt=cdt, evict=evict, w_transposed=w_transposed)
        acc = _scale_acc(acc, s_ref, xs, n0, n_in, block_n)  # [bm, bn] f32
        if rope and t < 2:  # linear: fine on a split-K partial
            c0 = pl.multiple_of(lax.rem(n0, jnp.int32(head_dim)), block_n)  # column within the head (block_n | Dh)
            tmask = _mask2(m_in, None)
            cos2 = _load(cos_ref.at[rows, pl.ds(c0, block_n)], tmask)  # [bm, bn]
            sin2 = _load(sin_ref.at[rows, pl.ds(c0, block_n)], tmask)
            acc = acc * cos2 + _pair_swap(acc) * sin2
        if t == 0 and q_scaled and not do_norm:  # attention temperature per token (linear)
            acc = row_scale(acc)
        mask = _mask2(m_in, n_in)
        if reduce is None:
            if do_norm:  # the whole head is this tile (block_n == Dh, no split)
                (acc,) = _l2norm_tiles([acc], out_dtype, head_dim, norm_eps)
                if t == 0 and q_scaled:
                    acc = row_scale(acc)
            put(t, o_ref, n0, acc, mask)
            return
        _store(part_ref.at[pid_s, rows, pl.ds(n0, block_n)], acc, mask)
        if reduce == "xla":
            return
        g = groups[t]  # column blocks of this counter: all of a head's where the norm needs them
        last = arrive(cnt_ref, bases[t] + pid_m * ngs[t] + j // g, num_splits * g, interpret=interpret)

        @pl.when(last)
        def _epilogue():  # the partials of every split (and column block) of this head / tile
            c0 = pl.multiple_of((j // g) * (g * block_n), block_n)
            cols = [pl.ds(c0 + i * block_n, block_n) for i in range(g)]
            tiles = [sum_partials(part_ref, num_splits, (rows, cs), (block_m, block_n), mask) for cs in cols]
            if do_norm:
                tiles = _l2norm_tiles(tiles, out_dtype, head_dim, norm_eps)
                if t == 0 and q_scaled:
                    tiles = [row_scale(a) for a in tiles]
            for i, a in enumerate(tiles):  # (n_in is None: N* are multiples of Dh, so of block_n)
                put(t, o_ref, c0 + i * block_n, a, mask)

    nbq, nbk, _ = nbs
    pl.when(pid_j < nbq)(lambda: branch(0, wq_ref, sq_ref, pid_j))
    pl.when((pid_j >= nbq) & (pid_j < nbq + nbk))(lambda: branch(1, wk_ref, sk_ref, pid_j - nbq))
    pl.when(pid_j >= nbq + nbk)(lambda: branch(2, wv_ref, sv_ref, pid_j - nbq - nbk))


def _cast(v, dtype):
    return v.astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC + ("head_dim", "qk_norm_eps", "cache_encode"))
def qkv_rope(x, wq, sq, wk, sk, wv, sv, *, head_dim, rope=None, q_row_scale=None, qk_norm_eps=None, cache=None,
             cache_encode=_cast, mode="auto", block_m=None, block_n=None, block_k=None, split_k=None,
             num_warps=None, num_stages=None, out_dtype=None, compute_dtype=None, evict=True, interpret=False,
             poison_output=False, reduce=None, w_transposed=False):
    """q [M, Nq], k [M, Nk], v [M, Nv] = x @ deq(wq | wk | wv) in one launch, with the attention epilogue:
    rope = (cos, sin) [M, Dh/2] (the model's tables for each token) rotates q and k; qk_norm_eps: L2 norm of
    each head of q and k after RoPE; q_row_scale [M]: per-token scale of q (NoPE attention temperature).
    x [M, D]; w* [D, N*] float8_e4m3fn (or [N*, D] with w_transposed: the Hugging Face layout, K contiguous) with
    s* [N*] float32, N* multiples of head_dim. block_n must divide
    head_dim (default min(64 or 128, head_dim)). reduce: where split-K partials are summed and the qk norm of
    heads wider than block_n is done: "kernel" (the last program of each tile / head), "xla" (a jnp epilogue:
    one or two more launches) or None (split_k.default_reduce("qkv")). Other arguments as fp8_gemm.fp8_matmul.

    cache = (k_cache, v_cache, start): k and v go straight into a KV cache instead of being returned (decode:
    the cache write, and with it XLA's sums of the k and v partials, is no launch of its own). k_cache,
    v_cache [B, S, Nk // head_dim, head_dim] (M = B * T rows, T tokens per sequence), start [B] int32: row
    b * T + i is written at slot start[b] + i, start clamped to [0, S - T] as jax.lax.dynamic_update_slice
    does; the caches are updated in place (aliased) and returned: (q, k_cache, v_cache). Each value is
    rounded to out_dtype, then stored as cache_encode(value, cache dtype) (a function of jnp ops: the
    model's FP8-cache quantization, mavjax.kv_cache.encode_kv). With a cache the split-K sums are always
    finished in the kernel (reduce "xla" is taken as "kernel": XLA's sums are what the cache path saves)."""
    reduce = default_reduce("qkv", reduce) if cache is None else "kernel"
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    ws, ss = {"wq": wq, "wk": wk, "wv": wv}, {"wq": sq, "wk": sk, "wv": sv}
    ns = tuple(_n_of(w, w_transposed) for w in (wq, wk, wv))
    for name, n in zip(ws, ns):
        if n % head_dim:
            raise ValueError(f"{name} has {n} output columns, not a multiple of head_dim={head_dim}")
    c = _setup(x, ws, ss, mode, sum(ns), block_m, block_n, block_k, split_k, num_warps, num_stages, compute_dtype,
               tiles_per_step=1, w_transposed=w_transposed)  # each program streams one of the three weights
    M, K = c["M"], c["K"]
    if block_n is None:
        c["block_n"] = min(c["block_n"], head_dim)
    bm, bn, S = c["block_m"], c["block_n"], c["split_k"]
    if head_dim % bn:
        raise ValueError(f"block_n={bn} must divide head_dim={head_dim} (a tile never straddles two heads)")
    if rope is not None and (rope[0].shape != (M, head_dim // 2) or rope[1].shape != (M, head_dim // 2)):
        raise ValueError(f"rope tables must be (cos, sin) of shape [{M}, {head_dim // 2}], got "
                         f"{rope[0].shape}, {rope[1].shape}")
    if q_row_scale is not None and q_row_scale.shape != (M,):
        raise ValueError(f"q_row_scale must be [{M}], got {q_row_scale.shape}")
    if cache is not None:
        kc, vc, start = cache
        B = start.shape[0] if start.ndim == 1 else -1
        if B <= 0 or M % B or kc.ndim != 4 or kc.shape[0] != B or kc.shape[2:] != (ns[1] // head_dim, head_dim) \
                or vc.shape != kc.shape or ns[2] != ns[1]:
            raise ValueError(f"cache must be k_cache, v_cache [B, S, {ns[1] // head_dim}, {head_dim}] and start [B] "
                             f"with M={M} a multiple of B; got {kc.shape}, {vc.shape}, {start.shape}")
        T = M // B  # tokens per sequence
        if T > kc.shape[1]:
            raise ValueError(f"{T} tokens per sequence do not fit a cache of {kc.shape[1]} slots")
    if M == 0 or K == 0:
        if cache is not None:
            return jnp.zeros((M, ns[0]), out_dtype), kc, vc
        return tuple(jnp.zeros((M, n), out_dtype) for n in ns)
    norm = qk_norm_eps is not None
    if reduce == "kernel":  # partials whenever a sum or a norm spans programs; all finished in-kernel
        red = "kernel" if S > 1 or (norm and bn < head_dim) else None
        norm_in_kernel = norm
    else:
        red = "xla" if S > 1 else None
        norm_in_kernel = norm and S == 1 and bn == head_dim
    norm_late = norm and not norm_in_kernel  # then q's row scale must follow it too
    if rope is not None:
        cos2, sin2 = rope_columns(*rope)  # [M, Dh] each (tiny; shared by q and k)
    else:
        cos2 = sin2 = jnp.zeros((M, head_dim), jnp.float32)
    rs = jnp.ones((M,), jnp.float32) if q_row_scale is None else q_row_scale.astype(jnp.float32)
    nbs = tuple(pl.cdiv(n, bn) for n in ns)
    g = head_dim // bn if norm_in_kernel else 1  # column blocks per counter of q and k: a head
    groups = (g, g, 1)
    kernel = functools.partial(
        _qkv_kernel, m=M, k=K, ns=ns, nbs=nbs, head_dim=head_dim, block_m=bm, block_n=bn, block_k=c["block_k"],
        kb_per_split=c["kb_per_split"], num_splits=S, reduce=red, groups=groups, x_fp8=c["mode"] == "fp8_fp8",
        cdt=c["cdt"], evict=evict, rope=rope is not None, norm_eps=float(qk_norm_eps) if norm_in_kernel else None,
        q_scaled=q_row_scale is not None and not norm_late,
        cache=None if cache is None else (T, kc.shape[1], cache_encode), interpret=interpret,
        w_transposed=w_transposed)
    args = [c["xk"], c["xs"], cos2, sin2, rs, wq, sq.astype(jnp.float32), wk, sk.astype(jnp.float32), wv,
            sv.astype(jnp.float32)]
    partials = [jax.ShapeDtypeStruct((S, M, n), jnp.float32) for n in ns]
    finals = [jax.ShapeDtypeStruct((M, n), out_dtype) for n in ns]
    if red == "kernel":  # per M block, one counter per head of q and k (column block, without the norm) and
        # per column block of v
        args.append(counters(pl.cdiv(M, bm) * sum(nb // gg for nb, gg in zip(nbs, groups))))
    aliases = {}
    if cache is not None:  # k and v are the caches, viewed [B * S, N] (free reshapes), updated in place
        flat = [t.reshape(-1, ns[1]) for t in (kc, vc)]
        finals[1:] = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in flat]
        args.append(start.astype(jnp.int32))
    outs = {None: finals, "xla": partials, "kernel": partials + finals}[red]
    if cache is not None:  # the two caches are the last inputs and the last outputs
        aliases = {len(args): len(outs) - 2, len(args) + 1: len(outs) - 1}
        args += flat
    res = _call(kernel, args, outs, (pl.cdiv(M, bm), sum(nbs), S), num_warps=c["num_warps"],
                num_stages=c["num_stages"], interpret=interpret, poison_output=poison_output, aliases=aliases,
                name=f"fp8_qkv_rope_{c['mode']}_m{bm}_n{bn}_k{c['block_k']}_s{S}{'_cache' if cache else ''}")
    q, k, v = res[-3:]
    if cache is not None:
        return q, k.reshape(kc.shape), v.reshape(vc.shape)
    if red == "xla":
        q, k, v = (jnp.sum(t, axis=0) for t in (q, k, v))  # [M, N*] f32
    if norm_late:  # after the split sum / across the tiles of a head; then q's row scale
        rnd = lambda y: y.astype(out_dtype).astype(jnp.float32)  # noqa: E731
        q, k = _l2norm_heads(rnd(q), head_dim, qk_norm_eps), _l2norm_heads(rnd(k), head_dim, qk_norm_eps)
        if q_row_scale is not None:  # (the model never has both on one layer; kept general)
            q = q * rs[:, None]
    return tuple(t.astype(out_dtype) for t in (q, k, v))
