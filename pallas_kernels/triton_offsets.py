"""64-bit addressing for 1-byte arrays of 2^31..2^32 elements in Pallas' Triton lowering (a JAX bug, worked
around here).

Pallas' Triton lowering (`jax._src.pallas.triton.lowering._compute_offsets_from_indices`, JAX 0.10-0.11 and
upstream as of 2026-11) computes a load's or store's element offsets in int32 unless the array is larger than
2^32 *bytes*. Triton adds an int32 offset to a pointer as a *signed* number, so int32 is safe only below 2^31
*elements*. For 2-byte and wider dtypes the byte rule implies the element one; for FP8 (1 byte) an array of
2^31..2^32 elements gets int32 offsets that wrap negative past element 2^31 and read before the array:
CUDA_ERROR_ILLEGAL_ADDRESS. Maverick's experts sharded over 2 GPUs are exactly that: [128, 5120, 4096] FP8 is
2.7e9 elements, and every expert from 103 on is out of reach (the crash of the first 2-GPU Pallas runs,
docs/benchmarks.md section 7). Single-GPU full width ([128, 5120, 8192], 5.4e9 > 2^32) and the 8-way shard
(6.7e8) were never affected, nor is any bf16 array.

The fix: for such arrays, the offset computation is told the array has 4-byte elements (its shape unchanged),
which is all the function uses the dtype for, so it picks 64-bit offsets. Nothing else changes; arrays below
2^31 elements keep 32-bit offsets (cheaper address arithmetic). Importing `pallas_kernels` installs it;
tests/test_triton_offsets.py lowers a kernel for CUDA on the CPU and checks the offsets' integer width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax.numpy as jnp

INT32_SAFE_ELEMENTS = 2 ** 31 - 1  # largest element offset a signed int32 holds

try:
    from jax._src.pallas.triton import lowering as _lowering
except ImportError:  # a jaxlib without the Triton lowering: nothing to fix
    _lowering = None


def needs_wide_offsets(shape, dtype) -> bool:
    """True where JAX's own rule (64-bit above 2^32 bytes) would address `shape` with int32 offsets that
    cannot reach every element."""
    n = math.prod(shape)
    return n > INT32_SAFE_ELEMENTS and n * jnp.dtype(dtype).itemsize <= 2 ** 32


def install():
    """Wrap the lowering's offset computation once (idempotent). Warns, and does nothing, if this JAX has no
    such function (renamed upstream: then check whether the bug is fixed there)."""
    if _lowering is None:
        return
    orig = getattr(_lowering, "_compute_offsets_from_indices", None)
    if orig is None or not hasattr(getattr(_lowering, "BlockInfo", None), "__dataclass_fields__"):
        warnings.warn("pallas_kernels.triton_offsets: this JAX's Triton lowering has no "
                      "_compute_offsets_from_indices/BlockInfo; FP8 arrays of 2^31..2^32 elements may be "
                      "addressed with int32 offsets (illegal address on the GPU)")
        return
    if getattr(orig, "_mavjax_wide_offsets", False):
        return

    @functools.wraps(orig)
    def offsets(block_info, nd_indexer):
        full = block_info.full_shape_dtype
        if needs_wide_offsets(full.shape, full.dtype):
            block_info = dataclasses.replace(block_info, full_shape_dtype=full.update(dtype=jnp.float32))
        return orig(block_info, nd_indexer)

    offsets._mavjax_wide_offsets = True
    _lowering._compute_offsets_from_indices = offsets


install()
