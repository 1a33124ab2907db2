"""The Llama 4 text decoder in Flax NNX, computing what transformers' `Llama4ForCausalLM` computes.

Shapes: B batch, T query tokens, S key/cache slots, D hidden, H query heads, K kv heads, G = H/K query heads
per kv head, Dh head dim, E experts, F expert (or MLP) hidden units, V vocabulary.

Every parameter carries `logical_axes` metadata (vocab, embed, heads, kv_heads, head_dim, mlp, expert,
expert_mlp, ...), so that sharding rules can map those names to mesh axes. Attention reads and writes an
explicit KV cache (`mavjax.kv_cache`), so the same forward serves training (no cache), prefill and decode.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mavjax.config import Llama4Config
from mavjax.kv_cache import FP8, KV_FP8_SCALE, KVCache, encode_kv, read_kv, write_slots


def _param(rngs: nnx.Rngs, shape, axes, dtype, std, init="normal", contract=None):
    """`contract`: for a projection weight, the axes its input contracts over (the rest are output channels,
    each with its own scale when the weight is quantized to FP8)."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)  # in dtype: no float32 copy of big tensors
    meta = {} if contract is None else {"contract": contract}
    return nnx.Param(value, logical_axes=axes, **meta)


def _weight(rngs, shape, axes, dtype, std, contract, quant, out_first=True):
    """A projection weight and its FP8 scale (None unless quant == "fp8"). `shape` is the weight's layout in a
    bf16 model, its contracted (input) axes `contract` first. FP8 weights are float8_e4m3fn with a float32 scale
    per output channel (the published FP8 release's scheme); `mavjax.quantize` fills them. With `out_first` an FP8
    weight is stored output axes first, [*out, *in] - torch Linear's [N, K], as the FP8 release stores it: K
    contiguous is what FP8 tensor cores read (cuBLASLt's FP8 GEMM, WGMMA), and the decode kernels stream it 3-14%
    faster (docs/benchmarks.md sections 28, 31). The routed experts (and the shared expert, which rides in their
    launches) keep [.., K, N]. The Param's `perm` says how: stored = jnp.transpose(bf16 layout, perm); its
    `contract` names the stored array's contracted axes."""
    if quant is None:
        return _param(rngs, shape, axes, dtype, std, contract=contract), None
    keep = tuple(i for i in range(len(shape)) if i not in contract)
    perm = keep + tuple(contract) if out_first else tuple(range(len(shape)))
    stored_contract = tuple(perm.index(i) for i in contract)
    w = nnx.Param(jnp.zeros(tuple(shape[i] for i in perm), jnp.float8_e4m3fn),
                  logical_axes=tuple(axes[i] for i in perm), contract=stored_contract, perm=perm)
    return w, nnx.Param(jnp.ones(tuple(shape[i] for i in keep), jnp.float32),
                        logical_axes=tuple(axes[i] for i in keep))


def stored_layout(var) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(perm, contract) of an FP8 projection weight (see _weight), None for any other parameter."""
    meta = var.get_metadata() if isinstance(var, nnx.Param) else {}
    if "perm" not in meta or var.get_value().dtype != jnp.float8_e4m3fn:
        return None
    return tuple(meta["perm"]), tuple(meta["contract"])


# The Pallas kernel families kernels="pallas" uses. MAVJAX_PALLAS_DISABLE="moe,attention" (a comma list) runs
# those as on the XLA path instead, read when a function is traced: to bisect a GPU failure to one family, or
# to time one family's share of a step, without touching the model code. "moe_shared" is the shared expert
# riding in the MoE pair kernels at decode; switched off, it runs as its own MLP (gate_up + gemm kernels).
# "moe_router" is the top-1 routing (argmax, sigmoid) done by the MoE pair kernels (moe_fp8's path for up to
# PAIRS_MAX tokens) from the router's logits; switched off, XLA routes (two more kernels) and the kernels read
# ids and scores. "norm_router" is the router's logits computed by the add + norm kernel before such an MoE
# (fused_norm.add_rms_norm(router=...)); switched off, XLA's dot computes them (two more kernels). "mosaic" is
# the Mosaic GPU kernels on Hopper at decode: pallas_kernels.mgpu_gemv for the dense MLPs' gate/up (its x
# widened to float16 by the norm kernel before it, MLP.widen_rows; or bf16 x of 17-64 tokens), and the MoE
# layers' experts (pallas_kernels.moe_mgpu, routed by XLA: MoE.experts_on_mosaic; above 16 pairs its sorted path);
# switched off, Triton's gate/up + SwiGLU, MoE pair kernels (routing in-kernel) and sorted kernels.
# "fp8_prefill" is the FP8 projections stored [N, K] above PALLAS_GEMM_MAX_ROWS rows as FP8 x FP8 products
# (fp8_prefill_matmul, XLA's FP8 GEMM); switched off, those run as on the XLA path (the weight upcast to bf16).
# "mosaic_dense" is the output and down projections (and any other `dense` FP8 projection) of 17 to
# PALLAS_GEMM_MAX_ROWS token rows on the Mosaic GPU kernel's bfloat16 path (`mosaic_gemm`); switched off (or with
# "mosaic"), Triton's weight-only kernels, as at up to 16 rows.
PALLAS_OPS = ("gemm", "qkv", "gate_up", "moe", "moe_shared", "moe_router", "norm_router", "attention",
              "prefill_attention", "norm", "mosaic", "fp8_prefill", "mosaic_dense")


# The token rows (B x T) up to which kernels="pallas" runs the FP8 projections (families "gemm", "qkv", "gate_up")
# on the Pallas kernels: decode, speculative verification, small batches, where they stream the weights. Above it
# (prefill, large batches) the projections are compute-bound: FP8 x FP8 products on XLA's FP8 GEMM where the weight
# is stored [N, K] (fp8_prefill_matmul), else as on the XLA path, the FP8 weight upcast to bf16 inside XLA's own GEMM
# fusion: on one H200 that was 1.4-8.5x faster than the Triton FP8 x FP8 kernel the Pallas path ran there, at every
# Maverick shape (full width and 1/8 shards) from 128 to 8192 rows, and the 2-layer Maverick-width model's time to
# first token 11% / 21% lower at 512 / 4096 tokens (docs/benchmarks.md section 29). The residual add + norm, the
# MoE and the attention keep their own rules. MAVJAX_PALLAS_GEMM_MAX_ROWS=N moves the line (a large N: the Triton
# kernels at prefill, for A/B runs).
PALLAS_GEMM_MAX_ROWS = 64


def gemm_max_rows() -> int:
    """PALLAS_GEMM_MAX_ROWS, or MAVJAX_PALLAS_GEMM_MAX_ROWS where set."""
    limit = os.environ.get("MAVJAX_PALLAS_GEMM_MAX_ROWS", "").strip()
    try:
        return int(limit) if limit else PALLAS_GEMM_MAX_ROWS
    except ValueError:
        raise ValueError(f"MAVJAX_PALLAS_GEMM_MAX_ROWS must be an integer, got {limit!r}") from None


def pallas_gemm(kernels: str, op: str, rows: int) -> bool:
    """Whether an FP8 projection of kernel family `op` ("gemm", "qkv" or "gate_up") over `rows` token rows runs as
    a Pallas kernel on the `kernels` path (`use_pallas` and at most PALLAS_GEMM_MAX_ROWS rows)."""
    return use_pallas(kernels, op) and rows <= gemm_max_rows()


def mosaic_gemm(kernels: str, rows: int):
    """fp8_matmul's `mosaic` argument for an FP8 projection of `rows` token rows on the Pallas GEMM path: None (the
    Mosaic GPU kernel where `mgpu_gemv.wanted` says so: a Hopper GPU, bf16 x read as it is, per-channel scales)
    above mgpu_gemv.MAX_ROWS (16) rows - batch 17-64 decode steps, wide verification - as gate_up_swiglu already
    chooses there; else False (Triton's weight-only kernels; at up to 16 rows the Mosaic kernel moved the decode
    step by at most 2% and slowed verification, docs/benchmarks.md section 20). Above 16 rows Triton's kernels take
    1.5-3.3x the weight bytes' time at full width, the Mosaic kernel's bfloat16 path 1.1-1.7x (sections 26, 33).
    Families "mosaic" and "mosaic_dense" switch it off."""
    from pallas_kernels.mgpu_gemv import MAX_ROWS

    on = rows > MAX_ROWS and use_pallas(kernels, "mosaic") and use_pallas(kernels, "mosaic_dense")
    return None if on else False


def use_pallas(kernels: str, op: str) -> bool:
    """Whether kernel family `op` (one of PALLAS_OPS) runs as a Pallas kernel on the `kernels` path."""
    if kernels != "pallas":
        return False
    off = {s.strip() for s in os.environ.get("MAVJAX_PALLAS_DISABLE", "").split(",") if s.strip()}
    if off - set(PALLAS_OPS):
        raise ValueError(f"MAVJAX_PALLAS_DISABLE names unknown kernel families {sorted(off - set(PALLAS_OPS))}; "
                         f"known: {', '.join(PALLAS_OPS)}")
    return op not in off


def shared_in_moe_kernels(kernels: str, pairs_shape, w_gate_shared, w_gate_routed) -> bool:
    """Whether the shared expert rides in the Triton MoE pair kernels (`moe_fp8_pairs(shared=...)`; over a mesh,
    in whichever MoE kernels `moe_fp8` picks): `shared_may_ride` (over a mesh that means expert=1) and ONE token
    (pairs_shape = the routing's [N, k], N == 1). Each token's shared row reads the whole shared expert, so N
    tokens read it N times: on one H200 (one 8-way rank of Maverick, docs/benchmarks.md section 8) riding along
    made the batch-1 decode step 9% faster (two launches and their split-K reductions saved per MoE layer) but the
    4-token verify 7% and the batch-8 step 22% slower than the shared expert's own batched launches. (The Mosaic
    GPU path streams it once for all tokens: MoE.shared_rides.)"""
    from pallas_kernels.moe_gemm import PAIRS_MAX

    return (pairs_shape[0] == 1 and int(np.prod(pairs_shape)) <= PAIRS_MAX
            and shared_may_ride(kernels, w_gate_shared, w_gate_routed))


def shared_may_ride(kernels: str, w_gate_shared, w_gate_routed) -> bool:
    """What the shared expert needs to ride in the MoE kernels' launches, whatever the token count: the Pallas
    MoE path, "moe_shared" not switched off, and the shared expert stored like the routed ones (w_gate [D, F]
    beside [E, D, F], one dtype)."""
    return (use_pallas(kernels, "moe") and use_pallas(kernels, "moe_shared")
            and w_gate_shared.shape == w_gate_routed.shape[1:] and w_gate_shared.dtype == w_gate_routed.dtype)


def dense(x, w, scale, n_in, kernels="xla", w_nk=False):
    """x [..., *in] @ w -> [..., *out], contracting x's last n_in axes. w is bf16/f32 [*in, *out] (scale None), or
    FP8 with a float32 scale per output channel [*out], stored [*in, *out] or, with w_nk, [*out, *in] (_weight's
    out_first). FP8 on the XLA path: the weight upcast to x's dtype inside XLA's GEMM (XLA's own FP8 dot is ~10x
    slower at decode shapes). On the Pallas path: up to PALLAS_GEMM_MAX_ROWS token rows pallas_kernels.fp8_gemm
    streams it (FP8 bytes read, upcast in registers; from 17 rows on the Mosaic GPU kernel, `mosaic_gemm`); above,
    with [N, K] weights, FP8 tensor-core products (fp8_prefill_matmul: x quantized per token), else XLA's
    upcast + dot."""
    if scale is None:
        return jnp.tensordot(x, w, axes=n_in)
    in_shape, out_shape = (w.shape[-n_in:], w.shape[:-n_in]) if w_nk else (w.shape[:n_in], w.shape[n_in:])
    K = int(np.prod(in_shape))
    x2 = x.reshape(-1, K)
    w2 = w.reshape(-1, K) if w_nk else w.reshape(K, -1)  # [N, K] or [K, N] (free reshapes)
    s = scale.reshape(-1)
    if pallas_gemm(kernels, "gemm", x2.shape[0]):
        from pallas_kernels.fp8_gemm import fp8_matmul

        y = fp8_matmul(x2, w2, s, out_dtype=x.dtype, w_transposed=w_nk, mosaic=mosaic_gemm(kernels, x2.shape[0]),
                       interpret=jax.default_backend() == "cpu")
    elif w_nk and x2.shape[0] > gemm_max_rows() and use_pallas(kernels, "fp8_prefill"):
        y = fp8_prefill_matmul(x2, w2, s, x.dtype)
    else:
        dims = (((1,), (1 if w_nk else 0,)), ((), ()))
        y = jax.lax.dot_general(x2, w2.astype(x.dtype), dims, preferred_element_type=jnp.float32)  # [M, N]
        y = (y * s).astype(x.dtype)
    return y.reshape(*x.shape[:-n_in], *out_shape)


def fp8_prefill_matmul(x, w, scale, out_dtype):
    """x [M, K] @ (w [N, K] FP8 * scale [N]) with FP8 tensor-core products: x quantized per token to e4m3
    (pallas_kernels.fp8_gemm.quantize_activation_per_token), the product XLA's FP8 dot (cuBLASLt's FP8 GEMM on
    GPU, which reads both operands K-contiguous), both scales applied to its float32 result. kernels="pallas"
    runs the FP8 projections of more than PALLAS_GEMM_MAX_ROWS rows (prefill, large batches) this way: on one
    H200 1029-1170 TFLOP/s at full width, 1.6-2.6x the upcast + dot, and the 2-layer Maverick-width model's time to
    first token 11-17% lower at 4096-16384 tokens (docs/benchmarks.md section 32); x's rounding to e4m3 moves the
    shipped model's perplexity by +1.6% (tests/test_fp8_quality.py)."""
    from pallas_kernels.fp8_gemm import quantize_activation_per_token

    xq, xs = quantize_activation_per_token(x)  # [M, K] e4m3, [M] float32
    y = jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [M, N]
    return (y * xs[:, None] * scale).astype(out_dtype)


def rms_norm(x, scale, eps):
    """RMSNorm in float32, cast back before the scale (transformers' order of operations)."""
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if scale is None else y * scale


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, (dim,), ("norm",), dtype, 0.0, init="ones")

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


def rope_tables(inv_freq, positions):
    """cos, sin [B, T, Dh/2] for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs (x[2i], x[2i+1]): Meta's complex-number convention, which transformers'
    Llama 4 keeps (its checkpoints are not permuted to the half-split layout of Llama 2/3). x [B, T, N, Dh]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def attention_mask(q_pos, k_pos, chunk_size):
    """Which keys each query sees: causal, and on chunked layers only keys in the query's own chunk.
    q_pos [B, T], k_pos [B, S] (absolute positions; -1 marks an empty slot) -> bool [B, T, S]."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k <= q) & (k >= 0)
    if chunk_size is not None:
        mask &= (k // chunk_size) == (q // chunk_size)
    return mask


def attn_temperature(positions, floor_scale, attn_scale):
    """Per-position query scale of the NoPE layers (arXiv:2501.19399), float32 [B, T]."""
    pos = positions.astype(jnp.float32)
    return jnp.log1p(jnp.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0


def attend(q, k, v, mask, scale):
    """Grouped-query attention. q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S] -> [B, T, H, Dh].
    Scores and softmax in float32; probabilities cast to the value dtype as transformers' eager path does."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale  # [B, K, G, T, S]
    # A large finite negative, not -inf: a row with no visible key (padding) must not make NaN gradients.
    s = jnp.where(mask[:, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0).astype(v.dtype)  # such rows -> 0
    o = jnp.einsum("bkgts,bskd->btkgd", p, v)  # [B, T, K, G, Dh]
    return o.reshape(B, T, H, Dh)


# The XLA path's attention materializes its float32 scores [B, H, T, S]; above this many bytes of them it runs in
# blocks of query rows (lax.map), one block's scores at a time, so a long prompt's prefill needs memory linear in
# its length: at Maverick's full width, 32K tokens would be 170 GB of scores at once. Each row's softmax is its
# own, so the blocks compute the same function.
XLA_ATTN_MAX_SCORE_BYTES = 1 << 30


def attend_by_position(q, k, v, q_pos, k_pos, chunk_size, scale, extra_mask=None, kernels="xla"):
    """attend(q, k, v, attention_mask(q_pos, k_pos, chunk_size) & extra_mask, scale). kernels="pallas" without an
    extra_mask: the blockwise Pallas kernel (pallas_kernels.prefill_attention, family "prefill_attention");
    otherwise XLA, in blocks of query rows (a power of two; T padded with q_pos = -1) where the scores would exceed
    XLA_ATTN_MAX_SCORE_BYTES. q [B, T, H, Dh], k/v [B, S, K, Dh] (q's dtype), q_pos [B, T], k_pos [B, S],
    extra_mask None or [B, T, S]."""
    if extra_mask is None and use_pallas(kernels, "prefill_attention"):
        from pallas_kernels.prefill_attention import prefill_attention

        return prefill_attention(q, k, v, q_pos, k_pos, chunk_size=chunk_size, scale=scale,
                                 interpret=jax.default_backend() == "cpu")
    B, T, H, Dh = q.shape
    rows = max(1, XLA_ATTN_MAX_SCORE_BYTES // (B * H * k.shape[1] * 4))
    if rows >= T:
        mask = attention_mask(q_pos, k_pos, chunk_size)
        return attend(q, k, v, mask if extra_mask is None else mask & extra_mask, scale)
    rows = 1 << (rows.bit_length() - 1)
    n = -(-T // rows)

    def blocks(a, fill):  # [B, T, ...] -> [n, B, rows, ...]
        a = jnp.pad(a, [(0, 0), (0, n * rows - T)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return a.reshape(B, n, rows, *a.shape[2:]).swapaxes(0, 1)

    def block(xs):
        qi, pi, *mi = xs
        mask = attention_mask(pi, k_pos, chunk_size)
        return attend(qi, k, v, mask & mi[0] if mi else mask, scale)  # [B, rows, H, Dh]

    xs = (blocks(q, 0), blocks(q_pos, -1)) + (() if extra_mask is None else (blocks(extra_mask, False),))
    o = jax.lax.map(block, xs)  # [n, B, rows, H, Dh]
    return o.swapaxes(0, 1).reshape(B, n * rows, H, Dh)[:, :T]


# Cached attention with at most this many query rows per kv head (G query heads x T positions: decode and
# speculative verification) goes through the split-KV Pallas kernel when kernels="pallas"; more rows (prefill) through
# the blockwise one (pallas_kernels.prefill_attention, family "prefill_attention"), which never materializes the
# [.., T, S] scores. Speculative tree verification's extra attn_mask stays on XLA.
PALLAS_MAX_ROWS = 64


class Attention(nnx.Module):
    def __init__(self, cfg: Llama4Config, layer: int, dtype, rngs: nnx.Rngs, kernels: str = "xla", quant=None):
        D, H, K, Dh, std = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
            cfg.initializer_range
        self.wq, self.wq_scale = _weight(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), dtype, std, (0,), quant)
        self.wk, self.wk_scale = _weight(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), dtype, std, (0,), quant)
        self.wv, self.wv_scale = _weight(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), dtype, std, (0,), quant)
        self.wo, self.wo_scale = _weight(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), dtype, std, (0, 1), quant)
        self.w_nk = quant is not None  # FP8 weights stored output first (_weight): wq [H, Dh, D], wo [D, H, Dh]
        self.use_rope = cfg.uses_rope(layer)
        self.qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.chunk_size = cfg.attention_chunk_size if cfg.is_chunked(layer) else None
        self.eps, self.floor_scale, self.attn_scale = cfg.rms_norm_eps, cfg.floor_scale, cfg.attn_scale
        self.scale = Dh ** -0.5
        self.kernels = kernels

    def __call__(self, x, positions, rope, cache_kv=None, cache_pos=None, write_index=None, attn_mask=None,
                 project=True, fresh_cache=False):
        """x [B, T, D], positions [B, T]. Without a cache, keys are this call's tokens. With one
        (k, v: [B, S, K, Dh]; cache_pos [B, S] the position each slot holds, already updated for this call),
        this call's keys are written at slots `write_index` [B] onward and attention reads the whole cache.
        `attn_mask` [B, T, S] (optional) is ANDed into the position mask: speculative tree verification, where
        a draft node sees only its ancestors among the slots of the same call.
        fresh_cache: the cache held nothing before this call (a prefill into a new cache, whose S slots are
        sized for the whole generation, S >= T): where XLA computes the attention, it reads this
        call's T keys - as the cache stores them, so an FP8 cache rounds them alike - instead of all S slots,
        which are only these keys and empty ones (the scores [.., T, S] -> [.., T, T]); the cache is written
        as always.
        Returns (out [B, T, D], updated (k, v) or None); `project=False`: out is the attention output before wo,
        [B, T, H, Dh] (the tensor-parallel path projects each device's heads itself, mavjax.parallel)."""
        B, T = x.shape[:2]
        G = self._heads(self.wq)[0] // self._heads(self.wk)[0]
        on_pallas = (cache_kv is not None and use_pallas(self.kernels, "attention") and T * G <= PALLAS_MAX_ROWS
                     and attn_mask is None)  # the split-KV kernel, over the cache
        if fresh_cache and attn_mask is not None:
            raise ValueError("fresh_cache (a prefill into an empty cache) takes no attn_mask over cache slots")
        new_keys_only = fresh_cache and cache_kv is not None and not on_pallas
        fused = (pallas_gemm(self.kernels, "qkv", B * T)
                 and self.wq_scale is not None)  # one FP8 launch, epilogue fused
        if fused and cache_kv is not None and not new_keys_only:  # ... which also writes k and v into the cache
            q, ck, cv = self._fused_qkv(x, positions, rope, (*cache_kv, write_index))
        elif fused:
            q, k, v = self._fused_qkv(x, positions, rope)
        else:
            q = self._proj(x, self.wq, self.wq_scale, 1)  # [B, T, D] x [D, H, Dh] -> [B, T, H, Dh]
            k = self._proj(x, self.wk, self.wk_scale, 1)  # [B, T, D] x [D, K, Dh] -> [B, T, K, Dh]
            v = self._proj(x, self.wv, self.wv_scale, 1)  # [B, T, D] x [D, K, Dh] -> [B, T, K, Dh]
            if self.use_rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.qk_norm:  # L2 norm without weight, after RoPE (transformers' order)
                q, k = rms_norm(q, None, self.eps), rms_norm(k, None, self.eps)
            if self.temperature_tuning:  # arXiv:2501.19399: sharpen NoPE attention at long positions
                t = attn_temperature(positions, self.floor_scale, self.attn_scale)  # [B, T]
                q = (q.astype(jnp.float32) * t[:, :, None, None]).astype(q.dtype)
        if cache_kv is None:
            keys, values, k_pos, new_cache = k, v, positions, None
        else:
            k_pos = cache_pos
            if not fused or new_keys_only:
                ck, cv = write_slots(cache_kv[0], k, write_index), write_slots(cache_kv[1], v, write_index)
            new_cache = (ck, cv)
            if on_pallas:
                from pallas_kernels.decode_attention import decode_attention

                kv_scale = KV_FP8_SCALE if ck.dtype == FP8 else None  # FP8 cache: dequantized in registers
                o = decode_attention(q, ck, cv, positions, k_pos, chunk_size=self.chunk_size, scale=self.scale,
                                     k_scale=kv_scale, v_scale=kv_scale,
                                     interpret=jax.default_backend() == "cpu")  # [B, T, H, Dh]
                if not project:
                    return o, new_cache
                return self._proj(o, self.wo, self.wo_scale, 2), new_cache  # [B, T, H, Dh] x [H, Dh, D]
            if new_keys_only:  # this call's keys as the cache holds them: [B, T, K, Dh]
                keys, values = (read_kv(encode_kv(a, c.dtype), q.dtype) for a, c in ((k, ck), (v, cv)))
                k_pos = positions
            else:
                keys, values = read_kv(ck, q.dtype), read_kv(cv, q.dtype)
        o = attend_by_position(q, keys, values, positions, k_pos, self.chunk_size, self.scale, attn_mask,
                               self.kernels)  # [B, T, H, Dh]
        if not project:
            return o, new_cache
        return self._proj(o, self.wo, self.wo_scale, 2), new_cache  # [B, T, H, Dh] x [H, Dh, D] -> [B, T, D]

    def _heads(self, w):
        """(heads, head_dim) of wq / wk / wv as stored (on a tensor-parallel device: its own heads)."""
        return tuple(w.shape[:2] if self.w_nk else w.shape[1:])

    def _proj(self, x, w, scale, n_in):
        return dense(x, w[...], None if scale is None else scale[...], n_in, self.kernels, self.w_nk)

    def out_add_norm(self, o, x, norm: "RMSNorm", router=None, widen_rows=None, pad_rows=None):
        """(x + wo(o), norm of it) for the attention output o [B, T, H, Dh] (dense_add_norm; with `router`
        also the MoE router's logit partials and with `pad_rows` the norm's padded copy, with `widen_rows` the
        norm's float16 form)."""
        return dense_add_norm(o, self.wo[...], None if self.wo_scale is None else self.wo_scale[...], 2, x, norm,
                              self.kernels, router=router, widen_rows=widen_rows, pad_rows=pad_rows, w_nk=self.w_nk)

    def _fused_qkv(self, x, positions, rope, cache=None):
        """kernels="pallas", FP8 weights: q, k, v through pallas_kernels.fused_gemm.qkv_rope, with RoPE, the
        qk norm and the temperature in the GEMM epilogue (same function as the unfused branch). With
        cache = (k_cache, v_cache, write_index) the kernel writes k and v into the cache itself (as write_slots
        would) and returns (q, k_cache, v_cache)."""
        from pallas_kernels.fused_gemm import qkv_rope

        B, T, D = x.shape
        (H, Dh), K = self._heads(self.wq), self._heads(self.wk)[0]
        # [N, D] as stored output first (w_nk), else [D, N]: free reshapes
        flat = lambda w, s, n: (w[...].reshape((n * Dh, D) if self.w_nk else (D, n * Dh)),  # noqa: E731
                                s[...].reshape(n * Dh))
        tables = tuple(r.reshape(B * T, Dh // 2) for r in rope) if self.use_rope else None
        t = attn_temperature(positions, self.floor_scale, self.attn_scale).reshape(B * T) \
            if self.temperature_tuning else None
        q, k, v = qkv_rope(x.reshape(B * T, D), *flat(self.wq, self.wq_scale, H), *flat(self.wk, self.wk_scale, K),
                           *flat(self.wv, self.wv_scale, K), head_dim=Dh, rope=tables, q_row_scale=t,
                           qk_norm_eps=self.eps if self.qk_norm else None, out_dtype=x.dtype, cache=cache,
                           cache_encode=encode_kv, w_transposed=self.w_nk,
                           interpret=jax.default_backend() == "cpu")  # [B*T, N*] each
        if cache is not None:  # k, v: the updated caches
            return q.reshape(B, T, H, Dh), k, v
        return q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: Llama4Config, hidden: int, dtype, rngs: nnx.Rngs, kernels: str = "xla", quant=None,
                 out_first=True):
        """out_first: FP8 weights stored output first (_weight; not the shared expert's, which rides with the
        routed experts' [K, N])."""
        D, std = cfg.hidden_size, cfg.initializer_range
        self.kernels = kernels
        self.w_nk = quant is not None and out_first  # w_gate, w_up [F, D], w_down [D, F]
        args = (dtype, std, (0,), quant, out_first)
        self.w_gate, self.w_gate_scale = _weight(rngs, (D, hidden), ("embed", "mlp"), *args)
        self.w_up, self.w_up_scale = _weight(rngs, (D, hidden), ("embed", "mlp"), *args)
        self.w_down, self.w_down_scale = _weight(rngs, (hidden, D), ("mlp", "embed"), *args)

    def __call__(self, x):
        val = lambda v: None if v is None else v[...]  # noqa: E731
        return swiglu(x, val(self.w_gate), val(self.w_gate_scale), val(self.w_up), val(self.w_up_scale),
                      val(self.w_down), val(self.w_down_scale), self.kernels, self.w_nk)

    def widen_rows(self, n_tokens: int):
        """The rows of x's float16 form (pallas_kernels.mgpu_gemv.padded_rows) that the Mosaic GPU gate/up takes
        straight from the norm kernel before it (dense_add_norm(widen_rows=...)) where that kernel runs, so
        that XLA's two widening kernels are not launched; None elsewhere."""
        if self.w_gate_scale is None or not (pallas_gemm(self.kernels, "gate_up", n_tokens)
                                             and use_pallas(self.kernels, "norm")):
            return None
        from pallas_kernels import mgpu_gemv

        F, D = self.w_gate.shape if self.w_nk else self.w_gate.shape[::-1]
        return (mgpu_gemv.padded_rows(n_tokens)
                if use_pallas(self.kernels, "mosaic") and mgpu_gemv.wanted(None, n_tokens, D, (F, F)) else None)

    def down_add_norm(self, x, residual, norm: "RMSNorm", widened=None):
        """(residual + self(x), norm of it): the MLP, the residual add and the next norm (dense_add_norm).
        widened: x's float16 form (widen_rows), or None."""
        val = lambda v: None if v is None else v[...]  # noqa: E731
        h = swiglu_hidden(x, val(self.w_gate), val(self.w_gate_scale), val(self.w_up), val(self.w_up_scale),
                          self.kernels, widened, self.w_nk)  # [..., F]
        return dense_add_norm(h, self.w_down[...], val(self.w_down_scale), 1, residual, norm, self.kernels,
                              w_nk=self.w_nk)


def swiglu_hidden(x, w_gate, s_gate, w_up, s_up, kernels, widened=None, w_nk=False):
    """silu(x @ gate) * (x @ up): x [..., D], w_gate/w_up [D, F] ([F, D] with w_nk: FP8 stored output first; s_*
    the FP8 scales, or None) -> [..., F].
    kernels="pallas" with FP8 weights: gate and up in one launch (Triton's with the SwiGLU in it, or the Mosaic
    GPU kernel's where gate_up_swiglu picks it - taking x's float16 form `widened` where given, MLP.widen_rows,
    or bf16 x of 17-64 rows as it is - unless the "mosaic" family is switched off)."""
    if pallas_gemm(kernels, "gate_up", int(np.prod(x.shape[:-1]))) and s_gate is not None:
        from pallas_kernels.fused_gemm import gate_up_swiglu

        h = gate_up_swiglu(x.reshape(-1, x.shape[-1]), w_gate, s_gate, w_up, s_up, out_dtype=x.dtype,
                           x_widened=widened, mosaic=None if use_pallas(kernels, "mosaic") else False,
                           w_transposed=w_nk, interpret=jax.default_backend() == "cpu")
        return h.reshape(*x.shape[:-1], h.shape[-1])
    g = dense(x, w_gate, s_gate, 1, kernels, w_nk)  # [..., D] x [D, F] -> [..., F]
    u = dense(x, w_up, s_up, 1, kernels, w_nk)  # [..., D] x [D, F] -> [..., F]
    return jax.nn.silu(g) * u


def swiglu(x, w_gate, s_gate, w_up, s_up, w_down, s_down, kernels, w_nk=False):
    """down(silu(x @ gate) * (x @ up)) on arrays (s_* the FP8 scales, or None). x [..., D], w_gate/w_up [D, F],
    w_down [F, D] (with w_nk: [F, D], [D, F], FP8 stored output first). Used by MLP and by the tensor-parallel
    layers (mavjax.parallel) on their shards."""
    h = swiglu_hidden(x, w_gate, s_gate, w_up, s_up, kernels, w_nk=w_nk)  # [..., F]
    return dense(h, w_down, s_down, 1, kernels, w_nk)  # [..., F] x [F, D] -> [..., D]


def route(x, router_w, top_k):
    """Top-k sigmoid routing. x [N, D] -> expert ids [N, k], scores [N, k] (in x's dtype)."""
    return route_logits(router_logits(x, router_w), top_k)


def router_logits(x, router_w):
    return jnp.einsum("nd,de->ne", x, router_w)  # [N, D] x [D, E] -> [N, E]


def route_logits(logits, top_k):
    """route() given the router's logits [N, E] (the Pallas MoE pair kernels do its top-1 case themselves:
    pallas_kernels.moe_gemm.top1_of_logits)."""
    if top_k == 1:  # Maverick: XLA:GPU lowers top_k to a sort kernel of its own, a reduction is cheaper
        top_vals, top_idx = top1(logits)
        top_vals, top_idx = top_vals[:, None], top_idx[:, None]  # [N, 1]
    else:
        top_vals, top_idx = jax.lax.top_k(logits, top_k)  # [N, k]
    return top_idx, jax.nn.sigmoid(top_vals.astype(jnp.float32)).astype(logits.dtype)


@jax.custom_jvp
def top1(logits):
    """(the largest logit, the lowest expert id holding it) of each row of logits [N, E] - lax.top_k(k=1)'s
    pick; a NaN counts as the largest, as in jnp.argmax - in ONE variadic reduction: argmax then a gather of
    its value would be two XLA kernels. Differentiable in the value (training routes through it): `_top1_jvp`."""
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)

    def better(a, b):  # (value, id) pairs: the larger value, the lower id among equals
        (av, ai), (bv, bi) = a, b
        a_nan, b_nan = jnp.isnan(av), jnp.isnan(bv)
        first = (a_nan & ~b_nan) | (~b_nan & (av > bv)) | (((av == bv) | (a_nan & b_nan)) & (ai < bi))
        return jnp.where(first, av, bv), jnp.where(first, ai, bi)

    init = (jnp.array(-jnp.inf, logits.dtype), jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32))
    return jax.lax.reduce((logits, ids), init, better, (1,))  # [N], [N]


@top1.defjvp
def _top1_jvp(primals, tangents):
    """The value's tangent is the chosen logit's (what argmax + take_along_axis would give; JAX cannot
    differentiate a variadic reduction with a custom comparator), the id's none."""
    (logits,), (dlogits,) = primals, tangents
    vals, idx = top1(logits)
    dvals = jnp.take_along_axis(dlogits, idx[:, None], axis=-1)[:, 0]  # [N]
    return (vals, idx), (dvals, np.zeros(idx.shape, jax.dtypes.float0))


# Up to this many (token, expert) pairs, gather the chosen experts' weights per pair instead of sorting
# tokens into a grouped GEMM: at decode only the routed experts are read, whatever ragged_dot lowers to.
GATHER_MAX_PAIRS = 8


def moe_experts(x, expert_idx, scores, w_gate, w_up, w_down, scales=None):
    """Routed experts. The score scales the expert's *input*, as Llama 4 does. x [N, D],
    expert_idx/scores [N, k], w_gate/w_up [E, D, F], w_down [E, F, D] -> [N, D]. `scales`: None, or the FP8
    weights' per-(expert, output channel) scales (s_gate [E, F], s_up [E, F], s_down [E, D])."""
    scales = scales or (None, None, None)
    if expert_idx.size <= GATHER_MAX_PAIRS:
        return moe_experts_gathered(x, expert_idx, scores, w_gate, w_up, w_down, scales)
    return moe_experts_grouped(x, expert_idx, scores, w_gate, w_up, w_down, scales)


def _scaled(y, scale_rows):
    return y if scale_rows is None else (y * scale_rows).astype(y.dtype)


def moe_experts_gathered(x, expert_idx, scores, w_gate, w_up, w_down, scales):
    """Few tokens (decode): per (token, expert) pair, read that expert's weights."""
    sg, su, sd = (None if s is None else s[expert_idx] for s in scales)  # [N, k, F|D]
    up = lambda w: w[expert_idx].astype(x.dtype)  # noqa: E731  [N, k, ...] (FP8 upcast after the gather)
    xs = x[:, None, :] * scores[..., None]  # [N, k, D]
    g = _scaled(jnp.einsum("nkd,nkdf->nkf", xs, up(w_gate)), sg)  # [N, k, F]
    u = _scaled(jnp.einsum("nkd,nkdf->nkf", xs, up(w_up)), su)  # [N, k, F]
    y = _scaled(jnp.einsum("nkf,nkfd->nkd", jax.nn.silu(g) * u, up(w_down)), sd)  # [N, k, D]
    return jnp.sum(y, axis=1)


def moe_experts_grouped(x, expert_idx, scores, w_gate, w_up, w_down, scales):
    """Many tokens: grouped GEMMs over tokens sorted by expert (no dense product over all experts)."""
    N, D = x.shape
    E, k = w_gate.shape[0], expert_idx.shape[1]
    flat_e = expert_idx.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_e, stable=True)
    token = (jnp.arange(N * k) // k)[order]  # [N*k] source token of each sorted row
    xs = x[token] * scores.reshape(-1)[order][:, None]  # [N*k, D]
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)  # [E]
    sg, su, sd = (None if s is None else s[flat_e[order]] for s in scales)  # [N*k, F|D]
    g = _scaled(expert_ragged_dot(xs, w_gate, sizes), sg)  # [N*k, F]
    u = _scaled(expert_ragged_dot(xs, w_up, sizes), su)  # [N*k, F]
    y = _scaled(expert_ragged_dot(jax.nn.silu(g) * u, w_down, sizes), sd)  # [N*k, D]
    return jnp.zeros((N, D), y.dtype).at[token].add(y)


# Narrower (FP8) expert weights are upcast for ragged_dot at most this many bytes at a time: upcasting all
# experts at once would hold a bf16 copy of the whole layer (3 x 10.7 GB at Maverick size).
UPCAST_CHUNK_BYTES = 1 << 30


def expert_ragged_dot(xs, w, sizes):
    """ragged_dot(xs [R, K], w [E, K, N], sizes [E]) -> [R, N], rows sorted by expert. Weights narrower than xs
    are upcast a chunk of G experts at a time: chunk c is a ragged_dot over G+1 groups whose first (a zero
    expert) takes the rows of the experts before it; rows after the chunk fall outside every group and are
    zeroed (explicitly: not every backend promises it), so the chunks' results add up to the whole product.
    Rows past sum(sizes) (sentinel rows of mavjax.parallel) come out zero."""
    E, K, N = w.shape
    per_expert = K * N * xs.dtype.itemsize
    G = max(g for g in range(1, E + 1) if E % g == 0 and (g * per_expert <= UPCAST_CHUNK_BYTES or g == 1))
    if w.dtype == xs.dtype or G == E:
        y = jax.lax.ragged_dot(xs, w.astype(xs.dtype), sizes)  # [R, N]
        return jnp.where((jnp.arange(xs.shape[0]) < jnp.sum(sizes))[:, None], y, 0)
    before = jnp.cumsum(sizes) - sizes  # [E] rows of the experts ahead of each one
    zero = jnp.zeros((1, K, N), xs.dtype)

    def chunk(acc, c):
        wc = jax.lax.dynamic_slice_in_dim(w, c * G, G).astype(xs.dtype)  # [G, K, N]
        sc = jax.lax.dynamic_slice_in_dim(sizes, c * G, G)  # [G]
        groups = jnp.concatenate([before[c * G][None], sc])  # [G+1]
        y = jax.lax.ragged_dot(xs, jnp.concatenate([zero, wc]), groups)  # [R, N]
        inside = jnp.arange(xs.shape[0]) < jnp.sum(groups)  # [R] rows of this chunk's experts or before
        return acc + jnp.where(inside[:, None], y, 0), None

    acc0 = jnp.zeros((xs.shape[0], N), xs.dtype)
    return jax.lax.scan(chunk, acc0, jnp.arange(E // G))[0]


class MoE(nnx.Module):
    def __init__(self, cfg: Llama4Config, dtype, rngs: nnx.Rngs, kernels: str = "xla", quant=None):
        D, E, F, std = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size, cfg.initializer_range
        self.top_k = cfg.num_experts_per_tok
        self.kernels = kernels
        self.router = _param(rngs, (D, E), ("embed", "router_expert"), dtype, std)  # bf16 even in FP8 models
        ax_in, ax_out = ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")
        args = (dtype, std, (1,), quant, False)  # FP8 experts stay [E, K, N] (_weight)
        self.w_gate, self.w_gate_scale = _weight(rngs, (E, D, F), ax_in, *args)
        self.w_up, self.w_up_scale = _weight(rngs, (E, D, F), ax_in, *args)
        self.w_down, self.w_down_scale = _weight(rngs, (E, F, D), ax_out, *args)
        self.shared = MLP(cfg, F, dtype, rngs, kernels, quant, out_first=False)  # stored like the routed experts

    def routes_in_kernels(self, n_tokens: int) -> bool:
        """Whether the Pallas MoE pair kernels route the n_tokens tokens themselves (top-1, from the router's
        logits, `moe_fp8_pairs(router_logits=...)`): top-1 routing on moe_fp8's pair path (decode, verify and
        small batches: at most PAIRS_MAX tokens), unless "moe_router" is switched off or the routed experts run
        on the Mosaic GPU kernel (`experts_on_mosaic`: XLA routes for it)."""
        from pallas_kernels.moe_gemm import PAIRS_MAX

        return (self.top_k == 1 and use_pallas(self.kernels, "moe") and use_pallas(self.kernels, "moe_router")
                and 1 <= n_tokens <= PAIRS_MAX and not self.experts_on_mosaic(n_tokens))

    def experts_on_mosaic(self, n_tokens: int) -> bool:
        """Whether the routed experts of n_tokens tokens run on the Mosaic GPU kernel
        (pallas_kernels.moe_mgpu: Hopper, up to 16 pairs, FP8 experts), routed by XLA from the logits. On one
        H200 (the 8-way rank, docs/benchmarks.md section 21) that made the decode step 3%, the 4-token verify
        step 10% and the batch-8 step 11% faster than the Triton pair kernels routing in-kernel. "mosaic"
        switched off: never. The shapes checked are the whole layer's (a mesh shard that the kernel does not take
        runs the Triton pair path, routed by XLA)."""
        from pallas_kernels import moe_mgpu

        if self.w_gate_scale is None or not (use_pallas(self.kernels, "moe") and use_pallas(self.kernels, "mosaic")):
            return False
        E, D, F = self.w_gate.shape
        scales = (self.w_gate_scale[...], self.w_up_scale[...], self.w_down_scale[...])
        return moe_mgpu.wanted(n_tokens * self.top_k, D, F, scales)

    def shared_rides(self, n_tokens: int) -> bool:
        """Whether the shared expert rides in the MoE kernels' launches. On the Mosaic GPU path (`experts_on_
        mosaic`) always: one program row streams it once for all tokens, on the columns the tokens take anyway
        (docs/benchmarks.md sections 22-23). On the Triton pair path at one token only (`shared_in_moe_kernels`:
        there each token's row re-reads the shared expert)."""
        if self.experts_on_mosaic(n_tokens):
            return shared_may_ride(self.kernels, self.shared.w_gate, self.w_gate)
        return shared_in_moe_kernels(self.kernels, (n_tokens, self.top_k), self.shared.w_gate, self.w_gate)

    def pad_rows(self, n_tokens: int, dtype):
        """The rows of the padded copy of x (pallas_kernels.mgpu_gemv.padded_rows) that the Mosaic GPU MoE path
        takes straight from the add + norm kernel before it (add_rms_norm(pad_rows=...), beside the router's
        logits), so that no XLA pad kernel runs before its first launch: bf16 x on that path with the logits from
        the norm (`logits_in_norm`); None elsewhere."""
        from pallas_kernels.mgpu_gemv import padded_rows

        ok = jnp.dtype(dtype) == jnp.bfloat16 and self.experts_on_mosaic(n_tokens) and self.logits_in_norm(n_tokens)
        return padded_rows(n_tokens) if ok else None

    def logits_in_norm(self, n_tokens: int) -> bool:
        """Whether the add + norm kernel before this MoE should compute its router's logits (as partials,
        fused_norm.add_rms_norm(router=...)) for `__call__(x, logits=...)`: where the pair kernels route or the
        experts run on the Mosaic GPU kernel (XLA then routes from them), with the Pallas norm, unless
        "norm_router" is switched off. Saves the router's XLA dot (two kernels)."""
        return ((self.routes_in_kernels(n_tokens) or self.experts_on_mosaic(n_tokens))
                and use_pallas(self.kernels, "norm") and use_pallas(self.kernels, "norm_router"))

    def __call__(self, x, logits=None, x_padded=None):
        """x [B, T, D] -> [B, T, D]. logits: None, or the router's logits of x as float32 partials [P, B*T, E]
        from the add + norm kernel (only where logits_in_norm); x_padded: None, or x's padded copy from it
        (only where pad_rows)."""
        B, T, D = x.shape
        N = B * T
        flat = x.reshape(N, D)
        routes = self.routes_in_kernels(N)
        mosaic = self.experts_on_mosaic(N)
        if logits is not None and not (routes or mosaic):
            raise ValueError("router logits given to an MoE that does not take them (see logits_in_norm)")
        if x_padded is not None and not mosaic:
            raise ValueError("a padded x given to an MoE that does not take it (see pad_rows)")
        scales = None if self.w_gate_scale is None else \
            (self.w_gate_scale[...], self.w_up_scale[...], self.w_down_scale[...])
        weights = (self.w_gate[...], self.w_up[...], self.w_down[...])
        if not use_pallas(self.kernels, "moe"):
            routed = moe_experts(flat, *route(flat, self.router[...], self.top_k), *weights, scales)
            return (self.shared(flat) + routed).reshape(B, T, D)
        # one grouped-GEMM launch pair over all experts; unrouted experts not read
        from pallas_kernels import mgpu_gemv
        from pallas_kernels.fused_norm import sum_router_partials
        from pallas_kernels.moe_gemm import moe_fp8, moe_fp8_pairs
        from pallas_kernels.moe_mgpu import moe_fp8_mgpu

        interpret = jax.default_backend() == "cpu"
        sh, shared = self.shared, None
        if self.shared_rides(N):  # the shared expert as more program rows of the same two launches
            val = lambda v: None if v is None else v[...]  # noqa: E731
            s_sh = None if scales is None else (val(sh.w_gate_scale), val(sh.w_up_scale), val(sh.w_down_scale))
            shared = (sh.w_gate[...], sh.w_up[...], sh.w_down[...], s_sh)
        if routes:  # the pair kernels route each token from the logits: no XLA argmax / sigmoid
            lg = router_logits(flat, self.router[...]) if logits is None else logits
            out = moe_fp8_pairs(flat, None, None, *weights, scales, shared=shared, interpret=interpret,
                                router_logits=lg)
        else:  # XLA routes: from the norm kernel's logit partials (summed, then rounded, as the kernels do)
            ids, sc = route(flat, self.router[...], self.top_k) if logits is None else \
                route_logits(sum_router_partials(logits, flat.dtype), self.top_k)
            if mosaic:
                out = moe_fp8_mgpu(flat, ids, sc, *weights, scales, shared=shared, x_padded=x_padded,
                                   interpret=mgpu_gemv.interpret_params(interpret))
            else:
                # many pairs (prefill): the sorted path, on the Mosaic GPU kernel where moe_fp8 finds it wanted
                out = moe_fp8(flat, ids, sc, *weights, scales, shared=shared, interpret=interpret,
                              mosaic=None if use_pallas(self.kernels, "mosaic") else False)
        return (out if shared is not None else self.shared(flat) + out).reshape(B, T, D)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Llama4Config, layer: int, dtype, rngs: nnx.Rngs, kernels: str = "xla", quant=None):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.attn = Attention(cfg, layer, dtype, rngs, kernels, quant)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = MoE(cfg, dtype, rngs, kernels, quant) if self.is_moe else \
            MLP(cfg, cfg.intermediate_size_mlp, dtype, rngs, kernels, quant)
        self.kernels = kernels

    def __call__(self, x, positions, rope, cache_kv=None, cache_pos=None, write_index=None, attn_mask=None):
        """One layer on its own: x [B, T, D] -> (x [B, T, D], cache_kv). Llama4.hidden_states runs the same
        arithmetic with each layer's last residual add fused into the next layer's first norm."""
        h, cache_kv = self.attn(self.attn_norm(x), positions, rope, cache_kv, cache_pos, write_index, attn_mask)
        x, normed = add_norm(x, h, self.ffn_norm, self.kernels)
        return x + self.ffn(normed), cache_kv


def add_norm(x, delta, norm: RMSNorm, kernels: str, router=None, widen_rows=None, pad_rows=None):
    """(x + delta, norm(x + delta)): a residual add and the RMSNorm after it; one pass over [B, T, D]
    (pallas_kernels.fused_norm) when kernels="pallas". router [D, E] (Pallas norm only, MoE.logits_in_norm):
    also the router's logits of the normed rows as the kernel's float32 partials [P, B*T, E], and with pad_rows
    (MoE.pad_rows) the normed rows padded [pad_rows, D]. widen_rows (Pallas norm only, MLP.widen_rows): also
    the normed rows' float16 form (yc, rs)."""
    if use_pallas(kernels, "norm"):
        from pallas_kernels.fused_norm import add_rms_norm

        return add_rms_norm(x, delta, norm.scale[...], eps=norm.eps, router=router, widen_rows=widen_rows,
                            pad_rows=pad_rows, interpret=jax.default_backend() == "cpu")
    if router is not None or widen_rows is not None or pad_rows is not None:
        raise ValueError("router logits or a widened / padded copy from the add + norm need the Pallas norm kernel")
    x = x + delta
    return x, norm(x)


def dense_add_norm(h, w, scale, n_in, x, norm: RMSNorm, kernels: str, router=None, widen_rows=None, pad_rows=None,
                   w_nk=False):
    """(x + dense(h), norm of it): an output projection (wo, an MLP's down), the residual add and the next
    RMSNorm. kernels="pallas" with FP8 weights: pallas_kernels.fp8_gemm.fp8_matmul_add_rms_norm, by default
    the FP8 GEMM then the add + norm kernel; with the GEMM family's split-K sums in the kernel
    (MAVJAX_SPLIT_K_REDUCE=gemm=kernel) one launch. h [..., *in] with in = w.shape[:n_in]; x [..., D].
    router, pad_rows: as add_norm (then always the GEMM and the add + norm kernel, which computes the logits);
    widen_rows: as add_norm (then the returns are (s, y, yc, rs)). w_nk: as dense."""
    rows = int(np.prod(h.shape[:-n_in]))
    if scale is not None and pallas_gemm(kernels, "gemm", rows) and use_pallas(kernels, "norm") and router is None:
        from pallas_kernels.fp8_gemm import fp8_matmul_add_rms_norm

        K = int(np.prod(w.shape[-n_in:] if w_nk else w.shape[:n_in]))
        s, y, *widened = fp8_matmul_add_rms_norm(
            h.reshape(-1, K), w.reshape((-1, K) if w_nk else (K, -1)), scale.reshape(-1), x.reshape(-1, x.shape[-1]),
            norm.scale[...], eps=norm.eps, widen_rows=widen_rows, w_transposed=w_nk, mosaic=mosaic_gemm(kernels, rows),
            interpret=jax.default_backend() == "cpu")
        return (s.reshape(x.shape), y.reshape(x.shape), *widened)
    return add_norm(x, dense(h, w, scale, n_in, kernels, w_nk), norm, kernels, router=router, widen_rows=widen_rows,
                    pad_rows=pad_rows)


class Llama4(nnx.Module):
    """Token ids in, logits (or final hidden states) out. `kernels`: "xla" (plain jax.numpy) or "pallas"
    (the kernels of pallas_kernels/ where they apply; both compute the same function)."""

    def __init__(self, cfg: Llama4Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 kernels: str = "xla", quant: str | None = None):
        """`quant="fp8"`: attention, dense-MLP and expert projections hold float8_e4m3fn weights with per-output-
        channel scales (fill them with `mavjax.quantize`); embedding, LM head, router and norms stay in `dtype`,
        as in the published FP8 release."""
        if kernels not in ("xla", "pallas"):
            raise ValueError(f"kernels must be 'xla' or 'pallas', got {kernels!r}")
        if quant not in (None, "fp8"):
            raise ValueError(f"quantize must be None or 'fp8', got {quant!r}")
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.kernels, self.quant = kernels, quant
        D, V, std = cfg.hidden_size, cfg.vocab_size, cfg.initializer_range
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), dtype, std)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs, kernels, quant)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs)
        self.lm_head = None if cfg.tie_word_embeddings else _param(rngs, (D, V), ("embed", "vocab"), dtype, std)
        self.inv_freq = nnx.Variable(jnp.asarray(cfg.rope_inv_freq(), jnp.float32))  # not a Param: not trained
        self.parallel = None  # a mavjax.parallel.Parallel: run the layers under shard_map over its mesh

    def set_parallel(self, parallel) -> "Llama4":
        """Run over `parallel.mesh` (mavjax.parallel; parameters must be sharded by mavjax.sharding.RULES)."""
        self.parallel = parallel
        return self

    def hidden_states(self, tokens, positions, cache=None, write_index=None, collect_layers=(), attn_mask=None,
                      fresh_cache=False):
        """tokens, positions [B, T] -> (final-normed hidden [B, T, D], updated cache, {layer: hidden}).
        `attn_mask` [B, T, S]: optional extra attention mask over the cache slots; `fresh_cache`: the cache is
        new (a prefill: attention reads this call's keys only, see Attention)."""
        if self.parallel is not None:
            from mavjax import parallel

            return parallel.hidden_states(self, tokens, positions, cache, write_index, collect_layers, attn_mask,
                                          fresh_cache)
        x = self.embed_tokens(tokens)  # [B, T, D]
        rope = rope_tables(self.inv_freq[...], positions)
        cache_pos = None if cache is None else write_slots(cache.pos, positions, write_index)
        new_kv, taps = [], {}
        layers = list(self.layers)
        h = layers[0].attn_norm(x)
        for i, layer in enumerate(layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            o, kv = layer.attn(h, positions, rope, kv, cache_pos, write_index, attn_mask, project=False,
                               fresh_cache=fresh_cache)
            new_kv.append(kv)
            # the router's logits come out of the FFN's norm kernel where the MoE kernels route (decode)
            router = layer.ffn.router[...] if layer.is_moe and layer.ffn.logits_in_norm(h.shape[0] * h.shape[1]) \
                else None
            # ... and the dense MLP's Mosaic GPU gate/up takes its x widened to float16 from it, the MoE's
            # Mosaic GPU experts their x padded
            widen = None if layer.is_moe else layer.ffn.widen_rows(h.shape[0] * h.shape[1])
            pad = layer.ffn.pad_rows(h.shape[0] * h.shape[1], h.dtype) if router is not None else None
            x, h, *extra = layer.attn.out_add_norm(o, x, layer.ffn_norm, router, widen, pad)  # wo, add, FFN norm
            # the layer's last residual add and the next layer's first norm (the final norm after the last)
            nxt = layers[i + 1].attn_norm if i + 1 < len(layers) else self.norm
            if layer.is_moe:
                x, h = add_norm(x, layer.ffn(h, *extra), nxt, self.kernels)
            else:
                x, h = layer.ffn.down_add_norm(h, x, nxt, tuple(extra) or None)
            if i in collect_layers:
                taps[i] = x
        if cache is not None:
            cache = KVCache(k=[kv[0] for kv in new_kv], v=[kv[1] for kv in new_kv], pos=cache_pos)
        return h, cache, taps

    def embed_tokens(self, tokens):
        """tokens [B, T] -> [B, T, D] (over a mesh: the vocabulary-parallel lookup of mavjax.parallel)."""
        if self.parallel is not None:
            from mavjax import parallel

            return parallel.embed(self.parallel, self.embed[...], tokens)
        return self.embed[...][tokens]

    def logits(self, h):
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        if self.parallel is not None:  # vocabulary-sharded head: whole logits on every device
            from mavjax import parallel

            return parallel.logits(self.parallel, h, w)
        return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)  # [B, T, V]

    def __call__(self, tokens, positions=None, cache=None, write_index=None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        h, cache, _ = self.hidden_states(tokens, positions, cache, write_index)
        return self.logits(h), cache
