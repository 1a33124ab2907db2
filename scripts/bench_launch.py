"""What one kernel costs inside a jitted step when it does almost nothing: a chain of dependent tiny kernels on
decode-sized activations ([8, 4096] bf16, 64 KB), per kind of kernel, so a step's ~12 launches a layer can be
priced apart from the bytes they read (docs/benchmarks.md: the rank's step is ~4x its bytes-read floor).

Kinds: an XLA fusion (an optimization barrier between steps keeps XLA from fusing the chain), a Pallas Triton
kernel over 32 programs of [8, 128] (a small kernel's grid) or one program, and a Pallas Mosaic GPU kernel over
32 programs (TMA in and out, waiting for its predecessor as the model's kernels do; one program cannot be built:
a TMA box is at most 256 elements a dimension). The time per kernel is the slope between a chain of 32 and one
of 128 kernels in one jitted call (the call's own dispatch cancels out). Each kind's result must equal the same
chain in numpy exactly (the same bf16 roundings in the same order). With --profile, the long chain is also
traced: the kernels' own device time (busy) against the span they took, so a launch that costs host time (the
GPU idle between kernels) shows apart from one that costs device time.
Run once as is and once with MAVJAX_DEFAULT_XLA_FLAGS=0 (no programmatic dependent launch) to see PDL's part.

  python scripts/bench_launch.py [--reps 50]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mavjax import xla_flags  # noqa: E402  (adds the default XLA flags, PDL among them, before JAX starts)
from mavjax.benchmarking import median_call_s  # noqa: E402

ROWS, COLS = 8, 4096  # (Triton blocks are powers of two: 4096 columns, not the model's 5120)
A, B = 0.5, 1.0  # y = x * A + B: contracts towards 2, finite over any chain


def step_xla(x):
    return jax.lax.optimization_barrier((x.astype(jnp.float32) * A + B).astype(x.dtype))


def _body(x_ref, o_ref):
    o_ref[...] = (x_ref[...].astype(jnp.float32) * A + B).astype(o_ref.dtype)


def step_triton(programs, interpret=False):
    block = (ROWS, COLS // programs)

    def f(x):
        return pl.pallas_call(_body, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(programs,),
                              in_specs=[pl.BlockSpec(block, lambda i: (0, i))],
                              out_specs=pl.BlockSpec(block, lambda i: (0, i)), interpret=interpret)(x)
    return f


def step_mosaic(programs, interpret=False):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.mgpu_gemv import interpret_params

    cols = COLS // programs
    params = interpret_params(interpret)

    def body(x_gmem, o_gmem):
        if params is None:
            plgpu.griddepcontrol_wait()  # under PDL: the predecessor's output is ready
        part = pl.ds(jax.lax.axis_index("n") * cols, cols)

        def scoped(x_smem, o_smem, barrier):
            plgpu.copy_gmem_to_smem(x_gmem.at[:, part], x_smem, barrier)
            plgpu.barrier_wait(barrier)
            _body(x_smem, o_smem)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, part])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((ROWS, cols), jnp.bfloat16), plgpu.SMEM((ROWS, cols), jnp.bfloat16),
                      plgpu.Barrier(num_arrivals=1))

    def f(x):
        return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(programs,),
                            grid_names=("n",), interpret=params)(x)
    return f


def chain(step, n):
    @jax.jit
    def f(x):
        for _ in range(n):
            x = step(x)
        return x
    return f


def expected(x, n):
    y = np.asarray(x, np.float32)
    for _ in range(n):
        y = np.asarray(jnp.asarray(y * A + B, jnp.bfloat16), np.float32)
    return y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--long", type=int, default=128)
    ap.add_argument("--interpret", action="store_true", help="CPU: check the Pallas kinds in the interpreter")
    ap.add_argument("--profile", action="store_true", help="trace the long chain: busy time against span")
    ap.add_argument("--kinds", nargs="*", default=None, help="only the kinds whose names contain one of these")
    a = ap.parse_args(argv)
    i = a.interpret
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r} (mavjax's defaults: {xla_flags.DEFAULTS})")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((ROWS, COLS)), jnp.bfloat16)
    kinds = {"xla fusion": step_xla, "triton, 32 programs": step_triton(32, i), "triton, 1 program": step_triton(1, i),
             "mosaic gpu, 32 programs": step_mosaic(32, i)}
    kinds = {k: v for k, v in kinds.items() if a.kinds is None or any(w in k for w in a.kinds)}
    bad = []
    chains = f"{f'chain {a.short} us':>14s} {f'chain {a.long} us':>14s}"
    print(f"{'kernel':26s} {'us/kernel':>10s} {chains} {'max err':>8s}" + (f" {'busy us/kernel':>15s} {'span us/kernel':>15s}" if a.profile else ""))
    for name, step in kinds.items():
        try:
            fs, fl = chain(step, a.short), chain(step, a.long)
            err = float(np.abs(np.asarray(fl(x), np.float32) - expected(x, a.long)).max())
            if err != 0:
                bad.append(name)
            ts, tl = median_call_s(fs, x, a.reps), median_call_s(fl, x, a.reps)
            per = (tl - ts) / (a.long - a.short)
            line = f"{name:26s} {per * 1e6:10.2f} {ts * 1e6:14.1f} {tl * 1e6:14.1f} {err:8.1e}"
            if a.profile:
                from mavjax.profiling import profile_kernels

                p = profile_kernels(lambda: fl(x).block_until_ready(), steps=1)
                n = max(p["kernels_per_step"], 1)
                line += f" {p['busy_us'] / n:15.2f} {p['span_us'] / n:15.2f}  ({p['kernels_per_step']:.0f} kernels)"
            print(line)
        except Exception as e:  # a kind this JAX cannot lower: say so, time the rest
            print(f"{name:26s} failed: {type(e).__name__}: {str(e)[:300]}")
            bad.append(name)
    if bad:
        print(f"FAILED: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
