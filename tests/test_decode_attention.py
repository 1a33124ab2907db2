"""Split-KV decode attention kernel (pallas_kernels.decode_attention) against a float64 numpy reference of
mavjax.model.attend(q, k, v, attention_mask(q_pos, k_pos, chunk), scale), and against that function itself.

Runs the kernels in Pallas interpret mode on CPU. DECODE_ATTN_INTERPRET=0 runs the same tests compiled for a GPU.

Error bounds, ||out - ref|| / ||ref|| with ref in float64 on the same (dequantized) inputs:
  float32 q and KV: 1e-5;  bf16 q and KV: 1e-2;  bf16 q with FP8 KV (vs reference on the dequantized KV): 1e-2.
The default path merges the splits inside the kernel (combine="kernel"); every case also runs the two-stage
path (combine="xla": partials, then combine_partials in XLA) and the two agree to float32 rounding (bf16
outputs: within one bf16 ulp).
"""

from __future__ import annotations

import os
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mavjax.model import attend, attention_mask
from helpers import lower_for_cuda, ref64, rel_err
from pallas_kernels.decode_attention import (combine_partials, decode_attention, decode_attention_partials,
                                             decode_attention_reference, default_num_splits, kv_range_from_k_pos)

INTERPRET = os.environ.get("DECODE_ATTN_INTERPRET", "1") != "0"
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float8_e4m3fn": 1e-2}
FP8 = jnp.float8_e4m3fn
GARBAGE = 50.0  # what invisible slots hold: large enough that any leak through the mask shows


def make_inputs(seed, B, T, K, G, Dh, S, lengths, kv_dtype, q_dtype, scale_kind="head"):
    """Cache rows hold positions 0 .. lengths[b]-1 in slots of the same index (mavjax.kv_cache's layout), the
    other slots are empty (-1) and hold garbage; the T queries are the last T positions of each row."""
    rng = np.random.default_rng(seed)
    H = K * G
    q = rng.standard_normal((B, T, H, Dh)).astype(np.float32)
    k = rng.standard_normal((B, S, K, Dh)).astype(np.float32)
    v = rng.standard_normal((B, S, K, Dh)).astype(np.float32)
    lengths = np.asarray(lengths)
    slot = np.arange(S)
    k_pos = np.where(slot[None] < lengths[:, None], slot[None], -1).astype(np.int32)
    k[k_pos < 0] = GARBAGE
    v[k_pos < 0] = -GARBAGE
    q_pos = (lengths[:, None] - T + np.arange(T)[None]).astype(np.int32)  # may be < 0: padding queries
    ks = vs = None
    if kv_dtype == FP8:
        if scale_kind == "head":
            ks = (np.abs(k).max(axis=(0, 1, 3)) / 448.0 * rng.uniform(1.0, 2.0, K)).astype(np.float32)
            vs = (np.abs(v).max(axis=(0, 1, 3)) / 448.0 * rng.uniform(1.0, 2.0, K)).astype(np.float32)
            k8 = jnp.asarray(k / ks[:, None], FP8)
            v8 = jnp.asarray(v / vs[:, None], FP8)
            kd = np.asarray(k8, np.float32) * ks[:, None]
            vd = np.asarray(v8, np.float32) * vs[:, None]
        else:  # per tensor
            ks, vs = np.float32(np.abs(k).max() / 448.0), np.float32(np.abs(v).max() / 300.0)
            k8, v8 = jnp.asarray(k / ks, FP8), jnp.asarray(v / vs, FP8)
            kd, vd = np.asarray(k8, np.float32) * ks, np.asarray(v8, np.float32) * vs
        qj = jnp.asarray(q, q_dtype)
        return dict(q=qj, k=k8, v=v8, q_pos=jnp.asarray(q_pos), k_pos=jnp.asarray(k_pos), k_scale=jnp.asarray(ks),
                    v_scale=jnp.asarray(vs)), (np.asarray(qj, np.float32), kd, vd)
    qj, kj, vj = jnp.asarray(q, q_dtype), jnp.asarray(k, kv_dtype), jnp.asarray(v, kv_dtype)
    exact = tuple(np.asarray(x, np.float32) for x in (qj, kj, vj))  # the values after rounding to the dtype
    return dict(q=qj, k=kj, v=vj, q_pos=jnp.asarray(q_pos), k_pos=jnp.asarray(k_pos)), exact


# (B, T, K, G, Dh, S, lengths, chunk, block_s, num_splits, kv dtype, q dtype)
CASES = {
    # S not a multiple of block_s, a length-1 row, rows of different lengths, more splits than some rows' tiles
    "f32_global_ragged_T1_G2": (3, 1, 2, 2, 16, 100, [100, 1, 37], None, 32, 3, jnp.float32, jnp.float32),
    # T > 1 straddling chunk boundaries (positions 46..48 cross 48 = 3 * 16), chunked layer
    "f32_chunked_T3_G2": (3, 3, 2, 2, 16, 100, [100, 3, 49], 16, 32, 3, jnp.float32, jnp.float32),
    # Maverick's group size 5, speculative T = 4, one kv head, 4 splits over few tiles
    "bf16_global_T4_G5_K1": (2, 4, 1, 5, 32, 64, [64, 23], None, 16, 4, jnp.bfloat16, jnp.bfloat16),
    # G = 1 (MHA), ragged, empty splits (5 splits, at most 3 tiles), chunked
    "bf16_chunked_G1_empty_splits": (2, 1, 2, 1, 16, 80, [80, 33], 32, 32, 5, jnp.bfloat16, jnp.bfloat16),
    # T = 9 queries x G = 2 -> 18 rows (padded to 32), chunk boundary inside the T queries
    "bf16_chunked_T9_rows32": (2, 9, 2, 2, 16, 96, [96, 40], 32, 16, 2, jnp.bfloat16, jnp.bfloat16),
    # Dh = 64, default block_s / num_splits, ragged S = 300 (block 128 -> clamped last tile)
    "bf16_defaults_Dh64": (2, 2, 2, 5, 64, 300, [300, 130], None, None, None, jnp.bfloat16, jnp.bfloat16),
    # FP8 KV with per-kv-head scales, global and chunked
    "fp8_head_global_T2": (2, 2, 2, 2, 32, 96, [96, 17], None, 32, 2, FP8, jnp.bfloat16),
    "fp8_head_chunked_T1_G5": (2, 1, 2, 5, 16, 112, [112, 64], 32, 16, 3, FP8, jnp.bfloat16),
    # tiny cache (S < 16: padded to one tile), T longer than a row (padding queries with q_pos < 0)
    "f32_tiny_S10_padded_queries": (2, 4, 1, 2, 16, 10, [10, 2], None, 32, 2, jnp.float32, jnp.float32),
    # one split: no partials, the program normalizes and stores its rows itself
    "bf16_one_split_G5": (1, 1, 1, 5, 16, 64, [64], None, 16, 1, jnp.bfloat16, jnp.bfloat16),
    # G = 8, three kv heads, one batch row, chunked: 3 splits for the chunk's one visible tile (two empty)
    "f32_B1_K3_G8_chunked": (1, 1, 3, 8, 16, 90, [75], 32, 16, 3, jnp.float32, jnp.float32),
    # 40 splits over 13 tiles (27 empty): the in-kernel merge loops over 3 chunks of 16 splits, the last short
    "f32_T4_G5_40_splits": (1, 4, 1, 5, 16, 200, [200], None, 16, 40, jnp.float32, jnp.float32),
    # 20 splits, Dh 64: the merge in two unrolled chunks of 16; an empty row (its query is padding)
    "bf16_Dh64_20_splits": (2, 1, 1, 5, 64, 320, [320, 0], None, 16, 20, jnp.bfloat16, jnp.bfloat16),
    # FP8 with more splits than a short row's tiles, chunked
    "fp8_head_chunked_G8_6_splits": (2, 1, 1, 8, 16, 64, [64, 9], 32, 16, 6, FP8, jnp.bfloat16),
}


_xla_reference = jax.jit(decode_attention_reference, static_argnames=("chunk_size", "scale"))


def _run(case, seed=0, scale_kind="head", combine="kernel"):
    """decode_attention on the case's inputs; combine="kernel" writes into a NaN-filled output (`poison`)."""
    B, T, K, G, Dh, S, lengths, chunk, bs, ns, kvd, qd = case
    inp, (qe, ke, ve) = make_inputs(seed, B, T, K, G, Dh, S, lengths, kvd, qd, scale_kind)
    scale = Dh ** -0.5
    kw = {} if bs is None else dict(block_s=bs)
    if ns is not None:
        kw["num_splits"] = ns
    if combine == "kernel":
        kw["poison"] = jnp.full(inp["q"].shape, jnp.nan, inp["q"].dtype)
    out = decode_attention(**inp, chunk_size=chunk, scale=scale, interpret=INTERPRET, combine=combine, **kw)
    ref = ref64(qe, ke, ve, inp["q_pos"], inp["k_pos"], chunk, scale)
    return inp, out, ref, chunk, scale


def assert_same_as_xla_combine(out, xla):
    """combine="kernel" vs "xla": the same float32 merge in another order (bf16 outputs: one ulp apart at most)."""
    rtol = 1e-5 if out.dtype == jnp.float32 else 2.0 ** -7
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(xla, np.float32), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    case = CASES[name]
    seed = zlib.crc32(name.encode()) % 1000
    inp, out, ref, chunk, scale = _run(case, seed=seed)
    assert out.shape == inp["q"].shape and out.dtype == inp["q"].dtype
    # every element written: the output buffer started as NaN
    assert not np.isnan(np.asarray(out, np.float32)).any()
    kvd = jnp.dtype(case[10]).name
    err = rel_err(out, ref)
    assert err < TOL[kvd], (name, err)
    # the two-stage path (XLA combine) on the same inputs
    two_stage = _run(case, seed=seed, combine="xla")[1]
    assert rel_err(two_stage, ref) < TOL[kvd]
    assert_same_as_xla_combine(out, two_stage)
    # Rows with no visible key (padding queries) are exactly 0, as in the reference.
    empty = np.asarray(inp["q_pos"]) < 0
    if empty.any():
        assert np.all(np.asarray(out, np.float32)[empty] == 0)
    # And the project's own XLA path on the same (dequantized) inputs (float32 matmuls in full precision: XLA's
    # default on GPU is TF32).
    with jax.default_matmul_precision("highest"):
        xla = _xla_reference(inp["q"], inp["k"], inp["v"], inp["q_pos"], inp["k_pos"], chunk_size=chunk,
                                         scale=scale, k_scale=inp.get("k_scale"), v_scale=inp.get("v_scale"))
    assert rel_err(out, np.asarray(xla, np.float64)) < TOL[kvd]


def test_fp8_per_tensor_scale():
    case = (2, 2, 2, 2, 16, 64, [64, 30], 16, 16, 2, FP8, jnp.bfloat16)
    inp, out, ref, _, _ = _run(case, seed=5, scale_kind="tensor")
    assert inp["k_scale"].ndim == 0
    assert rel_err(out, ref) < TOL["float8_e4m3fn"]


def test_every_partial_written_and_empty_splits_neutral():
    """The kernel's outputs, pre-filled with NaN through input_output_aliases, hold no NaN afterwards (every
    element written, including rows padding G*T up to R and splits whose share of tiles is empty), empty
    splits hold the neutral partial (o = 0, m = -inf, l = 0), and merging gives the reference."""
    B, T, K, G, Dh, S = 2, 2, 2, 5, 16, 80
    lengths, chunk, bs, ns = [80, 20], 32, 16, 4  # row 1 has 2 visible tiles for 4 splits
    inp, (qe, ke, ve) = make_inputs(3, B, T, K, G, Dh, S, lengths, jnp.float32, jnp.float32)
    R = 16
    poison = (jnp.full((B, K, ns, R, Dh), jnp.nan, jnp.float32), jnp.full((B, K, ns, R), jnp.nan, jnp.float32),
              jnp.full((B, K, ns, R), jnp.nan, jnp.float32))
    o, m, l = decode_attention_partials(inp["q"], inp["k"], inp["v"], inp["q_pos"], inp["k_pos"], poison=poison,
                                        chunk_size=chunk, scale=0.25, block_s=bs, num_splits=ns,
                                        interpret=INTERPRET)
    o, m, l = np.asarray(o), np.asarray(m), np.asarray(l)
    assert not np.isnan(o).any() and not np.isnan(m).any() and not np.isnan(l).any()
    empty = np.isneginf(m)
    assert empty[1].any(), "expected splits with nothing to do"
    assert np.all(l[empty] == 0) and np.all(o[empty] == 0)
    rows = G * T
    assert np.all(empty[:, :, :, rows:])  # padding rows see nothing
    merged = np.asarray(combine_partials(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l)))[:, :, :rows]
    out = merged.reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, Dh)
    ref = ref64(qe, ke, ve, inp["q_pos"], inp["k_pos"], chunk, 0.25)
    assert rel_err(out, ref) < TOL["float32"]


def test_invisible_tiles_are_skipped():
    """With slot == position, tiles outside [chunk start of the first query, last query] are never read:
    filling them with NaN changes nothing (any read of a NaN V row would poison the output)."""
    B, T, K, G, Dh, S, chunk, bs = 2, 2, 1, 2, 16, 128, 32, 16
    lengths = [100, 50]  # queries at 98, 99 (chunk [96, 128)) and 48, 49 (chunk [32, 64))
    inp, (qe, ke, ve) = make_inputs(4, B, T, K, G, Dh, S, lengths, jnp.float32, jnp.float32)
    k, v = np.asarray(inp["k"]).copy(), np.asarray(inp["v"]).copy()
    for b, (lo, hi) in enumerate([(96, 100), (32, 50)]):
        lo_t, hi_t = lo // bs * bs, -(-hi // bs) * bs
        for arr in (k, v):
            arr[b, :lo_t] = np.nan
            arr[b, hi_t:] = np.nan
    out = decode_attention(inp["q"], jnp.asarray(k), jnp.asarray(v), inp["q_pos"], inp["k_pos"], chunk_size=chunk,
                           scale=0.25, block_s=bs, num_splits=2, interpret=INTERPRET)
    ref = ref64(qe, ke, ve, inp["q_pos"], inp["k_pos"], chunk, 0.25)
    assert rel_err(out, ref) < TOL["float32"]


@pytest.mark.parametrize("chunk", [None, 16])
def test_arbitrary_slot_layout_with_kv_range(chunk):
    """Slots permuted (slot != position): correctness rests on k_pos masking once kv_range covers every
    visible slot (from kv_range_from_k_pos, or the whole cache)."""
    B, T, K, G, Dh, S = 2, 3, 2, 2, 16, 64
    inp, (qe, ke, ve) = make_inputs(6, B, T, K, G, Dh, S, [64, 40], jnp.float32, jnp.float32)
    perm = np.random.default_rng(0).permutation(S)
    k, v, k_pos = (np.asarray(x)[:, perm] for x in (inp["k"], inp["v"], inp["k_pos"]))
    ke, ve = ke[:, perm], ve[:, perm]
    ref = ref64(qe, ke, ve, inp["q_pos"], k_pos, chunk, 0.25)
    kv_range = kv_range_from_k_pos(inp["q_pos"], jnp.asarray(k_pos), chunk)
    for rng in (kv_range, jnp.asarray([[0, S]] * B, jnp.int32)):
        out = decode_attention(inp["q"], jnp.asarray(k), jnp.asarray(v), inp["q_pos"], jnp.asarray(k_pos),
                               chunk_size=chunk, scale=0.25, block_s=16, num_splits=3, kv_range=rng,
                               interpret=INTERPRET)
        assert rel_err(out, ref) < TOL["float32"]


def test_rows_without_visible_keys_are_zero():
    """Real queries (q_pos >= 0) that see no key give exactly 0 in both paths: row 0's cache is empty; row 1's
    second query (position 40, chunk [32, 48)) finds only empty slots in its chunk, its first sees keys."""
    B, T, K, G, Dh, S, chunk = 2, 2, 1, 5, 16, 48, 16
    inp, (qe, ke, ve) = make_inputs(9, B, T, K, G, Dh, S, [S, S], jnp.float32, jnp.float32)
    slot = np.arange(S)
    k_pos = np.stack([np.full(S, -1), np.where(slot < 32, slot, -1)]).astype(np.int32)
    q_pos = np.asarray([[10, 11], [31, 40]], np.int32)
    ref = ref64(qe, ke, ve, q_pos, k_pos, chunk, 0.25)
    kw = dict(chunk_size=chunk, scale=0.25, block_s=16, num_splits=3, interpret=INTERPRET)
    args = (inp["q"], inp["k"], inp["v"], jnp.asarray(q_pos), jnp.asarray(k_pos))
    out = decode_attention(*args, poison=jnp.full(inp["q"].shape, jnp.nan, jnp.float32), **kw)
    two_stage = decode_attention(*args, combine="xla", **kw)
    for o in (np.asarray(out), np.asarray(two_stage)):
        assert np.all(o[0] == 0) and np.all(o[1, 1] == 0) and np.any(o[1, 0] != 0)
    assert rel_err(out, ref) < TOL["float32"]
    assert_same_as_xla_combine(out, two_stage)


@pytest.mark.parametrize("itemsize", [1, 2])
@pytest.mark.parametrize("rows", [1, 5, 16, 20, 64])
@pytest.mark.parametrize("pairs", [1, 8, 64, 1024])
def test_default_num_splits_rule(pairs, rows, itemsize):
    """Programs fill the GPU (~4 per SM; long spans of <= 16 rows: 1, FP8 2) while every split keeps a tile, the
    partials' traffic stays within 1/8 of the KV bytes, the last program's merge reads no more than one split's
    KV share, and tiles divide evenly (no split left empty)."""
    from pallas_kernels.decode_attention import LONG_SPAN

    for S, chunk in [(64, None), (1088, None), (8256, None), (131072, None), (131072, 8192)]:
        block_s = 128
        ns = default_num_splits(1, pairs, S, chunk, block_s, 132, rows=rows, kv_itemsize=itemsize)
        span = S if chunk is None else min(S, chunk + block_s)
        tiles = -(-span // block_s)
        per = -(-tiles // ns)
        assert 1 <= ns <= min(tiles, 256) and per * (ns - 1) < tiles
        if span >= LONG_SPAN and rows <= 16:  # whole waves of 1 (FP8: 2) programs per SM
            assert ns <= max(1, (1 if itemsize == 2 else 2) * 132 // pairs)
            waves = ns * pairs / 132  # past one wave, no last wave under half full
            assert waves <= 1 or waves % 1 == 0 or waves % 1 >= 0.5, (S, chunk, ns)
        else:
            assert ns <= -(-4 * 132 // pairs)
        if ns > 1:
            assert 2 * ns * rows * 4 <= span * 2 * itemsize / 8
            assert ns * rows * 4 <= span / ns * 2 * itemsize
    # one 8-way rank of Maverick (5 query heads / 1 kv head), 1K context: a split per tile
    assert default_num_splits(1, 1, 1088, None, 128, 132, rows=5) == 9
    # all 8 kv heads at 8K (a long span): one whole wave, 8 x 15 programs (129 tiles: 9 each; the sweep: 16)
    assert default_num_splits(1, 8, 8256, None, 64, 132, rows=5) == 15
    # ... and at batch 8: 64 pairs x 2 (the sweep's best); an FP8 cache two per SM: 8 x 33 programs
    assert default_num_splits(8, 8, 131136, None, 64, 132, rows=5) == 2
    assert default_num_splits(1, 8, 131136, None, 128, 132, rows=5, kv_itemsize=1) == 33
    # FP8 at 8K: the merge's tail allows 22 splits (1.33 waves of 8 pairs); one whole wave of 16 instead
    assert default_num_splits(1, 8, 8192, None, 128, 132, rows=5, kv_itemsize=1) == 16
    # a chunked layer's window at decode (one query: the chunk itself, 64 tiles) splits as the 8K cache does;
    # only a window that may straddle a chunk boundary (several queries, or queries unknown) counts a tile more
    for itemsize, bs in ((1, 128), (2, 64)):
        assert default_num_splits(1, 8, 131072, 8192, bs, 132, rows=5, kv_itemsize=itemsize, queries=1) == 16
    assert default_num_splits(1, 8, 131072, 8192, 64, 132, rows=5, queries=None) == 15
    assert default_num_splits(1, 8, 131072, 8192, 128, 132, rows=5, kv_itemsize=1, queries=None) == 13
    # verification's 4 x 5 rows keep ~4 per SM
    assert default_num_splits(1, 8, 131136, None, 128, 132, rows=20, merge_in_kernel=False) == 65


def test_default_tiles():
    """Short spans and verification's wider row blocks: 128-slot tiles 2 deep; long spans at decode (a global
    layer's whole cache, a chunked layer's window; <= 16 rows): 16 KB tiles (bf16 64 slots, FP8 128, Dh = 64
    bf16 128) 3 deep."""
    from pallas_kernels.decode_attention import default_tiles

    assert default_tiles(1088, None, 128, 2, 5) == (128, 2)
    assert default_tiles(131072, 1024, 128, 2, 5) == (128, 2)  # chunked layer, 1K window
    assert default_tiles(8256, None, 128, 2, 5) == (64, 3)
    assert default_tiles(8256, None, 128, 1, 16) == (128, 3)
    assert default_tiles(131072, 8192, 128, 2, 1) == (64, 3)
    assert default_tiles(32768, None, 64, 2, 5) == (128, 3)
    assert default_tiles(131072, None, 128, 2, 20) == (128, 2)  # 4 queries x 5 heads


MAVERICK_RANK = dict(B=1, T=1, H=5, K=1, Dh=128, S=1088)  # one 8-way rank of Maverick, 1K context


def _lower_rank(monkeypatch, **kw):
    B, T, H, K, Dh, S = MAVERICK_RANK.values()
    sd = jax.ShapeDtypeStruct
    shapes = (sd((B, T, H, Dh), jnp.bfloat16), sd((B, S, K, Dh), jnp.bfloat16), sd((B, S, K, Dh), jnp.bfloat16),
              sd((B, T), jnp.int32), sd((B, S), jnp.int32))
    return lower_for_cuda(lambda *a: decode_attention(*a, chunk_size=None, scale=Dh ** -0.5, num_splits=9, **kw),
                           *shapes, monkeypatch=monkeypatch)


def test_one_launch_lowered_for_cuda(monkeypatch):
    """Lowered for CUDA on the CPU: one pallas_call and around it only free reshapes (and the counters'
    constant): no pad, transpose, slice or combine fusion. In its Triton IR every warp's partial stores pass a
    barrier before the arrival, an acquire-release atomic at GPU scope, and the last program reads the
    partials with volatile loads (not from L1); the output is a masked store in q.dtype."""
    hlo, (ttir,) = _lower_rank(monkeypatch)
    ops = set(re.findall(r"stablehlo\.(\w+)", hlo))
    assert ops <= {"custom_call", "reshape", "constant"}, ops
    assert hlo.count("stablehlo.custom_call") == 1
    lines = ttir.splitlines()
    atomics = [ln for ln in lines if "tt.atomic_rmw" in ln]
    assert atomics and all("acq_rel" in ln and "gpu" in ln for ln in atomics), atomics
    first = ttir.index("tt.atomic_rmw")
    assert "gpu.barrier" in ttir[:first]
    after = ttir[first:].splitlines()
    assert any("tt.load" in ln and "isVolatile = true" in ln for ln in after)
    assert any(re.search(r"tt\.store .*tensor<\d+x128x!tt\.ptr<bf16>>", ln) for ln in after)
    # the two-stage path keeps its XLA combine
    hlo, _ = _lower_rank(monkeypatch, combine="xla")
    assert "stablehlo.transpose" in hlo and "stablehlo.exponential" in hlo


def test_arrival_is_an_integer_add(monkeypatch):
    """The arrival counts with an integer add (split_k.arrive passes a scalar: JAX lowers a 1-element int32
    tensor value to a float add on the counter's bits)."""
    _, (ttir,) = _lower_rank(monkeypatch)
    atomics = [ln for ln in ttir.splitlines() if "tt.atomic_rmw" in ln]
    assert atomics and not any("fadd" in ln for ln in atomics), atomics


def test_reference_is_model_attend():
    """The float64 reference used above is mavjax.model.attend with attention_mask (float32 inputs)."""
    inp, (qe, ke, ve) = make_inputs(7, 2, 3, 2, 2, 16, 40, [40, 9], jnp.float32, jnp.float32)
    for chunk in (None, 16):
        with jax.default_matmul_precision("highest"):
            got = attend(inp["q"], inp["k"], inp["v"], attention_mask(inp["q_pos"], inp["k_pos"], chunk), 0.25)
        assert rel_err(got, ref64(qe, ke, ve, inp["q_pos"], inp["k_pos"], chunk, 0.25)) < 1e-5


@pytest.mark.parametrize("B,T,H,K,S,chunk,want,ns", [
    (1, 1, 5, 1, 1088, None, "kernel", 9),      # one 8-way rank of Maverick at 1K: the one-launch kernel
    (1, 1, 40, 8, 8192, None, "kernel", 16),    # 8K, 40/8 heads: ~one program per SM (section 11)
    (1, 1, 40, 8, 32768, None, "kernel", 16),   # 32K: 16 splits, a 64 KB merge (64 splits' was slower: section 9)
    (1, 4, 5, 1, 131072, None, "xla", None),    # 128K, 4 queries, one kv head: a 1.3 MB merge
    (1, 1, 40, 8, 131072, 8192, "kernel", None),  # a chunked layer sees its 8K window only
])
def test_plan_keeps_the_merge_in_the_kernel_only_where_it_is_small(monkeypatch, B, T, H, K, S, chunk, want, ns):
    from pallas_kernels.decode_attention import MERGE_MAX_BYTES, plan

    monkeypatch.delenv("MAVJAX_SPLIT_K_REDUCE", raising=False)
    combine, n = plan(B, T, H, K, S, chunk, 128, 128, 2)
    assert combine == want and (ns is None or n == ns), (combine, n)
    if combine == "kernel":
        assert n * max(1, 1 << (H // K * T - 1).bit_length()) * 128 * 4 <= MERGE_MAX_BYTES
    assert plan(B, T, H, K, S, chunk, 128, 128, 2, combine="kernel")[0] == "kernel"  # told: kept
    monkeypatch.setenv("MAVJAX_SPLIT_K_REDUCE", "attention=xla")
    assert plan(B, T, H, K, S, chunk, 128, 128, 2)[0] == "xla"


@pytest.mark.parametrize("factor", [1e5, 1e-6])
def test_fp8_cache_f16_dots_keep_any_q_magnitude(factor):
    """An FP8 cache is read into f16 dots (one conversion per two values, not bf16's three); f16 ends at 65504
    and goes subnormal below 6e-5, so each q row is rescaled by a power of two inside the kernel. q scaled by
    1e5 (beyond f16's range) or 1e-6 (f16-subnormal), with the softmax scale divided by the same factor, gives
    the reference's output; without the rescale the first would be inf/NaN and the second lose its digits."""
    case = (2, 2, 2, 5, 16, 64, [64, 30], None, 16, 3, FP8, jnp.bfloat16)
    B, T, K, G, Dh, S, lengths, chunk, bs, ns, kvd, qd = case
    inp, (qe, ke, ve) = make_inputs(11, B, T, K, G, Dh, S, lengths, kvd, qd)
    q = jnp.asarray(np.asarray(inp["q"], np.float32) * factor, jnp.bfloat16)
    scale = Dh ** -0.5 / factor
    inp["q"] = q
    ref = ref64(np.asarray(q, np.float32), ke, ve, inp["q_pos"], inp["k_pos"], chunk, scale)
    for combine in ("kernel", "xla"):
        out = decode_attention(**inp, chunk_size=chunk, scale=scale, block_s=bs, num_splits=ns, combine=combine,
                               interpret=INTERPRET)
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert rel_err(out, ref) < TOL["float8_e4m3fn"], (combine, rel_err(out, ref))
