"""The int32-offset fix for large FP8 arrays (pallas_kernels.triton_offsets), checked on the Triton IR that
Pallas emits: kernels are lowered for CUDA on the CPU (no GPU, no allocation: the arrays are shapes only)."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax._src.pallas.triton import lowering as triton_lowering

from pallas_kernels import triton_offsets  # (importing the package installs the fix)
from pallas_kernels.moe_gemm import moe_fp8_pairs

MOE_TP2 = (128, 5120, 4096)  # Maverick's experts over 2 GPUs, [E, D, F]: 2.7e9 FP8 elements


def triton_modules(fn, *shapes, monkeypatch):
    """The Triton IR (text) of every pallas_call in fn, lowered for CUDA from ShapeDtypeStructs."""
    texts = []
    orig = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        res = orig(*a, **k)
        texts.append(res.module.operation.get_asm(enable_debug_info=True, pretty_debug_info=True))
        return res

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
    jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    return texts


def load_offset_widths(text):
    """Integer widths of the tensor offset products of the module's loads (`ref[...]` and `plgpu.load`)."""
    return set(re.findall(r'arith\.muli .*: tensor<[0-9x]+xi(\d+)> "(?:get|load|masked_load):"', text))


def tile_of_expert(e_ref, w_ref, o_ref):
    o_ref[...] = w_ref[e_ref[0], pl.ds(0, 16), pl.ds(0, 16)].astype(jnp.float32)


def load_tile(e, w):
    return pl.pallas_call(tile_of_expert, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), grid=(1,),
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1))(e, w)


def _widths(shape, dtype, monkeypatch):
    # a fresh function each time: jit caches lowerings by function
    (text,) = triton_modules(lambda e, w: load_tile(e, w), jax.ShapeDtypeStruct((1,), jnp.int32),
                             jax.ShapeDtypeStruct(shape, dtype), monkeypatch=monkeypatch)
    return load_offset_widths(text)


def test_needs_wide_offsets_only_for_one_byte_arrays_past_int32():
    assert triton_offsets.needs_wide_offsets(MOE_TP2, jnp.float8_e4m3fn)
    assert triton_offsets.needs_wide_offsets((2 ** 31,), jnp.int8)
    assert not triton_offsets.needs_wide_offsets((2 ** 31 - 1,), jnp.float8_e4m3fn)
    assert not triton_offsets.needs_wide_offsets((2 ** 32 + 1,), jnp.float8_e4m3fn)  # JAX's rule takes it
    assert not triton_offsets.needs_wide_offsets(MOE_TP2, jnp.bfloat16)  # > 2^32 bytes: JAX's rule takes it
    assert not triton_offsets.needs_wide_offsets((128, 5120, 1024), jnp.float8_e4m3fn)


def test_large_fp8_array_is_addressed_with_64_bit_offsets(monkeypatch):
    assert _widths(MOE_TP2, jnp.float8_e4m3fn, monkeypatch) == {"64"}


def test_small_arrays_keep_32_bit_offsets(monkeypatch):
    assert _widths((128, 5120, 1024), jnp.float8_e4m3fn, monkeypatch) == {"32"}


def test_jax_rule_alone_would_use_int32_here(monkeypatch):
    """The bug the fix exists for, still in this JAX (a JAX that fixed it skips this, saying the workaround can
    go: pyproject admits newer JAX releases, and one fixing the bug must not fail CI)."""
    wrapped = triton_lowering._compute_offsets_from_indices
    monkeypatch.setattr(triton_lowering, "_compute_offsets_from_indices", wrapped.__wrapped__)
    widths = _widths(MOE_TP2, jnp.float8_e4m3fn, monkeypatch)
    if widths == {"64"}:
        pytest.skip(f"JAX {jax.__version__} addresses such arrays with 64-bit offsets itself: "
                    "pallas_kernels/triton_offsets.py can be removed")
    assert widths == {"32"}


def test_moe_pair_kernels_address_tp2_experts_with_64_bit_offsets(monkeypatch):
    """The real kernels at the 2-GPU shard's expert shape (where the first mesh runs crashed)."""
    E, D, F = MOE_TP2
    f8 = jnp.float8_e4m3fn
    shapes = [jax.ShapeDtypeStruct((1, D), jnp.bfloat16), jax.ShapeDtypeStruct((1, 1), jnp.int32),
              jax.ShapeDtypeStruct((1, 1), jnp.bfloat16), jax.ShapeDtypeStruct((E, D, F), f8),
              jax.ShapeDtypeStruct((E, D, F), f8), jax.ShapeDtypeStruct((E, F, D), f8),
              (jax.ShapeDtypeStruct((E, F), jnp.float32),) * 2 + (jax.ShapeDtypeStruct((E, D), jnp.float32),)]
    texts = triton_modules(lambda *a: moe_fp8_pairs(*a[:6], a[6]), *shapes, monkeypatch=monkeypatch)
    assert len(texts) == 2  # gate/up and down
    for text in texts:
        # the expert weight tiles are the only loads from arrays past 2^31 elements
        assert "64" in load_offset_widths(text), text[:2000]


def test_install_is_idempotent():
    before = triton_lowering._compute_offsets_from_indices
    triton_offsets.install()
    assert triton_lowering._compute_offsets_from_indices is before
    assert getattr(before, "_mavjax_wide_offsets", False)


if __name__ == "__main__":
    pytest.main([__file__, "-v"])
