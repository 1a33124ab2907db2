"""Pallas kernels for mavjax (see each module's docstring). Importing the package installs the fix for JAX's
int32 addressing of large FP8 arrays in the Triton lowering (triton_offsets)."""

from pallas_kernels import triton_offsets

__all__ = ["triton_offsets"]
