"""The weight-streaming kernels' K loop (pallas_kernels/k_loop.py): the three orders compute the same function.

The inputs are chosen so that each order's own failure shows: K is ragged and split so that the last split
has one K block of three (the unrolled order's extra steps must contribute zero, else that block counts three
times); the activation rows' largest values sit in the last K block of each split, at 1e5 (f16 ends at 65504:
a scale taken over fewer blocks than the program's range overflows to inf) or the rows are 1e-7 small
(without the scale, f16 subnormals: ~50% error).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import k_loop
from pallas_kernels.fp8_gemm import fp8_matmul, fp8_matmul_ref, quantize_weight_per_channel
from pallas_kernels.fused_gemm import gate_up_swiglu, gate_up_swiglu_ref

ORDERS = ["loop", "prepass", "unroll:99"]
BK = 64
K = 7 * BK - 5  # 7 K blocks, the last ragged; split 3 -> 3 blocks per split, the last split has one


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _x(M, kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((M, K))
    if kind == "large":  # each split's largest value in its last block
        for last in (2 * BK + 7, 5 * BK + 3, K - 1):
            x[:, last] = 1e5
    elif kind == "small":
        x = x * 1e-7
    return jnp.asarray(x, jnp.bfloat16)


def _w(seed, N):
    w = np.random.default_rng(seed).standard_normal((K, N)) / np.sqrt(K)
    return quantize_weight_per_channel(jnp.asarray(w, jnp.float32))


@pytest.fixture
def order_env(monkeypatch):
    def set_order(v):
        monkeypatch.setenv("MAVJAX_K_LOOP", v)
        jax.clear_caches()  # the order is read when a kernel is traced
    yield set_order
    jax.clear_caches()


def test_order_rule(monkeypatch):
    monkeypatch.delenv("MAVJAX_K_LOOP", raising=False)
    assert [k_loop.order(s, t) for s, t in [(2, 1), (3, 1), (4, 1), (1, 2), (2, 2), (8, 2), (9, 1)]] == [
        "unroll", "unroll", "prepass", "unroll", "prepass", "prepass", "loop"]
    # larger tiles count as several of the rank's: bench_kernels' full-width [256, 128] tiles, [16, 256] x blocks
    big = dict(tile_bytes=256 * 128, x_bytes=16 * 256 * 2)
    assert [k_loop.order(s, 1, **big) for s in (1, 2, 4)] == ["prepass", "prepass", "loop"]
    assert k_loop.order(1, 1, tile_bytes=2 * k_loop.TILE_BYTES) == "unroll"
    assert k_loop.order(2, 1, tile_bytes=2 * k_loop.TILE_BYTES) == "prepass"
    monkeypatch.setenv("MAVJAX_K_LOOP", "loop")
    assert k_loop.order(1) == "loop"
    monkeypatch.setenv("MAVJAX_K_LOOP", "prepass")
    assert k_loop.order(1) == "prepass" and k_loop.order(9) == "loop"
    monkeypatch.setenv("MAVJAX_K_LOOP", "unroll:6")
    assert k_loop.order(3, 2) == "unroll" and k_loop.order(4, 2) == "prepass"
    for bad in ("unroll", "prepass:2", "fast", "unroll:x"):
        monkeypatch.setenv("MAVJAX_K_LOOP", bad)
        with pytest.raises(ValueError, match="MAVJAX_K_LOOP"):
            k_loop.order(2)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", ["unit", "large", "small"])
def test_every_order_computes_the_same_gemm(order_env, order, kind):
    order_env(order)
    M, N = 3, 96
    x, (w, s) = _x(M, kind), _w(2, N)
    y = fp8_matmul(x, w, s, mode="weight_only", block_n=64, block_k=BK, split_k=3, compute_dtype="float16",
                   reduce="kernel", interpret=True, poison_output=True)
    assert bool(jnp.isfinite(y).all()), "unwritten (NaN-poisoned), overflowed or non-finite elements"
    assert _err(y, fp8_matmul_ref(x, w, s, out_dtype=jnp.float32)) < 1e-2


@pytest.mark.parametrize("order", ORDERS)
def test_every_order_computes_the_same_gate_up(order_env, order):
    order_env(order)
    M, F = 2, 80
    x, (wg, sg), (wu, su) = _x(M, "large"), _w(3, F), _w(4, F)
    h = gate_up_swiglu(x, wg, sg, wu, su, mode="weight_only", block_n=32, block_k=BK, split_k=3,
                       compute_dtype="float16", out_dtype=jnp.float32, interpret=True, poison_output=True)
    assert bool(jnp.isfinite(h).all())
    assert _err(h, gate_up_swiglu_ref(x, wg, sg, wu, su, out_dtype=jnp.float32)) < 1e-2
