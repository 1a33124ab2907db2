"""pallas_kernels.split_k: split-K sums finished by the last split's program. The arithmetic is tested with
each kernel (tests/test_fp8_gemm.py, test_fused_kernels.py, test_moe_gemm.py, test_decode_attention.py);
here the counting under the interpreter and, on the Triton IR lowered for CUDA on the CPU, the ordering the
GPU needs (barrier, acquire-release atomic at GPU scope, partials read through L2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.fp8_gemm import fp8_matmul, quantize_weight_per_channel
from pallas_kernels.split_k import arrive, counters, sum_partials
from test_triton_offsets import triton_modules

S, NB, W = 3, 4, 8


def _count_kernel(x_ref, cnt_ref, part_ref, y_ref, seen_ref):
    n, s = pl.program_id(0), pl.program_id(1)
    part_ref[s, pl.ds(n * W, W)] = x_ref[s, pl.ds(n * W, W)] * 2.0
    last = arrive(cnt_ref, n, S, interpret=True)
    seen_ref[n, s] = last.astype(jnp.int32)

    @pl.when(last)
    def _():
        y_ref[pl.ds(n * W, W)] = sum_partials(part_ref, S, (pl.ds(n * W, W),), (W,))


def test_exactly_one_last_arrival_per_tile_and_counters_back_at_zero():
    x = jnp.arange(S * NB * W, dtype=jnp.float32).reshape(S, NB * W)
    out = pl.pallas_call(
        _count_kernel, grid=(NB, S), interpret=True,
        out_shape=[jax.ShapeDtypeStruct((S, NB * W), jnp.float32), jax.ShapeDtypeStruct((NB * W,), jnp.float32),
                   jax.ShapeDtypeStruct((NB, S), jnp.int32),
                   ],
        input_output_aliases={})(x, counters(NB))
    _, y, seen = out
    np.testing.assert_array_equal(np.asarray(seen).sum(axis=1), 1)  # one last program per tile
    np.testing.assert_allclose(np.asarray(y), 2 * np.asarray(x).sum(axis=0))


def _reset_kernel(cnt_in, cnt_out):
    n = pl.program_id(0)
    arrive(cnt_in, n, 2, interpret=True)
    arrive(cnt_in, n, 2, interpret=True)
    cnt_out[pl.ds(n, 1)] = cnt_in[pl.ds(n, 1)]


def test_last_arrival_resets_its_counter():
    out = pl.pallas_call(_reset_kernel, grid=(NB,), interpret=True,
                         out_shape=jax.ShapeDtypeStruct((NB,), jnp.int32))(counters(NB))
    np.testing.assert_array_equal(np.asarray(out), 0)  # counters [0, NB) only


def test_counters_are_an_int32_constant_that_xla_keeps():
    c = counters(5)
    assert isinstance(c, np.ndarray) and c.dtype == np.int32 and c.shape == (6,) and not c[:5].any()
    assert c[-1] != 0  # not all equal: XLA would replace an all-equal constant by a (materialized) broadcast
    assert counters(0).shape == (2,)


def test_triton_ir_orders_partials_before_the_atomic(monkeypatch):
    """fp8_matmul with split_k > 1, lowered for CUDA: a barrier, then an acquire-release atomic add at GPU scope
    (the arrival), and the last program's partial loads volatile (never a stale L1 line)."""
    w, s = quantize_weight_per_channel(jnp.ones((256, 128), jnp.float32))

    def f(x, w, s):
        return fp8_matmul(x, w, s, split_k=4, block_n=64, block_k=64, mode="weight_only", reduce="kernel")

    (text,) = triton_modules(f, jax.ShapeDtypeStruct((1, 256), jnp.bfloat16), jax.ShapeDtypeStruct(w.shape, w.dtype),
                             jax.ShapeDtypeStruct(s.shape, s.dtype), monkeypatch=monkeypatch)
    atomics = [ln for ln in text.splitlines() if "tt.atomic_rmw" in ln]
    assert atomics and all("acq_rel" in ln and "gpu" in ln for ln in atomics), atomics
    # an integer add on the int32 counter (JAX lowers a 1-element int32 tensor value to a float add)
    assert all("atomic_rmw add" in ln and "fadd" not in ln and "i32" in ln for ln in atomics), atomics
    first_atomic = text.index("tt.atomic_rmw")
    assert "gpu.barrier" in text[:first_atomic]
    loads = [ln for ln in text.splitlines() if "tt.load" in ln]
    assert any("isVolatile = true" in ln for ln in loads), loads


def test_reduce_default_per_family(monkeypatch):
    from pallas_kernels.split_k import DEFAULTS, FAMILIES, default_reduce

    monkeypatch.delenv("MAVJAX_SPLIT_K_REDUCE", raising=False)
    assert {f: default_reduce(f) for f in FAMILIES} == DEFAULTS
    assert DEFAULTS["attention"] == "kernel" and DEFAULTS["gemm"] == "xla"
    for v in ("kernel", "xla"):
        monkeypatch.setenv("MAVJAX_SPLIT_K_REDUCE", v)
        assert {default_reduce(f) for f in FAMILIES} == {v}
    monkeypatch.setenv("MAVJAX_SPLIT_K_REDUCE", "gemm=kernel, attention=xla")
    assert default_reduce("gemm") == "kernel" and default_reduce("attention") == "xla"
    assert default_reduce("qkv") == DEFAULTS["qkv"]
    for bad in ("gemm", "router=kernel", "gemm=atomic"):
        monkeypatch.setenv("MAVJAX_SPLIT_K_REDUCE", bad)
        with pytest.raises(ValueError, match="comma list"):
            default_reduce("gemm")
