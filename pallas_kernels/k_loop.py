"""The K loop of the dense weight-streaming kernels (the FP8 GEMM, the fused gate/up and QKV): one program's K
blocks [lo, hi), at most `steps` of them (split-K: steps = K blocks per split, static).

At decode a program of one 8-way rank's kernels streams only 2-5 K blocks, and what it costs is the chain of
dependent memory round trips more than the bytes (docs/benchmarks.md sections 12-14). Three orders:

* "loop": the f16 row-scale pre-pass over x (upcast.row_scales: one L2 round trip per K block, in sequence),
  then a fori_loop that loads x and the weight tiles per step (Triton pipelines it num_stages deep).
* "prepass": the same loop, but the pre-pass requests all its x blocks at once (one round trip).
* "unroll": every x block and weight tile of the program is requested first, all in flight together, then the
  scale and the dots follow. Steps past hi (the last split's missing blocks) re-read block hi - 1 (an L1 hit)
  and contribute zero (their x block is zeroed). It holds every tile in registers, and loses to the
  pipeline's asynchronous copies beyond a few tiles (UNROLL_MAX_TILES).

MAVJAX_K_LOOP (see `order`) forces one for A/B timing; read when a kernel is traced. One 8-way rank of
Maverick on an H200 (docs/benchmarks.md section 14): decode at batch 1 2.68-2.70 ms against 2.79-2.86 with the
loop, verification 3.84 against 4.01, batch 8 4.30-4.38 against 4.43. The MoE pair kernels keep their loops:
there these orders gained nothing at one token and lost 25% at eight (the 16 pairs' programs).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from jax import lax

from pallas_kernels import upcast

# The limits are in the rank's tile sizes, where they were measured: weight tiles [64, 64] FP8 (4 KB) and x blocks
# [16, 64] of 2-byte values (2 KB). Larger tiles count as several: with bench_kernels.py's full-width tiles
# ([256, 128] weight tiles, [16, 256] x blocks) in the one-shot pre-pass or unrolled, its GEMM rows ran 8-17%
# slower than the loop had in section 10's runs (docs/benchmarks.md section 15), all those blocks live in
# registers at once.
TILE_BYTES = 64 * 64
X_BYTES = 16 * 64 * 2
# Unrolled when a program streams at most this many TILE_BYTES of weights (K steps x weights per step): the
# rank's kernels on an H200, loop-timed (docs/benchmarks.md section 14): the output projection (2 steps) 5.6-6.3
# us unrolled, 6.4-7.2 with the one-shot pre-pass, 7.1-7.7 with the loop; QKV (3 steps) 13.6-13.9 / 14.2-14.4 /
# 15.5-15.6; but the gate/up kernels (two tiles a step) 15.7-15.9 unrolled against 12.8-14.0 with the pre-pass.
UNROLL_MAX_TILES = 3
# Programs whose x blocks come to more than this many X_BYTES keep the loop's pre-pass (they would all be live
# at once).
PREPASS_MAX = 8


def order(steps: int, tiles: int = 1, tile_bytes: int = TILE_BYTES, x_bytes: int = X_BYTES) -> str:
    """How a program of `steps` K blocks runs, each an x block of x_bytes and `tiles` weight tiles of tile_bytes:
    "unroll", "prepass" (the pre-pass's x loads all issued at once, then the pipelined loop) or "loop".
    $MAVJAX_K_LOOP (A/B timing): loop | prepass | unroll:N (unroll up to N TILE_BYTES of weights, the pre-pass
    above); default unroll:UNROLL_MAX_TILES."""
    v = os.environ.get("MAVJAX_K_LOOP", "").strip() or f"unroll:{UNROLL_MAX_TILES}"
    mode, _, n = v.partition(":")
    if mode not in ("loop", "prepass", "unroll") or (mode == "unroll") != n.isdigit():
        raise ValueError(f"MAVJAX_K_LOOP must be loop, prepass or unroll:N, got {v!r}")
    if mode == "unroll" and steps * tiles * tile_bytes <= int(n) * TILE_BYTES:
        return "unroll"
    if mode != "loop" and steps * x_bytes <= PREPASS_MAX * X_BYTES:
        return "prepass"
    return "loop"


def stream_k(load_x, load_ws, step, init, lo, hi, steps, x_shape, cdt, *, block_n, tiles=1, scale_x=True):
    """(acc, s): acc after step(kb, x, ws, acc) for each K block kb in [lo, hi), where x = load_x(kb) [x_shape]
    = [rows, block_k] in cdt (f16: each row divided by its power-of-two scale s [rows] over the whole range,
    upcast.row_scales; s is None for other dtypes) and ws = load_ws(kb), the weight tiles as loaded (`tiles`
    FP8 tiles of block_k x block_n). The caller multiplies acc by s (per row) once. scale_x=False hands step x
    as loaded (FP8 activations) and s is None."""
    f16 = scale_x and jnp.dtype(cdt) == jnp.float16
    convert = (lambda v, mul: upcast.scaled(v, mul, cdt)) if scale_x else (lambda v, mul: v)
    rows, block_k = x_shape
    how = order(steps, tiles, block_k * block_n, rows * block_k * 2)
    # the program's blocks as unrolled steps: past hi, block hi - 1 again (an L1 hit; its x is zeroed below)
    kbs = [jnp.minimum(lo + i, hi - 1) for i in range(steps)] if how != "loop" else None
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
