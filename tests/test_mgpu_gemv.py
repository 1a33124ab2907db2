"""The Mosaic GPU weight-only FP8 GEMM (pallas_kernels/mgpu_gemv.py) under Pallas' GPU interpreter, against its
jnp reference, and its place in fp8_matmul / gate_up_swiglu and the model.

Error bound (||out - ref|| / ||ref||, ref = dequantize then float32 matmul): e4m3 -> f16 and -> bf16 are exact;
on the float16 path x is scaled into f16 by an exact power of two per row (bf16's 8 significant bits fit f16's
11), on the bfloat16 path (bf16 x, taken as it is) the weight is widened to bf16; either way the products are
exact in f32 and accumulate in f32, so the kernel computes the reference's function up to f32 summation order
plus the final cast: 1e-5 with a float32 output, 1e-2 with bf16 (the cast's <= 2^-9 per element). The interpreter fills every buffer with NaN
first, so an output element the kernel never writes fails the isfinite check. The interpreter runs the grid, the
K splits and the TMA pipeline as the GPU does but has no register operands, layouts or transposed refs, so the
GPU's own form of the loads is checked by lowering it for CUDA (test_lowers_for_the_gpu) and on the GPU by
scripts/check_kernels_gpu.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mgpu_gemv
from pallas_kernels.fp8_gemm import FP8, fp8_matmul, fp8_matmul_ref, quantize_weight_per_channel

INTERP = mgpu_gemv.interpret_params(True)


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _weights(seed, K, Ns):
    out = []
    for i, n in enumerate(Ns):
        kw, ko = jax.random.split(jax.random.key(seed * 31 + i))
        w = jax.random.normal(kw, (K, n)) * 10.0 ** jax.random.uniform(ko, (1, n), minval=-3, maxval=-1)
        out.append(quantize_weight_per_channel(w))
    return out


@pytest.mark.parametrize("w_layout", ["kn", "nk", "tiled"])
@pytest.mark.parametrize("M,K,Ns,cfg,scale_x", [  # scale_x: bf16 magnitudes f16 holds only with the row scaling
    (1, 128, (64,), {}, 1.0),
    (3, 512, (128, 192), dict(tile_n=64, split_k=2, stages=2), 3e4),  # two weights, one launch; 2 splits of 2
    (16, 192, (64,), dict(split_k=3, stages=1), 1e-30),  # K = 3 x 64: the 64-deep tile, one step per split
    (9, 384, (256,), dict(tile_n=128, split_k=1, stages=4), 1.0),  # rows padded to 16; 3 steps, 4-deep pipeline
    (61, 256, (64,), dict(split_k=2), 1.0),  # the bf16 path's 64 rows (float16: beyond its 16, an error below)
])
@pytest.mark.parametrize("compute_dtype", [None, jnp.float16])  # None: bf16 x taken as it is (the bf16 path)
def test_fp8_gemv_matches_reference(w_layout, M, K, Ns, cfg, scale_x, compute_dtype):
    if M > mgpu_gemv.max_rows(compute_dtype or jnp.bfloat16):
        with pytest.raises(ValueError, match="1..16 rows on its float16 path"):
            mgpu_gemv.fp8_gemv_multi(jnp.ones((M, K), jnp.bfloat16), *zip(*_weights(0, K, Ns)), w_layout="kn",
                                     compute_dtype=compute_dtype, interpret=INTERP)
        return
    x = (jax.random.normal(jax.random.key(M), (M, K)) * scale_x).astype(jnp.bfloat16)
    x = x.at[0].multiply(7.0)  # rows of different magnitudes
    ws = _weights(M + K, K, Ns)
    if w_layout == "tiled":  # tile_weight's layout: the tiles are the weight's (cfg's, else the rule's)
        tn = cfg.get("tile_n") or mgpu_gemv.default_config(K, Ns, rows=mgpu_gemv.padded_rows(M),
                                                           w_layout="tiled")["tile_n"]
        cfg = {k: v for k, v in cfg.items() if k != "tile_n"}
        args = [mgpu_gemv.tile_weight(w, tn, mgpu_gemv.tile_k_for(K)) for w, _ in ws], [s for _, s in ws]
        np.testing.assert_array_equal(np.asarray(mgpu_gemv.reference(x, args[0][0], ws[0][1], w_layout="tiled")),
                                      np.asarray(mgpu_gemv.reference(x, *ws[0])))  # the layout round-trips
    else:
        args = [w if w_layout == "kn" else w.T for w, _ in ws], [s for _, s in ws]
    outs = mgpu_gemv.fp8_gemv_multi(x, *args, w_layout=w_layout, out_dtype=jnp.float32, interpret=INTERP,
                                    compute_dtype=compute_dtype, **cfg)
    for y, (w, s) in zip(outs, ws):
        ref = mgpu_gemv.reference(x, w, s, out_dtype=jnp.float32)
        assert y.shape == ref.shape and bool(jnp.isfinite(y).all())
        assert _err(y, ref) < 1e-5, _err(y, ref)
        np.testing.assert_allclose(np.asarray(ref), np.asarray(fp8_matmul_ref(x, w, s, out_dtype=jnp.float32)),
                                   rtol=1e-5, atol=1e-30)  # the two references agree
    y = mgpu_gemv.fp8_gemv(x, *(a[0] for a in args), w_layout=w_layout, interpret=INTERP)  # bf16 out
    assert y.dtype == jnp.bfloat16 and _err(y, mgpu_gemv.reference(x, *ws[0])) < 1e-2


@pytest.mark.parametrize("w_layout", ["nk", "tiled"])
@pytest.mark.parametrize("M,K,Ns,cfg", [
    (1, 128, (64,), {}),
    (9, 384, (128, 192), dict(split_k=3, stages=1)),  # two weights, one launch; one K step per split
    (61, 512, (64,), dict(split_k=2, stages=2)),  # 64 rows: the WGMMA's N = 64
])
def test_fp8_path_matches_reference(w_layout, M, K, Ns, cfg):
    """The FP8 x FP8 path (x quantized per token, both WGMMA operands FP8 from shared memory) computes the
    reference's function of x's e4m3 form exactly up to f32 summation order (1e-5), and of x itself to e4m3's
    rounding of x: 3 significand bits, a relative error of at most 2^-4 per element and ~2^-4 / sqrt(3) = 3.6%
    r.m.s. over random values, so 6e-2 on ||y - ref|| / ||ref|| (2.6e-2 measured, here and on the GPU)."""
    from pallas_kernels.fp8_gemm import dequantize_activation, quantize_activation_per_token

    x = (jax.random.normal(jax.random.key(M), (M, K)) * 3.0).astype(jnp.bfloat16)
    x = x.at[0].multiply(50.0)  # rows of different magnitudes: one scale per token
    ws = _weights(M + K + 1, K, Ns)
    tn = 64
    args = ([mgpu_gemv.tile_weight(w, tn, mgpu_gemv.tile_k_for(K)) for w, _ in ws] if w_layout == "tiled"
            else [w.T for w, _ in ws]), [s for _, s in ws]
    outs = mgpu_gemv.fp8_gemv_multi(x, *args, w_layout=w_layout, out_dtype=jnp.float32, compute_dtype=FP8,
                                    interpret=INTERP, **cfg)
    xq = dequantize_activation(*quantize_activation_per_token(x))  # [M, K] float32: x as the kernel sees it
    for y, (w, s) in zip(outs, ws):
        assert y.shape == (M, w.shape[1]) and bool(jnp.isfinite(y).all())
        assert _err(y, mgpu_gemv.reference(xq, w, s, out_dtype=jnp.float32)) < 1e-5
        assert 1e-3 < _err(y, mgpu_gemv.reference(x, w, s, out_dtype=jnp.float32)) < 6e-2  # x was rounded
    (w, s), = ws[:1]
    y = mgpu_gemv.fp8_gemv(x, args[0][0], s, w_layout=w_layout, compute_dtype=FP8, interpret=INTERP)  # bf16 out
    assert y.dtype == jnp.bfloat16 and _err(y, mgpu_gemv.reference(xq, w, s)) < 1e-2


@pytest.mark.parametrize("w_layout,M", [("nk", 8), ("nk", 64), ("tiled", 16)])
def test_fp8_path_lowers_for_the_gpu(w_layout, M):
    """The FP8 path's WGMMA (both operands e4m3 from swizzled shared memory, x's tile read transposed: K-major)
    lowers to Mosaic GPU for CUDA here on the CPU; Mosaic rejects an FP8 operand that is not K-major."""
    K, N = 5120, 2048
    w = jnp.zeros((N, K), FP8)
    w = mgpu_gemv.tile_weight(w, 64, 128, "nk") if w_layout == "tiled" else w
    f = jax.jit(functools.partial(mgpu_gemv.fp8_gemv, w_layout=w_layout, compute_dtype=FP8))
    text = f.trace(jnp.ones((M, K), jnp.bfloat16), w, jnp.ones((N,), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "griddepcontrol.wait" in text


def test_widen_is_exact():
    """Every e4m3 value (all 256 bit patterns but the two NaNs) widens exactly to float16 and to bfloat16 (through
    float32: Hopper has no e4m3 -> bf16 instruction)."""
    w = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), FP8)
    want = np.asarray(w.astype(jnp.float32))
    for cdt in (jnp.float16, jnp.bfloat16):
        got = mgpu_gemv.widen(w, cdt)
        assert got.dtype == cdt
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32))[~np.isnan(want)], want[~np.isnan(want)])


def test_compute_dtype_choice():
    """bf16 x goes in as it is (no widening kernels, no row factors); f32 x, or x handed over widened, takes the
    float16 path; the kernel's name says nothing of it, its x operand's dtype does."""
    from helpers import kernel_calls

    (w, s), = _weights(5, 128, (64,))

    def x_dtypes(x, **kw):
        jaxpr = jax.make_jaxpr(functools.partial(mgpu_gemv.fp8_gemv, interpret=INTERP, **kw))(x, w, s).jaxpr
        return [str(e.invars[0].aval.dtype) for e in kernel_calls(jaxpr)]

    assert x_dtypes(jnp.ones((2, 128), jnp.bfloat16)) == ["bfloat16"]
    assert x_dtypes(jnp.ones((2, 128), jnp.float32)) == ["float16"]
    assert x_dtypes(jnp.ones((2, 128), jnp.bfloat16), compute_dtype=jnp.float16) == ["float16"]


def test_default_config_rule():
    """Section 18's sweep: 128-wide tiles from 16 MB, the K split for about three programs per SM, <= 4 stages;
    section 27: every program resident in one wave (shared memory per SM), 3 stages where that allows more."""
    assert mgpu_gemv.default_config(640, [5120]) == dict(tile_n=64, split_k=5, stages=1)  # o, 8-way
    assert mgpu_gemv.default_config(2048, [5120]) == dict(tile_n=64, split_k=4, stages=4)  # down, 8-way
    assert mgpu_gemv.default_config(5120, [16384]) == dict(tile_n=128, split_k=2, stages=4)  # full gate
    # [N, K] and tiled weights: 64-wide tiles (a tile row is 128 bytes of K already; section 28's best at full width)
    assert mgpu_gemv.default_config(5120, [16384], w_layout="nk") == dict(tile_n=64, split_k=1, stages=4)
    assert mgpu_gemv.default_config(16384, [5120], w_layout="tiled") == dict(tile_n=64, split_k=4, stages=4)
    # the full down projection at 16 tokens: 320 programs fit one wave at 3 stages (3 per SM), not at 4 (2)
    assert mgpu_gemv.default_config(16384, [5120], rows=16) == dict(tile_n=128, split_k=8, stages=3)
    assert mgpu_gemv.default_config(16384, [5120], rows=8) == dict(tile_n=128, split_k=8, stages=4)
    # above 16 rows (section 26): 64-wide tiles, float32 partials within a quarter of the weight's bytes
    assert mgpu_gemv.default_config(5120, [16384], rows=64) == dict(tile_n=64, split_k=1, stages=4)
    assert mgpu_gemv.default_config(5120, [5120], rows=64) == dict(tile_n=64, split_k=4, stages=3)  # not 10
    assert mgpu_gemv.default_config(16384, [5120], rows=64) == dict(tile_n=64, split_k=4, stages=3)
    assert mgpu_gemv.default_config(5120, [5120], rows=16) == dict(tile_n=128, split_k=8, stages=3)
    for K, Ns, rows in [(5120, [2048], 64), (2048, [5120], 32), (640, [5120], 64), (16384, [5120], 24)]:
        c = mgpu_gemv.default_config(K, Ns, rows=rows)
        assert c["tile_n"] == 64 and (K // mgpu_gemv.tile_k_for(K)) % c["split_k"] == 0
        assert 4 * c["split_k"] * sum(Ns) * rows <= K * sum(Ns) / 4 or c["split_k"] == 1
    for K, Ns, rows in [(640, [5120], 8), (5120, [2048, 2048], 8), (5120, [896], 16), (192, [64], 8),
                        (64, [128, 64], 8), (16384, [5120], 16), (5120, [16384], 32), (8192, [5120, 5120], 16)]:
        c = mgpu_gemv.default_config(K, Ns, rows=rows)
        tk = mgpu_gemv.tile_k_for(K)
        assert all(n % c["tile_n"] == 0 for n in Ns) and (K // tk) % c["split_k"] == 0
        assert 1 <= c["stages"] <= 4
        programs = sum(Ns) // c["tile_n"] * c["split_k"]  # one wave: all resident at once, or no split
        assert c["split_k"] == 1 or programs <= mgpu_gemv.resident(c["tile_n"], tk, rows, c["stages"]) * 132


def test_smem_bytes_matches_mosaic():
    """`smem_bytes` against what Mosaic GPU itself counted for these kernels on an H200 (its "exceeds available
    shared memory: smem_bytes=..." errors, section 27's sweep): stages x (weight tile + x tile + barrier)."""
    assert mgpu_gemv.smem_bytes(256, 128, 64, 6) == 294960
    assert mgpu_gemv.smem_bytes(256, 128, 16, 8) == 294976
    assert mgpu_gemv.smem_bytes(256, 128, 32, 6) == 245808
    assert mgpu_gemv.resident(128, 128, 8, 4) == 3 and mgpu_gemv.resident(128, 128, 16, 4) == 2
    # the FP8 path's x tile holds one byte a value
    assert mgpu_gemv.smem_bytes(64, 128, 64, 4, x_bytes=1) == 4 * (64 * 128 + 64 * 128 + 8)
    assert mgpu_gemv.resident(64, 128, 64, 4, x_bytes=1) == 3 > mgpu_gemv.resident(64, 128, 64, 4)


def test_bad_input():
    x = jnp.ones((2, 128), jnp.bfloat16)
    (w, s), = _weights(0, 128, (64,))
    with pytest.raises(ValueError, match="1..16 rows on its float16 path"):
        mgpu_gemv.fp8_gemv(jnp.ones((17, 128), jnp.float32), w, s, interpret=INTERP)
    with pytest.raises(ValueError, match="1..64 rows on its bfloat16 path"):
        mgpu_gemv.fp8_gemv(jnp.ones((65, 128), jnp.bfloat16), w, s, interpret=INTERP)
    with pytest.raises(ValueError, match="K % 64"):
        mgpu_gemv.fp8_gemv(jnp.ones((2, 96), jnp.bfloat16), w[:96], s, interpret=INTERP)
    with pytest.raises(ValueError, match=r"scales .* must be \[N\]"):
        mgpu_gemv.fp8_gemv(x, w, s[:32], interpret=INTERP)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        mgpu_gemv.gemv_partials(jnp.ones((8, 128), jnp.float16), [w.astype(jnp.bfloat16)], interpret=INTERP)
    with pytest.raises(ValueError, match="tile_n"):
        mgpu_gemv.gemv_partials(jnp.ones((8, 128), jnp.float16), [w], tile_n=128, interpret=INTERP)
    with pytest.raises(ValueError, match="padded to a multiple of 8"):
        mgpu_gemv.gemv_partials(jnp.ones((3, 128), jnp.float16), [w], interpret=INTERP)
    with pytest.raises(ValueError, match="bfloat16 path takes bf16 x"):
        mgpu_gemv.fp8_gemv(jnp.ones((2, 128), jnp.float32), w, s, compute_dtype=jnp.bfloat16, interpret=INTERP)
    wt = mgpu_gemv.tile_weight(w, 64, 64)  # [1, 2, 64, 64]
    with pytest.raises(ValueError, match=r"tile_n=128 for tiled weights of tile \(64, 64\)"):
        mgpu_gemv.fp8_gemv(x, wt, s, w_layout="tiled", tile_n=128, interpret=INTERP)
    with pytest.raises(ValueError, match="tiled weights .* must be"):  # tiles other than the kernel's
        mgpu_gemv.gemv_partials(jnp.ones((8, 128), jnp.float16), [wt], w_layout="tiled", interpret=INTERP)
    with pytest.raises(ValueError, match="must divide by the tiles"):
        mgpu_gemv.tile_weight(w, 128, 64)
    # the FP8 path: K-major weights only, x quantized by the op itself, up to 64 rows
    with pytest.raises(ValueError, match="needs K-major weights"):
        mgpu_gemv.fp8_gemv(x, w, s, compute_dtype=FP8, interpret=INTERP)
    with pytest.raises(ValueError, match="need the weight K-major"):
        mgpu_gemv.gemv_partials(jnp.ones((8, 128), FP8), [w], compute_dtype=FP8, interpret=INTERP)
    with pytest.raises(ValueError, match="1..64 rows on its float8_e4m3fn path"):
        mgpu_gemv.fp8_gemv(jnp.ones((65, 128), jnp.bfloat16), w.T, s, w_layout="nk", compute_dtype=FP8,
                           interpret=INTERP)
    with pytest.raises(ValueError, match="quantizes x itself"):
        mgpu_gemv.operand(x, widened=(jnp.ones((8, 128), jnp.float16), jnp.ones((8,))), compute_dtype=FP8)


@pytest.mark.parametrize("w_layout,K,Ns", [("kn", 5120, (2048, 2048)), ("kn", 640, (5120,)), ("nk", 192, (128,)),
                                          ("kn", 192, (64,)), ("tiled", 5120, (4096,))])
@pytest.mark.parametrize("x_dtype,M", [(jnp.bfloat16, 8), (jnp.float32, 8), (jnp.bfloat16, 64)])  # bf16 / f16 path
def test_lowers_for_the_gpu(w_layout, K, Ns, x_dtype, M):
    """The GPU form (register operands, the transposed FP8 load and its layout change, the widening to f16 or,
    through f32, to bf16, swizzled TMA tiles) is lowered to Mosaic GPU for CUDA here on the CPU: a layout, tiling
    or conversion Mosaic rejects (e4m3 -> bf16 directly, say) fails this test; also with the bf16 path's 64 rows
    (the WGMMA's N = 64)."""
    x = jnp.ones((M, K), x_dtype)
    ws = [jnp.zeros((K, n) if w_layout == "kn" else (n, K), FP8) for n in Ns]
    ws = [mgpu_gemv.tile_weight(w, 64, 128, "nk") for w in ws] if w_layout == "tiled" else ws
    ss = [jnp.ones((n,), jnp.float32) for n in Ns]
    f = jax.jit(functools.partial(mgpu_gemv.fp8_gemv_multi, w_layout=w_layout))
    text = f.trace(x, ws, ss).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert "griddepcontrol.wait" in text  # its first read waits for the producer of x under XLA's PDL


def test_dispatch_from_fp8_matmul_and_gate_up(monkeypatch):
    """fp8_matmul and gate_up_swiglu take the Mosaic GPU kernel where asked: mosaic=True always (the interpreter
    here); None where `wanted` (on a Hopper GPU: up to 64 rows of bf16 x, 16 of other x), without Triton tiles,
    and for gate_up_swiglu only with x already widened (x_widened, what the norm kernel gives the model's dense
    MLPs) or bf16 x above 16 rows; False, fp8_matmul's default, never. An unsupported problem with mosaic=True
    is an error."""
    from pallas_kernels.fused_gemm import gate_up_swiglu, gate_up_swiglu_ref
    from pallas_kernels.upcast import to_compute
    from helpers import pallas_call_names

    x = jax.random.normal(jax.random.key(1), (2, 128)).astype(jnp.bfloat16)
    (w, s), (wu, su) = _weights(3, 128, (128, 128))
    xc, rs = to_compute(x, jnp.float16)
    wide = (jnp.pad(xc, ((0, 6), (0, 0))), jnp.pad(rs, (0, 6), constant_values=1.0))  # 8 rows

    def names(f):
        return pallas_call_names(jax.make_jaxpr(f)(x).jaxpr)

    y = fp8_matmul(x, w, s, mosaic=True, interpret=True)
    assert _err(y, fp8_matmul_ref(x, w, s)) < 1e-2
    assert _err(fp8_matmul(x, w.T, s, w_transposed=True, mosaic=True, interpret=True), fp8_matmul_ref(x, w, s)) < 1e-2
    ref = gate_up_swiglu_ref(x, w, s, wu, su)
    assert _err(gate_up_swiglu(x, w, s, wu, su, mosaic=True, interpret=True), ref) < 1e-2
    assert _err(gate_up_swiglu(x, w, s, wu, su, mosaic=True, x_widened=wide, interpret=True), ref) < 1e-2
    gemm = lambda a, **k: fp8_matmul(a, w, s, interpret=True, **k)  # noqa: E731
    gate_up = lambda a, **k: gate_up_swiglu(a, w, s, wu, su, interpret=True, **k)  # noqa: E731
    assert names(lambda a: gemm(a, mosaic=None))[0].startswith("fp8_weight_only")  # a CPU: Triton's
    assert names(lambda a: gate_up(a, x_widened=wide))[0].startswith("fp8_gate_up_swiglu")
    monkeypatch.setattr(mgpu_gemv, "on_hopper", lambda: True)
    jax.clear_caches()  # the choice is made at trace time
    assert names(lambda a: gemm(a, mosaic=None))[0].startswith("mgpu_fp8_gemv")
    assert names(gemm)[0].startswith("fp8_weight_only")  # fp8_matmul's default: Triton's
    assert names(lambda a: gemm(a, mosaic=None, block_n=32))[0].startswith("fp8_weight_only")  # a tuner's tiles
    assert names(lambda a: gate_up(a, x_widened=wide))[0].startswith("mgpu_fp8_gemv")
    assert names(gate_up)[0].startswith("fp8_gate_up_swiglu")  # not widened: Triton's
    # above 16 rows: bf16 x on the bf16 path up to 64 rows (section 26), other x and more rows Triton's
    x32 = jax.random.normal(jax.random.key(2), (32, 128)).astype(jnp.bfloat16)
    for rows, dtype, mosaic in [(32, jnp.bfloat16, True), (64, jnp.bfloat16, True), (65, jnp.bfloat16, False),
                                (32, jnp.float32, False)]:
        xr = jnp.ones((rows, 128), dtype)
        for f in (lambda a: gemm(xr, mosaic=None), lambda a: gate_up(xr)):
            assert names(f)[0].startswith("mgpu_fp8_gemv") == mosaic, (rows, dtype, names(f))
    assert _err(gate_up(x32), gate_up_swiglu_ref(x32, w, s, wu, su)) < 1e-2  # the automatic choice, interpreted
    # asked for, bf16 x up to 64 rows (its bf16 path), other x up to 16; past them an error naming the limit
    assert names(lambda a: gemm(x32, mosaic=True))[0].startswith("mgpu_fp8_gemv")
    assert _err(fp8_matmul(x32, w, s, mosaic=True, interpret=True), fp8_matmul_ref(x32, w, s)) < 1e-2
    with pytest.raises(ValueError, match=r"Mosaic GPU GEMM takes 1..64 rows \(bfloat16 path\)"):
        fp8_matmul(jnp.ones((65, 128), jnp.bfloat16), w, s, mode="weight_only", mosaic=True, interpret=True)
    with pytest.raises(ValueError, match=r"Mosaic GPU GEMM takes 1..16 rows \(float16 path\)"):
        fp8_matmul(jnp.ones((17, 128), jnp.float32), w, s, mode="weight_only", mosaic=True, interpret=True)
    with pytest.raises(ValueError, match="widened must be float16"):
        gate_up_swiglu(x, w, s, wu, su, x_widened=(wide[0][:4], wide[1]), interpret=True)
    # fp8_fp8 mode: the FP8 x FP8 path on [N, K] weights where asked (or automatic on Hopper), up to 64 rows;
    # [K, N] weights stay on Triton automatically and are an error when the Mosaic kernel is asked for
    from pallas_kernels.fp8_gemm import dequantize_activation, quantize_activation_per_token

    prod = lambda a, wt, **k: fp8_matmul(a, wt, s, mode="fp8_fp8", interpret=True, **k)  # noqa: E731
    assert names(lambda a: prod(a, w.T, w_transposed=True, mosaic=None))[0].startswith("mgpu_fp8_gemv")
    assert names(lambda a: prod(a, w, mosaic=None))[0].startswith("fp8_fp8")
    assert names(lambda a: prod(a, w.T, w_transposed=True))[0].startswith("fp8_fp8")  # mosaic=False: Triton's
    assert names(lambda a: prod(jnp.ones((65, 128), jnp.bfloat16), w.T, w_transposed=True,
                                mosaic=None))[0].startswith("fp8_fp8")
    y = prod(x32, w.T, w_transposed=True, mosaic=True)
    xq = dequantize_activation(*quantize_activation_per_token(x32))
    assert _err(y, mgpu_gemv.reference(xq, w, s)) < 1e-2  # x's e4m3 form, bf16 output
    assert _err(y, prod(x32, w.T, w_transposed=True)) < 1e-2  # Triton's FP8 x FP8 kernel: the same function
    with pytest.raises(ValueError, match="K-major weights only"):
        prod(x32, w, mosaic=True)


def test_bench_layout_configs_paths():
    """scripts/bench_mgpu_gemv.py --layouts: the FP8 paths only on K-major layouts ([N, K], tiled), the float16 path
    only up to its 16 rows (the bfloat16 one above), and only the paths asked for."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_mgpu_gemv.py"
    spec = importlib.util.spec_from_file_location("bench_mgpu_gemv", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def paths(M, layouts, **kw):
        return {(c["layout"], c["path"]) for c in bench.layout_configs(5120, 16384, M, layouts, **kw)}

    assert paths(8, ("kn", "nk", "tiled")) == {("kn", "f16"), ("nk", "f16"), ("nk", "f8"), ("nk", "f8q"),
                                                ("tiled", "f16"), ("tiled", "bf16"), ("tiled", "f8"), ("tiled", "f8q")}
    assert paths(64, ("kn", "nk")) == {("kn", "bf16"), ("nk", "bf16"), ("nk", "f8"), ("nk", "f8q")}
    assert paths(16, ("nk",), paths=("f8",)) == {("nk", "f8")}
