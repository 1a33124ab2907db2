"""float16 dots of the weight-streaming kernels (pallas_kernels/upcast.py): activations of any bf16 magnitude
stay exact.

The kernels widen FP8 weights to f16 (one conversion per two values, bf16 needs three) and rescale each
activation row by a power of two before casting it to f16, whose range ends at 65504 and whose normal numbers
start at 2^-14. Every weight-streaming kernel is run here on activations 1e6 and 1e-7 times a unit normal,
against its float32 reference: without the rescale the first overflows to inf and the second falls into f16's
subnormals (about 50% relative error), so each of these would fail. Bound: ||out - ref|| / ||ref|| < 1e-2, as
the kernels' own tests on unit-scale inputs (bf16 outputs carry 2^-9 relative rounding).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import upcast
from pallas_kernels.fp8_gemm import FP8, fp8_matmul, fp8_matmul_ref, quantize_weight_per_channel
from pallas_kernels.fused_gemm import gate_up_swiglu, gate_up_swiglu_ref, qkv_rope, qkv_rope_ref
from pallas_kernels.moe_gemm import moe_fp8, moe_reference, quantize_experts

FACTORS = [1e6, 1e-7]


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _x(seed, M, D, factor):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((M, D)) * factor, jnp.bfloat16)


def _w(seed, K, N):
    w = np.random.default_rng(seed).standard_normal((K, N)) / np.sqrt(K)
    return quantize_weight_per_channel(jnp.asarray(w, jnp.float32))


def test_default_is_float16_up_to_16_rows():
    assert upcast.compute_dtype() == jnp.float16
    assert upcast.compute_dtype(rows=16) == jnp.float16
    assert upcast.compute_dtype(rows=64) == jnp.bfloat16  # the scale pre-pass would spill registers
    assert upcast.compute_dtype(jnp.bfloat16) == jnp.bfloat16
    assert upcast.compute_dtype("float16", rows=64) == jnp.float16  # an explicit dtype is kept
    assert upcast.storage_dtype(jnp.float16) == jnp.bfloat16


def test_to_compute_is_exact_over_bf16_range():
    rng = np.random.default_rng(0)
    exps = np.array([-120, -30, -7, 0, 5, 16, 40, 120])  # one row per binade of the row's magnitude
    x = jnp.asarray(rng.standard_normal((len(exps), 64)) * 2.0 ** exps[:, None], jnp.bfloat16)
    x = x.at[3].set(0)  # an all-zero row
    xc, s = upcast.to_compute(x, jnp.float16)
    assert xc.dtype == jnp.float16 and s.shape == (len(exps),)
    xc32, x32, s = np.asarray(xc, np.float32), np.asarray(x, np.float32), np.asarray(s)
    assert np.isfinite(xc32).all()
    amax = np.abs(xc32).max(axis=1)
    nz = np.abs(x32).max(axis=1) > 0
    usual = nz & (exps > -100)  # below 2^-100 the scale is capped (2^(14 - e) must stay a finite f32)
    assert ((amax[usual] >= 2.0 ** 13) & (amax[usual] < 2.0 ** 14)).all()
    assert (amax[exps <= -100] >= 2.0 ** -6).all()
    assert (amax[~nz] == 0).all()
    assert (np.log2(s) == np.round(np.log2(s))).all()  # powers of two: the rescale is exact
    # every value within 2^27 of its row's largest is a normal f16 after the rescale: exactly recovered
    big = np.abs(x32) >= np.abs(x32).max(axis=1, keepdims=True) * 2.0 ** -27
    big &= usual[:, None]
    np.testing.assert_array_equal((xc32 * s[:, None])[big], x32[big])
    # other dtypes: a plain cast, nothing to undo
    xb, sb = upcast.to_compute(x, jnp.bfloat16)
    assert sb is None and xb.dtype == jnp.bfloat16


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("M, split_k, swap_ab", [(1, 3, True), (5, 1, False)])
def test_fp8_matmul(factor, M, split_k, swap_ab):
    x = _x(1, M, 96, factor)
    w, s = _w(2, 96, 80)
    y = fp8_matmul(x, w, s, block_n=32, block_k=32, split_k=split_k, swap_ab=swap_ab, interpret=True,
                   poison_output=True)
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert _err(y, fp8_matmul_ref(x, w, s)) < 1e-2


@pytest.mark.parametrize("factor", FACTORS)
def test_gate_up_swiglu(factor):
    x = _x(3, 2, 64, factor)
    (wg, sg), (wu, su) = _w(4, 64, 48), _w(5, 64, 48)
    h = gate_up_swiglu(x, wg, sg, wu, su, block_n=16, block_k=16, split_k=2, interpret=True, poison_output=True)
    assert np.isfinite(np.asarray(h, np.float32)).all()
    assert _err(h, gate_up_swiglu_ref(x, wg, sg, wu, su)) < 1e-2


@pytest.mark.parametrize("factor", FACTORS)
def test_qkv(factor):
    x = _x(6, 1, 64, factor)
    (wq, sq), (wk, sk), (wv, sv) = _w(7, 64, 64), _w(8, 64, 32), _w(9, 64, 32)
    got = qkv_rope(x, wq, sq, wk, sk, wv, sv, head_dim=32, block_n=32, block_k=16, split_k=2, interpret=True,
                   poison_output=True)
    ref = qkv_rope_ref(x, wq, sq, wk, sk, wv, sv, head_dim=32)
    for g, r in zip(got, ref):
        assert _err(g, r) < 1e-2


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("method", ["pairs", "sorted"])
def test_moe(factor, method):
    E, D, F, N = 4, 64, 32, 3
    rng = np.random.default_rng(10)
    w = lambda shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[1]), jnp.float32)  # noqa: E731
    ws, scales = quantize_experts(w((E, D, F)), w((E, D, F)), w((E, F, D)))
    x = _x(11, N, D, factor)
    idx = jnp.asarray([[0], [2], [3]], jnp.int32)
    scores = jnp.asarray([[0.9], [0.5], [0.7]], jnp.bfloat16)
    kw = dict(block_n=16, block_k=16, split_k=2, block_n_down=16, block_k_down=16)
    if method == "sorted":
        kw["block_m"] = 16
    y = moe_fp8(x, idx, scores, *ws, scales, method=method, interpret=True, poison_output=True, **kw)
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert _err(y, moe_reference(x, idx, scores, *ws, scales=scales)) < 1e-2


def test_kernels_lower_for_cuda_with_f16_dots(monkeypatch):
    """Every weight-streaming kernel and the FP8-cache attention lower to Triton IR for CUDA (the rescale's
    bitcasts and shifts included: the interpreter above does not check the Triton lowering) and widen e4m3 to
    f16, not bf16."""
    from pallas_kernels.decode_attention import decode_attention
    from test_triton_offsets import triton_modules

    S = jax.ShapeDtypeStruct
    x, w, s = S((1, 256), jnp.bfloat16), S((256, 128), FP8), S((128,), jnp.float32)
    E, D, F = 4, 128, 64
    wg, wd, sf, sd = S((E, D, F), FP8), S((E, F, D), FP8), S((E, F), jnp.float32), S((E, D), jnp.float32)
    q, kv, pos, kpos = (S((1, 1, 8, 64), jnp.bfloat16), S((1, 256, 2, 64), FP8), S((1, 1), jnp.int32),
                        S((1, 256), jnp.int32))

    def moe(x, wg, wd, sf, sd):
        return moe_fp8(x, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.bfloat16), wg, wg, wd, (sf, sf, sd),
                       method="pairs")

    cases = [
        (lambda x, w, s: fp8_matmul(x, w, s, split_k=2, block_n=64, block_k=64), (x, w, s)),
        (lambda x, w, s: gate_up_swiglu(x, w, s, w, s, split_k=2, block_n=64, block_k=64), (x, w, s)),
        (moe, (S((1, D), jnp.bfloat16), wg, wd, sf, sd)),
        (lambda q, k, v, p, kp: decode_attention(q, k, v, p, kp, chunk_size=None, scale=0.125, k_scale=1.0,
                                                 v_scale=1.0), (q, kv, kv, pos, kpos)),
    ]
    for fn, shapes in cases:
        texts = triton_modules(fn, *shapes, monkeypatch=monkeypatch)
        assert texts
        for text in texts:
            widen = re.findall(r"tt\.fp_to_fp .*f8E4M3FN> -> tensor<[0-9x]+x(\w+)>", text)
            widen += re.findall(r"arith\.extf .*f8E4M3FN> to tensor<[0-9x]+x(\w+)>", text)
            assert widen and set(widen) == {"f16"}, (set(widen), text[:300])


def test_compute_dtype_env_override(monkeypatch):
    monkeypatch.setenv("MAVJAX_FP8_COMPUTE_DTYPE", "bfloat16")
    assert upcast.compute_dtype() == jnp.bfloat16
    assert upcast.compute_dtype("float16") == jnp.float16  # an explicit argument wins
    monkeypatch.setenv("MAVJAX_FP8_COMPUTE_DTYPE", "int8")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        upcast.compute_dtype()
