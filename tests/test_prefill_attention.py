"""Blockwise prefill attention kernel (pallas_kernels.prefill_attention) against a float64 numpy reference of
mavjax.model.attend(q, k, v, attention_mask(q_pos, k_pos, chunk), scale), in Pallas interpret mode on CPU.

Error bounds, ||out - ref|| / ||ref||: float32 1e-5; bf16 1e-2 (q, k, v rounded to bf16 before both, the
probabilities cast to bf16 before P.V as the model's attend does). float32 cases are also checked element by
element, so an output block left unwritten (zeros) or a leaked invisible key (GARBAGE) fails.
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import lower_for_cuda, ref64, rel_err
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference, tile_ranges

TOL = {"float32": 1e-5, "bfloat16": 1e-2}
GARBAGE = 50.0  # what empty slots hold: any leak through the mask shows


def make(seed, B, T, S, H, K, Dh, dtype, lengths=None, layout="prefill"):
    """Inputs of a prefill into S slots: row b's prompt of lengths[b] tokens at slots 0.. (positions 0..), its
    queries at positions 0..T-1 (those >= its length: padding, q_pos -1); empty slots hold GARBAGE at k_pos -1.
    layout="shuffled": the same keys in a random slot order (any layout the positions describe)."""
    rng = np.random.default_rng(seed)
    lengths = [T] * B if lengths is None else lengths
    q = rng.standard_normal((B, T, H, Dh))
    k = np.full((B, S, K, Dh), GARBAGE)
    v = np.full((B, S, K, Dh), -GARBAGE)
    k_pos = np.full((B, S), -1, np.int64)
    q_pos = np.full((B, T), -1, np.int64)
    for b, n in enumerate(lengths):
        k[b, :n] = rng.standard_normal((n, K, Dh))
        v[b, :n] = rng.standard_normal((n, K, Dh))
        k_pos[b, :n] = np.arange(n)
        q_pos[b, :n] = np.arange(n)
        if layout == "shuffled":
            perm = rng.permutation(S)
            k[b], v[b], k_pos[b] = k[b, perm], v[b, perm], k_pos[b, perm]
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    inp = dict(q=cast(q), k=cast(k), v=cast(v), q_pos=jnp.asarray(q_pos, jnp.int32),
               k_pos=jnp.asarray(k_pos, jnp.int32))
    exact = [np.asarray(jnp.asarray(inp[n], jnp.float32), np.float64) for n in ("q", "k", "v")]
    return inp, exact


# name: (B, T, S, H, K, Dh, chunk, lengths, dtype, block_q, block_k, layout)
CASES = {
    "causal_f32": (1, 64, 64, 4, 2, 16, None, None, jnp.float32, 16, 16, "prefill"),
    "causal_bf16_gqa5": (1, 96, 96, 10, 2, 32, None, None, jnp.bfloat16, 32, 16, "prefill"),
    "mha": (2, 32, 32, 3, 3, 16, None, None, jnp.float32, 16, 32, "prefill"),
    "chunked": (1, 100, 100, 4, 1, 16, 24, None, jnp.float32, 16, 16, "prefill"),  # chunks across blocks
    "chunked_bf16": (2, 128, 128, 4, 2, 64, 32, None, jnp.bfloat16, 32, 32, "prefill"),
    "ragged_T_S": (2, 37, 53, 4, 2, 16, None, [37, 20], jnp.float32, 16, 16, "prefill"),  # pads T and S
    "padded_rows": (3, 48, 64, 2, 1, 16, 16, [48, 1, 30], jnp.float32, 16, 16, "prefill"),  # length 1, empties
    "short": (1, 1, 16, 2, 2, 16, None, [1], jnp.float32, 128, 64, "prefill"),  # one query, blocks lowered
    "shuffled": (2, 40, 64, 4, 2, 16, None, [40, 25], jnp.float32, 16, 16, "shuffled"),
    "shuffled_chunked": (1, 64, 80, 2, 1, 16, 16, [64], jnp.float32, 16, 16, "shuffled"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    B, T, S, H, K, Dh, chunk, lengths, dtype, bq, bk, layout = CASES[name]
    inp, (qe, ke, ve) = make(zlib.crc32(name.encode()), B, T, S, H, K, Dh, dtype, lengths, layout)
    scale = Dh ** -0.5
    out = prefill_attention(**inp, chunk_size=chunk, scale=scale, block_q=bq, block_k=bk, interpret=True)
    assert out.shape == (B, T, H, Dh) and out.dtype == dtype
    ref = ref64(qe, ke, ve, inp["q_pos"], inp["k_pos"], chunk, scale)
    assert rel_err(out, ref) < TOL[jnp.dtype(dtype).name], name
    if dtype == jnp.float32:  # every element: none left unwritten, none leaking a GARBAGE key
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)
    pad = np.asarray(inp["q_pos"]) < 0  # padding queries see nothing -> 0, as the reference
    assert np.all(np.asarray(out, np.float32)[pad] == 0)


def test_same_as_model_attend_in_bf16():
    """Against the model's own XLA attention on the same bf16 inputs (what kernels="xla" computes)."""
    inp, _ = make(3, 2, 64, 64, 8, 2, 64, jnp.bfloat16, [64, 50])
    for chunk in (None, 16):
        want = prefill_attention_reference(**inp, chunk_size=chunk, scale=0.125)
        got = prefill_attention(**inp, chunk_size=chunk, scale=0.125, block_q=32, block_k=16, interpret=True)
        w, g = (np.asarray(x, np.float32) for x in (want, got))
        assert np.linalg.norm(g - w) / np.linalg.norm(w) < 1e-2


def _brute_tiles(q_pos, k_pos, chunk, bq, bk):
    """[B, nq, nk] bools: tiles holding a key visible to some query of the block; tiles whose every slot is
    visible to every query of the block."""
    qp, kp = np.asarray(q_pos)[:, :, None], np.asarray(k_pos)[:, None, :]
    vis = (kp <= qp) & (kp >= 0)
    if chunk is not None:
        vis &= (kp // chunk) == (qp // chunk)
    B, T, S = vis.shape
    tiles = vis.reshape(B, T // bq, bq, S // bk, bk)
    return tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))


@pytest.mark.parametrize("chunk", [None, 32])
@pytest.mark.parametrize("layout", ["prefill", "shuffled"])
def test_tile_ranges_hold_every_visible_tile(chunk, layout):
    """tile_ranges is an envelope [lo, hi) of the visible tiles for any layout, and its unmasked run [flo, fhi)
    holds only tiles that every query of the block sees whole; for a prefill (slot i = position i) both are
    exact: the lower triangle of tiles (causal) or the query block's chunk, the run every tile but those
    crossing the diagonal or a chunk start, nothing for padding."""
    inp, _ = make(5, 2, 128, 128, 1, 1, 16, jnp.float32, [128, 40], layout)
    bq, bk = 16, 16
    r = np.asarray(tile_ranges(inp["q_pos"], inp["k_pos"], chunk, bq, bk))
    hit, full = _brute_tiles(inp["q_pos"], inp["k_pos"], chunk, bq, bk)
    B, nq, nk = hit.shape
    for b in range(B):
        for i in range(nq):
            lo, flo, fhi, hi = r[b, i]
            seen, whole = np.flatnonzero(hit[b, i]), np.flatnonzero(full[b, i])
            assert lo <= flo <= fhi <= hi and all(lo <= j < hi for j in seen), (b, i, r[b, i], seen)
            assert all(full[b, i, flo:fhi]), (b, i, r[b, i], whole)
            if layout == "prefill":
                assert (lo, hi) == ((seen[0], seen[-1] + 1) if seen.size else (0, 0)), (b, i, r[b, i], seen)
                assert list(range(flo, fhi)) == list(whole), (b, i, r[b, i], whole)
    if layout == "prefill":
        visited = int(np.sum(r[0, :, 3] - r[0, :, 0]))
        unmasked = int(np.sum(r[0, :, 2] - r[0, :, 1]))
        assert visited == (nq * (nq + 1) // 2 if chunk is None else nq * (chunk // bk + 1) // 2)
        assert unmasked == visited - nq  # only the diagonal tiles (bq = bk) carry a mask
        assert np.all(r[1, 40 // bq + 1:] == 0)  # row 1's padding query blocks visit no tile
        assert r[1, 40 // bq, 2] - r[1, 40 // bq, 1] == 0  # ... and its block with padding has no unmasked tile


def test_bad_inputs_are_named():
    inp, _ = make(0, 1, 16, 16, 4, 2, 16, jnp.float32)
    kw = dict(chunk_size=None, scale=0.25, interpret=True)
    with pytest.raises(ValueError, match="H % K"):
        prefill_attention(inp["q"], inp["k"][:, :, :1].repeat(3, 2), inp["v"], inp["q_pos"], inp["k_pos"], **kw)
    with pytest.raises(ValueError, match="q_pos"):
        prefill_attention(inp["q"], inp["k"], inp["v"], inp["q_pos"][:, :8], inp["k_pos"], **kw)
    with pytest.raises(ValueError, match="dtype"):
        prefill_attention(inp["q"], inp["k"].astype(jnp.bfloat16), inp["v"], inp["q_pos"], inp["k_pos"], **kw)


def test_lowered_for_cuda_at_maverick_width(monkeypatch):
    """Lowered for CUDA on the CPU (no GPU) at Maverick's full width, 4096 tokens: one Triton kernel whose three
    tile loops (masked, unmasked, masked) run between bounds it loads (scf.for over tile_ranges), bf16 dots with
    float32 accumulators of the default tiles (64 query rows x 64 keys, head_dim 128)."""
    sd = jax.ShapeDtypeStruct
    B, T, H, K, Dh = 1, 4096, 40, 8, 128
    shapes = (sd((B, T, H, Dh), jnp.bfloat16), sd((B, T, K, Dh), jnp.bfloat16), sd((B, T, K, Dh), jnp.bfloat16),
              sd((B, T), jnp.int32), sd((B, T), jnp.int32))
    f = lambda *a: prefill_attention(*a, chunk_size=8192, scale=Dh ** -0.5)  # noqa: E731
    hlo, texts = lower_for_cuda(f, *shapes, monkeypatch=monkeypatch)
    assert hlo.count("stablehlo.custom_call") == 1 and len(texts) == 1
    (ttir,) = texts
    loops = [ln for ln in ttir.splitlines() if "scf.for" in ln]
    assert len(loops) == 3 and all(re.search(r"scf\.for %\w+ = %\w+ to %\w+", ln) for ln in loops), loops
    dots = [ln for ln in ttir.splitlines() if "tt.dot" in ln]
    assert any("tensor<64x128xbf16> * tensor<128x64xbf16> -> tensor<64x64xf32>" in d for d in dots), dots
    assert any("tensor<64x64xbf16> * tensor<64x128xbf16> -> tensor<64x128xf32>" in d for d in dots), dots
