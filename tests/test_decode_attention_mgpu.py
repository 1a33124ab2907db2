"""The Mosaic GPU split-KV decode attention (pallas_kernels/decode_attention_mgpu.py) under Pallas' GPU
interpreter, against a float64 numpy reference of mavjax.model.attend with attention_mask, and its place in
decode_attention (mosaic=...).

Error bound ||out - ref|| / ||ref|| <= 1e-2 (ref on the bf16-rounded inputs): p and, with the merge in the kernel,
the partial outputs and merge weights are rounded to bf16 (<= 2^-9 relative each) before products that
accumulate in float32, and the output is bf16 (measured 2-4e-3). The interpreter fills every buffer with NaN first
(the output, the q rows the kernel never copies, the partials), so an output element never written, or a padding
row's garbage leaking through the mask, fails the isfinite check. It runs the grid in order and has no semaphores
or register layouts: the GPU form (layouts, swizzled tiles, the WGMMAs, the semaphores) is lowered for CUDA here
(test_lowers_for_the_gpu), and run on a GPU by scripts/bench_attention.py --tune --mosaic, which checks every
variant against XLA's attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ref64, rel_err
from pallas_kernels import decode_attention_mgpu as mg
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.mgpu_gemv import interpret_params

INTERP = interpret_params(True)
GARBAGE = 50.0  # what empty slots hold: any leak through the mask shows


def _inputs(seed, B, T, K, G, Dh, S, lengths):
    """Rows hold positions 0 .. lengths[b]-1 in the slots of that index (mavjax.kv_cache's layout), the other
    slots are empty (-1) and hold garbage; the T queries are each row's last T positions (< 0: padding queries)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, K * G, Dh)).astype(np.float32)
    k = rng.standard_normal((B, S, K, Dh)).astype(np.float32)
    v = rng.standard_normal((B, S, K, Dh)).astype(np.float32)
    lengths = np.asarray(lengths)
    slot = np.arange(S)
    k_pos = np.where(slot[None] < lengths[:, None], slot[None], -1).astype(np.int32)
    k[k_pos < 0], v[k_pos < 0] = GARBAGE, -GARBAGE
    q_pos = (lengths[:, None] - T + np.arange(T)[None]).astype(np.int32)
    qj, kj, vj = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    return qj, kj, vj, jnp.asarray(q_pos), jnp.asarray(k_pos)


# (B, T, K, G, Dh, S, lengths, chunk, num_splits, merge)
CASES = {
    # 8 splits over 3 tiles: empty splits (m = -inf, l = 0) in the in-kernel merge; rows of different lengths
    "kernel_empty_splits": (2, 1, 2, 5, 64, 192, [150, 1], None, 8, "kernel"),
    # chunked layer, T = 2 straddling a chunk boundary (63 | 64), G = 3 (rows padded to 8 per position)
    "kernel_chunked_T2": (2, 2, 1, 3, 64, 192, [65, 130], 64, 4, "kernel"),
    # verification: T = 4 positions x 5 heads = 32 rows, causal among them; one split: output from the registers
    "kernel_one_split_T4": (1, 4, 2, 5, 128, 128, [100], None, 1, "kernel"),
    # G = 16 (two row groups a position), T = 1 with a padding query row (length 0 -> q_pos = -1: zeros)
    "kernel_G16_padding_row": (2, 1, 1, 16, 64, 128, [128, 0], None, 4, "kernel"),
    # the XLA merge: an odd split count the kernel's merge does not take, chunked, a length-1 row
    "xla_chunked_odd_splits": (2, 1, 2, 5, 64, 256, [200, 1], 128, 3, "xla"),
    # S = 200, not whole tiles: the last tile runs past S (zeros, k_pos 0 included, masked by slot)
    "kernel_ragged_cache": (2, 1, 2, 5, 64, 200, [200, 70], None, 8, "kernel"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    B, T, K, G, Dh, S, lengths, chunk, ns, merge = CASES[name]
    q, k, v, q_pos, k_pos = _inputs(len(name), B, T, K, G, Dh, S, lengths)
    out = mg.decode_attention_mgpu(q, k, v, q_pos, k_pos, chunk_size=chunk, scale=Dh ** -0.5, num_splits=ns,
                                   merge=merge, interpret=INTERP)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    ref = ref64(*(np.asarray(a, np.float32) for a in (q, k, v)), np.asarray(q_pos), np.asarray(k_pos), chunk,
                Dh ** -0.5)
    assert rel_err(out, ref) <= 1e-2, rel_err(out, ref)
    dead = np.asarray(q_pos) < 0  # padding queries see nothing: exactly zero
    assert (out[dead] == 0).all()


def test_through_decode_attention_and_merges_agree():
    """decode_attention(mosaic=True) takes this kernel (combine -> its merge); both merges give the same output to
    the bf16 rounding of the kernel's partials."""
    q, k, v, q_pos, k_pos = _inputs(3, 1, 1, 2, 5, 64, 256, [256])
    kw = dict(chunk_size=None, scale=0.125, interpret=True, mosaic=True, num_splits=4)
    a = np.asarray(decode_attention(q, k, v, q_pos, k_pos, **kw), np.float32)
    b = np.asarray(decode_attention(q, k, v, q_pos, k_pos, combine="xla", **kw), np.float32)
    assert rel_err(a, b) <= 1e-2 and np.isfinite(a).all()


def test_what_it_takes_and_errors():
    assert mg.supported(1, 40, 8, 8192, 128, jnp.bfloat16, jnp.bfloat16)
    assert mg.supported(4, 40, 8, 8192, 128, jnp.bfloat16, jnp.bfloat16)  # 4 x 8 rows
    assert not mg.supported(9, 40, 8, 8192, 128, jnp.bfloat16, jnp.bfloat16)  # 72 rows > 64
    assert not mg.supported(1, 40, 8, 8192, 128, jnp.bfloat16, jnp.float8_e4m3fn)  # FP8 cache: Triton's
    assert mg.supported(1, 40, 8, 8200, 128, jnp.bfloat16, jnp.bfloat16)  # not whole tiles: the last is masked
    assert not mg.supported(1, 40, 8, 8196, 128, jnp.bfloat16, jnp.bfloat16)  # k_pos rows not 16-byte aligned
    assert not mg.supported(1, 40, 8, 32, 128, jnp.bfloat16, jnp.bfloat16)  # less than a tile
    assert not mg.supported(1, 40, 8, 8192, 96, jnp.bfloat16, jnp.bfloat16)  # Dh % 64
    assert mg.merge_fits(16, 5, 1) and mg.merge_fits(1, 5, 9) and mg.merge_fits(2, 5, 4)
    assert not mg.merge_fits(3, 5, 1)  # 24 rows: not a multiple of the WGMMA's 64
    assert not mg.merge_fits(64, 5, 1)  # 512 rows: more than one TMA copy moves
    q, k, v, q_pos, k_pos = _inputs(0, 1, 1, 1, 5, 64, 128, [128])
    with pytest.raises(ValueError, match="merge must be"):
        mg.attention(q, k, v, q_pos, k_pos, chunk_size=None, scale=1.0, num_splits=3, merge="kernel",
                     interpret=INTERP)
    with pytest.raises(ValueError, match="bf16 q and cache"):
        decode_attention(q, k.astype(jnp.float8_e4m3fn), v.astype(jnp.float8_e4m3fn), q_pos, k_pos,
                         chunk_size=None, scale=1.0, mosaic=True, interpret=True)
    with pytest.raises(ValueError, match="no kv_range"):
        decode_attention(q, k, v, q_pos, k_pos, chunk_size=None, scale=1.0, mosaic=True, interpret=True,
                         kv_range=jnp.array([[0, 128]], jnp.int32))
    with pytest.raises(ValueError, match="do not match"):
        mg.decode_attention_mgpu(q, k, v[:, :64], q_pos, k_pos, chunk_size=None, scale=1.0, interpret=INTERP)


@pytest.mark.parametrize("B,K,S,chunk,T,want", [
    (1, 8, 8192, None, 1, 16),  # 8 pairs: one wave of 16 splits, 8 tiles each
    (8, 8, 8192, None, 1, 2),  # 64 pairs: 2
    (1, 1, 1024, None, 1, 16),  # 16 tiles: one each
    (1, 8, 131072, 8192, 1, 16),  # a chunked layer sees its chunk (+ a tile): 129 tiles over 16 splits
    (256, 8, 8192, None, 1, 1),  # more pairs than SMs
])
def test_default_num_splits(B, K, S, chunk, T, want):
    assert mg.default_num_splits(B, K, S, chunk, 64, T, num_sms=132) == want


def test_lowers_for_the_gpu():
    """The GPU form (TMA copies of q's rows and the swizzled K/V tiles, the WGMMAs with p from registers, the
    layouts of the row statistics and masks, the merge's semaphores and its WGMMA) lowered to Mosaic GPU for
    CUDA here on the CPU: a layout, tiling or copy Mosaic rejects fails this test."""
    q = jnp.ones((1, 1, 40, 128), jnp.bfloat16)
    for S, merge, ns in ((8192, "kernel", 16), (8192, "kernel", 1), (8192, "xla", 16), (8200, "kernel", 16)):
        k = jnp.ones((1, S, 8, 128), jnp.bfloat16)
        qp, kp = jnp.ones((1, 1), jnp.int32), jnp.ones((1, S), jnp.int32)
        f = jax.jit(lambda *a, merge=merge, ns=ns: mg.decode_attention_mgpu(
            *a, chunk_size=None, scale=0.1, num_splits=ns, merge=merge))
        text = f.trace(q, k, k, qp, kp).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


@pytest.mark.parametrize("S,chunk,kv,want", [
    (8192, None, jnp.bfloat16, True),  # a global layer at 8K: the Mosaic GPU kernel
    (8192, 4096, jnp.bfloat16, True),  # a chunked one whose window is LONG_SPAN
    (1024, None, jnp.bfloat16, False),  # short spans stay on Triton's (the 8-way rank at 1K: 5.3 against 5.7 us)
    (8192, None, jnp.float8_e4m3fn, False),  # FP8 cache: Triton's
])
def test_default_dispatch(monkeypatch, S, chunk, kv, want):
    """decode_attention(mosaic=None) on a Hopper GPU takes the Mosaic GPU kernel where a query sees LONG_SPAN slots
    or more of a bf16 cache (docs/benchmarks.md section 34), Triton's elsewhere; off Hopper never. Both kernels
    are replaced by spies: this checks the choice only."""
    import pallas_kernels.decode_attention as da
    import pallas_kernels.decode_attention_mgpu as mod

    taken = []
    monkeypatch.setattr(mod, "decode_attention_mgpu", lambda q, *a, **k: taken.append("mosaic") or q)
    monkeypatch.setattr(da, "_call", lambda q, *a, **k: taken.append("triton") or [q.reshape(q.shape[0], -1,
                                                                                              q.shape[-1])])
    q = jnp.zeros((1, 1, 10, 64), jnp.bfloat16)
    k = jnp.zeros((1, S, 2, 64), kv)
    qp, kp = jnp.full((1, 1), S - 1, jnp.int32), jnp.arange(S, dtype=jnp.int32)[None]
    scales = dict(k_scale=jnp.float32(1.0), v_scale=jnp.float32(1.0)) if kv != jnp.bfloat16 else {}
    for hopper in (False, True):
        monkeypatch.setattr("pallas_kernels.mgpu_gemv.on_hopper", lambda h=hopper: h)
        taken.clear()
        decode_attention.__wrapped__(q, k, k, qp, kp, chunk_size=chunk, scale=0.125, interpret=True,
                                     combine="kernel", **scales)
        assert taken == ["mosaic" if hopper and want else "triton"]
