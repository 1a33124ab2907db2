"""FP8 MoE decode on Hopper through the Mosaic GPU weight-only GEMM (pallas_kernels.mgpu_gemv): the routed
experts of a Llama 4 MoE layer for up to 16 (token, expert) pairs in two launches, `moe_reference` semantics.

Why beside moe_gemm's Triton pair path: at one token that path's two kernels each took 10-13 us above their
bytes (docs/benchmarks.md sections 10-12: 1.77-1.87x the chosen expert's bytes at full width, target 1.3x),
while the Mosaic GPU kernel streams a 5120x16384 FP8 weight at the copy-bandwidth floor (section 18). One token's
expert is exactly such a weight (gate | up, then the 8192x5120 down).

    xs[p]  = x[token(p)] * score[p]                      in x's dtype, as the reference      [P, D]
    gu     = gemv_partials(xs, (w_gate, w_up), ids)      program p streams expert ids[p]  [S, P, 2F, Mp]
    h[p]   = silu(g[p] * s_gate[e]) * (u[p] * s_up[e])   row p of slice p, summed over S   [P, F]  (bf16)
    yp     = gemv_partials(h, (w_down,), ids)                                              [S, P, D, Mp]
    y[n]   = sum_j  yp[p, row p] * s_down[e]             p = (n, j)                         [N, D]

Every program p multiplies all Mp padded rows (the pairs' inputs are the WGMMA's columns, padded to 8 or 16
anyway) and only row p of its result is kept: the tensor cores have time to spare and the extra f32 partials
are 2 * Mp * (2F + D) * 4 bytes a pair, against 3 * D * F bytes of the expert (under 2% at Maverick's shapes).
Only the named experts are read (two pairs on one expert read it twice, as the Triton pair path does); a pair
whose id lies outside [0, E) reads nothing and contributes nothing. The shared expert can ride along
(`shared=`): one more program row streams it once, its columns the N tokens' x (N more WGMMA columns), and it
keeps those N columns. The split-K sums, scales and SwiGLU are XLA fusions between and after the two launches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import mgpu_gemv

MAX_PAIRS = mgpu_gemv.MAX_ROWS  # the WGMMA's columns: every pair's input is one of them


def supported(rows, D, F, scales) -> bool:
    """Whether `moe_fp8_mgpu` takes this layer: 1..MAX_PAIRS rows (the (token, expert) pairs, plus one per
    token where the shared expert rides along), FP8 experts with per-channel scales ([E, F], [E, F], [E, D]),
    D and F multiples of 64."""
    return (scales is not None and all(s.ndim == 2 for s in scales) and 0 < rows <= MAX_PAIRS
            and mgpu_gemv.supported(rows, D, (F, F)) and mgpu_gemv.supported(rows, F, (D,)))


def wanted(rows, D, F, scales) -> bool:
    """Whether moe_fp8(mosaic=None) takes this path: `supported` and on a Hopper GPU."""
    return supported(rows, D, F, scales) and mgpu_gemv.on_hopper()


def _keep_own_rows(parts, P, n_shared):
    """[S, P (+ 1), N, Mp] partials -> [P + n_shared, N] float32, summed over the K splits: pair p's row p of its
    slice, then the shared program's (slice P) rows P .. P + n_shared - 1."""
    p = jnp.arange(P)
    rows = parts[:, p, :, p]  # [P, S, N] (the two index arrays lead)
    if n_shared:
        rows = jnp.concatenate([rows, parts[:, P, :, P:P + n_shared].transpose(2, 0, 1)])  # + [n_shared, S, N]
    return rows.sum(axis=1)


@functools.partial(jax.jit, static_argnames=("tile_n", "split_k", "stages", "tile_n_down", "split_k_down",
                                             "stages_down", "interpret"))
def moe_fp8_mgpu(x, expert_idx, scores, w_gate, w_up, w_down, scales, *, shared=None, tile_n=None, split_k=None,
                 stages=None, tile_n_down=None, split_k_down=None, stages_down=None, interpret=None):
    """Routed experts (`moe_gemm.moe_reference` semantics) for few pairs on the Mosaic GPU kernel. x [N, D];
    expert_idx, scores [N, k]; w_gate, w_up [E, D, F], w_down [E, F, D] float8_e4m3fn; scales (s_gate [E, F],
    s_up [E, F], s_down [E, D]) float32. shared: None, or Llama 4's shared expert (w_gate [D, F], w_up [D, F],
    w_down [F, D] FP8, (s_gate [F], s_up [F], s_down [D])): one more program row in the same two launches, for all
    N tokens (their input not scaled by a router score), and the result is routed + shared, as
    `moe_gemm.moe_fp8_pairs(shared=...)` computes. Rows (WGMMA columns): N * k (+ N with shared) <= MAX_PAIRS.
    Tiles: mgpu_gemv.default_config per launch where not given (the `_down` ones for the down projection).
    interpret: mgpu_gemv.interpret_params(...). Returns [N, D] in x's dtype."""
    N, D = x.shape
    E, _, F = w_gate.shape
    k = expert_idx.shape[1]
    P = N * k
    Q = N if shared is not None else 0  # the shared expert's rows (columns of its one program), after the pairs
    if not supported(P + Q, D, F, scales):
        raise ValueError(f"moe_fp8_mgpu takes 1..{MAX_PAIRS} rows ((token, expert) pairs + shared-expert rows), FP8 "
                         f"experts with per-channel scales and D, F multiples of 64; got {P} + {Q} rows, D={D}, "
                         f"F={F}, scales {None if scales is None else [s.shape for s in scales]}")
    sg, su, sd = scales
    ids = expert_idx.reshape(-1).astype(jnp.int32)  # [P]
    valid = (ids >= 0) & (ids < E)
    e = jnp.clip(ids, 0, E - 1)  # for the scales' gathers; a dropped pair's values are masked below
    xs = x[jnp.arange(P) // k] * scores.reshape(-1)[:, None].astype(x.dtype)  # [P, D], the reference's rounding
    sg, su, sd = sg[e], su[e], sd[e]  # [P, F], [P, F], [P, D]: each row's scales
    sh_gu = sh_dn = ()
    if shared is not None:
        *w_sh, s_sh = shared
        s_shapes = None if s_sh is None else [s.shape for s in s_sh]
        if [w.shape for w in w_sh] != [(D, F), (D, F), (F, D)] or s_shapes != [(F,), (F,), (D,)]:
            raise ValueError(f"shared expert must be FP8 [D={D}, F={F}], [D, F], [F, D] with scales [F], [F], [D]; "
                             f"got {[w.shape for w in w_sh]} and scales {s_shapes}")
        xs = jnp.concatenate([xs, x])  # [P + N, D]
        valid = jnp.concatenate([valid, jnp.ones((N,), bool)])
        sg, su, sd = (jnp.concatenate([a, jnp.broadcast_to(b, (N, b.shape[0]))]) for a, b in zip((sg, su, sd), s_sh))
        sh_gu, sh_dn = w_sh[:2], w_sh[2:]  # one program row reads the shared expert once, for all N tokens
    xp, rs, cdt = mgpu_gemv.operand(xs)

    c1 = mgpu_gemv.default_config(D, (F, F), copies=P + bool(Q))
    gu = mgpu_gemv.gemv_partials(xp, (w_gate, w_up), ids=ids, shared_ws=sh_gu, tile_n=tile_n or c1["tile_n"],
                                 split_k=split_k or c1["split_k"], stages=stages or c1["stages"],
                                 compute_dtype=cdt, interpret=interpret)  # [S, P (+ 1), 2F, Mp]
    gu = _keep_own_rows(gu, P, Q)  # [P + Q, 2F]
    gu = gu if rs is None else gu * rs[:, None]
    g, u = gu[:, :F] * sg, gu[:, F:] * su  # [P + Q, F] each
    h = jnp.where(valid[:, None], jax.nn.silu(g) * u, 0.0).astype(jnp.bfloat16)  # as the pair path keeps h

    hp, _, _ = mgpu_gemv.operand(h)  # bf16, taken as it is
    c2 = mgpu_gemv.default_config(F, (D,), copies=P + bool(Q))
    yp = mgpu_gemv.gemv_partials(hp, (w_down,), ids=ids, shared_ws=sh_dn, tile_n=tile_n_down or c2["tile_n"],
                                 split_k=split_k_down or c2["split_k"], stages=stages_down or c2["stages"],
                                 compute_dtype=hp.dtype, interpret=interpret)  # [S, P (+ 1), D, Mp]
    yp = jnp.where(valid[:, None], _keep_own_rows(yp, P, Q) * sd, 0.0)  # [P + Q, D]
    y = yp[:P].reshape(N, k, D).sum(axis=1) + (yp[P:] if Q else 0.0)  # [N, D]
    return y.astype(x.dtype)
