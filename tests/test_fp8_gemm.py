"""FP8 GEMM kernels (pallas_kernels/fp8_gemm.py) under the Pallas interpreter, against the jnp reference.

Error bounds (||out - ref|| / ||ref||, ref = dequantize then float32 matmul at HIGHEST precision):
  * weight-only: e4m3 -> bf16 is exact and the dot accumulates exact bf16 x bf16 products in f32, so the
    kernel computes the reference's function up to f32 summation order (~1e-7) plus the final cast. With a
    bf16 output the cast alone is <= 2^-9 relative per element (~2e-3 worst case), bound 1e-2; with an f32
    output bound 1e-5.
  * fp8_fp8 vs the reference *with* per-token e4m3 activation quantization emulated: e4m3 x e4m3 products
    are exact in f32, so again only summation order: bound 1e-5 (f32 out).
  * fp8_fp8 vs the plain reference (bf16 activations): the activation quantization error dominates. e4m3
    keeps 3 mantissa bits, so rounding is <= 2^-4 relative per element, with an RMS of about
    2^-4 / sqrt(3) * E[1/mantissa] ~ 2.4e-2 for random data; the errors of the K terms of a dot are
    independent, so ||dy|| / ||y|| is that same ~2.4e-2 (measured 2.6e-2). Bound 5e-2.
Every output starts as NaN (poison_output=True aliases a NaN buffer in; the interpreter NaN-fills outputs
too), so an element the kernel does not write fails the isfinite check. Inputs are random, never zeros.
Shapes are small (the interpreter runs each program sequentially on 2 shared CPU cores).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_gemm import (
    FP8, FP8_MAX, dequantize_activation, dequantize_weight, fp8_matmul, fp8_matmul_add_rms_norm, fp8_matmul_ref,
    quantize_activation_per_token, quantize_weight_blockwise, quantize_weight_per_channel)
from pallas_kernels.fused_norm import add_rms_norm_ref

SB = (32, 32)  # block-scale granularity for the tests (128x128 in production; same code path, smaller shapes)


def _inputs(seed, M, K, N, scale_kind, lead=()):
    kx, kw, ko = jax.random.split(jax.random.key(seed), 3)
    x = (jax.random.normal(kx, (*lead, M, K), jnp.float32) + 0.1).astype(jnp.bfloat16)
    # Per-column magnitudes spread over 2 decades, so per-channel / per-block scales actually differ.
    w = jax.random.normal(kw, (K, N), jnp.float32) * 10.0 ** jax.random.uniform(ko, (1, N), minval=-3, maxval=-1)
    if scale_kind == "channel":
        wq, s = quantize_weight_per_channel(w)
    else:
        wq, s = quantize_weight_blockwise(w, SB)
    return x, wq, s


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _run(x, wq, s, mode, cfg, out_dtype, w_transposed=False):
    wq_, s_ = (wq.T, s.T) if w_transposed else (wq, s)
    y = fp8_matmul(x, wq_, s_, mode=mode, out_dtype=out_dtype, scale_block=SB, interpret=True,
                   poison_output=True, w_transposed=w_transposed, **cfg)
    assert y.shape == (*x.shape[:-1], wq.shape[1]) and y.dtype == jnp.dtype(out_dtype or x.dtype)
    assert bool(jnp.isfinite(y).all()), "unwritten (NaN-poisoned) or non-finite output elements"
    return y


# ---------------------------------------------------------------------------------------------------------
# Quantization round trips
# ---------------------------------------------------------------------------------------------------------

def _check_roundtrip(w, deq, scale_full):
    """e4m3: |err| <= 2^-4 |w| for normal codes; absolute <= 2^-10 * scale (half the subnormal step 2^-9)."""
    w, deq, scale_full = (np.asarray(a, np.float64) for a in (w, deq, scale_full))
    bound = np.maximum(2.0 ** -4 * np.abs(w), 2.0 ** -10 * scale_full) * (1 + 1e-6)
    assert np.all(np.abs(deq - w) <= bound)
    assert _err(deq, w) < 2.0 ** -4


def test_quantize_weight_per_channel_roundtrip():
    w = jax.random.normal(jax.random.key(0), (192, 80)) * jnp.linspace(0.01, 3.0, 80)[None, :]
    wq, s = quantize_weight_per_channel(w)
    assert wq.dtype == FP8 and s.shape == (80,) and s.dtype == jnp.float32
    np.testing.assert_allclose(np.abs(np.asarray(wq, np.float32)).max(0), FP8_MAX)  # amax maps to 448
    _check_roundtrip(w, dequantize_weight(wq, s), np.broadcast_to(s[None, :], w.shape))


def test_quantize_weight_blockwise_roundtrip_ragged():
    w = jax.random.normal(jax.random.key(1), (300, 200)) * 0.05
    w = w.at[:128, :128].multiply(100.0)  # one block much larger: its scale must not leak into the others
    wq, s = quantize_weight_blockwise(w)
    assert wq.shape == (300, 200) and s.shape == (3, 2)
    full = np.repeat(np.repeat(np.asarray(s), 128, 0), 128, 1)[:300, :200]
    _check_roundtrip(w, dequantize_weight(wq, s), full)


def test_quantize_activation_per_token_roundtrip():
    x = jax.random.normal(jax.random.key(2), (2, 5, 96)) * jnp.arange(1, 11, dtype=jnp.float32).reshape(2, 5, 1)
    xq, s = quantize_activation_per_token(x)
    assert xq.shape == x.shape and s.shape == (2, 5)
    _check_roundtrip(x, dequantize_activation(xq, s), np.broadcast_to(np.asarray(s)[..., None], x.shape))


def test_jitted_roundtrip_keeps_the_rounding():
    # Inside one jit XLA may fold f32 -> f8 -> f32 away (excess precision); dequantize_* must not let it.
    w = jax.random.normal(jax.random.key(3), (64, 32))
    deq = jax.jit(lambda w: dequantize_weight(*quantize_weight_per_channel(w)))(w)
    assert 1e-2 < _err(deq, w) < 2.0 ** -4


def test_zero_weights_quantize_without_nan():
    wq, s = quantize_weight_per_channel(jnp.zeros((8, 4)))
    assert bool(jnp.isfinite(s).all()) and not bool(jnp.any(wq.astype(jnp.float32)))


# ---------------------------------------------------------------------------------------------------------
# Kernel A: weight-only
# ---------------------------------------------------------------------------------------------------------

WEIGHT_ONLY_CASES = [
    # M, K, N, scale kind, cfg, w_transposed
    (1, 256, 128, "channel", dict(block_n=64, block_k=64, split_k=1), False),
    (3, 200, 136, "channel", dict(block_n=32, block_k=64, split_k=2), False),   # ragged N, K; uneven split
    (17, 160, 96, "block", dict(block_n=32, block_k=32, split_k=2), False),     # ragged M, block scales
    (64, 96, 200, "channel", dict(block_n=64, block_k=32, split_k=3), True),    # [N, K] layout, ragged N
    (5, 232, 72, "block", dict(block_n=64, block_k=64, split_k=4), True),       # clamps to 32x32, ragged
    (3, 200, 136, "channel", dict(block_n=32, block_k=64, split_k=2, swap_ab=True), False),  # y^T = w^T x^T
    (17, 160, 96, "block", dict(block_n=32, block_k=32, split_k=1, swap_ab=True), True),
]


@pytest.mark.parametrize("M,K,N,kind,cfg,wt", WEIGHT_ONLY_CASES)
def test_weight_only_matches_reference(M, K, N, kind, cfg, wt):
    x, wq, s = _inputs(M * 7 + K, M, K, N, kind)
    ref = fp8_matmul_ref(x, wq, s, scale_block=SB, out_dtype=jnp.float32)
    y32 = _run(x, wq, s, "weight_only", cfg, jnp.float32, wt)
    assert _err(y32, ref) < 1e-5
    if M in (1, 17):  # bf16 output (the production dtype): only the final cast differs (1 compile per case)
        ybf = _run(x, wq, s, "weight_only", cfg, None, wt)
        assert _err(ybf, ref) < 1e-2


@pytest.mark.parametrize("M,K,N,kind,cfg,wt", [WEIGHT_ONLY_CASES[i] for i in (1, 3, 5)])
def test_split_k_reduced_in_the_kernel_equals_the_xla_sum(M, K, N, kind, cfg, wt):
    """reduce="kernel" (the last split of each tile sums the partials, pallas_kernels.split_k) and
    reduce="xla" (a jnp sum after the kernel: split_k.DEFAULTS' choice for this family) give the same sums up
    to f32 summation order."""
    x, wq, s = _inputs(M * 5 + N, M, K, N, kind)
    yk = _run(x, wq, s, "weight_only", dict(cfg, reduce="kernel"), jnp.float32, wt)
    yx = _run(x, wq, s, "weight_only", dict(cfg, reduce="xla"), jnp.float32, wt)
    assert _err(yk, yx) < 1e-6


ADD_NORM_CASES = [  # M, K, N, cfg, w_transposed
    (1, 256, 160, dict(block_n=32, block_k=64, split_k=3), False),    # 5 column blocks, uneven split
    (3, 200, 136, dict(block_n=64, block_k=32, split_k=1), True),     # no split: the row norm still waits
    (17, 96, 72, dict(block_n=32, block_k=32, split_k=2, swap_ab=True), False),  # ragged M and N
]


@pytest.mark.parametrize("M,K,N,cfg,wt", ADD_NORM_CASES)
def test_matmul_add_rms_norm_matches_its_reference(M, K, N, cfg, wt):
    """One launch: residual add on each finished tile, RMSNorm of whole rows by the last tile to finish.
    Reference: the model's own order (projection cast to bf16, residual add in bf16, fused_norm's reference
    norm). Every step is the same arithmetic up to f32 summation order, so s and y may differ only where a
    last-bit difference of the f32 sum flips a bf16 rounding: bound 1e-2 (as for a bf16 GEMM output)."""
    x, wq, s = _inputs(M * 3 + K, M, K, N, "channel")
    kr, kw = jax.random.split(jax.random.key(M + N))
    res = jax.random.normal(kr, (M, N), jnp.float32).astype(jnp.bfloat16)
    nw = (1.0 + 0.2 * jax.random.normal(kw, (N,), jnp.float32)).astype(jnp.bfloat16)
    wq_, s_ = (wq.T, s) if wt else (wq, s)
    out, y = fp8_matmul_add_rms_norm(x, wq_, s_, res, nw, eps=1e-5, w_transposed=wt, reduce="kernel",
                                     interpret=True, poison_output=True, **cfg)
    assert out.dtype == jnp.bfloat16 and y.dtype == jnp.bfloat16 and out.shape == y.shape == (M, N)
    assert bool(jnp.isfinite(out).all() and jnp.isfinite(y).all()), "unwritten (NaN-poisoned) elements"
    s_ref, y_ref = add_rms_norm_ref(res, fp8_matmul_ref(x, wq, s).astype(jnp.bfloat16), nw, 1e-5)
    assert _err(out, s_ref) < 1e-2 and _err(y, y_ref) < 1e-2
    # the same with the add + norm as a second kernel (reduce="xla"): the two paths agree as closely
    out2, y2 = fp8_matmul_add_rms_norm(x, wq_, s_, res, nw, eps=1e-5, w_transposed=wt, reduce="xla",
                                       interpret=True, **cfg)
    assert _err(out, out2) < 1e-2 and _err(y, y2) < 1e-2


def test_matmul_add_rms_norm_prefill_and_bad_shapes():
    """M > 64 takes the fp8 x fp8 GEMM and then the add + norm kernel; shapes are checked."""
    x, wq, s = _inputs(4, 70, 64, 48, "channel")
    res = jax.random.normal(jax.random.key(1), (70, 48), jnp.float32).astype(jnp.bfloat16)
    nw = jnp.ones((48,), jnp.bfloat16)
    out, y = fp8_matmul_add_rms_norm(x, wq, s, res, nw, eps=1e-5, block_m=32, block_n=32, block_k=32,
                                     interpret=True)
    s_ref, y_ref = add_rms_norm_ref(res, fp8_matmul_ref(x, wq, s, quantize_x=True).astype(jnp.bfloat16), nw, 1e-5)
    assert _err(out, s_ref) < 1e-2 and _err(y, y_ref) < 1e-2
    with pytest.raises(ValueError, match="residual must be"):
        fp8_matmul_add_rms_norm(x, wq, s, res[:3], nw, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="norm_scale must be"):
        fp8_matmul_add_rms_norm(x, wq, s, res, nw[:8], eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="reduce must be"):
        fp8_matmul(x, wq, s, reduce="atomic", interpret=True)


def test_weight_only_float16_compute():
    # compute_dtype=f16: e4m3 -> f16 is exact too; only x is rounded to f16 (11-bit vs bf16's 8-bit mantissa).
    x, wq, s = _inputs(9, 8, 128, 64, "channel")
    y = _run(x, wq, s, "weight_only", dict(block_n=32, block_k=64, split_k=2, compute_dtype=jnp.float16),
             jnp.float32)
    assert _err(y, fp8_matmul_ref(x, wq, s, out_dtype=jnp.float32)) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Kernel B: fp8 x fp8
# ---------------------------------------------------------------------------------------------------------

FP8_FP8_CASES = [
    (64, 128, 128, "channel", dict(block_m=32, block_n=64, block_k=64), False),
    (100, 200, 136, "channel", dict(block_m=32, block_n=32, block_k=64), True),  # ragged M, N, K
    (3, 96, 64, "block", dict(block_m=16, block_n=32, block_k=32), False),      # M < 16
    (70, 160, 96, "block", dict(block_m=64, block_n=64, block_k=64), True),     # clamped to 32x32, ragged M
]


@pytest.mark.parametrize("M,K,N,kind,cfg,wt", FP8_FP8_CASES)
def test_fp8_fp8_matches_reference(M, K, N, kind, cfg, wt):
    x, wq, s = _inputs(M * 11 + N, M, K, N, kind)
    y = _run(x, wq, s, "fp8_fp8", cfg, jnp.float32, wt)
    emulated = fp8_matmul_ref(x, wq, s, scale_block=SB, quantize_x=True, out_dtype=jnp.float32)
    plain = fp8_matmul_ref(x, wq, s, scale_block=SB, out_dtype=jnp.float32)
    assert _err(y, emulated) < 1e-5
    assert _err(y, plain) < 5e-2


# ---------------------------------------------------------------------------------------------------------
# API: auto mode, leading dims, validation
# ---------------------------------------------------------------------------------------------------------

def test_auto_mode_and_leading_batch_dims():
    # [2, 4, K] -> M = 8 <= 64: weight-only, bf16 out; the same call with M = 2 * 40 = 80 goes fp8_fp8.
    x, wq, s = _inputs(5, 4, 64, 48, "channel", lead=(2,))
    cfg = dict(block_m=32, block_n=32, block_k=32, split_k=2)
    y = _run(x, wq, s, "auto", cfg, None)
    assert y.shape == (2, 4, 48) and y.dtype == jnp.bfloat16
    assert _err(y, fp8_matmul_ref(x, wq, s)) < 1e-2
    xb, _, _ = _inputs(6, 40, 64, 48, "channel", lead=(2,))
    yb = _run(xb, wq, s, "auto", cfg, jnp.float32)
    assert _err(yb, fp8_matmul_ref(xb, wq, s, quantize_x=True, out_dtype=jnp.float32)) < 1e-5


def test_rejects_bad_arguments():
    x, wq, s = _inputs(0, 2, 64, 32, "channel")
    with pytest.raises(ValueError, match="fits neither"):
        fp8_matmul(x, wq, s[:16], interpret=True)
    with pytest.raises(ValueError, match="has K="):
        fp8_matmul(x[:, :32], wq, s, interpret=True)
    with pytest.raises(TypeError):
        fp8_matmul(x, wq.astype(jnp.bfloat16), s, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        fp8_matmul(x, wq, s, block_k=48, interpret=True)


@pytest.mark.parametrize("N, K, tiles", [(5120, 640, 1), (5120, 2048, 1), (2048, 5120, 2), (896, 5120, 1),
                                         (1024, 5120, 2), (16384, 5120, 1), (5120, 16384, 1), (64, 64, 1),
                                         (5120, 5120, 1), (16384, 5120, 2), (65536, 5120, 2)])
def test_weight_only_blocks_fill_the_machine(N, K, tiles):
    """The decode heuristic: 64-deep tiles; a small weight (<= SMALL_WEIGHT_BYTES) 64-wide with 2 stages, a
    large one 128-wide with 4; enough K splits for ~4 programs per SM (a large weight: ~4 streamed tiles per
    SM), never fewer than 2 K steps per split."""
    from pallas_kernels.fp8_gemm import SMALL_WEIGHT_BYTES, weight_only_blocks

    c = weight_only_blocks(N, K, tiles=tiles, num_sms=132)
    nb, nk = -(-N // c["block_n"]), -(-K // c["block_k"])
    small = K * N * tiles <= SMALL_WEIGHT_BYTES
    streams = nb * c["split_k"] * (1 if small else tiles)  # programs, or tiles streamed at once if large
    assert (c["block_n"], c["block_k"], c["num_stages"]) == ((64, 64, 2) if small else (128, 64, 4))
    assert c["split_k"] == 1 or nk // c["split_k"] >= 2
    assert streams >= min(4 * 132, nb * max(1, nk // 2))  # as many as the K steps allow
    assert streams < 4 * 132 + nb * tiles
    assert weight_only_blocks(N, K, tiles=tiles, scale_kind="block")["block_k"] == 128


def test_weight_only_blocks_measured_shapes():
    """The H200 sweeps' winners (docs/benchmarks.md section 11): o 5120x5120 (26 MB) takes the large tiles;
    the full-width gate/up (two tiles a step) split 3; one rank's shapes keep the small tiles."""
    from pallas_kernels.fp8_gemm import weight_only_blocks

    assert weight_only_blocks(5120, 5120, num_sms=132) == dict(block_n=128, block_k=64, split_k=14, num_stages=4)
    assert weight_only_blocks(16384, 5120, tiles=2, num_sms=132)["split_k"] == 3
    assert weight_only_blocks(2048, 5120, tiles=2, num_sms=132)["block_n"] == 64  # the rank's dense gate/up


def test_interpreter_flags_lanes_past_the_buffer():
    """The kernels' _store, under the interpreter, raises on a lane outside the buffer that no mask covers: on
    the GPU it writes over another buffer, while the interpreter clamps the slice and hides it (an add + norm
    grid past its rows, docs/benchmarks.md section 20). Masked, the same slices pass; traced for the GPU the
    kernel gets no check at all."""
    import functools

    from jax.experimental import pallas as pl

    from helpers import equations
    from pallas_kernels.fp8_gemm import _call, _load, _store

    def kern(x_ref, o_ref, *, masked):  # two programs of 4 rows over a 6-row buffer
        rows = pl.ds(pl.program_id(0) * 4, 4)
        mask = ((pl.program_id(0) * 4 + jnp.arange(4)) < 6)[:, None] if masked else None
        _store(o_ref.at[rows, pl.ds(0, 8)], _load(x_ref.at[rows, pl.ds(0, 8)], mask) + 1, mask)

    x = jnp.arange(48, dtype=jnp.float32).reshape(6, 8)

    def run(masked, interpret=True):
        return _call(functools.partial(kern, masked=masked), [x], [jax.ShapeDtypeStruct((6, 8), jnp.float32)], (2,),
                     num_warps=4, num_stages=1, interpret=interpret, poison_output=False, name="t")[0]

    np.testing.assert_array_equal(np.asarray(run(True)), np.asarray(x) + 1)
    with pytest.raises(Exception, match=r"reaches past its \[6, 8\] buffer"):
        jax.block_until_ready(run(False))
    prims = {e.primitive.name for e in equations(jax.make_jaxpr(lambda: run(False, interpret=False))().jaxpr)}
    assert "pallas_call" in prims and "debug_callback" not in prims
    assert "debug_callback" in {e.primitive.name for e in equations(jax.make_jaxpr(lambda: run(False))().jaxpr)}
