"""The K loop of the weight-streaming kernels (FP8 GEMM, fused gate/up and QKV, the MoE gate/up kernels): one
program's K blocks [lo, hi), at most `steps` of them (split-K: steps = K blocks per split, static).

At decode a program of one 8-way rank's kernels streams only 2-5 K blocks, and what it costs is the chain of
dependent memory round trips more than the bytes (docs/benchmarks.md sections 12-14). Two orders:

* "loop": the f16 row-scale pre-pass over x (upcast.row_scales: one L2 round trip per K block, in sequence),
  then a fori_loop that loads x and the weight tiles per step (Triton pipelines it num_stages deep).
* "unroll" (steps <= UNROLL_MAX): every x block and weight tile of the program is requested first, all in
  flight together, then the scale and the dots follow: one round trip in all. Steps past hi (the last split's
  missing blocks) re-read block hi - 1 (an L1 hit) and contribute zero (their x block is zeroed).

MAVJAX_K_LOOP=loop|unroll forces one order (A/B timing); read when a kernel is traced.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from jax import lax

from pallas_kernels import upcast

# Programs with more K blocks than this keep the loop: every unrolled tile is live in registers at once.
UNROLL_MAX = 8
# ... and with more than this, the x blocks of the pre-pass are not all loaded at once either.
PREPASS_MAX = 8


def order(steps: int) -> str:
    """How a program of `steps` K blocks runs: "unroll", "prepass" (the pre-pass's x loads all issued at once,
    then the pipelined loop) or "loop". $MAVJAX_K_LOOP: loop | prepass | unroll | unroll:N (unroll up to N
    steps, the pre-pass above); default unroll up to UNROLL_MAX."""
    v = os.environ.get("MAVJAX_K_LOOP", "").strip() or "unroll"
    mode, _, n = v.partition(":")
    if mode not in ("loop", "prepass", "unroll") or (n and (mode != "unroll" or not n.isdigit())):
        raise ValueError(f"MAVJAX_K_LOOP must be loop, prepass, unroll or unroll:N, got {v!r}")
    if mode == "unroll" and steps <= (int(n) if n else UNROLL_MAX):
        return "unroll"
    if mode != "loop" and steps <= PREPASS_MAX:
        return "prepass"
    return "loop"


def stream_k(load_x, load_ws, step, init, lo, hi, steps, x_shape, cdt, *, scale_x=True):
    """(acc, s): acc after step(kb, x, ws, acc) for each K block kb in [lo, hi), where x = load_x(kb) [x_shape]
    in cdt (f16: each row divided by its power-of-two scale s [rows] over the whole range, upcast.row_scales;
    s is None for other dtypes or scale_x=False, which casts x as it is: FP8 activations) and ws = load_ws(kb),
    the weight tiles as loaded. The caller multiplies acc by s (per row) once."""
    f16 = scale_x and jnp.dtype(cdt) == jnp.float16
    convert = (lambda v, mul: upcast.scaled(v, mul, cdt)) if scale_x else (lambda v, mul: v)
    how = order(steps)
    kbs = [jnp.minimum(lo + i, hi - 1) for i in range(steps)]
    if how != "unroll":
        if not f16:
            mul, s = None, None
        elif how == "prepass":  # x's blocks all in flight at once (re-read blocks do not change the max)
            mul, s = upcast.row_scales_of([load_x(kb) for kb in kbs], cdt)
        else:
            mul, s = upcast.row_scales(load_x, lo, hi, x_shape, cdt)
        return lax.fori_loop(lo, hi, lambda kb, acc: step(kb, convert(load_x(kb), mul), load_ws(kb), acc),
                             init), s
    xs = [load_x(kb) for kb in kbs]                     # every load of the program issued before any use
    ws = [load_ws(kb) for kb in kbs]
    mul, s = upcast.row_scales_of(xs, cdt) if f16 else (None, None)
    acc = init
    for i, (kb, x, w) in enumerate(zip(kbs, xs, ws)):
        x = convert(x, mul)
        if i:  # step 0 is always in range (lo < hi)
            x = jnp.where(lo + i < hi, x, jnp.zeros((), x.dtype))
        acc = step(kb, x, w, acc)
    return acc, s
