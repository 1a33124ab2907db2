"""FP8 MoE on Hopper through the Mosaic GPU weight-only GEMM (pallas_kernels.mgpu_gemv): the routed experts of a
Llama 4 MoE layer in two launches, `moe_reference`'s function - for up to 16 (token, expert) pairs (decode:
`moe_fp8_mgpu`, below), and for any number through row blocks of tokens sorted by expert (prefill and batches:
`moe_fp8_mgpu_sorted`, at the end of the file).

Why beside moe_gemm's Triton pair path: at one token that path's two kernels each took 10-13 us above their
bytes (docs/benchmarks.md sections 10-12: 1.77-1.87x the chosen expert's bytes at full width, target 1.3x),
while the Mosaic GPU kernel streams a 5120x16384 FP8 weight at the copy-bandwidth floor (section 18). One token's
expert is exactly such a weight (gate | up, then the 8192x5120 down).

    gu     = gemv_partials(x, (w_gate, w_up), ids)       program p streams expert ids[p]  [S, P, 2F, Nt]
    g, u   = score[p] * gu[:, p, :, t(p)] summed over S, times s_gate[e] / s_up[e]     [P, F] each
    h[p]   = silu(g) * u                                  (bf16, padded rows zero)      [Pp, F]
    yp     = gemv_partials(h, (w_down,), ids)                                            [S, P, D, Pp]
    y[n]   = sum_j  yp[:, p, :, p] summed over S * s_down[e]     p = (n, j)              [N, D]

The gate|up launch's columns (the WGMMA's N, padded to 8 or 16) are the N tokens' x as it is, t(p) = p // k
the pair's token: x @ w is linear, so the router score multiplies the gate and up products in float32 instead
of x first - `moe_reference`'s function without its rounding of x * score to x's dtype (<= 2^-9 relative per
input element) - and every pair and the shared expert share one operand, which the add + norm kernel before the
MoE can hand over already padded (`x_padded`, fused_norm.add_rms_norm(pad_rows=...)): no XLA kernel before the
first launch. The down launch's columns are the pairs' h rows; every program multiplies all of them and keeps
its own (the tensor cores have time to spare; the extra f32 partials are 2 * Mp * (2F + D) * 4 bytes a pair,
against 3 * D * F bytes of the expert: under 2% at Maverick's shapes). Only the named experts are read (two
pairs on one expert read it twice, as the Triton pair path does); a pair whose id lies outside [0, E) reads
nothing and contributes nothing. The shared expert can ride along (`shared=`): one more program row streams it
once for all N tokens, in the gate|up launch on the same x columns (keeping the N tokens'), in the down launch
on its own h rows (the operand's second group, `gemv_partials`' [2, Mp, K] x). The split-K sums are chains of
adds (`split_k.sum_in_xla`), so each of the scales + SwiGLU and the combine is one XLA fusion.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mgpu_gemv
from pallas_kernels.split_k import sum_in_xla

MAX_PAIRS = mgpu_gemv.MAX_ROWS  # the WGMMA's columns: every pair's input is one of them


def supported(pairs, D, F, scales) -> bool:
    """Whether `moe_fp8_mgpu` takes this layer: 1..MAX_PAIRS (token, expert) pairs (the shared expert, riding
    along, adds no columns), FP8 experts with per-channel scales ([E, F], [E, F], [E, D]), D and F multiples
    of 64."""
    return (scales is not None and all(s.ndim == 2 for s in scales) and 0 < pairs <= MAX_PAIRS
            and mgpu_gemv.supported(pairs, D, (F, F)) and mgpu_gemv.supported(pairs, F, (D,)))


def wanted(pairs, D, F, scales) -> bool:
    """Whether moe_fp8(mosaic=None) takes this path: `supported` and on a Hopper GPU."""
    return supported(pairs, D, F, scales) and mgpu_gemv.on_hopper()


@functools.partial(jax.jit, static_argnames=("tile_n", "split_k", "stages", "tile_n_down", "split_k_down",
                                             "stages_down", "interpret"))
def moe_fp8_mgpu(x, expert_idx, scores, w_gate, w_up, w_down, scales, *, shared=None, x_padded=None, tile_n=None,
                 split_k=None, stages=None, tile_n_down=None, split_k_down=None, stages_down=None, interpret=None):
    """Routed experts (`moe_gemm.moe_reference`'s function, the score applied to the gate and up products: see
    the module doc) for few pairs on the Mosaic GPU kernel. x [N, D]; expert_idx, scores [N, k]; w_gate, w_up
    [E, D, F], w_down [E, F, D] float8_e4m3fn; scales (s_gate [E, F], s_up [E, F], s_down [E, D]) float32.
    shared: None, or Llama 4's shared expert (w_gate [D, F], w_up [D, F], w_down [F, D] FP8, (s_gate [F], s_up
    [F], s_down [D])): one more program row in the same two launches, for all N tokens, and the result is
    routed + shared, as `moe_gemm.moe_fp8_pairs(shared=...)` computes. x_padded: bf16 x already in the kernel's
    form, [padded_rows(N), D] (x's rows, then zeros), or None. Pairs: N * k <= MAX_PAIRS.
    Tiles: mgpu_gemv.default_config per launch where not given (the `_down` ones for the down projection).
    interpret: mgpu_gemv.interpret_params(...). Returns [N, D] in x's dtype."""
    N, D = x.shape
    E, _, F = w_gate.shape
    k = expert_idx.shape[1]
    P = N * k
    if not supported(P, D, F, scales):
        raise ValueError(f"moe_fp8_mgpu takes 1..{MAX_PAIRS} (token, expert) pairs, FP8 experts with per-channel "
                         f"scales and D, F multiples of 64; got {P} pairs, D={D}, F={F}, scales "
                         f"{None if scales is None else [s.shape for s in scales]}")
    sh_gu = sh_dn = ()
    if shared is not None:
        *w_sh, s_sh = shared
        s_shapes = None if s_sh is None else [s.shape for s in s_sh]
        if [w.shape for w in w_sh] != [(D, F), (D, F), (F, D)] or s_shapes != [(F,), (F,), (D,)]:
            raise ValueError(f"shared expert must be FP8 [D={D}, F={F}], [D, F], [F, D] with scales [F], [F], [D]; "
                             f"got {[w.shape for w in w_sh]} and scales {s_shapes}")
        sh_gu, sh_dn = w_sh[:2], w_sh[2:]  # one program row reads the shared expert once, for all N tokens
    ids = expert_idx.reshape(-1).astype(jnp.int32)  # [P]
    e = jnp.clip(ids, 0, E - 1)  # for the scales' gathers; a dropped pair's values are masked below
    valid = (ids >= 0) & (ids < E)  # [P]
    score = scores.reshape(-1).astype(x.dtype).astype(jnp.float32)  # [P], the score as the reference rounds it
    xp, rs, cdt = mgpu_gemv.operand(x, padded=x_padded)  # [Nt, D]: the tokens are the gate|up's columns
    Pp = mgpu_gemv.padded_rows(P)  # the down launch's columns (its x: the pairs' h rows)
    pair = np.minimum(np.arange(Pp), P - 1)  # h row r: pair r (the rows past P repeat the last pair, zeroed)
    live = jnp.asarray(np.arange(Pp) < P) & valid[pair]  # [Pp]: a dropped pair's slice is unwritten (masked)
    tok = np.minimum(np.arange(Pp), N - 1)  # the shared expert's h row r: token r (rows past N zeroed)

    c1 = mgpu_gemv.default_config(D, (F, F), copies=P + bool(sh_gu), rows=xp.shape[-2])
    gu = mgpu_gemv.gemv_partials(xp, (w_gate, w_up), ids=ids, shared_ws=sh_gu, tile_n=tile_n or c1["tile_n"],
                                 split_k=split_k or c1["split_k"], stages=stages or c1["stages"],
                                 compute_dtype=cdt, interpret=interpret)  # [S, P (+ 1), 2F, Nt]
    gu = sum_in_xla(gu)  # [P (+ 1), 2F, Nt]
    if rs is not None:  # x's row factors (the float16 path): column n is token n's
        gu = gu * jnp.pad(rs, (0, gu.shape[-1] - N))
    sg, su, sd = scales
    t = pair // k
    a = gu[pair, :, t] * score[pair][:, None]  # [Pp, 2F]: each row's own column, scored
    h = jnp.where(live[:, None], jax.nn.silu(a[:, :F] * sg[e[pair]]) * (a[:, F:] * su[e[pair]]), 0.0)  # [Pp, F]
    if sh_gu:  # the shared program's row P: token r's column, no score
        b = gu[P][:, tok].T  # [Pp, 2F]
        hs = jnp.where(np.arange(Pp)[:, None] < N, jax.nn.silu(b[:, :F] * s_sh[0]) * (b[:, F:] * s_sh[1]), 0.0)
        h = jnp.stack([h, hs])  # [2, Pp, F]: the shared row's program reads the second group
    h = h.astype(jnp.bfloat16)  # as the pair path keeps h

    c2 = mgpu_gemv.default_config(F, (D,), copies=P + bool(sh_dn), rows=Pp)
    yp = mgpu_gemv.gemv_partials(h, (w_down,), ids=ids, shared_ws=sh_dn, tile_n=tile_n_down or c2["tile_n"],
                                 split_k=split_k_down or c2["split_k"], stages=stages_down or c2["stages"],
                                 compute_dtype=jnp.bfloat16, interpret=interpret)  # [S, P (+ 1), D, Pp]
    yp = sum_in_xla(yp)  # [P (+ 1), D, Pp]
    p = np.arange(P)
    rows = jnp.where(valid[:, None], yp[p, :, p] * sd[e], 0.0)  # [P, D]: pair p's own column
    y = rows[0::k]
    for j in range(1, k):  # token n's pairs n*k .. n*k + k - 1
        y = y + rows[j::k]  # [N, D]
    if sh_dn:
        y = y + yp[P][:, :N].T * s_sh[2]  # [N, D]
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Many pairs (prefill, large batches): row blocks of tokens sorted by expert, each a program row of the kernel
# ----------------------------------------------------------------------------------------------------------

SORTED_BLOCK_M = (8, 128)  # a row block's rows (the WGMMA's N): a multiple of 8, at most 128 (the accumulator)


# From this many pairs per expert on average (prefill: 4096 tokens over 128 experts), 256-wide weight tiles 64 deep:
# every program of a row block reads the block's x tile again, and at 32-128 rows a block that x tile is as many
# bytes as a 128-wide FP8 weight tile or more; twice as wide halves that traffic. On one H200 at Maverick's full
# width (docs/benchmarks.md section 31): 4096 tokens 6.4 ms against 7.5 with 128 x 128 tiles, 16384 tokens 14.1
# against 18.3; 128-row blocks at that width spill (27.6 / 41.8 ms).
WIDE_PAIRS_PER_EXPERT = 32


def sorted_config(pairs, E, D, F, block_m=None, tile_n=None, tile_k=None):
    """block_m, tile_n, tile_k, stages of `moe_fp8_mgpu_sorted` (tile_n_down / stages_down the same rule for the
    down launch). block_m: the average pairs per expert rounded up to a power of two in [16, 64] (one row block
    per routed expert at uniform routing, so each expert's weights are streamed about once); tiles 128 wide and
    `mgpu_gemv.tile_k_for` deep, from WIDE_PAIRS_PER_EXPERT pairs per expert 256 wide and 64 deep (where D and
    F divide by 256); stages: the most of 4, 3, 2 whose shared memory fits one SM."""
    avg = -(-pairs // E)
    bm = block_m or min(64, max(16, 1 << max(0, avg - 1).bit_length()))
    wide = avg >= WIDE_PAIRS_PER_EXPERT and D % 256 == 0 and F % 256 == 0
    tn = tile_n or (256 if wide else 128 if F % 128 == 0 and D % 128 == 0 else 64)
    tk = tile_k or (64 if wide else None)

    def stages(K):
        k = tk or mgpu_gemv.tile_k_for(K)
        return next((s for s in (4, 3, 2) if mgpu_gemv.resident(tn, k, bm, s) >= 1), 1)

    return dict(block_m=bm, tile_n=tn, tile_k=tk, stages=stages(D), tile_n_down=tn, stages_down=stages(F))


def sorted_supported(x_dtype, D, F, scales, block_m, tile_n) -> bool:
    """Whether `moe_fp8_mgpu_sorted` takes this layer: FP8 experts with per-channel scales, bf16 x, D and F
    multiples of tile_n and 64, block_m a multiple of 8 within SORTED_BLOCK_M."""
    return (scales is not None and all(s.ndim == 2 for s in scales) and jnp.dtype(x_dtype) == jnp.bfloat16
            and block_m % 8 == 0 and SORTED_BLOCK_M[0] <= block_m <= SORTED_BLOCK_M[1]
            and D % 64 == 0 and F % 64 == 0 and D % tile_n == 0 and F % tile_n == 0)


def sorted_wanted(pairs, E, D, F, scales, x_dtype) -> bool:
    """Whether moe_fp8(mosaic=None) takes the sorted Mosaic GPU path: more than MAX_PAIRS pairs (fewer: the pair
    path, `wanted`), `sorted_supported` at `sorted_config`'s tiles, on a Hopper GPU."""
    cfg = sorted_config(pairs, E, D, F)
    return (pairs > MAX_PAIRS and sorted_supported(x_dtype, D, F, scales, cfg["block_m"], cfg["tile_n"])
            and mgpu_gemv.on_hopper())


# Pairs per pass of the sorted path: more go through in chunks of tokens (lax.map), which bounds its float32
# partials ([blocks, 2F, block_m]: 2.7 GB at Maverick's full width for 32768 pairs, 4.5x the bf16 h of Triton's
# sorted path) at the cost of one more read of the routed experts per chunk (~5 ms at full width on an H200,
# against ~29 ms of products for a chunk: an estimate from docs/benchmarks.md section 31's 16384-token op).
SORTED_MAX_PAIRS = 32768


@functools.partial(jax.jit, static_argnames=("block_m", "tile_n", "tile_k", "stages", "tile_n_down", "stages_down",
                                             "interpret"))
def moe_fp8_mgpu_sorted(x, expert_idx, scores, w_gate, w_up, w_down, scales, *, block_m=None, tile_n=None,
                        tile_k=None, stages=None, tile_n_down=None, stages_down=None, interpret=None):
    """Routed experts (`moe_gemm.moe_reference`'s function, x scaled by the score in x's dtype as the reference
    rounds it) for any number of pairs on the Mosaic GPU kernel: the pairs sorted by expert into row blocks of
    block_m rows (`moe_gemm.sort_tokens`: each block one expert's, padded with zero rows), and each row block a
    program row of `mgpu_gemv.gemv_partials(x_per_id=True)` streaming its expert's weights against its own rows
    (the WGMMA's columns). Only the experts that received pairs are read (a block past the active ones reads
    nothing and is masked); an expert with more than block_m pairs is streamed once per block.

        xs[b]  = x[token of row r] * score          rows r of block b, zero on padding    [B, bm, D] bf16
        gu[b]  = w_gate|w_up[e_b]^T xs[b]^T                                               [B, 2F, bm] f32
        h[b]   = silu(g * s_gate[e_b]) * (u * s_up[e_b])                                  [B, bm, F] bf16
        y[b]   = (w_down[e_b]^T h[b]^T)^T * s_down[e_b]                                   [B, bm, D]
        out[n] = sum_j y[row of pair (n, j)]                                              [N, D]

    x [N, D] bf16; expert_idx, scores [N, k]; w_gate, w_up [E, D, F], w_down [E, F, D] float8_e4m3fn; scales
    (s_gate [E, F], s_up [E, F], s_down [E, D]) float32. A pair whose id lies outside [0, E) is dropped. Tiles:
    `sorted_config` where not given; above SORTED_MAX_PAIRS pairs the tokens go through in equal chunks of at most
    that many pairs. interpret: mgpu_gemv.interpret_params(...). Returns [N, D] bf16."""
    from pallas_kernels.moe_gemm import sort_tokens

    N, D = x.shape
    E, _, F = w_gate.shape
    k = expert_idx.shape[1]
    P = N * k
    if P > SORTED_MAX_PAIRS:
        n = -(-P // SORTED_MAX_PAIRS)  # chunks
        per = -(-N // n)  # tokens a chunk; the padding tokens' pairs are dropped (id E)
        pad = lambda a, v: jnp.pad(a, ((0, n * per - N), (0, 0)), constant_values=v).reshape(n, per, -1)  # noqa
        kw = dict(block_m=block_m, tile_n=tile_n, tile_k=tile_k, stages=stages, tile_n_down=tile_n_down,
                  stages_down=stages_down, interpret=interpret)
        y = jax.lax.map(lambda c: moe_fp8_mgpu_sorted(*c, w_gate, w_up, w_down, scales, **kw),
                        (pad(x, 0), pad(expert_idx, E), pad(scores, 0)))  # [n, per, D]
        return y.reshape(n * per, D)[:N]
    cfg = sorted_config(P, E, D, F, block_m, tile_n, tile_k)
    bm, tn, tnd, tk = cfg["block_m"], cfg["tile_n"], tile_n_down or cfg["tile_n_down"], cfg["tile_k"]
    if not (sorted_supported(x.dtype, D, F, scales, bm, tn) and sorted_supported(x.dtype, D, F, scales, bm, tnd)):
        raise ValueError(f"moe_fp8_mgpu_sorted takes bf16 x, FP8 experts with per-channel scales, D and F multiples "
                         f"of 64 and of the tiles, block_m a multiple of 8 in {list(SORTED_BLOCK_M)}; got "
                         f"{x.dtype} x, D={D}, F={F}, block_m={bm}, tiles {tn}/{tnd}, scales "
                         f"{None if scales is None else [s.shape for s in scales]}")
    routing = sort_tokens(expert_idx, E, bm)
    R = routing.row_pair.shape[0]
    B = R // bm
    row_token = jnp.minimum(routing.row_pair // k, N - 1)  # [R]
    row_score = jnp.concatenate([scores.reshape(-1).astype(x.dtype), jnp.zeros((1,), x.dtype)])[routing.row_pair]
    xs = (x[row_token] * row_score[:, None]).reshape(B, bm, D)  # [B, bm, D]: padding rows score 0, so zero
    live = jnp.arange(B) < routing.num_active_blocks[0]  # [B]
    ids = jnp.where(live, routing.block_expert, -1)  # a block past the active ones reads nothing
    e = routing.block_expert
    sg, su, sd = scales

    gu = mgpu_gemv.gemv_partials(xs, (w_gate, w_up), ids=ids, x_per_id=True, tile_n=tn, tile_k=tk,
                                 stages=stages or cfg["stages"],
                                 compute_dtype=jnp.bfloat16, interpret=interpret)[0]  # [B, 2F, bm]
    g, u = gu[:, :F] * sg[e][:, :, None], gu[:, F:] * su[e][:, :, None]  # [B, F, bm]
    h = jnp.where(live[:, None, None], jax.nn.silu(g) * u, 0.0).astype(jnp.bfloat16)  # [B, F, bm]
    yp = mgpu_gemv.gemv_partials(jnp.swapaxes(h, 1, 2), (w_down,), ids=ids, x_per_id=True, tile_n=tnd,
                                 tile_k=tk,
                                 stages=stages_down or cfg["stages_down"], compute_dtype=jnp.bfloat16,
                                 interpret=interpret)[0]  # [B, D, bm]
    y_sorted = jnp.where(live[:, None, None], yp * sd[e][:, :, None], 0.0)  # [B, D, bm]
    y_sorted = jnp.swapaxes(y_sorted, 1, 2).reshape(R, D)  # [R, D]
    y = jnp.take(y_sorted, routing.pair_row, axis=0, mode="fill", fill_value=0).reshape(N, k, D)
    return jnp.sum(y, axis=1).astype(x.dtype)
