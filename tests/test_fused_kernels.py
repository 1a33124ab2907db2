"""Fused kernels (pallas_kernels/fused_norm.py, fused_gemm.py) under the Pallas interpreter vs their references.

Error bounds (||out - ref|| / ||ref||, refs in float32 at HIGHEST precision on the dequantized weights):
  * float32 outputs: e4m3 -> bf16 upcasts are exact and bf16 x bf16 (or e4m3 x e4m3) products are exact in
    f32, so kernel and reference differ only in f32 summation order and in exp / rsqrt ulps: bound 1e-5.
  * bf16 outputs: plus the final rounding, <= 2^-9 relative per element: bound 1e-2.
  * add + RMSNorm: the residual sum is one correctly rounded add on both sides (bit-equal); the normed
    output differs by f32 summation order before one bf16 rounding (a rare 1-ulp flip): bound 1e-2 for bf16,
    1e-5 for f32.
Every output starts as NaN (poison_output aliases a NaN buffer in), so an element not written fails the
finiteness check. Shapes are ragged (not multiples of the blocks), with single rows and forced split-K.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mavjax.model import apply_rope, rms_norm, rope_tables
from pallas_kernels.fp8_gemm import FP8, quantize_weight_per_channel
from pallas_kernels.fused_gemm import (
    _rope_ref, gate_up_swiglu, gate_up_swiglu_ref, qkv_rope, qkv_rope_ref, rope_columns)
from pallas_kernels.fused_norm import add_rms_norm, add_rms_norm_ref


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _finite(*ys):
    for y in ys:
        assert bool(jnp.isfinite(y).all()), "unwritten (NaN-poisoned) or non-finite output elements"


def _w(key, K, N):
    w = jax.random.normal(key, (K, N), jnp.float32) * 10.0 ** jax.random.uniform(
        jax.random.fold_in(key, 1), (1, N), minval=-2.5, maxval=-1)
    return quantize_weight_per_channel(w)


# ---------------------------------------------------------------------------------------------------------
# residual add + RMSNorm
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lead,D,dtype,block_m", [((1,), 64, jnp.bfloat16, 4), ((2, 3), 100, jnp.bfloat16, 4),
                                                  ((37,), 48, jnp.float32, 8), ((5,), 256, jnp.bfloat16, 1)])
def test_add_rms_norm(lead, D, dtype, block_m):
    k1, k2, k3 = jax.random.split(jax.random.key(D), 3)
    x = (3 * jax.random.normal(k1, (*lead, D))).astype(dtype)
    h = jax.random.normal(k2, (*lead, D)).astype(dtype)
    scale = (1 + 0.3 * jax.random.normal(k3, (D,))).astype(dtype)
    s, y = add_rms_norm(x, h, scale, eps=1e-5, block_m=block_m, interpret=True, poison_output=True)
    s_ref, y_ref = add_rms_norm_ref(x, h, scale, 1e-5)
    _finite(s, y)
    assert s.shape == y.shape == x.shape and s.dtype == dtype and y.dtype == y_ref.dtype
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    assert _err(y, y_ref) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize("lead,D,E,router_block,dtype,block_m", [
    ((1,), 200, 8, 64, jnp.bfloat16, None),   # decode: one token, D not a multiple of the slice
    ((1, 1), 96, 5, 32, jnp.bfloat16, None),  # E not a power of two
    ((3,), 64, 16, 128, jnp.float32, 2),      # one slice wider than D; rows past the end
    ((2, 3), 130, 3, 16, jnp.bfloat16, 4),    # many slices, the last of 2 columns
])
def test_add_rms_norm_with_router_logits(lead, D, E, router_block, dtype, block_m):
    """router=: s and y exactly as without it (each program writes its slice of them, all written), and the
    partials sum to the router's logits of y (mavjax.model.router_logits), one partial per D slice."""
    from pallas_kernels.fused_norm import sum_router_partials

    k1, k2, k3, k4 = jax.random.split(jax.random.key(D + E), 4)
    x = (3 * jax.random.normal(k1, (*lead, D))).astype(dtype)
    h = jax.random.normal(k2, (*lead, D)).astype(dtype)
    scale = (1 + 0.3 * jax.random.normal(k3, (D,))).astype(dtype)
    router = (0.1 * jax.random.normal(k4, (D, E))).astype(dtype)
    s, y, parts = add_rms_norm(x, h, scale, eps=1e-5, router=router, router_block=router_block, block_m=block_m,
                               interpret=True, poison_output=True)
    _finite(s, y, parts)
    s0, y0 = add_rms_norm(x, h, scale, eps=1e-5, interpret=True)
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s0, np.float32))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
    M = int(np.prod(lead))
    assert parts.shape == (-(-D // router_block), M, E) and parts.dtype == jnp.float32
    _, _, lg_ref = add_rms_norm_ref(x, h, scale, 1e-5, router=router)
    assert lg_ref.shape == (*lead, E)
    want = jnp.einsum("md,de->me", y0.reshape(M, D).astype(jnp.float32), router.astype(jnp.float32),
                      precision="highest")
    # f32 products and sums: summation order only; but with bf16 y the CPU interpreter multiplies y before its
    # rounding to bf16 (XLA's excess precision drops the convert pair), up to 2^-9 per element
    assert _err(jnp.sum(parts, axis=0), want) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)
    lg = sum_router_partials(parts, dtype)
    assert lg.dtype == dtype
    assert _err(lg, lg_ref.reshape(M, E)) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)
    # pad_rows: y again, padded with zero rows (the Mosaic GPU MoE path's x); the rest unchanged
    rows = -(-M // 8) * 8 + (8 if M == 6 else 0)  # 8, or 16 rows past 6 tokens
    s2, y2, parts2, yp = add_rms_norm(x, h, scale, eps=1e-5, router=router, router_block=router_block,
                                      block_m=block_m, pad_rows=rows, interpret=True, poison_output=True)
    _finite(s2, y2, parts2, yp)
    assert yp.shape == (rows, D) and yp.dtype == y.dtype
    for a, b in ((s2, s), (y2, y), (parts2, parts), (yp[:M], y.reshape(M, D))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert not np.asarray(yp[M:], np.float32).any()
    with pytest.raises(ValueError, match="needs a router and at least"):
        add_rms_norm(x, h, scale, eps=1e-5, pad_rows=rows, interpret=True)


@pytest.mark.parametrize("lead,D,rows,block_m", [((1,), 64, 8, None), ((3,), 100, 8, 2), ((2, 5), 128, 16, None),
                                                 ((1, 4), 64, 8, None), ((12,), 128, 16, 4)])
def test_add_rms_norm_widened_for_the_mosaic_gemm(lead, D, rows, block_m):
    """widen_rows: the normed rows also in the Mosaic GPU GEMM's float16 form, yc [rows, D] and rs [rows] with
    y = yc * rs exactly up to f16's rounding of a value bf16 holds exactly (rs powers of two, |yc| < 2^14: no
    overflow however large the rows); rows past the tokens zero; s and y bit-equal to the plain kernel's.
    Token counts that are a multiple of block_m (4, 12: a verify step's 4 tokens) with more rows widened: the
    grid's extra programs must mask their rows (unmasked, on the GPU they read past x and h and wrote rows past
    the end of s and y, clobbering the next buffer: docs/benchmarks.md section 20). (On
    the CPU, XLA's excess precision can skip the bf16 rounding of y inside the kernel, so yc may carry a few
    more bits than y: the bound is f16's 2^-11, not exact equality.)"""
    from pallas_kernels.upcast import to_compute

    k1, k2, k3 = jax.random.split(jax.random.key(D), 3)
    x = (3 * jax.random.normal(k1, (*lead, D))).astype(jnp.bfloat16)
    h = (1e3 * jax.random.normal(k2, (*lead, D))).astype(jnp.bfloat16)
    scale = (1 + 0.3 * jax.random.normal(k3, (D,))).astype(jnp.bfloat16)
    s, y, yc, rs = add_rms_norm(x, h, scale, eps=1e-5, widen_rows=rows, block_m=block_m, interpret=True,
                                poison_output=True)
    s0, y0 = add_rms_norm(x, h, scale, eps=1e-5, block_m=block_m, interpret=True)
    _finite(s, y, yc, rs)
    M = int(np.prod(lead))
    assert yc.shape == (rows, D) and yc.dtype == jnp.float16 and rs.shape == (rows,) and rs.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s0, np.float32))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
    want_c, want_s = to_compute(y.reshape(M, D), jnp.float16)
    np.testing.assert_array_equal(np.asarray(rs[:M]), np.asarray(want_s))
    back = yc[:M].astype(jnp.float32) * rs[:M, None]
    np.testing.assert_allclose(np.asarray(back), np.asarray(y.reshape(M, D), np.float32), rtol=2 ** -8, atol=0)
    assert float(jnp.abs(yc[:M].astype(jnp.float32)).max()) < 2 ** 14
    assert not np.asarray(yc[M:]).any()
    with pytest.raises(ValueError, match="widen_rows=2 needs no router and at least"):
        add_rms_norm(x, h, scale, eps=1e-5, widen_rows=2, interpret=True) if M > 2 else \
            add_rms_norm(x, h, scale, eps=1e-5, widen_rows=2, router=jnp.ones((D, 4), jnp.bfloat16), interpret=True)


def test_add_rms_norm_bad_input():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="same shape"):
        add_rms_norm(x, jnp.ones((2, 9)), jnp.ones(8), eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="scale must be"):
        add_rms_norm(x, x, jnp.ones(9), eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match=r"router must be \[D=8, E\]"):
        add_rms_norm(x, x, jnp.ones(8), eps=1e-5, router=jnp.ones((9, 4)), interpret=True)
    with pytest.raises(ValueError, match="router_block=48 must be a power of two"):
        add_rms_norm(x, x, jnp.ones(8), eps=1e-5, router=jnp.ones((8, 4)), router_block=48, interpret=True)


# ---------------------------------------------------------------------------------------------------------
# gate/up + SwiGLU
# ---------------------------------------------------------------------------------------------------------

GATE_UP = [  # (M, D, F, mode, cfg)
    (1, 256, 192, "weight_only", dict(block_n=64, block_k=64, split_k=1)),
    (5, 300, 200, "weight_only", dict(block_n=64, block_k=64, split_k=3)),   # ragged K and N, split-K
    (16, 160, 96, "weight_only", dict(block_n=32, block_k=32, split_k=1)),
    (70, 200, 130, "fp8_fp8", dict(block_m=32, block_n=64, block_k=64)),      # ragged M, N, K
]


@pytest.mark.parametrize("M,D,F,mode,cfg", GATE_UP)
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_gate_up_swiglu(M, D, F, mode, cfg, out_dtype):
    kx, kg, ku = jax.random.split(jax.random.key(M * 1000 + F), 3)
    x = (jax.random.normal(kx, (M, D)) + 0.1).astype(jnp.bfloat16)
    (wg, sg), (wu, su) = _w(kg, D, F), _w(ku, D, F)
    y = gate_up_swiglu(x, wg, sg, wu, su, mode=mode, out_dtype=out_dtype, interpret=True, poison_output=True,
                       **cfg)
    ref = gate_up_swiglu_ref(x, wg, sg, wu, su, mode=mode, out_dtype=jnp.float32)
    _finite(y)
    assert y.shape == (M, F) and y.dtype == out_dtype
    assert _err(y, ref) < (1e-5 if out_dtype == jnp.float32 else 1e-2)


def test_gate_up_swiglu_bad_input():
    wq, s = _w(jax.random.key(0), 64, 32)
    with pytest.raises(ValueError, match="same shape"):
        gate_up_swiglu(jnp.ones((2, 64)), wq, s, wq[:, :16], s[:16], interpret=True)
    with pytest.raises(ValueError, match="per output channel"):
        gate_up_swiglu(jnp.ones((2, 64)), wq, s, wq, s[:16], interpret=True)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        gate_up_swiglu(jnp.ones((2, 64)), wq.astype(jnp.bfloat16), s, wq, s, interpret=True)


# ---------------------------------------------------------------------------------------------------------
# QKV + RoPE / qk-norm / temperature
# ---------------------------------------------------------------------------------------------------------

def test_rope_columns_match_model_apply_rope():
    """The per-column tables with the c ^ 1 partner reproduce mavjax.model.apply_rope (interleaved pairs)."""
    Dh, H = 16, 3
    inv_freq = 1.0 / (500.0 ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))
    pos = jnp.array([[0, 5, 77]], jnp.int32)
    cos, sin = rope_tables(inv_freq, pos)  # [1, 3, Dh/2]
    x = jax.random.normal(jax.random.key(0), (1, 3, H, Dh))
    want = apply_rope(x, cos, sin).reshape(3, H * Dh)
    got = _rope_ref(x.reshape(3, H * Dh), *rope_columns(cos[0], sin[0]), Dh)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


F32, BF16 = jnp.float32, jnp.bfloat16
QKV = [  # (M, D, H, K, Dh, rope, norm, temp, mode, cfg, out_dtype)
    (1, 256, 4, 2, 32, True, True, False, "weight_only", dict(block_n=32, block_k=64, split_k=1), F32),  # norm in
    (1, 256, 4, 2, 32, True, True, False, "weight_only", dict(block_n=32, block_k=64, split_k=1), BF16),
    (3, 200, 4, 1, 32, True, True, False, "weight_only", dict(block_n=16, block_k=64, split_k=2), F32),  # norm after
    (6, 130, 2, 2, 32, False, False, True, "weight_only", dict(block_n=32, block_k=32, split_k=3), BF16),  # NoPE
    (1, 64, 2, 1, 16, True, False, False, "weight_only", dict(block_n=16, block_k=16, split_k=1), F32),
    (20, 96, 4, 2, 32, True, True, False, "fp8_fp8", dict(block_m=16, block_n=32, block_k=32), F32),  # ragged M
    (20, 96, 2, 1, 32, False, False, True, "fp8_fp8", dict(block_m=16, block_n=16, block_k=64), BF16),
]


def _qkv_inputs(seed, M, D, H, K, Dh, rope, temp):
    """x [M, D], the (weight, scale) pairs of q, k, v, the RoPE tables of random positions (or None) and the
    temperature row scale (or None)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = (jax.random.normal(keys[0], (M, D)) + 0.1).astype(jnp.bfloat16)
    ws = _w(keys[1], D, H * Dh), _w(keys[2], D, K * Dh), _w(keys[3], D, K * Dh)
    pos = jax.random.randint(keys[4], (1, M), 0, 9000)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))
    tables = tuple(t[0] for t in rope_tables(inv_freq, pos)) if rope else None
    return x, ws, tables, 1.0 + jax.random.uniform(keys[5], (M,)) if temp else None


@pytest.mark.parametrize("M,D,H,K,Dh,rope,norm,temp,mode,cfg,out_dtype", QKV)
def test_qkv_rope(M, D, H, K, Dh, rope, norm, temp, mode, cfg, out_dtype):
    x, ((wq, sq), (wk, sk), (wv, sv)), tables, rs = _qkv_inputs(M * 100 + D, M, D, H, K, Dh, rope, temp)
    eps = 1e-5 if norm else None
    kw = dict(head_dim=Dh, rope=tables, q_row_scale=rs, qk_norm_eps=eps, mode=mode)
    got = qkv_rope(x, wq, sq, wk, sk, wv, sv, out_dtype=out_dtype, interpret=True, poison_output=True, **kw, **cfg)
    want = qkv_rope_ref(x, wq, sq, wk, sk, wv, sv, out_dtype=jnp.float32, **kw)
    for name, g, r, n in zip("qkv", got, want, (H, K, K)):
        _finite(g)
        assert g.shape == (M, n * Dh) and g.dtype == out_dtype, name
        assert _err(g, r) < (1e-5 if out_dtype == jnp.float32 else 1e-2), name


def test_qkv_ref_matches_model_order_of_operations():
    """qkv_rope_ref computes what mavjax.model.Attention does on FP8 weights (XLA path: upcast, dot, RoPE,
    L2 norm in float32 of the rounded values, temperature) - in float32 the two agree to rounding."""
    from mavjax.model import dense

    M, D, H, Dh = 4, 64, 2, 16
    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (M, D), jnp.float32)
    wq, sq = _w(keys[1], D, H * Dh)
    pos = jnp.arange(M, dtype=jnp.int32)[None] * 7
    inv_freq = 1.0 / (500.0 ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))
    cos, sin = rope_tables(inv_freq, pos)
    q = dense(x[None], wq.reshape(D, H, Dh), sq.reshape(H, Dh), 1)  # [1, M, H, Dh]
    q = rms_norm(apply_rope(q, cos, sin), None, 1e-5).reshape(M, H * Dh)
    got = qkv_rope_ref(x, wq, sq, wq, sq, wq, sq, head_dim=Dh, rope=(cos[0], sin[0]), qk_norm_eps=1e-5)[0]
    assert _err(got, q) < 1e-5


def test_qkv_rope_bad_input():
    wq, s = _w(jax.random.key(0), 64, 32)
    x = jnp.ones((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        qkv_rope(x, wq, s, wq, s, wq, s, head_dim=24, interpret=True)
    with pytest.raises(ValueError, match="must divide head_dim"):
        qkv_rope(x, wq, s, wq, s, wq, s, head_dim=16, block_n=32, interpret=True)
    with pytest.raises(ValueError, match="rope tables"):
        qkv_rope(x, wq, s, wq, s, wq, s, head_dim=16, rope=(jnp.ones((2, 4)), jnp.ones((2, 4))), interpret=True)


# ---------------------------------------------------------------------------------------------------------
# Split-K finished in the kernel (reduce="kernel": the last split of each tile / head sums the partials)
# ---------------------------------------------------------------------------------------------------------
# Bounds as above against the references; reduce="kernel" against reduce="xla" (same partials, summed in
# the same split order by the kernel and by XLA's reduction): float32 outputs agree to 1e-6 relative.
# The interpreter runs the programs one by one, so these check the sums, epilogues and counter layout, not
# the cross-program ordering on a GPU (the IR test below checks what provides it is there).

def _n_splits(K, block_k, split_k):
    """The split count the kernels use (no empty splits): the cases below state the one they exercise."""
    nk = -(-K // block_k)
    return -(-nk // -(-nk // split_k))


def _close(a, b, rtol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


SPLIT_GATE_UP = [  # (M, D, F, mode, cfg, splits): ragged M / N / K everywhere
    (3, 300, 80, "weight_only", dict(block_n=32, block_k=32, split_k=5), 5),
    (17, 270, 50, "weight_only", dict(block_m=32, block_n=16, block_k=32, split_k=3), 3),
    (20, 100, 72, "fp8_fp8", dict(block_m=16, block_n=32, block_k=64, split_k=2), 2),  # 2 M blocks
]


@pytest.mark.parametrize("M,D,F,mode,cfg,splits", SPLIT_GATE_UP)
def test_gate_up_swiglu_split_k_in_kernel(M, D, F, mode, cfg, splits):
    assert _n_splits(D, cfg["block_k"], cfg["split_k"]) == splits
    kx, kg, ku = jax.random.split(jax.random.key(M * 7 + F), 3)
    x = (jax.random.normal(kx, (M, D)) + 0.1).astype(jnp.bfloat16)
    (wg, sg), (wu, su) = _w(kg, D, F), _w(ku, D, F)
    kw = dict(mode=mode, interpret=True, poison_output=True, **cfg)
    got = gate_up_swiglu(x, wg, sg, wu, su, out_dtype=jnp.float32, reduce="kernel", **kw)
    xla = gate_up_swiglu(x, wg, sg, wu, su, out_dtype=jnp.float32, reduce="xla", **kw)
    ref = gate_up_swiglu_ref(x, wg, sg, wu, su, mode=mode, out_dtype=jnp.float32)
    _finite(got)
    assert got.shape == (M, F) and got.dtype == jnp.float32
    assert _err(got, ref) < 1e-5
    _close(got, xla)
    if splits == 5:  # the final cast happens in the last split's epilogue too
        bf = gate_up_swiglu(x, wg, sg, wu, su, out_dtype=jnp.bfloat16, reduce="kernel", **kw)
        _finite(bf)
        assert bf.dtype == jnp.bfloat16 and _err(bf, ref) < 1e-2


SPLIT_QKV = [  # (M, D, H, K, Dh, rope, norm, temp, mode, cfg, splits)
    # qk norm with a head over 2 column blocks, q's row scale after the norm, ragged K
    (3, 300, 2, 1, 32, True, True, True, "weight_only", dict(block_n=16, block_k=32, split_k=5), 5),
    # no norm: a counter per column block; 2 M blocks, ragged M
    (20, 200, 2, 1, 32, True, False, True, "fp8_fp8", dict(block_m=16, block_n=16, block_k=32, split_k=3), 3),
    # NoPE with the norm, a head over 4 column blocks, 2 M blocks
    (18, 100, 2, 1, 64, False, True, False, "fp8_fp8", dict(block_m=16, block_n=16, block_k=64, split_k=2), 2),
    # the whole head in one tile (counters per head = per tile)
    (2, 200, 2, 2, 32, True, True, False, "weight_only", dict(block_n=32, block_k=32, split_k=3), 3),
    # no split, but the norm spans 2 column blocks: still finished in-kernel
    (2, 100, 2, 1, 32, True, True, False, "weight_only", dict(block_n=16, block_k=64, split_k=1), 1),
]


def _qkv_case(M, D, H, K, Dh, rope, norm, temp, mode):
    keys = jax.random.split(jax.random.key(M * 31 + D + Dh), 6)
    x = (jax.random.normal(keys[0], (M, D)) + 0.1).astype(jnp.bfloat16)
    ws = (*_w(keys[1], D, H * Dh), *_w(keys[2], D, K * Dh), *_w(keys[3], D, K * Dh))
    pos = jax.random.randint(keys[4], (1, M), 0, 9000)
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))
    tables = tuple(t[0] for t in rope_tables(inv_freq, pos)) if rope else None
    rs = 1.0 + jax.random.uniform(keys[5], (M,)) if temp else None
    return x, ws, dict(head_dim=Dh, rope=tables, q_row_scale=rs, qk_norm_eps=1e-5 if norm else None, mode=mode)


@pytest.mark.parametrize("M,D,H,K,Dh,rope,norm,temp,mode,cfg,splits", SPLIT_QKV)
def test_qkv_rope_split_k_in_kernel(M, D, H, K, Dh, rope, norm, temp, mode, cfg, splits):
    assert _n_splits(D, cfg["block_k"], cfg["split_k"]) == splits
    x, ws, kw = _qkv_case(M, D, H, K, Dh, rope, norm, temp, mode)
    run = functools.partial(qkv_rope, x, *ws, interpret=True, poison_output=True, **kw, **cfg)
    got, xla = run(out_dtype=jnp.float32, reduce="kernel"), run(out_dtype=jnp.float32, reduce="xla")
    want = qkv_rope_ref(x, *ws, out_dtype=jnp.float32, **kw)
    for name, g, a, r, n in zip("qkv", got, xla, want, (H, K, K)):
        _finite(g)
        assert g.shape == (M, n * Dh) and g.dtype == jnp.float32, name
        assert _err(g, r) < 1e-5, name
        _close(g, a)
    if norm and temp:  # the norm of the bf16-rounded head, the row scale, the bf16 cast, in the epilogue
        bf = run(out_dtype=jnp.bfloat16, reduce="kernel")
        for name, g, r in zip("qkv", bf, want):
            _finite(g)
            assert g.dtype == jnp.bfloat16 and _err(g, r) < 1e-2, name


# (B, T, S, H, K, Dh, rope, norm, cfg, cache dtype): cfg forces split-K with the norm across column blocks,
# no split with the norm in one block, and a ragged last split; T > 1 is speculative verification
QKV_CACHE = [
    (1, 1, 40, 4, 2, 32, True, True, dict(block_n=16, block_k=32, split_k=3), BF16),
    (2, 3, 24, 2, 1, 32, True, True, dict(block_n=32, block_k=64, split_k=1), BF16),
    (3, 2, 17, 2, 2, 16, False, False, dict(block_n=16, block_k=32, split_k=4), jnp.float8_e4m3fn),
    (2, 1, 16, 4, 2, 32, True, False, dict(block_n=32, block_k=64, split_k=2), jnp.float8_e4m3fn),
]


@pytest.mark.parametrize("B,T,S,H,K,Dh,rope,norm,cfg,cdt", QKV_CACHE)
def test_qkv_rope_writes_the_kv_cache(B, T, S, H, K, Dh, rope, norm, cfg, cdt):
    """cache=(k_cache, v_cache, start): q as without a cache, and the caches exactly what
    mavjax.kv_cache.write_slots makes of the k, v it would return (FP8: its quantization), every other slot
    untouched; starts past S - T are clamped as dynamic_update_slice does."""
    from mavjax.kv_cache import encode_kv, write_slots

    M = B * T
    x, ws, kw = _qkv_case(M, 100, H, K, Dh, rope, norm, False, "weight_only")
    keys = jax.random.split(jax.random.key(B * 7 + S), 2)
    kc, vc = (jax.random.normal(k_, (B, S, K, Dh)).astype(cdt) for k_ in keys)
    start = jnp.array([S - T, 0, S + 5][:B], jnp.int32)  # the last slots, the first, clamped
    run = functools.partial(qkv_rope, x, *ws, out_dtype=BF16, interpret=True, poison_output=True, **kw, **cfg)
    q, k, v = run()
    q2, kc2, vc2 = run(cache=(kc, vc, start), cache_encode=encode_kv)
    _finite(q2)
    np.testing.assert_array_equal(np.asarray(q2, np.float32), np.asarray(q, np.float32))
    for name, got, old, new in (("k", kc2, kc, k), ("v", vc2, vc, v)):
        assert got.shape == old.shape and got.dtype == cdt, name
        want = write_slots(old, new.reshape(B, T, K, Dh), start)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=name)
    with pytest.raises(ValueError, match="cache must be"):
        run(cache=(kc[..., :Dh // 2], vc, start))
    if T > 1:
        with pytest.raises(ValueError, match="do not fit"):
            run(cache=(kc[:, :T - 1], vc[:, :T - 1], start))


@pytest.fixture
def arrivals_log(monkeypatch):
    """Every arrive() of the fused kernels run in the test (interpret mode): (counter, arrivals, last, *grid
    position)."""
    from jax.experimental import pallas as pl

    import pallas_kernels.fused_gemm as fg

    log, pids, real = [], [], fg.arrive

    def top_level_ids(kernel):  # (the interpreter substitutes program ids only outside pl.when bodies)
        def k(*refs, **kw):
            pids[:] = [pl.program_id(i) for i in range(3)]
            return kernel(*refs, **kw)
        return k

    def spy(cnt_ref, idx, arrivals, *, interpret):
        last = real(cnt_ref, idx, arrivals, interpret=interpret)
        jax.debug.callback(lambda *v: log.append(tuple(int(a) for a in v)), idx, arrivals, last, *pids)
        return last

    monkeypatch.setattr(fg, "arrive", spy)
    for name in ("_gate_up_kernel", "_qkv_kernel"):
        monkeypatch.setattr(fg, name, top_level_ids(getattr(fg, name)))
    jax.clear_caches()  # the jitted entry points retrace with the spy, and without it after the test
    yield log
    jax.clear_caches()


def _check_counters(log, group_of, n_counters):
    """Each counter serves exactly one output group, which arrives there `arrivals` times, one of them last."""
    by_idx = {}
    for idx, arrivals, last, *pid in log:
        by_idx.setdefault(idx, []).append((arrivals, last, group_of(*pid)))
    assert sorted(by_idx) == list(range(n_counters))
    groups = set()
    for idx, rec in by_idx.items():
        (arrivals,), (group,) = {a for a, _, _ in rec}, {g for _, _, g in rec}
        assert len(rec) == arrivals and sum(last for _, last, _ in rec) == 1, (idx, rec)
        groups.add(group)
    assert len(groups) == n_counters  # no two groups share a counter


def test_split_k_counter_layout(arrivals_log):
    """Which programs count on which counter: gate/up one per output tile (split_k arrivals); qkv one per
    (M block, head) of q and k under the norm (split_k * Dh / block_n arrivals), one per column block of v.
    (Sequential programs would hide a wrong layout from the value tests: an early last arrival's epilogue is
    redone by a later one.)"""
    log = arrivals_log
    M, D, F = 20, 96, 48
    kg, ku = jax.random.split(jax.random.key(5))
    x = jnp.ones((M, D), jnp.bfloat16)
    (wg, sg), (wu, su) = _w(kg, D, F), _w(ku, D, F)
    gate_up_swiglu(x, wg, sg, wu, su, mode="fp8_fp8", block_m=16, block_n=16, block_k=32, split_k=3,
                   reduce="kernel", interpret=True).block_until_ready()
    jax.effects_barrier()
    assert {a for _, a, *_ in log} == {3}
    _check_counters(log, lambda m, n, s: (m, n), n_counters=2 * 3)

    log.clear()
    M, D, H, K, Dh, bn = 20, 64, 2, 1, 32, 16
    x, ws, kw = _qkv_case(M, D, H, K, Dh, True, True, False, "fp8_fp8")
    qkv_rope(x, *ws, block_m=16, block_n=bn, block_k=32, split_k=2, reduce="kernel", interpret=True,
             **kw)[0].block_until_ready()
    jax.effects_barrier()
    nbq, nbk = H * Dh // bn, K * Dh // bn

    def head(m, j, s):  # (M block, tensor, head of q / k, column block of v)
        if j < nbq:
            return m, "q", j // (Dh // bn)
        if j < nbq + nbk:
            return m, "k", (j - nbq) // (Dh // bn)
        return m, "v", j - nbq - nbk

    assert {(a, head(*p)[1]) for _, a, _, *p in log} == {(4, "q"), (4, "k"), (2, "v")}
    _check_counters(log, head, n_counters=2 * (H + K + K * Dh // bn))


def test_reduce_argument():
    wq, s = _w(jax.random.key(0), 64, 32)
    x = jnp.ones((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="reduce"):
        gate_up_swiglu(x, wq, s, wq, s, reduce="atomic", interpret=True)
    with pytest.raises(ValueError, match="reduce"):
        qkv_rope(x, wq, s, wq, s, wq, s, head_dim=16, reduce="atomic", interpret=True)


def test_gate_up_split_k_lowers_to_a_semaphore(monkeypatch):
    """Lowered for CUDA (on the CPU, shapes only): a barrier, then the arrival, a GPU-scope acquire-release
    atomic add of the counters' type (`fadd` on i32 would add bit patterns as floats, flushed to zero as
    subnormals: no split would ever arrive last), and the last split reads the partials bypassing L1."""
    from test_triton_offsets import triton_modules

    f8, S = jnp.float8_e4m3fn, jax.ShapeDtypeStruct
    shapes = (S((3, 512), jnp.bfloat16), S((512, 200), f8), S((200,), jnp.float32), S((512, 200), f8),
              S((200,), jnp.float32))
    (text,) = triton_modules(lambda *a: gate_up_swiglu(*a, mode="weight_only", block_n=64, block_k=64, split_k=4,
                                                       reduce="kernel"), *shapes, monkeypatch=monkeypatch)
    atomics = re.findall(r"tt\.atomic_rmw (\w+), (\w+), (\w+), .*-> (?:tensor<\d+x)?(\w+)", text)
    assert atomics, "no atomic in the kernel"
    for op, sem, scope, elt in atomics:  # the arrival and the reset
        assert (sem, scope) == ("acq_rel", "gpu")
        assert op == ("fadd" if elt.startswith("f") else "add"), f"tt.atomic_rmw {op} on {elt}"
    assert "gpu.barrier" in text[:text.index("tt.atomic_rmw")]
    # the last split's reads of the partials: g and u, 4 splits each ([16, 64] f32 tiles)
    assert len(re.findall(r"tt\.load .*(?:isVolatile = true|cache = cg).*: tensor<16x64x!tt\.ptr<f32>>", text)) == 8


# ---------------------------------------------------------------------------------------------------------
# Weights stored [N, K] (w_transposed: the Hugging Face layout, what cuBLASLt's and WGMMA's FP8 products take)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M,D,F,mode,cfg", [GATE_UP[0], GATE_UP[-1], (18, 128, 64, "weight_only", {})])
def test_gate_up_swiglu_takes_weights_stored_n_by_k(M, D, F, mode, cfg):
    """The same kernels on the same weights stored [F, D]: the tiles are loaded [bn, bk] and contracted over
    their K axis, so the products are unchanged - the output equals the [D, F] one to rounding (the interpreter's
    CPU dot may sum a transposed operand in another order) - weight-only with split-K, ragged FP8 x FP8, and the
    Mosaic GPU path's "nk" layout at 18 rows of bf16 x."""
    kx, kg, ku = jax.random.split(jax.random.key(M + F), 3)
    x = (jax.random.normal(kx, (M, D)) + 0.1).astype(jnp.bfloat16)
    (wg, sg), (wu, su) = _w(kg, D, F), _w(ku, D, F)
    kw = dict(mode=mode, interpret=True, **cfg)
    if not cfg:
        kw["mosaic"] = True  # (Pallas' GPU interpreter)
    want = gate_up_swiglu(x, wg, sg, wu, su, **kw)
    got = gate_up_swiglu(x, wg.T, sg, wu.T, su, w_transposed=True, poison_output=not kw.get("mosaic"), **kw)
    _finite(got)
    assert _err(got, want) < 1e-3  # (the output is bf16: a last-bit flip at most)
    assert _err(got, gate_up_swiglu_ref(x, wg, sg, wu, su, mode=mode, out_dtype=jnp.float32)) < 1e-2
    with pytest.raises(ValueError, match=r"must be \[N, K=.*\] \(w_transposed\)"):
        gate_up_swiglu(x, wg, sg, wu, su, w_transposed=True, mode=mode, interpret=True, block_n=32)


@pytest.mark.parametrize("case", [QKV[2], QKV[3], QKV[5]])
def test_qkv_rope_takes_weights_stored_n_by_k(case):
    """qkv_rope on wq, wk, wv stored [N*, D] equals the [D, N*] layout's output to float32 rounding (RoPE with
    the qk norm after a split-K sum, NoPE with the temperature and a 3-way split, ragged FP8 x FP8), and the
    cache-writing form too."""
    M, D, H, K, Dh, rope, norm, temp, mode, cfg, out_dtype = case
    x, ((wq, sq), (wk, sk), (wv, sv)), tables, rs = _qkv_inputs(M * 7 + D, M, D, H, K, Dh, rope, temp)
    kw = dict(head_dim=Dh, rope=tables, q_row_scale=rs, qk_norm_eps=1e-5 if norm else None, mode=mode,
              out_dtype=out_dtype, interpret=True, **cfg)
    want = qkv_rope(x, wq, sq, wk, sk, wv, sv, **kw)
    got = qkv_rope(x, wq.T, sq, wk.T, sk, wv.T, sv, w_transposed=True, poison_output=True, **kw)
    tol = 1e-6 if out_dtype == F32 else 1e-3  # float32 rounding (a bf16 output may flip in its last bit)
    for g, w in zip(got, want):
        _finite(g)
        assert _err(g, w) < tol
    if mode == "weight_only":  # k and v straight into a cache: 2 sequences of M / 2 tokens (M even here)
        B = 2 if M % 2 == 0 else 1
        kc = jnp.zeros((B, 16, K, Dh), out_dtype)
        start = jnp.arange(B, dtype=jnp.int32) * 3
        want = qkv_rope(x, wq, sq, wk, sk, wv, sv, cache=(kc, kc, start), **kw)
        got = qkv_rope(x, wq.T, sq, wk.T, sk, wv.T, sv, cache=(kc, kc, start), w_transposed=True, **kw)
        for g, w in zip(got, want):
            assert _err(g, w) < tol


def test_n_by_k_weights_lower_for_cuda(monkeypatch):
    """The [N, K] forms of both fused kernels lower to Triton for CUDA on this CPU (a [bn, bk] tile load and a
    dot contracting both operands' last axes)."""
    from helpers import lower_for_cuda

    D, F, Dh = 5120, 2048, 128
    fp8 = lambda *s: jax.ShapeDtypeStruct(s, FP8)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    x = jax.ShapeDtypeStruct((8, D), jnp.bfloat16)
    _, texts = lower_for_cuda(lambda x, wg, sg, wu, su: gate_up_swiglu(x, wg, sg, wu, su, w_transposed=True,
                                                                     mosaic=False),
                              x, fp8(F, D), f32(F), fp8(F, D), f32(F), monkeypatch=monkeypatch)
    _, texts2 = lower_for_cuda(lambda x, wq, sq, wk, sk, wv, sv: qkv_rope(x, wq, sq, wk, sk, wv, sv, head_dim=Dh,
                                                                          w_transposed=True),
                               x, fp8(5 * Dh, D), f32(5 * Dh), fp8(Dh, D), f32(Dh), fp8(Dh, D), f32(Dh),
                               monkeypatch=monkeypatch)
    for name, ts in (("fp8_gate_up_swiglu", texts), ("fp8_qkv_rope", texts2)):
        assert any(name in t and "tt.dot" in t for t in ts), (name, [t[:80] for t in ts])
