"""FP8 MoE grouped GEMM (pallas_kernels/moe_gemm.py) under the Pallas interpreter, against the jnp reference.

Error bound (||out - ref|| / ||ref||, ref = `moe_reference`: dequantized weights, float32 at HIGHEST
precision after the score multiply): e4m3 -> bf16 is exact and the dots accumulate exact bf16 x bf16
products in f32, so the kernels differ from the reference only by rounding h = silu(g) * u to bf16 between
the two GEMMs (<= 2^-9 relative per element), the bf16 cast of the output, the bf16 cast of the scored input
when x is float32, and f32 summation order: ~3e-3 measured, bound 1e-2, for FP8 and for bf16 weights alike.
Every kernel output starts as NaN (poison_output=True aliases NaN buffers in), so a row of a routed pair
that a kernel does not write fails the isfinite check. Inputs are random, never zeros (x ~ N(0.1, 1),
scores = sigmoid(N(0, 1)), weights ~ N(0, 1/D) with per-channel magnitudes spread over a decade).
Shapes are tiny (the interpreter runs each program sequentially on 2 shared CPU cores).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mavjax.model import moe_experts
from pallas_kernels.fp8_gemm import FP8, quantize_weight_per_channel
from pallas_kernels.moe_gemm import (
    _down, _gate_up, moe_fp8, moe_reference, num_buffer_rows, quantize_experts, sort_tokens)

BOUND = 1e-2
# Jitted once per shape: eager op-by-op dispatch of the reference's loop costs seconds on 2 CPU cores.
reference = jax.jit(moe_reference)
quantize = jax.jit(quantize_experts, static_argnames="batch_size")
sort = jax.jit(sort_tokens, static_argnums=(1, 2))
model_moe = jax.jit(moe_experts)


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _weights(seed, E, D, F):
    """float32 gate/up [E, D, F] and down [E, F, D] ~ N(0, 1/K), magnitudes per (expert, output channel)
    spread over a decade (so the per-channel scales differ). numpy: no per-shape XLA compile."""
    rng = np.random.default_rng(seed)

    def w(shape):
        mag = 10.0 ** rng.uniform(-0.5, 0.5, (shape[0], 1, shape[2]))
        return jnp.asarray(rng.standard_normal(shape) * mag / np.sqrt(shape[1]), jnp.float32)
    return w((E, D, F)), w((E, D, F)), w((E, F, D))


def _routing(seed, N, k, E, experts=None, dtype=jnp.bfloat16):
    """Distinct experts per token drawn from `experts` (default all E); scores = sigmoid(normal) in (0, 1)."""
    rng = np.random.default_rng(seed)
    pool = np.arange(E) if experts is None else np.asarray(experts)
    idx = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(N)]).astype(np.int32)
    scores = 1.0 / (1.0 + np.exp(-rng.standard_normal((N, k))))
    return jnp.asarray(idx), jnp.asarray(scores, dtype)


def _x(seed, N, D, dtype=jnp.bfloat16):
    return jnp.asarray(np.random.default_rng(seed + 1000).standard_normal((N, D)) + 0.1, dtype)


def _run(x, idx, scores, ws, scales, cfg):
    y = moe_fp8(x, idx, scores, *ws, scales, interpret=True, poison_output=True, **cfg)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(jnp.isfinite(y).all()), "unwritten (NaN-poisoned) or non-finite output elements"
    return y


# ---------------------------------------------------------------------------------------------------------
# Quantization, sorting, reference
# ---------------------------------------------------------------------------------------------------------

def test_quantize_experts_is_per_expert_per_channel():
    wg, wu, wd = _weights(0, 3, 40, 24)
    (qg, qu, qd), (sg, su, sd) = quantize(wg, wu, wd)
    assert qg.dtype == qu.dtype == qd.dtype == FP8
    assert sg.shape == su.shape == (3, 24) and sd.shape == (3, 40) and sd.dtype == jnp.float32
    for e in range(3):
        q, s = jax.jit(quantize_weight_per_channel)(wd[e])
        np.testing.assert_array_equal(np.asarray(qd[e], np.float32), np.asarray(q, np.float32))
        np.testing.assert_array_equal(np.asarray(sd[e]), np.asarray(s))
    (qg2, _, _), (sg2, _, _) = quantize(wg, wu, wd, batch_size=2)  # lax.map in chunks: same values
    np.testing.assert_array_equal(np.asarray(qg2, np.float32), np.asarray(qg, np.float32))
    np.testing.assert_array_equal(np.asarray(sg2), np.asarray(sg))


SORT_CASES = [
    # N, k, E, block_m, experts used
    (1, 1, 8, 16, None),              # decode
    (13, 2, 8, 16, [1, 2, 5, 6, 7]),  # empty experts
    (40, 1, 4, 16, [3]),              # all on one expert (skew): ceil(40 / 16) = 3 blocks
    (50, 2, 64, 16, None),            # more experts than pairs per expert (padding-heavy)
    (33, 2, 4, 32, None),             # every expert hit, groups not multiples of block_m
]


@pytest.mark.parametrize("N,k,E,bm,experts", SORT_CASES)
def test_sort_tokens_layout(N, k, E, bm, experts):
    idx, _ = _routing(N * 31 + E, N, k, E, experts)
    r = jax.tree.map(np.asarray, sort(idx, E, bm))
    P = N * k
    flat = np.asarray(idx).reshape(-1)
    R = num_buffer_rows(P, E, bm)
    assert R == -(-(P + min(E, P) * (bm - 1)) // bm) * bm and r.row_pair.shape == (R,)
    sizes = np.bincount(flat, minlength=E)
    np.testing.assert_array_equal(r.group_sizes, sizes)
    padded = -(-sizes // bm) * bm
    np.testing.assert_array_equal(r.group_offsets, np.cumsum(padded) - padded)
    assert int(r.num_active_blocks[0]) == padded.sum() // bm <= R // bm
    # every pair has its own row, inside its expert's group, in stable (token) order
    assert len(set(r.pair_row.tolist())) == P
    np.testing.assert_array_equal(r.row_pair[r.pair_row], np.arange(P))
    assert (r.row_pair == P).sum() == R - P
    for e in range(E):
        rows = r.pair_row[flat == e]
        np.testing.assert_array_equal(rows, r.group_offsets[e] + np.arange(sizes[e]))
    # block -> expert table: each active block lies inside its expert's padded group
    for b in range(int(r.num_active_blocks[0])):
        e = r.block_expert[b]
        assert r.group_offsets[e] <= b * bm < r.group_offsets[e] + padded[e]


def test_route_top1_equals_top_k():
    """route's top-1 shortcut (argmax, no sort) picks what lax.top_k picks, ties to the lowest id included, with
    the same sigmoid score."""
    from mavjax.model import route

    x = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 1.0, 5.0], [0.5, 0.5, 0.5, 0.5]], jnp.bfloat16)
    w = jnp.eye(4, dtype=jnp.bfloat16)  # logits = x
    idx, sc = route(x, w, 1)
    vals, want = jax.lax.top_k(x, 1)
    assert idx.dtype == jnp.int32 and idx.shape == (3, 1)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want))  # [[1], [3], [0]]
    np.testing.assert_array_equal(np.asarray(sc, np.float32),
                                  np.asarray(jax.nn.sigmoid(vals.astype(jnp.float32)).astype(x.dtype), np.float32))
    idx2, _ = route(x, w, 2)
    np.testing.assert_array_equal(np.asarray(idx2[:, 0]), np.asarray(want[:, 0]))


def test_top1_is_one_reduction_with_top_ks_choice():
    """mavjax.model.top1 (the value and the id from one variadic reduction): lax.top_k's pick on 128 experts
    with many ties (coarse values), the lowest id among equal values; NaN counts as the largest (jnp.argmax's
    choice), an all -inf row gives id 0."""
    from mavjax.model import top1

    lg = jnp.round(jax.random.normal(jax.random.key(0), (64, 128)) * 2).astype(jnp.bfloat16)  # ties everywhere
    lg = lg.at[3].set(-jnp.inf).at[5, 70].set(jnp.nan).at[6, 9].set(jnp.nan).at[6, 2].set(jnp.nan)
    v, i = jax.jit(top1)(lg)
    ok = np.ones(64, bool)
    ok[[5, 6]] = False
    want_v, want_i = jax.lax.top_k(lg[ok], 1)
    np.testing.assert_array_equal(np.asarray(i)[ok], np.asarray(want_i[:, 0]))
    np.testing.assert_array_equal(np.asarray(v, np.float32)[ok], np.asarray(want_v[:, 0], np.float32))
    assert i.dtype == jnp.int32 and int(i[3]) == 0
    np.testing.assert_array_equal(np.asarray(i)[[5, 6]], np.asarray(jnp.argmax(lg[jnp.asarray([5, 6])], -1)))
    assert bool(jnp.isnan(v[5])) and [int(i[5]), int(i[6])] == [70, 2]
    # differentiable in the value (training routes through it): the chosen logit's gradient, as a gather's
    x = jax.random.normal(jax.random.key(1), (5, 9))
    g = jax.grad(lambda a: jnp.sum(jnp.sin(top1(a)[0])))(x)
    want = jax.grad(lambda a: jnp.sum(jnp.sin(jnp.max(a, axis=-1))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6)


def test_reference_matches_model():
    """moe_reference (float32) vs mavjax.model.moe_experts (bf16 throughout), both of the model's paths
    (<= 8 pairs: per-pair gather; more: ragged_dot); FP8 weights with scales too."""
    E, D, F = 6, 48, 40
    ws = _weights(1, E, D, F)
    wb = tuple(w.astype(jnp.bfloat16) for w in ws)
    qw, qs = quantize(*ws)
    for N, k, fp8 in ((3, 2, False), (20, 2, True)):  # 6 pairs: gather path; 40: ragged_dot path
        idx, sc = _routing(N, N, k, E)
        x = _x(N, N, D)
        w, s = (qw, qs) if fp8 else (wb, None)
        assert _err(model_moe(x, idx, sc, *w, scales=s), reference(x, idx, sc, *w, scales=s)) < 2e-2


def test_grouped_fp8_upcast_in_chunks(monkeypatch):
    """The ragged_dot path upcasts FP8 experts a chunk at a time (never a bf16 copy of the whole layer): with
    the chunk capped at 2 experts (3 chunks of E = 6, skewed routing so some chunks get no rows and rows sit on
    both sides of every chunk), it equals the one-shot upcast bit for bit, and the reference."""
    import mavjax.model as model

    E, D, F = 6, 48, 40
    qw, qs = quantize(*_weights(2, E, D, F))
    idx, sc = _routing(30, 30, 2, E, [0, 3, 4, 5])
    x = _x(30, 30, D)
    whole = model.moe_experts_grouped(x, idx, sc, *qw, qs)
    monkeypatch.setattr(model, "UPCAST_CHUNK_BYTES", 2 * D * F * 2)
    chunked = model.moe_experts_grouped(x, idx, sc, *qw, qs)
    np.testing.assert_array_equal(np.asarray(chunked, np.float32), np.asarray(whole, np.float32))
    assert _err(chunked, reference(x, idx, sc, *qw, scales=qs)) < 2e-2


# ---------------------------------------------------------------------------------------------------------
# Kernels vs reference
# ---------------------------------------------------------------------------------------------------------

T = dict(block_n=32, block_k=32, block_n_down=32, block_k_down=32)  # small tiles: several blocks per dim

MOE_CASES = [
    # id, N, k, E, D, F, weights, x dtype, experts used, cfg
    ("decode N=1 k=1 fp8 default cfg (split-K)", 1, 1, 8, 64, 96, "fp8", jnp.bfloat16, None,
     dict(method="sorted")),
    ("decode N=1 k=2 bf16", 1, 2, 8, 64, 96, "bf16", jnp.bfloat16, None,
     dict(T, method="sorted", split_k=1, split_k_down=1)),
    # The pair path (moe_fp8_pairs: no sort, one program row per (token, expert) pair).
    ("pairs: N=1 k=1 fp8 default cfg (auto picks pairs)", 1, 1, 8, 64, 96, "fp8", jnp.bfloat16, None, {}),
    ("pairs: ragged D/F, k=2 fp8, uneven split-K", 5, 2, 8, 80, 48, "fp8", jnp.bfloat16, None,
     dict(T, method="pairs", split_k=2, split_k_down=3)),
    ("pairs: ragged, split-K partials summed by XLA", 5, 2, 8, 80, 48, "fp8", jnp.bfloat16, None,
     dict(T, method="pairs", split_k=3, split_k_down=2, gu_epilogue="xla")),
    ("pairs: ragged, the earlier reductions (reduce='xla')", 5, 2, 8, 80, 48, "fp8", jnp.bfloat16, None,
     dict(T, method="pairs", split_k=2, split_k_down=3, reduce="xla")),
    ("pairs: two pairs per expert, bf16 w, x f32", 3, 2, 4, 64, 80, "bf16", jnp.float32, [1, 2],
     dict(T, method="pairs", split_k=1, split_k_down=1)),
    ("pairs: N=16 k=1 fp8 (PAIRS_MAX), one split", 16, 1, 8, 64, 64, "fp8", jnp.bfloat16, None,
     dict(T, split_k=1, split_k_down=1)),
    ("ragged D/F, empty experts, k=2 fp8", 13, 2, 8, 80, 48, "fp8", jnp.bfloat16, [1, 2, 5, 6, 7],
     dict(T, split_k=1, split_k_down=1)),
    ("skew: all on one expert, split-K", 37, 1, 8, 64, 64, "fp8", jnp.bfloat16, [3],
     dict(T, block_m=16, split_k=2, split_k_down=2)),
    ("k=2 bf16, x f32, block_m=32", 24, 2, 4, 64, 80, "bf16", jnp.float32, None,
     dict(T, block_m=32, split_k=1, split_k_down=1)),
    ("N=20 k=1 fp8, uneven split-K", 20, 1, 16, 96, 48, "fp8", jnp.bfloat16, None,
     dict(T, split_k=2, split_k_down=1, block_k=32)),
    # 32 pairs per expert: default_config's prefill tiles (64 x 256 x 64), wider than F and ragged against D
    ("prefill tiles: N=96 k=1 E=3 fp8, default cfg", 96, 1, 3, 80, 96, "fp8", jnp.bfloat16, None, {}),
    # 128 pairs per expert: the long prefill's 128 x 128 x 64 tiles, ragged against F and D
    ("long prefill tiles: N=256 k=1 E=2 fp8, default cfg", 256, 1, 2, 80, 96, "fp8", jnp.bfloat16, None, {}),
]


def test_default_config_takes_the_prefill_tiles_from_32_pairs_per_expert():
    """default_config: from PREFILL_PAIRS_PER_EXPERT pairs per expert on average the sorted path's wide tiles
    (docs/benchmarks.md section 29: 1.8x faster at 4096 tokens over Maverick's 128 experts), from
    LONG_PREFILL_PAIRS_PER_EXPERT 128-row ones (section 30: 10% faster at 16384 tokens), below it the
    decode-sized rule (block_m the average as a power of two in [16, 64], 64 x 256 tiles, 4 warps)."""
    from pallas_kernels.moe_gemm import (LONG_PREFILL_PAIRS_PER_EXPERT, LONG_PREFILL_TILES, PREFILL_PAIRS_PER_EXPERT,
                                         PREFILL_TILES, default_config)

    assert (PREFILL_PAIRS_PER_EXPERT, LONG_PREFILL_PAIRS_PER_EXPERT) == (32, 128)
    for P in (16384, 65536, 127 * 128 + 1):  # cdiv(P, 128) == 128 from 16257 pairs (section 30)
        c = default_config(P, 128, 5120, 8192)
        assert {k: c[k] for k in LONG_PREFILL_TILES} == LONG_PREFILL_TILES == dict(block_m=128, block_n=128,
                                                                                     block_k=64, num_warps=8)
        assert c["block_n_down"] == 128 and c["split_k"] == c["split_k_down"] == 1
        assert c["num_stages"] == c["num_stages_down"] == 4  # what ran on the H200
    for P in (4096, 16256, 32 * 128 - 127):  # cdiv(P, 128) == 32 from 3969 pairs
        c = default_config(P, 128, 5120, 8192)
        assert {k: c[k] for k in PREFILL_TILES} == PREFILL_TILES == dict(block_m=64, block_n=256, block_k=64,
                                                                           num_warps=8)
        assert c["block_n_down"] == 256 and c["block_k_down"] == 64 and c["split_k"] == c["split_k_down"] == 1
        assert c["num_stages"] == c["num_stages_down"] == 4  # what ran on the H200
    for P, bm in ((3968, 32), (1024, 16), (16, 16)):
        c = default_config(P, 128, 5120, 8192)
        assert (c["block_m"], c["block_n"], c["block_k"], c["num_warps"]) == (bm, 64, 256, 4), (P, c)


@pytest.mark.parametrize("name,N,k,E,D,F,wkind,xdt,experts,cfg", MOE_CASES, ids=[c[0] for c in MOE_CASES])
def test_moe_matches_reference(name, N, k, E, D, F, wkind, xdt, experts, cfg):
    ws = _weights(N * 7 + D, E, D, F)
    if wkind == "fp8":
        ws, scales = quantize(*ws)
    else:
        ws, scales = tuple(w.astype(jnp.bfloat16) for w in ws), None
    idx, sc = _routing(N * 13 + E, N, k, E, experts, xdt)
    x = _x(N, N, D, xdt)
    y = _run(x, idx, sc, ws, scales, cfg)
    ref = reference(x, idx, sc, *ws, scales=scales)
    assert _err(y, ref) < BOUND, _err(y, ref)


@pytest.mark.parametrize("method", ["sorted", "pairs"])
def test_out_of_range_expert_ids_contribute_nothing(method):
    """Pairs with an id outside [0, E) (the expert-parallel exchange's empty slots carry id E, the decode path's
    pairs owned by another device too) are dropped: the output equals the reference over the valid pairs only,
    every element written (poisoned outputs), and no weight is read for them (NaN in every expert the valid
    pairs do not use, expert 0 included, leaves the output finite)."""
    E, D, F, N, k = 8, 64, 48, 6, 2
    qw, qs = quantize(*_weights(3, E, D, F))
    idx, sc = _routing(4, N, k, E, [2, 5])
    idx = idx.at[::3, 0].set(E).at[1::4, 1].set(-1).at[4].set(E + 7)  # row 4: no valid pair at all
    valid = (idx >= 0) & (idx < E)
    x = _x(4, N, D)
    want = reference(x, jnp.where(valid, idx, 2), jnp.where(valid, sc, 0), *qw, scales=qs)
    dead = jnp.asarray([e not in (2, 5) for e in range(E)])
    qw = tuple(jnp.where(dead[:, None, None], jnp.asarray(jnp.nan, w.dtype), w) for w in qw)
    qs = tuple(jnp.where(dead[:, None], jnp.nan, s_) for s_ in qs)
    y = _run(x, idx, sc, qw, qs, dict(T, method=method, split_k=2, split_k_down=1))
    assert _err(y, want) < BOUND, _err(y, want)
    assert float(jnp.max(jnp.abs(y[4]))) == 0.0


def test_sort_tokens_drops_out_of_range_ids():
    idx = jnp.asarray([[2], [4], [0], [2], [9]])
    r = sort_tokens(idx, 4, 16)
    R = r.row_pair.shape[0]
    assert [int(v) for v in r.group_sizes] == [1, 0, 2, 0]
    assert int(r.pair_row[1]) >= R and int(r.pair_row[4]) >= R  # no row
    assert sorted(int(v) for v in r.row_pair if int(v) < 5) == [0, 2, 3]  # only the valid pairs hold rows


def test_pair_path_reads_only_routed_experts():
    """The pair path reads only the experts named by expert_idx: NaN weights and scales elsewhere leave the
    output exact."""
    E, D, F, N, k = 8, 64, 48, 3, 2
    used = [2, 6]
    (qg, qu, qd), (sg, su, sd) = quantize(*_weights(9, E, D, F))
    idx, sc = _routing(11, N, k, E, used)
    x = _x(11, N, D)
    ref = reference(x, idx, sc, qg, qu, qd, scales=(sg, su, sd))
    dead = jnp.asarray([e not in used for e in range(E)])
    nan_w = lambda w: jnp.where(dead[:, None, None], jnp.asarray(jnp.nan, w.dtype), w)  # noqa: E731
    nan_s = lambda s: jnp.where(dead[:, None], jnp.nan, s)  # noqa: E731
    y = _run(x, idx, sc, (nan_w(qg), nan_w(qu), nan_w(qd)), (nan_s(sg), nan_s(su), nan_s(sd)),
             dict(T, method="pairs", split_k=2, split_k_down=1))
    assert _err(y, ref) < BOUND


def test_unrouted_experts_are_not_read():
    """Experts that receive no token hold NaN weights and scales: the output stays finite and correct (active
    row blocks read only their own expert). Inactive row blocks (>= the active count) write nothing: with the
    outputs poisoned, their rows of h and y_sorted are still NaN while every active row is written."""
    E, D, F, N, k, bm = 8, 64, 48, 10, 1, 16
    used = [0, 3, 4]  # the default table maps inactive blocks to expert E - 1 = 7: unrouted, NaN
    ws0 = _weights(5, E, D, F)
    (qg, qu, qd), (sg, su, sd) = quantize(*ws0)
    idx, sc = _routing(7, N, k, E, used)
    x = _x(7, N, D)
    ref = reference(x, idx, sc, qg, qu, qd, scales=(sg, su, sd))
    dead = jnp.asarray([e not in used for e in range(E)])
    nan_w = lambda w: jnp.where(dead[:, None, None], jnp.asarray(jnp.nan, w.dtype), w)  # noqa: E731
    nan_s = lambda s: jnp.where(dead[:, None], jnp.nan, s)  # noqa: E731
    ws = (nan_w(qg), nan_w(qu), nan_w(qd))
    scales = (nan_s(sg), nan_s(su), nan_s(sd))
    assert bool(jnp.isnan(ws[0][7].astype(jnp.float32)).all())
    y = _run(x, idx, sc, ws, scales, dict(T, method="sorted", block_m=bm, split_k=1, split_k_down=1))
    assert _err(y, ref) < BOUND

    routing = sort(idx, E, bm)
    n_act = int(routing.num_active_blocks[0])
    R = routing.row_pair.shape[0]
    assert n_act == 3 and R // bm > n_act  # some blocks are inactive
    row_token = jnp.minimum(routing.row_pair // k, N - 1)
    row_score = jnp.concatenate([sc.reshape(-1), jnp.zeros((1,), sc.dtype)])[routing.row_pair]
    common = dict(block_m=bm, num_warps=4, evict=True, interpret=True, poison_output=True, num_stages=2,
                  split_k=1)
    h = _gate_up(x[row_token], row_score, routing, ws[0], ws[1], scales[0], scales[1], block_n=32, block_k=32,
                 cdt=jnp.dtype(jnp.bfloat16), **common)
    ys = _down(h, routing, ws[2], scales[2], block_n=32, block_k=32, out_dtype=jnp.bfloat16,
               cdt=jnp.dtype(jnp.bfloat16), **common)
    for a in (h, ys):
        a = np.asarray(a, np.float32)
        assert np.isfinite(a[:n_act * bm]).all()
        assert np.isnan(a[n_act * bm:]).all()


def test_rejects_bad_arguments():
    E, D, F, N = 4, 32, 48, 2
    ws = tuple(w.astype(jnp.bfloat16) for w in _weights(0, E, D, F))
    idx, sc = _routing(0, N, 1, E)
    x = _x(0, N, D)
    with pytest.raises(ValueError, match="power of two"):
        moe_fp8(x, idx, sc, *ws, block_n=48, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        moe_fp8(x, idx, sc, *ws, block_m=8, interpret=True)
    with pytest.raises(ValueError, match="method"):
        moe_fp8(x, idx, sc, *ws, method="dense", interpret=True)
    with pytest.raises(ValueError, match="gu_epilogue"):
        moe_fp8(x, idx, sc, *ws, method="pairs", gu_epilogue="kernel2", interpret=True)
    with pytest.raises(ValueError, match="reduce"):
        moe_fp8(x, idx, sc, *ws, method="pairs", reduce="triton", interpret=True)
    with pytest.raises(ValueError, match="w_down"):
        moe_fp8(x, idx, sc, ws[0], ws[1], ws[2][:, :16], interpret=True)
    with pytest.raises(ValueError, match="expert_idx"):
        moe_fp8(x, idx[:1], sc, *ws, interpret=True)
    qw = tuple(w.astype(FP8) for w in ws)
    qs = (jnp.ones((E, F)), jnp.ones((E, F)), jnp.ones((E, D)))
    with pytest.raises(ValueError, match="need scales"):
        moe_fp8(x, idx, sc, *qw, interpret=True)
    with pytest.raises(ValueError, match="scales must be"):
        moe_fp8(x, idx, sc, *qw, (qs[0], qs[1], qs[1]), interpret=True)


@pytest.mark.parametrize("N,k,wkind,cfg", [
    (1, 1, "fp8", {}),                                                     # the default decode config (split-K)
    (3, 2, "fp8", dict(T, method="pairs", split_k=2, split_k_down=3)),    # every sum in the kernels
    (3, 2, "fp8", dict(T, method="pairs", split_k=2, split_k_down=3, reduce="xla")),  # in kernel 2 and XLA
    (3, 2, "fp8", dict(T, method="pairs", split_k=2, gu_epilogue="xla")),  # gate/up partials summed by XLA
    (2, 1, "bf16", dict(T, method="pairs", split_k=1, split_k_down=1)),   # h stored by kernel 1, bf16 weights
])
def test_shared_expert_rides_in_the_pair_kernels(N, k, wkind, cfg):
    """shared=: Llama 4's shared expert as one more program row per token of the pair kernels gives routed +
    shared (the shared expert's input unscaled by any router score); its weights are read once per token, every
    output element written (poisoned outputs), unrouted experts still unread (NaN there leaves it exact)."""
    E, D, F = 8, 80, 48
    ws = _weights(N * 3 + k, E + 1, D, F)  # expert E: the shared one
    if wkind == "fp8":
        ws, scales = quantize(*ws)
    else:
        ws, scales = tuple(w.astype(jnp.bfloat16) for w in ws), None
    routed_w = tuple(w[:E] for w in ws)
    routed_s = None if scales is None else tuple(s[:E] for s in scales)
    shared = (ws[0][E], ws[1][E], ws[2][E], None if scales is None else tuple(s[E] for s in scales))
    used = [1, 4, 6]
    idx, sc = _routing(N + 5, N, k, E, used)
    x = _x(N + 5, N, D)
    ones = jnp.ones((N, 1), x.dtype)
    want = (reference(x, idx, sc, *routed_w, scales=routed_s).astype(jnp.float32)
            + reference(x, jnp.full((N, 1), E, jnp.int32), ones, *ws, scales=scales).astype(jnp.float32))
    dead = jnp.asarray([e not in used for e in range(E)])
    nan_w = lambda w: jnp.where(dead[:, None, None], jnp.asarray(jnp.nan, w.dtype), w)  # noqa: E731
    nan_s = lambda s: jnp.where(dead[:, None], jnp.nan, s)  # noqa: E731
    y = moe_fp8(x, idx, sc, *map(nan_w, routed_w), None if routed_s is None else tuple(map(nan_s, routed_s)),
                shared=shared, interpret=True, poison_output=True, **cfg)
    assert y.shape == x.shape and y.dtype == x.dtype and bool(jnp.isfinite(y).all())
    assert _err(y, want) < BOUND, _err(y, want)


def test_shared_expert_bad_arguments():
    E, D, F, N = 4, 64, 32, 2
    ws, scales = quantize(*_weights(1, E, D, F))
    idx, sc = _routing(2, N, 1, E)
    x = _x(2, N, D)
    good = (ws[0][0], ws[1][0], ws[2][0], tuple(s[0] for s in scales))
    with pytest.raises(ValueError, match="the routed experts' F"):
        moe_fp8(x, idx, sc, *ws, scales, shared=(ws[0][0][:, :16], *good[1:]), interpret=True)
    with pytest.raises(ValueError, match="stored like the routed experts"):
        moe_fp8(x, idx, sc, *ws, scales, shared=(*good[:3], None), interpret=True)
    with pytest.raises(ValueError, match="pair path only"):
        moe_fp8(x, idx, sc, *ws, scales, shared=good, method="sorted", interpret=True)


# ---------------------------------------------------------------------------------------------------------
# Pair path: split-K sums finished inside the kernels (reduce="kernel", pallas_kernels/split_k.py's protocol)
# ---------------------------------------------------------------------------------------------------------

PAIR_REDUCE_CASES = [
    # id, N, k, shared, D, F, split_k, split_k_down, block_k_down, dropped pairs, x dtype
    ("top-1, 1 token, splits 3/2", 1, 1, False, 80, 48, 3, 2, 32, False, jnp.bfloat16),
    ("top-1 + shared, 1 token, one down split", 1, 1, True, 80, 48, 2, 1, 32, False, jnp.bfloat16),
    ("top-2 + shared, 3 tokens, splits 3/3, dropped", 3, 2, True, 80, 48, 3, 3, 16, True, jnp.float32),
    ("top-2, 4 tokens, 5 (padded to 8) / 3 splits, dropped", 4, 2, False, 144, 48, 5, 3, 16, True, jnp.float32),
    ("top-1 + shared, 4 tokens, token 2 all dropped", 4, 1, True, 144, 48, 5, 2, 32, True, jnp.bfloat16),
    ("top-1, 2 tokens, no split: direct stores", 2, 1, False, 80, 48, 1, 1, 32, False, jnp.bfloat16),
]


@pytest.mark.parametrize("name,N,k,shared,D,F,s1,s2,bkd,drop,xdt", PAIR_REDUCE_CASES,
                         ids=[c[0] for c in PAIR_REDUCE_CASES])
def test_pair_sums_finished_in_kernel(name, N, k, shared, D, F, s1, s2, bkd, drop, xdt):
    """reduce="kernel" (the last split of each h tile writes h; the last of a token's (k + shared) x splits
    programs per output tile writes the final output) equals the reference and the earlier XLA-reduced path
    (reduce="xla"). D, F ragged against 32-wide tiles. Every output and partial buffer starts as NaN, so an
    output tile finished before all its partials were stored, or never finished, fails. Dropped pairs (ids
    outside [0, E)) still arrive: their tiles complete and contribute zero. (The interpreter runs a tile's
    splits back to back, so two gate/up tiles sharing a counter would go unnoticed here; kernel 2's tiles
    interleave: a token's shared row runs after all pair rows.)"""
    E = 6
    ws, scales = quantize(*_weights(N * 5 + D + k, E + 1, D, F))  # expert E: the shared one
    routed_w, routed_s = tuple(w[:E] for w in ws), tuple(s_[:E] for s_ in scales)
    idx, sc = _routing(N + 17 * k, N, k, E, None, xdt)
    if drop:
        idx = idx.at[0, k - 1].set(E).at[N - 1, 0].set(-1)
        if N > 2:
            idx = idx.at[2].set(E + 3)  # a token with no valid pair
    valid = (idx >= 0) & (idx < E)
    x = _x(N + 3, N, D, xdt)
    want = reference(x, jnp.where(valid, idx, 0), jnp.where(valid, sc, 0), *routed_w, scales=routed_s)
    sh = None
    if shared:
        sh = (ws[0][E], ws[1][E], ws[2][E], tuple(s_[E] for s_ in scales))
        want = (want.astype(jnp.float32)
                + reference(x, jnp.full((N, 1), E, jnp.int32), jnp.ones((N, 1), xdt), *ws, scales=scales))
    cfg = dict(T, method="pairs", split_k=s1, split_k_down=s2, block_k_down=bkd, shared=sh)
    y = _run(x, idx, sc, routed_w, routed_s, dict(cfg, reduce="kernel"))
    y_xla = _run(x, idx, sc, routed_w, routed_s, dict(cfg, reduce="xla"))
    assert _err(y, want) < BOUND, _err(y, want)
    # the same partials summed in another order (h too, before its bf16 cast): 0 measured on CPU
    assert _err(y, y_xla) < (1e-3 if xdt == jnp.bfloat16 else 1e-5), _err(y, y_xla)
    if drop and N > 2 and not shared:
        assert float(jnp.max(jnp.abs(y[2]))) == 0.0


def test_pair_kernels_lower_with_the_split_k_protocol(monkeypatch):
    """Both pair kernels, lowered for CUDA on the CPU (shapes only), carry the protocol: a barrier, then an
    integer acquire-release atomic add on a scalar counter (a pl.ds(i, 1) slice would lower to `fadd` on the
    int32 tensor), then volatile loads of the partials (never a stale L1 line). reduce="xla" lowers no
    atomics."""
    import re

    from jax._src.pallas.triton import lowering as triton_lowering

    from pallas_kernels.moe_gemm import moe_fp8_pairs

    E, D, F, N, k = 8, 80, 48, 2, 2
    f8, S = FP8, jax.ShapeDtypeStruct
    shapes = [S((N, D), jnp.bfloat16), S((N, k), jnp.int32), S((N, k), jnp.bfloat16), S((E, D, F), f8),
              S((E, D, F), f8), S((E, F, D), f8), (S((E, F), jnp.float32),) * 2 + (S((E, D), jnp.float32),),
              (S((D, F), f8), S((D, F), f8), S((F, D), f8), (S((F,), jnp.float32),) * 2 + (S((D,), jnp.float32),))]

    def lower(reduce):
        texts = []
        orig = triton_lowering.lower_jaxpr_to_triton_module

        def capture(*a, **kw):
            res = orig(*a, **kw)
            texts.append(res.module.operation.get_asm(enable_debug_info=False))
            return res

        monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
        fn = lambda *a: moe_fp8_pairs(*a[:7], shared=a[7], reduce=reduce, split_k=3, split_k_down=2,  # noqa: E731
                                      **T)
        jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
        monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", orig)
        return texts

    texts = lower("kernel")
    assert len(texts) == 2  # gate/up and down
    for text in texts:
        atom = re.search(r"tt\.atomic_rmw add, acq_rel, gpu, .*: \(!tt\.ptr<i32>, i32\) -> i32", text)
        assert atom, text[:2000]
        assert "fadd" not in text
        barrier = text.find("gpu.barrier")
        assert 0 <= barrier < atom.start()
        assert text.find("isVolatile = true", atom.end()) > 0
    assert not any("atomic_rmw" in t for t in lower("xla"))


@pytest.mark.parametrize("N,shared,cfg", [
    (1, True, {}),                                                  # the model's decode: default config
    (3, True, dict(split_k=2, split_k_down=3)),                     # the split-K sums in the kernels
    (2, False, dict(split_k=2, split_k_down=2, reduce="xla")),      # ... in XLA; no shared expert
])
def test_pair_kernels_route_from_the_logits(N, shared, cfg):
    """router_logits=: the pair kernels route each token themselves (top-1 sigmoid, mavjax.model.route's) and
    give exactly what they give with the ids and scores route_logits makes of the same logits, whether given
    the logits or float32 partials of them. Token 0's two
    largest logits tie (the lower id wins, as jnp.argmax); every expert no token picks has NaN weights, so a
    wrong pick shows; scores span (0, 1)."""
    from mavjax.model import route_logits
    from pallas_kernels.moe_gemm import moe_fp8_pairs

    E, D, F = 8, 80, 48
    ws, scales = quantize(*_weights(N + 40, E + 1, D, F))  # expert E: the shared one
    routed_w, routed_s = tuple(w[:E] for w in ws), tuple(s[:E] for s in scales)
    sh = (ws[0][E], ws[1][E], ws[2][E], tuple(s[E] for s in scales)) if shared else None
    rng = np.random.default_rng(N)
    logits = rng.standard_normal((N, E)) * 2.0
    logits[0, [2, 5]] = logits[0].max() + 1.0  # a tie at the top: expert 2
    logits = jnp.asarray(logits, jnp.bfloat16)
    idx, sc = route_logits(logits, 1)
    assert int(idx[0, 0]) == 2
    dead = ~np.isin(np.arange(E), np.asarray(idx))
    nan_w = lambda w: jnp.where(dead[:, None, None], jnp.asarray(jnp.nan, w.dtype), w)  # noqa: E731
    nan_s = lambda s: jnp.where(dead[:, None], jnp.nan, s)  # noqa: E731
    x = _x(N + 40, N, D)
    kw = dict(shared=sh, interpret=True, poison_output=True, **cfg)
    got = moe_fp8_pairs(x, None, None, *map(nan_w, routed_w), tuple(map(nan_s, routed_s)), router_logits=logits,
                        **kw)
    want = moe_fp8_pairs(x, idx, sc, *routed_w, routed_s, **kw)
    assert got.shape == x.shape and got.dtype == x.dtype and bool(jnp.isfinite(got).all())
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # float32 partials [P, N, E] of the same logits (fused_norm.add_rms_norm(router=...)), summed exactly
    lf = logits.astype(jnp.float32)
    parts = jnp.stack([lf / 2 + 0.5, lf / 4 - 0.5, lf / 4])
    got = moe_fp8_pairs(x, None, None, *map(nan_w, routed_w), tuple(map(nan_s, routed_s)), router_logits=parts,
                        **kw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="router_logits must be"):
        moe_fp8_pairs(x, idx, sc, *routed_w, routed_s, router_logits=logits, interpret=True)
    with pytest.raises(ValueError, match="float32 partials"):
        moe_fp8_pairs(x, None, None, *routed_w, routed_s, router_logits=parts.astype(jnp.bfloat16),
                      interpret=True)
    with pytest.raises(ValueError, match="router_logits must be"):
        moe_fp8_pairs(x, None, None, *routed_w, routed_s, router_logits=logits[:, :-1], interpret=True)
