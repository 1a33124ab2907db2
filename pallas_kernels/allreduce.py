"""One-shot all-reduce over NVLink peer memory, fused with the residual add (Pallas Mosaic GPU), then RMSNorm.

DOES NOT YET LOWER ON GPU (two H200s, jax 0.11.2, 2026-11-29: an AssertionError in pallas_call's GPU
lowering, docs/benchmarks.md section 7). Written before any multi-GPU machine was lent; jax 0.10.2's
Mosaic GPU interpreter has no remote refs or cross-device semaphores, so nothing here can run on CPU. It is kept
out of the default path (`Parallel(allreduce="oneshot")` / `LLM(..., allreduce="oneshot")` opt in), and
scripts/bench_allreduce.py checks it against `psum` on random data before timing it.

Why: an XLA/NCCL psum of a [1, 5120] bf16 vector costs ~19 us on two H200s, latency not bandwidth (10 KB). A
one-shot all-reduce moves each device's partial once: every device stores its partial straight into a slot of
every peer's buffer (plain st.global through NVLink peer mappings: `plgpu.remote_ref`), signals the peer's
semaphore, waits for n-1 signals, and sums its n slots locally. No multicast (no multimem instructions, no
cuMulticastCreate, no NVLS): the device machines forbid it.

The protocol per call (n devices, `me` this device):
  1. handshake: signal `ready` on every peer, wait for n-1 `ready`. A peer is then inside this same call, so its
     output buffer of this call is live and it has finished reading the previous call's (XLA may reuse the same
     symmetric allocation from call to call);
  2. store x into slot `me` of every peer's `buf` (and of our own), then signal `done` on that peer; stores
     before a semaphore signal are visible to the peer once it sees the signal (the same pattern as JAX's own
     remote-DMA tests);
  3. wait for n-1 `done`; sum the n slots in float32, add the residual, store the new residual.
The RMSNorm (a row reduction) follows in XLA, which fuses it into one small kernel.

Requirements (JAX's Pallas Mosaic GPU, jax >= 0.7): sm90+; `buf` is a kernel *output*, which XLA allocates in
symmetric (peer-mapped) memory for kernels that communicate; single-process multi-GPU works in recent jax,
multi-process needs NVSHMEM (`pip install nvidia-nvshmem-cu12`, XLA_FLAGS=--xla_gpu_experimental_enable_nvshmem).
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp

LANES = 128  # rows of 128 elements: the flat [R*D] vector is handed to the kernel as [R*D/128, 128]


def _device_id(axis_names, sizes, pe):
    """Linear peer index -> {mesh axis: coordinate} (row-major over axis_names)."""
    out, rest = {}, pe
    for a, s in reversed(list(zip(axis_names, sizes))):
        out[a] = rest % s
        rest = rest // s
    return out


def oneshot_allreduce_add(partial, residual, axis_names):
    """Inside shard_map: residual + sum of `partial` over `axis_names`, through peer memory. partial/residual
    [..., D] of one dtype; returns [..., D] in residual's dtype (the sum is accumulated in float32)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    try:  # registers pallas_call's Mosaic GPU lowering. Without it the first run on two H200s (jax 0.11.2) failed
        # with "assert rule is not None" in pallas_call's gpu_lowering; with it, it still failed there with a bare
        # AssertionError (traceback not kept; scripts/bench_allreduce.py now logs it): unresolved
        importlib.import_module("jax._src.pallas.mosaic_gpu.pallas_call_registration")
    except ImportError as e:
        raise NotImplementedError(f"the one-shot all-reduce needs Pallas' Mosaic GPU backend, which this jax "
                                  f"cannot import: {e!r}") from e

    axis_names = tuple(axis_names)
    sizes = tuple(jax.lax.axis_size(a) for a in axis_names)
    n = math.prod(sizes)
    shape = partial.shape
    size = math.prod(shape)
    if size % LANES:
        raise ValueError(f"one-shot all-reduce needs a multiple of {LANES} elements, got shape {shape}")
    rows = size // LANES

    def kernel(x_ref, r_ref, out_ref, buf_ref, ready_sem, done_sem):
        me = 0  # this device's linear index (computed in the kernel: a kernel cannot close over traced values)
        for a, s in zip(axis_names, sizes):
            me = me * s + jax.lax.axis_index(a)
        for off in range(1, n):  # 1. every peer is inside this call
            pl.semaphore_signal(ready_sem, device_id=_device_id(axis_names, sizes, (me + off) % n))
        pl.semaphore_wait(ready_sem, n - 1)
        x = x_ref[...]  # [rows, 128]
        buf_ref[me] = x
        for off in range(1, n):  # 2. my partial into slot `me` of every peer's buffer
            peer = _device_id(axis_names, sizes, (me + off) % n)
            plgpu.remote_ref(buf_ref, peer)[me] = x
            pl.semaphore_signal(done_sem, device_id=peer)
        pl.semaphore_wait(done_sem, n - 1)  # 3. every peer's partial has landed here
        acc = r_ref[...].astype(jnp.float32)
        for j in range(n):
            acc = acc + buf_ref[j].astype(jnp.float32)
        out_ref[...] = acc.astype(out_ref.dtype)

    gmem = pl.BlockSpec(memory_space=plgpu.GMEM)
    out, _ = pl.pallas_call(
        kernel,
        in_specs=[gmem, gmem],
        out_specs=[gmem, gmem],
        out_shape=[jax.ShapeDtypeStruct((rows, LANES), residual.dtype),
                   jax.ShapeDtypeStruct((n, rows, LANES), partial.dtype)],  # buf: peers write into it
        scratch_shapes=[plgpu.SemaphoreType.REGULAR, plgpu.SemaphoreType.REGULAR],
        compiler_params=plgpu.CompilerParams(),
    )(partial.reshape(rows, LANES), residual.reshape(rows, LANES))
    return out.reshape(shape)


def oneshot_allreduce_residual_rmsnorm(partial, residual, scale, eps, axis_names):
    """The fused layer boundary of mavjax.parallel.allreduce_residual_rmsnorm through the one-shot kernel:
    (x = residual + allreduce(partial), rms_norm(x, scale, eps))."""
    from mavjax.model import rms_norm

    if jax.default_backend() != "gpu":
        raise NotImplementedError("allreduce='oneshot' is a GPU (NVLink peer memory) kernel; use 'xla' here")
    x = oneshot_allreduce_add(partial, residual, axis_names)
    return x, rms_norm(x, scale, eps)
