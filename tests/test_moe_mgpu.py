"""The Mosaic GPU MoE decode path (pallas_kernels/moe_mgpu.py: the (token, expert) pairs on the expert-indexed
Mosaic GPU weight-only GEMM) under Pallas' GPU interpreter, against moe_gemm.moe_reference, and its place in
moe_fp8.

Error bound (||out - ref|| / ||ref||, ref in float32 on the dequantized weights): the GEMMs are exact products
summed in f32 (tests/test_mgpu_gemv.py), but h is kept in bf16 between the two launches (as the Triton pair
path keeps it: <= 2^-9 relative per element) and the output is cast to bf16 (another 2^-9): 1e-2, the bound
of tests/test_moe_gemm.py. The interpreter fills every buffer with NaN first, so a partial sum the kernel never
writes and the epilogue reads makes the output non-finite; unrouted experts hold NaN weights, so a program
that reads an expert it was not given does too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mgpu_gemv, moe_mgpu
from pallas_kernels.moe_gemm import moe_fp8, moe_reference, quantize_experts

INTERP = mgpu_gemv.interpret_params(True)


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _experts(seed, E, D, F):
    ks = jax.random.split(jax.random.key(seed), 3)
    w = [jax.random.normal(k, s) * 0.05 for k, s in zip(ks, [(E, D, F), (E, D, F), (E, F, D)])]
    return quantize_experts(*w)


def _poison_unrouted(ws, scales, used):
    """NaN weights and scales in every expert no pair names."""
    dead = jnp.asarray([e not in used for e in range(ws[0].shape[0])])
    ws = tuple(jnp.where(dead[:, None, None], jnp.asarray(jnp.nan, w.dtype), w) for w in ws)
    return ws, tuple(jnp.where(dead[:, None], jnp.nan, s) for s in scales)


@pytest.mark.parametrize("N,k,E,D,F,x_dtype,cfg", [
    (1, 1, 4, 128, 192, jnp.bfloat16, {}),  # decode, one token: the bf16 path
    (3, 2, 6, 192, 256, jnp.float32, dict(split_k=3, split_k_down=2)),  # f32 x: the f16 path with row factors
    (8, 2, 8, 64, 64, jnp.bfloat16, dict(tile_n_down=64, stages=1)),  # 16 pairs: the WGMMA's 16 columns
])
def test_matches_reference_and_reads_only_named_experts(N, k, E, D, F, x_dtype, cfg):
    (wg, wu, wd), scales = _experts(N * 10 + k, E, D, F)
    rng = np.random.default_rng(N)
    idx = np.stack([rng.choice(E - 1, size=k, replace=False) for _ in range(N)]).astype(np.int32)  # expert E-1 unused
    if N > 1:
        idx[1, 0] = idx[0, 0]  # two pairs on one expert
    x = (jax.random.normal(jax.random.key(7), (N, D)) * (3e4 if x_dtype == jnp.float32 else 1.0)).astype(x_dtype)
    x = x.at[0].multiply(1e-3)  # rows of different magnitudes
    sc = jax.nn.sigmoid(jax.random.normal(jax.random.key(8), (N, k))).astype(x_dtype)
    ws, ss = _poison_unrouted((wg, wu, wd), scales, set(idx.ravel().tolist()))
    y = moe_mgpu.moe_fp8_mgpu(x, jnp.asarray(idx), sc, *ws, ss, interpret=INTERP, **cfg)
    ref = moe_reference(x, jnp.asarray(idx), sc, wg, wu, wd, scales=scales)
    assert y.shape == (N, D) and y.dtype == x_dtype and bool(jnp.isfinite(y).all())
    assert _err(y, ref) < 1e-2, _err(y, ref)


@pytest.mark.parametrize("N,k", [(1, 1), (3, 2), (8, 1)])
def test_shared_expert_rides_along(N, k):
    """shared=: one more program row streams the shared expert once for all tokens in the same two launches
    (its gate|up on the tokens' columns, its down on its own h rows; input not scaled by a score); the result is
    routed + shared, what moe_fp8_pairs(shared=...) and the model compute."""
    from pallas_kernels.moe_gemm import moe_fp8_pairs

    E, D, F = 5, 128, 64
    (wg, wu, wd), scales = _experts(11 + N, E, D, F + 0)
    (sg, su, sd), sh_s = _experts(12 + N, 1, D, F)
    shared = (sg[0], su[0], sd[0], tuple(s[0] for s in sh_s))
    x = jax.random.normal(jax.random.key(N), (N, D)).astype(jnp.bfloat16)
    idx = jnp.asarray(np.arange(N * k).reshape(N, k) % (E - 1), jnp.int32)
    sc = jax.nn.sigmoid(jax.random.normal(jax.random.key(9), (N, k))).astype(jnp.bfloat16)
    ws, ss = _poison_unrouted((wg, wu, wd), scales, set(np.asarray(idx).ravel().tolist()))
    y = moe_mgpu.moe_fp8_mgpu(x, idx, sc, *ws, ss, shared=shared, interpret=INTERP)
    ones = jnp.ones((N, 1), jnp.bfloat16)
    ref = (moe_reference(x, idx, sc, wg, wu, wd, scales=scales).astype(jnp.float32)
           + moe_reference(x, jnp.zeros((N, 1), jnp.int32), ones, sg, su, sd, scales=sh_s).astype(jnp.float32))
    assert bool(jnp.isfinite(y).all()) and _err(y, ref) < 1e-2, _err(y, ref)
    pairs = moe_fp8_pairs(x, idx, sc, wg, wu, wd, scales, shared=shared, interpret=True)
    assert _err(y, pairs) < 1e-2  # the Triton pair path's function
    with pytest.raises(ValueError, match="shared expert must be"):
        moe_mgpu.moe_fp8_mgpu(x, idx, sc, wg, wu, wd, scales, shared=(sg[0], su[0], sd[0][:, :64], shared[3]),
                              interpret=INTERP)


def test_x_padded_as_the_norm_kernel_writes_it():
    """x_padded (bf16 x already padded to the kernel's rows, what add_rms_norm(pad_rows=...) writes) gives the
    same result as padding in XLA; a wrong shape or a non-bf16 x is an error naming it."""
    E, D, F = 4, 128, 64
    (wg, wu, wd), scales = _experts(4, E, D, F)
    x = jax.random.normal(jax.random.key(3), (3, D)).astype(jnp.bfloat16)
    idx, sc = jnp.asarray([[2], [0], [2]], jnp.int32), jnp.full((3, 1), 0.6, jnp.bfloat16)
    y = moe_mgpu.moe_fp8_mgpu(x, idx, sc, wg, wu, wd, scales, interpret=INTERP)
    yp = moe_mgpu.moe_fp8_mgpu(x, idx, sc, wg, wu, wd, scales, x_padded=jnp.pad(x, ((0, 5), (0, 0))),
                               interpret=INTERP)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(yp, np.float32))
    with pytest.raises(ValueError, match="padded must be bfloat16"):
        moe_mgpu.moe_fp8_mgpu(x, idx, sc, wg, wu, wd, scales, x_padded=x, interpret=INTERP)
    with pytest.raises(ValueError, match="padded is the bfloat16 path"):
        moe_mgpu.moe_fp8_mgpu(x.astype(jnp.float32), idx, sc, wg, wu, wd, scales,
                              x_padded=jnp.zeros((8, D), jnp.bfloat16), interpret=INTERP)


def test_dropped_pairs_read_nothing_and_add_nothing():
    """An id outside [0, E) (what the expert-parallel path gives a pair owned by another device) reads no expert
    and contributes zero; the token's other pairs still count."""
    E, D, F = 4, 128, 64
    (wg, wu, wd), scales = _experts(3, E, D, F)
    x = jax.random.normal(jax.random.key(1), (2, D)).astype(jnp.bfloat16)
    sc = jnp.full((2, 2), 0.7, jnp.bfloat16)
    idx = jnp.asarray([[1, E], [-1, 2]], jnp.int32)
    ws, ss = _poison_unrouted((wg, wu, wd), scales, {1, 2})
    y = moe_mgpu.moe_fp8_mgpu(x, idx, sc, *ws, ss, interpret=INTERP)
    kept = jnp.asarray([[1], [2]], jnp.int32)
    ref = moe_reference(x, kept, sc[:, :1], wg, wu, wd, scales=scales)
    assert bool(jnp.isfinite(y).all()) and _err(y, ref) < 1e-2


def test_gemv_partials_by_expert_id():
    """The kernel alone: slice p of the result is xp @ w[ids[p]] for every row (the op keeps row p), exact in
    f32; a dropped id's slice is left unwritten (NaN under the interpreter)."""
    E, K, N = 3, 256, 64
    w = jax.random.normal(jax.random.key(0), (E, K, N)).astype(mgpu_gemv.FP8)
    xp = jax.random.normal(jax.random.key(1), (8, K)).astype(jnp.float16)
    ids = jnp.asarray([2, 0, 7], jnp.int32)
    parts = mgpu_gemv.gemv_partials(xp, (w,), ids=ids, split_k=2, stages=1, interpret=INTERP)  # [2, 3, N, 8]
    assert parts.shape == (2, 3, N, 8)
    got = parts.sum(0)
    for p, e in enumerate([2, 0]):
        want = jnp.einsum("mk,kn->nm", xp.astype(jnp.float32), w[e].astype(jnp.float32))
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want), rtol=1e-5, atol=1e-3)
    assert bool(jnp.isnan(got[2]).all())
    with pytest.raises(ValueError, match="stacked"):
        mgpu_gemv.gemv_partials(xp, (w[0],), ids=ids, interpret=INTERP)
    # the shared row (shared_ws) with its own x: xp [2, Mp, K], the ids' programs read xp[0], it reads xp[1]
    ws = jax.random.normal(jax.random.key(2), (K, N)).astype(mgpu_gemv.FP8)
    x2 = jnp.stack([xp, -2 * xp[::-1]])
    parts = mgpu_gemv.gemv_partials(x2, (w,), ids=ids[:2], shared_ws=(ws,), split_k=2, stages=1, interpret=INTERP)
    got = parts.sum(0)  # [3, N, 8]
    for p, (xi, wi) in enumerate([(xp, w[2]), (xp, w[0]), (x2[1], ws)]):
        want = jnp.einsum("mk,kn->nm", xi.astype(jnp.float32), wi.astype(jnp.float32))
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match=r"or \[2, Mp, K\] with shared_ws"):
        mgpu_gemv.gemv_partials(x2, (w,), ids=ids, interpret=INTERP)


def test_lowers_for_the_gpu():
    """The GPU form (the expert id read from global memory, the expert's weights by that id through the TMA
    pipeline, Lane semantics; with the shared expert riding along) lowers to Mosaic GPU for CUDA on this CPU,
    at the 8-way shard's shapes."""
    E, D, F = 8, 5120, 1024
    x, idx, sc = jnp.ones((1, D), jnp.bfloat16), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.bfloat16)
    ws = [jax.ShapeDtypeStruct(s, mgpu_gemv.FP8) for s in [(E, D, F), (E, D, F), (E, F, D)]]
    ss = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(E, F), (E, F), (E, D)]]
    shared = ws[0].update(shape=(D, F)), ws[1].update(shape=(D, F)), ws[2].update(shape=(F, D)), \
        tuple(s.update(shape=s.shape[1:]) for s in ss)
    for sh in (None, shared):  # the shared expert's rows: a second branch streaming unstacked weights
        f = lambda *a, sh: moe_mgpu.moe_fp8_mgpu(*a, shared=sh)  # noqa: E731
        text = jax.jit(f).trace(x, idx, sc, *ws, ss, sh=sh).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("mosaic_gpu") >= 2


def test_dispatch_from_moe_fp8(monkeypatch):
    """moe_fp8: mosaic=True always (the interpreter here); None (the default) on a Hopper GPU where it applies
    (at most 16 rows, the shared expert's included) and no Triton tile is given; False never. A problem it does
    not take with mosaic=True is an error naming it."""
    from helpers import pallas_call_names

    E, D, F = 4, 128, 64
    (wg, wu, wd), scales = _experts(5, E, D, F)
    x = jax.random.normal(jax.random.key(2), (2, D)).astype(jnp.bfloat16)
    idx, sc = jnp.asarray([[0], [3]], jnp.int32), jnp.full((2, 1), 0.5, jnp.bfloat16)
    shared = (wg[1], wu[1], wd[1], (scales[0][1], scales[1][1], scales[2][1]))
    ref = moe_reference(x, idx, sc, wg, wu, wd, scales=scales)
    assert _err(moe_fp8(x, idx, sc, wg, wu, wd, scales, mosaic=True, interpret=True), ref) < 1e-2

    def names(**kw):
        f = functools.partial(moe_fp8, interpret=True, **kw)
        return pallas_call_names(jax.make_jaxpr(f)(x, idx, sc, wg, wu, wd, scales).jaxpr)

    assert not any(n.startswith("mgpu_fp8_moe") for n in names())  # a CPU: the Triton pair path
    monkeypatch.setattr(mgpu_gemv, "on_hopper", lambda: True)
    jax.clear_caches()  # the choice is made at trace time
    assert [n[:12] for n in names()] == ["mgpu_fp8_moe"] * 2
    assert [n[:12] for n in names(shared=shared)] == ["mgpu_fp8_moe"] * 2  # the shared expert rides along
    assert not any(n.startswith("mgpu") for n in names(block_n=32))  # a tuner's Triton tiles
    assert not any(n.startswith("mgpu") for n in names(mosaic=False))
    # up to 16 pairs the pair path, the shared expert adding no columns; from 17 the sorted path on the Mosaic GPU
    # kernel (bf16 x), or Triton's where it does not apply (f32 x) or is switched off
    for n, sh, dt, mosaic, want in ((9, shared, jnp.bfloat16, None, True), (16, shared, jnp.bfloat16, None, True),
                                    (17, None, jnp.bfloat16, None, True), (17, None, jnp.float32, None, False),
                                    (17, None, jnp.bfloat16, False, False)):
        f = functools.partial(moe_fp8, interpret=True, shared=sh, mosaic=mosaic)
        big = jnp.ones((n, D), dt), jnp.zeros((n, 1), jnp.int32), jnp.ones((n, 1), dt)
        got = pallas_call_names(jax.make_jaxpr(f)(*big, wg, wu, wd, scales).jaxpr)
        assert any(name.startswith("mgpu") for name in got) == want, (n, got)
    with pytest.raises(ValueError, match="per-channel scales"):
        moe_fp8(x, idx, sc, *(w.astype(jnp.bfloat16) for w in (wg, wu, wd)), None, mosaic=True, interpret=True)
    with pytest.raises(ValueError, match="moe_fp8_mgpu_sorted takes bf16 x"):
        moe_fp8(jnp.ones((17, D)), jnp.zeros((17, 1), jnp.int32), jnp.ones((17, 1)), wg, wu, wd, scales, mosaic=True,
                interpret=True)


def test_default_config_counts_every_expert_streamed():
    """Splits for about three programs per SM over all the experts of one launch: one expert of the 8-way shard
    splits its K ten ways, 16 of them only once or twice."""
    assert mgpu_gemv.default_config(5120, (1024, 1024)) == dict(tile_n=64, split_k=10, stages=4)
    assert mgpu_gemv.default_config(5120, (1024, 1024), copies=16)["split_k"] == 1
    assert mgpu_gemv.default_config(5120, (8192, 8192), copies=1)["split_k"] == 2


@pytest.mark.parametrize("N,k,E,D,F,used,cfg", [
    (40, 2, 5, 128, 128, 4, dict(block_m=16, tile_n=64)),  # ragged groups, a dropped pair, expert 4 unrouted
    (37, 1, 4, 192, 256, 1, dict(block_m=8, tile_n=64, stages=1)),  # every token on one expert: five row blocks
    (20, 1, 3, 128, 128, 3, {}),  # sorted_config's tiles
])
def test_sorted_matches_reference_and_reads_only_routed_experts(N, k, E, D, F, used, cfg):
    """moe_fp8_mgpu_sorted (the pairs sorted by expert into row blocks, each block a program row reading its
    expert and its own rows) against the float32 reference: groups not multiples of the block, an expert with
    more pairs than a block, empty experts holding NaN weights (a block reading one would poison its rows), a
    pair whose id is out of range (dropped). The interpreter fills unwritten memory with NaN, so a block past
    the active ones that the epilogue forgot to mask shows too."""
    (wg, wu, wd), scales = _experts(N + k, E, D, F)
    rng = np.random.default_rng(N)
    if used == 1:
        idx = np.full((N, k), 2, np.int32)
    else:
        idx = np.stack([rng.choice(used, size=k, replace=False) for _ in range(N)]).astype(np.int32)
    if k > 1:
        idx[5, 1] = E  # dropped
    x = jax.random.normal(jax.random.key(N), (N, D)).astype(jnp.bfloat16)
    sc = jax.nn.sigmoid(jax.random.normal(jax.random.key(9), (N, k))).astype(jnp.bfloat16)
    ws, ss = _poison_unrouted((wg, wu, wd), scales, set(idx.ravel().tolist()))
    y = moe_mgpu.moe_fp8_mgpu_sorted(x, jnp.asarray(idx), sc, *ws, ss, interpret=INTERP, **cfg)
    ref = moe_reference(x, jnp.asarray(idx), sc, wg, wu, wd, scales=scales)
    assert y.shape == (N, D) and y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y).all())
    assert _err(y, ref) < 1e-2, _err(y, ref)


def test_sorted_bad_arguments():
    E, D, F = 3, 128, 128
    (wg, wu, wd), scales = _experts(1, E, D, F)
    x, idx, sc = jnp.ones((20, D), jnp.bfloat16), jnp.zeros((20, 1), jnp.int32), jnp.ones((20, 1), jnp.bfloat16)
    for kw, bad in ((dict(block_m=12), "block_m=12"), (dict(tile_n=256), "tiles 256"),
                    (dict(block_m=256), "block_m=256")):
        with pytest.raises(ValueError, match=bad):
            moe_mgpu.moe_fp8_mgpu_sorted(x, idx, sc, wg, wu, wd, scales, interpret=INTERP, **kw)
    with pytest.raises(ValueError, match="per-channel scales"):
        moe_mgpu.moe_fp8_mgpu_sorted(x, idx, sc, wg, wu, wd, None, interpret=INTERP)


def test_gemv_partials_with_its_own_rows_per_id():
    """x_per_id: program row p multiplies its own rows xp[p] by expert ids[p] (exact in f32); a dropped id's
    slice is unwritten (NaN under the interpreter); xp must hold one row block per id and no shared row."""
    E, K, N = 3, 256, 64
    w = jax.random.normal(jax.random.key(0), (E, K, N)).astype(mgpu_gemv.FP8)
    xp = jax.random.normal(jax.random.key(1), (3, 16, K)).astype(jnp.bfloat16)
    ids = jnp.asarray([2, 0, -1], jnp.int32)
    got = mgpu_gemv.gemv_partials(xp, (w,), ids=ids, x_per_id=True, split_k=2, stages=1,
                                  compute_dtype=jnp.bfloat16, interpret=INTERP).sum(0)  # [3, N, 16]
    for p, e in enumerate([2, 0]):
        want = jnp.einsum("mk,kn->nm", xp[p].astype(jnp.float32), w[e].astype(jnp.float32))
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want), rtol=1e-5, atol=1e-3)
    assert bool(jnp.isnan(got[2]).all())
    with pytest.raises(ValueError, match="x_per_id takes xp"):
        mgpu_gemv.gemv_partials(xp[:2], (w,), ids=ids, x_per_id=True, compute_dtype=jnp.bfloat16, interpret=INTERP)


def test_sorted_config_and_lowering_at_maverick_shapes():
    """block_m: the average pairs per expert as a power of two in [16, 64] (4096 tokens over 128 experts: 32),
    128-wide tiles, 256 wide and 64 deep from 32 pairs per expert (docs/benchmarks.md section 31's sweep), the
    deepest pipeline that fits; the GPU form (row
    blocks' own x by TMA at the block's index, the expert by its id) lowers to Mosaic GPU for CUDA on this CPU."""
    E, D, F = 128, 5120, 8192
    assert moe_mgpu.sorted_config(4096, E, D, F) == dict(block_m=32, tile_n=256, tile_k=64, stages=4, tile_n_down=256,
                                                         stages_down=4)
    assert moe_mgpu.sorted_config(17, E, D, F) == dict(block_m=16, tile_n=128, tile_k=None, stages=4, tile_n_down=128,
                                                       stages_down=4)
    assert moe_mgpu.sorted_config(16384, E, D, F)["block_m"] == 64
    assert moe_mgpu.sorted_config(100, 4, 192, 320)["tile_n"] == 64  # D, F not multiples of 128
    F = 1024  # the 8-way shard
    ws = [jax.ShapeDtypeStruct(s, mgpu_gemv.FP8) for s in [(E, D, F), (E, D, F), (E, F, D)]]
    ss = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(E, F), (E, F), (E, D)]]
    for n in (512, 4096, 40000):  # 128 x 128 tiles, then 256 x 64, then two chunks of 20000 tokens
        x, idx, sc = (jax.ShapeDtypeStruct((n, d), t)
                      for d, t in ((D, jnp.bfloat16), (1, jnp.int32), (1, jnp.bfloat16)))
        text = jax.jit(moe_mgpu.moe_fp8_mgpu_sorted).trace(x, idx, sc, *ws, ss).lower(
            lowering_platforms=("cuda",)).as_text()
        assert text.count("mosaic_gpu") >= 2


def test_expert_parallel_rows_take_the_sorted_mosaic_path(monkeypatch):
    """The expert-parallel exchange's grouped GEMM (`mavjax.parallel.expert_rows`: rows already scaled by their
    score, sentinel id E_loc for rows routed elsewhere) takes moe_fp8's own choice: on a Hopper GPU (patched) the
    sorted Mosaic GPU path above 16 rows, Triton's with "mosaic" switched off; sentinel rows come out zero."""
    from helpers import pallas_call_names
    from mavjax.parallel import expert_rows

    E, D, F, R = 4, 128, 128, 24
    (wg, wu, wd), scales = _experts(6, E, D, F)
    xs = jax.random.normal(jax.random.key(4), (R, D)).astype(jnp.bfloat16)
    e = jnp.asarray(np.arange(R) % (E + 1), jnp.int32)  # id E: a sentinel row
    monkeypatch.setattr(mgpu_gemv, "on_hopper", lambda: True)
    for off, want in (("", "mgpu_fp8_moe"), ("mosaic", "moe_gate_up_m")):
        monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", off)
        jax.clear_caches()
        f = functools.partial(expert_rows, kernels="pallas")
        names = pallas_call_names(jax.make_jaxpr(f)(xs, e, wg, wu, wd, scales).jaxpr)
        assert sum(n.startswith(want) for n in names) == (2 if off == "" else 1), names
        y = f(xs, e, wg, wu, wd, scales)
        ref = moe_reference(xs, jnp.minimum(e, E - 1)[:, None], jnp.ones((R, 1), jnp.bfloat16), wg, wu, wd,
                            scales=scales)
        live = np.asarray(e) < E
        assert bool(jnp.all(y[~live] == 0)) and _err(y[live], ref[live]) < 1e-2


def test_sorted_goes_through_in_chunks_above_its_pair_limit(monkeypatch):
    """Above SORTED_MAX_PAIRS pairs the tokens go through in equal chunks (a scan; the padding tokens' pairs
    dropped): the same function as one pass."""
    from helpers import equations

    E, D, F, N, k = 4, 128, 64, 45, 2
    (wg, wu, wd), scales = _experts(12, E, D, F)
    x = jax.random.normal(jax.random.key(12), (N, D)).astype(jnp.bfloat16)
    idx = jnp.asarray(np.random.default_rng(12).integers(0, E, (N, k)), jnp.int32)
    sc = jax.nn.sigmoid(jax.random.normal(jax.random.key(13), (N, k))).astype(jnp.bfloat16)
    f = functools.partial(moe_mgpu.moe_fp8_mgpu_sorted, block_m=16, tile_n=64, interpret=INTERP)
    args = (x, idx, sc, wg, wu, wd, scales)
    scans = lambda: [e.primitive.name for e in equations(jax.make_jaxpr(f)(*args).jaxpr)].count("scan")  # noqa
    whole, one_pass = f(*args), scans()
    monkeypatch.setattr(moe_mgpu, "SORTED_MAX_PAIRS", 32)  # 90 pairs: three chunks of 15 tokens
    jax.clear_caches()
    assert scans() == one_pass + 1  # the chunks' map around the same pass
    chunked = f(*args)
    assert bool(jnp.isfinite(chunked).all()) and chunked.shape == (N, D)
    assert _err(chunked, whole) < 1e-3 and _err(chunked, moe_reference(*args[:6], scales=scales)) < 1e-2
