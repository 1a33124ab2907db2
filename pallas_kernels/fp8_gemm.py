"""FP8 (float8_e4m3fn) GEMMs in Pallas (Triton lowering), with plain jax.numpy references side by side.

Layout: x [..., K] activations, w_fp8 [K, N] weights (or [N, K], the torch/HF layout, with
w_transposed=True), y [..., N] = x @ dequant(w_fp8).

Weight scales, one of:
  * per output channel:  w_scale float32 [N]                                  w = w_fp8 * scale[None, :]
  * 128x128 blocks:      w_scale float32 [ceil(K/bk), ceil(N/bn)], (bk, bn) = scale_block (DeepSeek / HF
                         "fp8 block" style; transposed with w_transposed)     w = w_fp8 * scale[k // bk, n // bn]

Two kernels:
  * weight-only (decode, M <= 64): bf16 activations, FP8 weights widened in registers (exact) to f16 (up to 16
    rows, activations rescaled: pallas_kernels/upcast.py) or bf16, tensor-core dot with f32 accumulation; the
    K loop is pallas_kernels/k_loop.py's. Memory-bound: the job is streaming w once, so the grid is
    (N blocks, split-K) to give every SM work even on N=640 tensor-parallel shards; split-K partials (f32,
    scale applied) are summed by the last split of each tile to finish (pallas_kernels.split_k; or, with
    reduce="xla", by a jnp sum after the kernel). x is padded (by masked loads, not copies) to >= 16 rows for
    the tensor-core dot; swap_ab=True computes y^T = w^T x^T instead (weight tile as the MMA's A operand).
    `fp8_matmul_add_rms_norm` adds a residual to each finished tile and RMS-normalizes the rows in the last
    tile to finish: an output projection, the residual add and the next norm in one launch.
  * fp8 x fp8 (prefill / large batch): activations quantized per token to e4m3 (jnp, outside the kernel), FP8
    x FP8 tensor-core dot (jnp.dot on float8_e4m3fn operands, preferred_element_type=f32: the Pallas Triton
    lowering accepts it) with f32 accumulation; row scale x column scale on the f32 accumulator. Grid over
    (M blocks, N blocks), grouped ("swizzled") program order for L2 reuse, K loop inside.

Both mask ragged edges (M, N, K not multiples of the blocks) in the kernel instead of padding, so no hidden
copy of the weight tensor is made per call. Block scales are applied per K step inside the loop, which needs
block_k | scale_block[0] and block_n | scale_block[1] (larger requests are clamped).

Every kernel runs under interpret=True on CPU (tests). On an H100 with JAX 0.11.2 both kernels, both layouts,
both scale kinds, split-K, swap_ab and ragged shapes lowered, wrote every element and matched the float64
reference (scripts/bench_fp8_gemm.py validates before it times). Block sizes must be powers of two; too
many stages x too large tiles exceed shared memory (e.g. 128x512 fp8 x 4 stages) and fail to compile, which
the benchmark's autotuner skips.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Pallas' Triton backend: masked loads/stores and compiler params.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old / very new jax without the Triton backend
    plgpu = None

from pallas_kernels import mgpu_gemv, upcast
from pallas_kernels.k_loop import stream_k
from pallas_kernels.split_k import arrive, counters, default_reduce, load_partial, sum_partials

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
NUM_SMS_H100 = 132

__all__ = [
    "FP8", "FP8_MAX",
    "quantize_weight_per_channel", "quantize_weight_blockwise", "quantize_activation_per_token",
    "dequantize_weight", "dequantize_activation",
    "fp8_matmul_ref", "fp8_matmul", "fp8_matmul_add_rms_norm", "default_config",
]


# ----------------------------------------------------------------------------------------------------------
# Quantization helpers (pure jnp)
# ----------------------------------------------------------------------------------------------------------

def _to_fp8(v):
    # Clip before the cast: float8_e4m3fn has no inf, values past 464 would become NaN.
    return jnp.clip(v, -FP8_MAX, FP8_MAX).astype(FP8)


def _safe_scale(amax):
    """amax / 448, with all-zero groups given scale 1 (their codes are 0 anyway)."""
    return jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)


def quantize_weight_per_channel(w):
    """w [K, N] -> (w_fp8 [K, N] float8_e4m3fn, scale [N] float32), scale = amax over K of |w| / 448."""
    w32 = jnp.asarray(w).astype(jnp.float32)
    scale = _safe_scale(jnp.max(jnp.abs(w32), axis=0))
    return _to_fp8(w32 / scale[None, :]), scale


def quantize_weight_blockwise(w, block=(128, 128)):
    """w [K, N] -> (w_fp8 [K, N], scale [ceil(K/bk), ceil(N/bn)] float32): one scale per (bk x bn) block."""
    w32 = jnp.asarray(w).astype(jnp.float32)
    K, N = w32.shape
    bk, bn = block
    kb, nb = pl.cdiv(K, bk), pl.cdiv(N, bn)
    wp = jnp.pad(w32, ((0, kb * bk - K), (0, nb * bn - N))).reshape(kb, bk, nb, bn)
    scale = _safe_scale(jnp.max(jnp.abs(wp), axis=(1, 3)))
    q = _to_fp8(wp / scale[:, None, :, None]).reshape(kb * bk, nb * bn)[:K, :N]
    return q, scale


def quantize_activation_per_token(x):
    """x [..., K] -> (x_fp8 [..., K], scale [...] float32), one scale per row (token)."""
    x32 = jnp.asarray(x).astype(jnp.float32)
    scale = _safe_scale(jnp.max(jnp.abs(x32), axis=-1))
    return _to_fp8(x32 / scale[..., None]), scale


def _expand_block_scale(scale, K, N, block):
    bk, bn = block
    return jnp.repeat(jnp.repeat(scale, bk, axis=0), bn, axis=1)[:K, :N]


def dequantize_weight(w_fp8, scale, block=(128, 128)):
    """Inverse of the weight quantizers, in float32. scale [N] (per channel) or [K/bk, N/bn] (blockwise)."""
    K, N = w_fp8.shape
    w = _exact_upcast(w_fp8)
    kind = _scale_kind(scale, K, N, block)
    if kind == "channel":
        return w * scale.astype(jnp.float32)[None, :]
    return w * _expand_block_scale(scale.astype(jnp.float32), K, N, block)


def dequantize_activation(x_fp8, scale):
    return _exact_upcast(x_fp8) * scale.astype(jnp.float32)[..., None]


def _exact_upcast(v_fp8):
    """fp8 -> f32 behind an optimization barrier: under jit, XLA (xla_allow_excess_precision, on by default)
    may otherwise fold a quantize-then-dequantize pair f32 -> f8 -> f32 into a no-op and so drop the very
    rounding a reference is meant to include (seen on an H100: the reference lost the e4m3 error)."""
    return lax.optimization_barrier(v_fp8).astype(jnp.float32)


def _scale_kind(w_scale, K, N, block):
    if w_scale.ndim == 1 and w_scale.shape == (N,):
        return "channel"
    if w_scale.ndim == 2 and w_scale.shape == (pl.cdiv(K, block[0]), pl.cdiv(N, block[1])):
        return "block"
    raise ValueError(f"w_scale of shape {w_scale.shape} fits neither per-channel scales ({N},) nor "
                     f"{block} block scales ({pl.cdiv(K, block[0])}, {pl.cdiv(N, block[1])}) of a [{K}, {N}] weight")


# ----------------------------------------------------------------------------------------------------------
# Reference (plain jnp): dequantize, matmul in float32, cast
# ----------------------------------------------------------------------------------------------------------

def fp8_matmul_ref(x, w_fp8, w_scale, *, scale_block=(128, 128), quantize_x=False, out_dtype=None):
    """y = x @ dequantize(w_fp8, w_scale) in float32 (HIGHEST precision: no TF32 on GPU), cast to out_dtype.

    quantize_x=True first passes x through per-token e4m3 quantization, i.e. emulates the fp8_fp8 kernel's
    arithmetic exactly up to f32 summation order.
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    w = dequantize_weight(w_fp8, w_scale, scale_block)
    if quantize_x:
        xq, xs = quantize_activation_per_token(x)
        xx = dequantize_activation(xq, xs)
    else:
        xx = x.astype(jnp.float32)
    return jnp.matmul(xx, w, precision=lax.Precision.HIGHEST).astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Pallas plumbing
# ----------------------------------------------------------------------------------------------------------

def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _compiler_params(num_warps, num_stages):
    if plgpu is None:
        return None
    for name in ("CompilerParams", "TritonCompilerParams"):  # 0.5+ / older spelling
        cls = getattr(plgpu, name, None)
        if cls is not None:
            return cls(num_warps=num_warps, num_stages=num_stages)
    return None


def _load(ref, mask, eviction_policy=None):
    """Masked load; masked-off lanes read as 0 (a constant of the ref's own dtype, so Triton's load verifies)."""
    if mask is None and eviction_policy is None:
        return ref[...]
    other = None if mask is None else jnp.zeros((), ref.dtype)
    return plgpu.load(ref, mask=mask, other=other, eviction_policy=eviction_policy)


def _store(ref, val, mask):
    _check_in_bounds(ref, mask)
    if mask is None:
        ref[...] = val
    else:
        plgpu.store(ref, val, mask=mask)


_INTERPRETING = contextvars.ContextVar("interpreting", default=False)  # a kernel traced for the interpreter


@contextlib.contextmanager
def interpreted(interpret):
    """Around a pallas_call's trace: its _store checks its lanes (`_check_in_bounds`) if it is to run in the
    interpreter; kernels traced for the GPU get nothing added."""
    token = _INTERPRETING.set(bool(interpret))
    try:
        yield
    finally:
        _INTERPRETING.reset(token)


def _check_in_bounds(ref, mask):
    """Under the interpreter (the CPU tests), before a store: raise if a lane that `mask` lets through (all,
    without one) lies outside the buffer that `ref` slices. On the GPU such a lane writes past the buffer, over
    whatever XLA placed there; the interpreter clamps the slice instead, so the block lands on rows inside it,
    where it may even rewrite their own values and show nothing (an add + norm grid past its rows did this,
    docs/benchmarks.md section 20). Only the axes the mask leaves open are checked (where `_in_bounds` found
    the blocks statically full), and not loads: a clamped load reads other rows' values, which the kernels'
    tests against their references see."""
    try:  # no public names for a ref's slices in JAX 0.10-0.11; a JAX that moves them goes unchecked
        from jax._src.state.indexing import NDIndexer, Slice
        from jax._src.state.types import TransformedRef
    except ImportError:  # pragma: no cover
        return
    if not _INTERPRETING.get() or not isinstance(ref, TransformedRef) or len(ref.transforms) != 1 \
            or not isinstance(ref.transforms[0], NDIndexer):
        return
    indices = ref.transforms[0].indices
    if not all(isinstance(i, Slice) or jnp.ndim(i) == 0 for i in indices):
        return  # gathered lanes: not checked
    n = sum(isinstance(i, Slice) for i in indices)
    mshape = tuple(mask.shape) if mask is not None and jnp.ndim(mask) == n else (1,) * n
    ok, axis = None, 0
    for dim, i in zip(ref.ref.shape, indices):
        if isinstance(i, Slice):  # an axis the mask leaves open (the `_in_bounds` shortcut's): its lanes, shaped
            if mshape[axis] == 1:  # to broadcast along that axis of the block
                pos = i.start + jnp.arange(i.size) * i.stride
                lanes = ((pos >= 0) & (pos < dim)).reshape([-1 if a == axis else 1 for a in range(n)])
                ok = lanes if ok is None else ok & lanes
            axis += 1
        elif not isinstance(i, int):  # a traced index
            ok = (i >= 0) & (i < dim) if ok is None else ok & (i >= 0) & (i < dim)
    if ok is None:  # every axis masked (the masks' own bounds are the kernels' tests' business) or static
        return
    bad = jnp.any(~ok if mask is None else mask & ~ok)
    # the host call only where a lane is outside (one per store slowed the interpreted tests by a sixth)
    jax.lax.cond(bad, lambda: jax.debug.callback(functools.partial(_raise_outside, tuple(ref.ref.shape))),
                 lambda: None)


def _raise_outside(shape):
    raise IndexError(f"a Pallas kernel's store reaches past its {list(shape)} buffer (a lane outside it is not "
                     f"masked: on the GPU it would write over another buffer)")


def _call(kernel, args, out_shapes, grid, *, num_warps, num_stages, interpret, poison_output, name, aliases=None):
    """pallas_call. aliases {input index: output index}: outputs updated in place (the kernel writes some of
    their elements, the rest keep the input's). poison_output aliases NaN-filled buffers into the other outputs,
    so an element never written stays NaN."""
    aliases = dict(aliases or {})
    if poison_output:
        n_in = len(args)
        fresh = [i for i in range(len(out_shapes)) if i not in aliases.values()]
        args = [*args, *(jnp.full(out_shapes[i].shape, jnp.nan, out_shapes[i].dtype) for i in fresh)]
        aliases.update({n_in + j: i for j, i in enumerate(fresh)})
        inner = kernel

        def kernel(*refs):  # the poison inputs are the outputs' own refs: drop them
            return inner(*refs[:n_in], *refs[n_in + len(fresh):])
    with interpreted(interpret):
        out = pl.pallas_call(
            kernel, out_shape=tuple(out_shapes), grid=grid, input_output_aliases=aliases, interpret=interpret,
            compiler_params=_compiler_params(num_warps, num_stages), name=name)(*args)
    return tuple(out)


def _silu(g):
    """SwiGLU's silu in kernels: exp only (no logistic lowering needed); g -> -inf gives -0."""
    return g / (1.0 + jnp.exp(-g))


def swiglu_of_partials(g_parts, u_parts, dtype):
    """silu(sum g) * (sum u) over the leading split axis of two float32 partials [S, ...], cast to `dtype`: the
    XLA epilogue of a split gate/up kernel. The sums are chains of adds, not reductions: XLA fuses adds with
    their elementwise consumers into one loop kernel, while each jnp.sum over the split axis would be a reduce
    fusion of its own (two launches for g and u, the SwiGLU riding on the second; docs/benchmarks.md section 15)."""
    add = lambda p: functools.reduce(jnp.add, [p[i] for i in range(p.shape[0])])  # noqa: E731
    return (_silu(add(g_parts)) * add(u_parts)).astype(dtype)


def _mask2(rows, cols):
    """Outer AND of two optional 1-D lane masks (None = all in bounds)."""
    if rows is None and cols is None:
        return None
    if rows is None:
        return cols[None, :]
    if cols is None:
        return rows[:, None]
    return rows[:, None] & cols[None, :]


def _in_bounds(start, size, limit, extent=None):
    """Lane mask start + arange(size) < limit, or None when every block is statically full: limit % size == 0
    and the grid's blocks along that axis end at limit. extent: where they end when the grid reaches past
    limit (fused_norm's widened rows); then the mask is always given (docs/benchmarks.md section 20)."""
    full = limit % size == 0 and (extent is None or extent <= limit)
    return None if full else (start + jnp.arange(size)) < limit


def _load_w_tile(w_ref, k0, n0, block_k, block_n, k_in, n_in, w_transposed, eviction_policy):
    """The [block_k, block_n] weight tile (as stored: [block_n, block_k] when w_transposed)."""
    if w_transposed:
        return _load(w_ref.at[pl.ds(n0, block_n), pl.ds(k0, block_k)], _mask2(n_in, k_in), eviction_policy)
    return _load(w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], _mask2(k_in, n_in), eviction_policy)


def _dot_w(x, w, w_transposed):
    """x [bm, bk] @ w, w being [bk, bn] or, transposed, [bn, bk]; f32 accumulation on the tensor cores."""
    dims = (((1,), (1,)), ((), ())) if w_transposed else (((1,), (0,)), ((), ()))
    return lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _block_scale(s_ref, kb, pid_n, block_k, block_n, scale_block, w_transposed):
    """The one scale of K step kb and N block pid_n (block_k | scale_block[0], block_n | scale_block[1])."""
    i = kb // (scale_block[0] // block_k)
    j = pid_n // (scale_block[1] // block_n)
    return s_ref[j, i] if w_transposed else s_ref[i, j]


# ----------------------------------------------------------------------------------------------------------
# Kernel A: weight-only FP8 (bf16 activations), grid (N blocks, split-K)
# ----------------------------------------------------------------------------------------------------------

def _weight_only_kernel(x_ref, w_ref, s_ref, *refs, m, n, k, block_m, block_n, block_k, kb_per_split,
                        num_splits, scale_kind, scale_block, partial, reduce, epilogue, eps, w_transposed,
                        evict, swap_ab, cdt, interpret):
    """One [block_m, block_n] output tile's share (K blocks of split pid_s). refs: the epilogue's inputs
    (add_norm: residual [M, N], norm scale [N]), the tile counters (reduce="kernel" or add_norm), then the
    outputs: partials [S, M, N] f32 when split and reduced in XLA; else (partials if split,) y, and with
    add_norm (partials if split,) s, y."""
    n_epi = 2 if epilogue == "add_norm" else 0
    in_kernel = (partial and reduce == "kernel") or epilogue == "add_norm"
    epi_refs, refs = refs[:n_epi], refs[n_epi:]
    cnt_ref, outs = (refs[0], refs[1:]) if in_kernel else (None, refs)
    pid_n = pl.program_id(0)
    pid_s = pl.program_id(1)
    n0 = pl.multiple_of(pid_n * block_n, block_n)
    nk = pl.cdiv(k, block_k)
    kb_lo = pid_s * kb_per_split
    kb_hi = jnp.minimum(kb_lo + kb_per_split, nk)

    # Static decisions: masks only on the edges that are actually ragged.
    m_in = _in_bounds(0, block_m, m) if m != block_m else None
    n_in = _in_bounds(n0, block_n, n)
    # swap_ab: accumulate y^T [bn, bm] = w^T x^T, so the weight tile is the MMA's A operand (M = block_n
    # rows) and the few activation rows are its N; otherwise y [bm, bn] = x w with x padded to >= 16 rows.
    acc_shape = (block_n, block_m) if swap_ab else (block_m, block_n)

    def load_x(kb):  # x is re-read by every program (keep it in L2)
        k0 = pl.multiple_of(kb * block_k, block_k)
        return _load(x_ref.at[pl.ds(0, block_m), pl.ds(k0, block_k)], _mask2(m_in, _in_bounds(k0, block_k, k)),
                     "evict_last" if evict else None)                                  # [bm, bk]

    def load_w(kb):  # w is streamed exactly once (evict it first)
        k0 = pl.multiple_of(kb * block_k, block_k)
        return _load_w_tile(w_ref, k0, n0, block_k, block_n, _in_bounds(k0, block_k, k), n_in, w_transposed,
                            "evict_first" if evict else None)                           # fp8

    def step(kb, x, w, acc):  # x [bm, bk] in cdt (f16: scaled per row, pallas_kernels/k_loop.py)
        w = w.astype(cdt)                                                              # e4m3 -> f16 is exact
        if swap_ab:
            dims = (((1,), (1,)), ((), ())) if w_transposed else (((0,), (1,)), ((), ()))
            part = lax.dot_general(w, x, dims, preferred_element_type=jnp.float32)     # [bn, bm]
        else:
            part = _dot_w(x, w, w_transposed)                                          # [bm, bn]
        if scale_kind == "block":  # one scale per (K step, program)
            part = part * _block_scale(s_ref, kb, pid_n, block_k, block_n, scale_block, w_transposed)
        return acc + part

    acc, x_s = stream_k(load_x, load_w, step, jnp.zeros(acc_shape, jnp.float32), kb_lo, kb_hi, kb_per_split,
                        (block_m, block_k), cdt, block_n=block_n)
    if x_s is not None:
        acc = acc * (x_s[None, :] if swap_ab else x_s[:, None])
    if scale_kind == "channel":  # once, after the K loop
        s = _load(s_ref.at[pl.ds(n0, block_n)], n_in)
        acc = acc * (s[:, None] if swap_ab else s[None, :])
    if swap_ab:
        acc = acc.T
    out_mask = _mask2(m_in, n_in)
    tile = (pl.ds(0, block_m), pl.ds(n0, block_n))

    def finish(y):  # the whole K sum of this tile [bm, bn] f32
        if epilogue is None:
            _store(outs[-1].at[tile], y.astype(outs[-1].dtype), out_mask)
            return
        res_ref, nw_ref = epi_refs
        sum_ref, y_ref = outs[-2:]
        r = _load(res_ref.at[tile], out_mask)
        # the model's order: the projection rounded to the residual's dtype, then the residual add
        _store(sum_ref.at[tile], (r + y.astype(r.dtype)).astype(sum_ref.dtype), out_mask)
        # RMSNorm needs whole rows: the last of the N blocks to finish its sum normalizes every row
        nb = pl.cdiv(n, block_n)
        last_n = arrive(cnt_ref, nb, nb, interpret=interpret)
        pl.when(last_n)(lambda: _rms_norm_rows(sum_ref, nw_ref, y_ref, m=m, n=n, eps=eps))

    if not partial:
        finish(acc)
    elif reduce == "xla":
        _store(outs[0].at[(pid_s, *tile)], acc, out_mask)
    else:
        _store(outs[0].at[(pid_s, *tile)], acc, out_mask)
        last = arrive(cnt_ref, pid_n, num_splits, interpret=interpret)
        pl.when(last)(lambda: finish(sum_partials(outs[0], num_splits, tile, (block_m, block_n), out_mask)))


def _rms_norm_rows(s_ref, w_ref, y_ref, *, m, n, eps):
    """y = rms_norm(s) * w over whole rows of s [M, N] (written by other programs of this launch: volatile
    loads), as mavjax.model.rms_norm: float32 statistics, cast, then the scale. A row at a time, the whole row
    in one load (one L2 round trip per row: decode has one or a few rows)."""
    bn = _next_pow2(n)
    c_in = _in_bounds(0, bn, n)
    w = _load(w_ref.at[pl.ds(0, bn)], c_in)                                             # [bn]

    def row(i, carry):
        v = load_partial(s_ref.at[i, pl.ds(0, bn)], c_in).astype(jnp.float32)          # [bn]
        r = lax.rsqrt(jnp.sum(v * v) / n + eps)
        _store(y_ref.at[i, pl.ds(0, bn)], ((v * r).astype(s_ref.dtype) * w).astype(y_ref.dtype), c_in)
        return carry

    lax.fori_loop(0, m, row, 0)


def _weight_only_pallas(x, w_fp8, w_scale, *, scale_kind, scale_block, block_n, block_k, split_k, num_warps,
                        num_stages, out_dtype, interpret, poison_output, w_transposed, evict, swap_ab,
                        cdt, reduce="kernel", add_norm=None):
    """add_norm: None, or (residual [M, N], norm scale [N], eps): returns (residual + y, rms_norm of it)."""
    M, K = x.shape
    N = w_fp8.shape[0 if w_transposed else 1]
    block_m = max(16, _next_pow2(M))  # tensor-core dots need >= 16 rows; Triton blocks are powers of two
    nk = pl.cdiv(K, block_k)
    split = max(1, min(split_k, nk))
    kb_per_split = pl.cdiv(nk, split)
    split = pl.cdiv(nk, kb_per_split)  # no empty splits
    partial = split > 1
    nb = pl.cdiv(N, block_n)
    epilogue = None if add_norm is None else "add_norm"
    if epilogue and reduce == "xla":
        raise ValueError("the add_norm epilogue needs reduce='kernel'")
    in_kernel = (partial and reduce == "kernel") or epilogue is not None
    args = [x, w_fp8, w_scale]
    if epilogue:
        res, nw, eps = add_norm
        args += [res, nw]
    if in_kernel:  # tile counters, then one for the whole-row norm
        args.append(counters(nb + 1))
    part = jax.ShapeDtypeStruct((split, M, N), jnp.float32)
    final = [jax.ShapeDtypeStruct((M, N), out_dtype)]
    if epilogue:
        final = [jax.ShapeDtypeStruct((M, N), res.dtype), jax.ShapeDtypeStruct((M, N), out_dtype)]
    if partial and reduce == "xla":
        out_shapes = [part]
    else:
        out_shapes = ([part] if partial else []) + final
    kernel = functools.partial(
        _weight_only_kernel, m=M, n=N, k=K, block_m=block_m, block_n=block_n, block_k=block_k,
        kb_per_split=kb_per_split, num_splits=split, scale_kind=scale_kind, scale_block=scale_block,
        partial=partial, reduce=reduce, epilogue=epilogue, eps=float(add_norm[2]) if epilogue else None,
        w_transposed=w_transposed, evict=evict,
        swap_ab=swap_ab, cdt=jnp.dtype(cdt), interpret=interpret)
    outs = _call(kernel, args, out_shapes, (nb, split), num_warps=num_warps, num_stages=num_stages,
                 interpret=interpret, poison_output=poison_output,
                 name=f"fp8_weight_only{'_add_norm' if epilogue else ''}_m{block_m}_n{block_n}_k{block_k}_s{split}")
    if partial and reduce == "xla":
        return jnp.sum(outs[0], axis=0).astype(out_dtype)
    final = outs[1:] if partial else outs  # the in-kernel sum's partials are scratch
    return tuple(final) if epilogue else final[0]


# ----------------------------------------------------------------------------------------------------------
# Kernel B: FP8 x FP8 (per-token activation scales), grid over (M blocks x N blocks), K loop inside
# ----------------------------------------------------------------------------------------------------------

def _fp8_fp8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, m, n, k, block_m, block_n, block_k, group_m,
                    scale_kind, scale_block, w_transposed):
    # Grouped program order: group_m consecutive M blocks sweep the N blocks together, so the w tiles they
    # share are read from L2 rather than DRAM.
    pid = pl.program_id(0)
    num_m, num_n = pl.cdiv(m, block_m), pl.cdiv(n, block_n)
    width = group_m * num_n
    first_m = (pid // width) * group_m
    group_size = jnp.minimum(num_m - first_m, group_m)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    m0 = pl.multiple_of(pid_m * block_m, block_m)
    n0 = pl.multiple_of(pid_n * block_n, block_n)
    m_in = _in_bounds(m0, block_m, m)
    n_in = _in_bounds(n0, block_n, n)

    def body(kb, acc):
        k0 = pl.multiple_of(kb * block_k, block_k)
        k_in = _in_bounds(k0, block_k, k)
        x = _load(x_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)], _mask2(m_in, k_in))  # [bm, bk] fp8
        w = _load_w_tile(w_ref, k0, n0, block_k, block_n, k_in, n_in, w_transposed, None)
        part = _dot_w(x, w, w_transposed)                                                # FP8 tensor cores
        if scale_kind == "block":
            part = part * _block_scale(ws_ref, kb, pid_n, block_k, block_n, scale_block, w_transposed)
        return acc + part

    acc = lax.fori_loop(0, pl.cdiv(k, block_k), body, jnp.zeros((block_m, block_n), jnp.float32))
    acc = acc * _load(xs_ref.at[pl.ds(m0, block_m)], m_in)[:, None]
    if scale_kind == "channel":
        acc = acc * _load(ws_ref.at[pl.ds(n0, block_n)], n_in)[None, :]
    _store(o_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)], acc.astype(o_ref.dtype), _mask2(m_in, n_in))


def _fp8_fp8_pallas(x, w_fp8, w_scale, *, scale_kind, scale_block, block_m, block_n, block_k, group_m,
                    num_warps, num_stages, out_dtype, interpret, poison_output, w_transposed):
    M, K = x.shape
    N = w_fp8.shape[0 if w_transposed else 1]
    xq, xs = quantize_activation_per_token(x)
    block_m = max(16, min(block_m, _next_pow2(M)))
    grid = (pl.cdiv(M, block_m) * pl.cdiv(N, block_n),)
    out_shape = jax.ShapeDtypeStruct((M, N), out_dtype)
    kernel = functools.partial(
        _fp8_fp8_kernel, m=M, n=N, k=K, block_m=block_m, block_n=block_n, block_k=block_k, group_m=group_m,
        scale_kind=scale_kind, scale_block=scale_block, w_transposed=w_transposed)
    return _call(kernel, [xq, xs, w_fp8, w_scale], [out_shape], grid, num_warps=num_warps, num_stages=num_stages,
                 interpret=interpret, poison_output=poison_output, name=f"fp8_fp8_m{block_m}_n{block_n}_k{block_k}")[0]


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------

# Weight-streaming (decode) tiles from H100 sweeps of the loop-timed kernels (scripts/tune_decode_kernels.py,
# docs/benchmarks.md section 5). One 8-way rank's shapes (2-21 MB): 64-deep tiles, 2 pipeline stages, ~4
# programs per SM (~530) with 2-4 K steps each were best, 20-35% faster than 256-deep tiles at 4 stages, which
# hold ~160 KB of shared memory, allow one program per SM and leave the grid's second wave nearly empty. The
# full-width fused gate/up (168 MB): 128-wide, 64-deep tiles, 4 stages, 640 programs: 1.43x its byte floor,
# 1.87x faster than the 256-deep config. Block-scaled weights keep 128-deep tiles (one scale per tile).
# H200 sweeps with f16 dots (docs/benchmarks.md sections 10-11, three calls agreeing): the 26 MB 5120x5120
# projection is 20% faster with the large-weight tiles (hence 24 MB, not 32), and the full-width gate/up,
# whose programs each stream two tiles (gate and up), was best at split 3 (384 programs), 17% under split 5:
# a large weight's split counts each program's tiles, ~4 streamed tiles per SM.
SMALL_WEIGHT_BYTES = 24 << 20


def weight_only_blocks(N, K, *, tiles=1, scale_kind="channel", num_sms=NUM_SMS_H100):
    """block_n, block_k, split_k, num_stages of a weight-streaming kernel whose programs each read `tiles`
    [block_k, block_n] FP8 tiles per K step out of `N` output columns (summed over the programs' rows: pairs
    or weights) and a depth K: split-K for ~4 programs per SM (a large weight: ~4 / tiles), never fewer than 2
    K steps per split."""
    small = K * N * tiles <= SMALL_WEIGHT_BYTES
    bn, stages = (64, 2) if small else (128, 4)
    bk = 128 if scale_kind == "block" else 64
    nb, nk = pl.cdiv(N, bn), pl.cdiv(K, bk)
    split = max(1, min(pl.cdiv(4 * num_sms, nb * (1 if small else tiles)), nk // 2))
    return dict(block_n=bn, block_k=bk, split_k=int(split), num_stages=stages)


def default_config(mode, M, N, K, scale_kind="channel", num_sms=NUM_SMS_H100, tiles=1):
    """Heuristic block sizes (weight_only: `weight_only_blocks`); scripts/bench_fp8_gemm.py and
    scripts/tune_decode_kernels.py sweep the alternatives."""
    if mode == "weight_only":
        return dict(block_m=None, num_warps=4, swap_ab=False,
                    **weight_only_blocks(N, K, tiles=tiles, scale_kind=scale_kind, num_sms=num_sms))
    return dict(block_m=128, block_n=128, block_k=128, split_k=1, num_warps=4, num_stages=3, swap_ab=False)


_MATMUL_STATIC = ("mode", "block_m", "block_n", "block_k", "split_k", "group_m", "num_warps", "num_stages",
                  "out_dtype", "scale_block", "w_transposed", "evict", "swap_ab", "compute_dtype", "reduce",
                  "mosaic", "interpret", "poison_output")


@functools.partial(jax.jit, static_argnames=_MATMUL_STATIC)
def fp8_matmul(x, w_fp8, w_scale, *, mode="auto", block_m=None, block_n=None, block_k=None, split_k=None,
               group_m=8, num_warps=None, num_stages=None, out_dtype=None, scale_block=(128, 128),
               w_transposed=False, evict=True, swap_ab=None, compute_dtype=None, reduce=None, mosaic=False,
               interpret=False, poison_output=False):
    """y[..., N] = x[..., K] @ (w_fp8[K, N] dequantized with w_scale), f32 accumulation, cast to out_dtype.

    mode: "weight_only" (bf16 activations x upcast FP8 weights; memory-bound decode path), "fp8_fp8"
      (activations quantized per token to e4m3, FP8 x FP8 tensor-core dot), or "auto" (weight_only when the
      flattened M <= 64).
    w_scale: float32 [N] per output channel, or [ceil(K/bk), ceil(N/bn)] for (bk, bn) = scale_block blocks.
    w_transposed: w_fp8 is stored [N, K] (torch Linear / HF checkpoint layout, K contiguous) and block scales
      are [ceil(N/bn), ceil(K/bk)] (HF "weight_scale_inv" layout); scale_block stays (bk, bn).
    Block sizes / split_k (weight_only) / group_m (fp8_fp8) / num_warps / num_stages: None picks
      default_config(); block sizes must be powers of two (Triton); with block scales block_k and block_n
      are clamped to divide scale_block. evict: L2 eviction hints in the weight-only kernel (stream w, keep x).
    swap_ab (weight_only): compute y^T = w^T x^T so the weight tile is the MMA's A operand.
    compute_dtype (weight_only): dtype of the in-register dot (default float16 up to M = 16, bfloat16 above:
      pallas_kernels/upcast.py; f16 is one conversion per two weights instead of bf16's three); e4m3 converts
      exactly to both; x is cast inside the kernel (f16: each row rescaled by a power of two over the
      program's K range, so any bf16 magnitude is safe).
    reduce (weight_only with split_k > 1): "kernel" (the last split of each tile sums the partials:
      pallas_kernels.split_k, one launch) or "xla" (a jnp sum after the kernel: a second launch); None:
      split_k.default_reduce("gemm") (split_k.DEFAULTS: "xla", measured faster).
    mosaic: the Mosaic GPU kernel (pallas_kernels.mgpu_gemv) instead of Triton's: False (the
      default) - never; True - always (under interpret=True, Pallas' GPU interpreter; weight_only: bf16 x up to 64
      rows, other x up to 16; fp8_fp8: up to 64 rows, [N, K] weights (w_transposed), its FP8 x FP8 path); None -
      where `mgpu_gemv.wanted` (per-channel scales, on a Hopper GPU, up to 64 rows of bf16 x, 16 of other x) and
      no Triton tile is given. fp8_fp8 with [K, N] weights and mosaic=True is an error (FP8 WGMMA reads K-major
      operands only); fp8_fp8 above 64 rows stays on Triton. Not
      the default: its kernel is faster than Triton's and with bf16 x its op too (docs/benchmarks.md sections
      18-19), but in the model the output and down projections on it moved decode by at most 2% and made the
      verify step 2-3% slower (section 20; section 19's NaN verify with them was the add + norm kernel's, fixed).
    poison_output: debugging aid; the output buffer starts as NaN (aliased in), so unwritten elements show.
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    """
    return _fp8_matmul(x, w_fp8, w_scale, None, **_kwargs(locals()))


@functools.partial(jax.jit, static_argnames=_MATMUL_STATIC + ("eps", "widen_rows"))
def fp8_matmul_add_rms_norm(x, w_fp8, w_scale, residual, norm_scale, *, eps, mode="auto", block_m=None,
                            block_n=None, block_k=None, split_k=None, group_m=8, num_warps=None, num_stages=None,
                            out_dtype=None, scale_block=(128, 128), w_transposed=False, evict=True, swap_ab=None,
                            compute_dtype=None, reduce=None, mosaic=False, interpret=False, poison_output=False,
                            widen_rows=None):
    """(s, y): s = residual + (x @ dequant(w_fp8)) rounded to residual's dtype first (the model's residual
    add), y = rms_norm(s) * norm_scale (mavjax.model.rms_norm's arithmetic), what an output projection and
    the next layer's norm compute. residual [..., N] like the output, norm_scale [N]. Weight-only mode with
    reduce="kernel": one launch (the last split of each tile adds the residual; the last tile to finish
    normalizes the rows: pallas_kernels.split_k); otherwise fp8_matmul then fused_norm.add_rms_norm.
    widen_rows: also y widened for the Mosaic GPU GEMM that consumes it, (s, y, yc, rs) as
    add_rms_norm(widen_rows=...) (always the two launches). Other arguments as fp8_matmul; out_dtype is y's
    (default: residual's)."""
    kw = _kwargs(locals())
    N = w_fp8.shape[0 if w_transposed else 1]
    if residual.shape != (*x.shape[:-1], N):
        raise ValueError(f"residual must be the output's shape {(*x.shape[:-1], N)}, got {residual.shape}")
    if norm_scale.shape != (N,):
        raise ValueError(f"norm_scale must be [{N}], got {norm_scale.shape}")
    M = x.size // x.shape[-1] if x.shape[-1] else 0
    one_launch = (M > 0 and w_fp8.size > 0 and default_reduce("gemm", reduce) == "kernel" and widen_rows is None
                  and (mode == "weight_only" or (mode == "auto" and M <= 64)))
    if not one_launch:  # the GEMM, then the add + norm kernel
        from pallas_kernels.fused_norm import add_rms_norm

        y = _fp8_matmul(x, w_fp8, w_scale, None, **dict(kw, out_dtype=residual.dtype))
        s, yn, *widened = add_rms_norm(residual, y, norm_scale, eps=eps, widen_rows=widen_rows,
                                       interpret=interpret, poison_output=poison_output)
        return (s, yn.astype(out_dtype or residual.dtype), *widened)
    kw["out_dtype"] = out_dtype or residual.dtype
    return _fp8_matmul(x, w_fp8, w_scale, (residual, norm_scale, eps), **kw)


def _kwargs(loc):
    return {k: loc[k] for k in _MATMUL_STATIC}


def _fp8_matmul(x, w_fp8, w_scale, add_norm, *, mode, block_m, block_n, block_k, split_k, group_m, num_warps,
                num_stages, out_dtype, scale_block, w_transposed, evict, swap_ab, compute_dtype, reduce, mosaic,
                interpret, poison_output):
    *lead, K = x.shape
    N, Kw = w_fp8.shape if w_transposed else w_fp8.shape[::-1]
    if Kw != K:
        raise ValueError(f"x has K={K}, w_fp8 {w_fp8.shape} has K={Kw} (w_transposed={w_transposed})")
    if w_fp8.dtype != FP8:
        raise TypeError(f"w_fp8 must be float8_e4m3fn, got {w_fp8.dtype}")
    scale_block = tuple(scale_block)
    scale_kind = _scale_kind(w_scale.T if w_transposed else w_scale, K, N, scale_block)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if mode == "auto":
        mode = "weight_only" if M <= 64 else "fp8_fp8"
    if mode not in ("weight_only", "fp8_fp8"):
        raise ValueError(f"unknown mode {mode!r}")
    reduce = default_reduce("gemm", reduce)
    if M == 0 or N == 0 or K == 0:
        return jnp.zeros((*lead, N), out_dtype)

    # the Mosaic GPU kernel where it applies, unless Triton tiles are asked for (the tuners)
    triton_tiles = (block_n, block_k, split_k, num_warps, num_stages, compute_dtype) != (None,) * 6
    if mode == "weight_only" and add_norm is None and mgpu_gemv.wanted(
            mosaic, M, K, (N,), scale_kind, auto=not triton_tiles, compute_dtype=mgpu_gemv.path_dtype(x2.dtype)):
        y = mgpu_gemv.fp8_gemv(x2, w_fp8, w_scale, w_layout="nk" if w_transposed else "kn", out_dtype=out_dtype,
                               interpret=mgpu_gemv.interpret_params(interpret))
        return y.reshape(*lead, N)
    # FP8 x FP8 at decode sizes on the Mosaic GPU kernel's FP8 path (x quantized per token, both WGMMA operands
    # from shared memory): it takes K-major weights only, so [N, K] ones, and only where asked (mosaic=True, or
    # None on a Hopper GPU without Triton tiles)
    if mode == "fp8_fp8" and mosaic and not w_transposed:
        raise ValueError("the Mosaic GPU FP8 x FP8 path reads K-major weights only: [N, K] (w_transposed=True)")
    if mode == "fp8_fp8" and add_norm is None and w_transposed and mgpu_gemv.wanted(
            mosaic, M, K, (N,), scale_kind, auto=not triton_tiles, compute_dtype=FP8):
        y = mgpu_gemv.fp8_gemv(x2, w_fp8, w_scale, w_layout="nk", out_dtype=out_dtype, compute_dtype=FP8,
                               interpret=mgpu_gemv.interpret_params(interpret))
        return y.reshape(*lead, N)

    cfg = default_config(mode, M, N, K, scale_kind)
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    if scale_kind == "block":
        block_k, block_n = min(block_k, scale_block[0]), min(block_n, scale_block[1])
        if scale_block[0] % block_k or scale_block[1] % block_n:
            raise ValueError(f"block scales {scale_block} need block_k | {scale_block[0]} and "
                             f"block_n | {scale_block[1]}; got block_k={block_k}, block_n={block_n}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")
    w_scale = w_scale.astype(jnp.float32)
    common = dict(scale_kind=scale_kind, scale_block=scale_block, block_n=block_n, block_k=block_k,
                  num_warps=num_warps, num_stages=num_stages, out_dtype=out_dtype, interpret=interpret,
                  poison_output=poison_output, w_transposed=w_transposed)

    if mode == "weight_only":
        cdt = upcast.compute_dtype(compute_dtype, rows=M)  # x is cast (f16: rescaled) inside the kernel
        swap_ab = cfg["swap_ab"] if swap_ab is None else swap_ab
        if add_norm is not None:
            res2 = add_norm[0].reshape(M, N)
            s, y = _weight_only_pallas(x2, w_fp8, w_scale, split_k=split_k or cfg["split_k"],
                                       evict=evict, swap_ab=swap_ab, cdt=cdt, reduce=reduce,
                                       add_norm=(res2, add_norm[1], add_norm[2]), **common)
            return s.reshape(*lead, N), y.reshape(*lead, N)
        y = _weight_only_pallas(x2, w_fp8, w_scale, split_k=split_k or cfg["split_k"],
                                evict=evict, swap_ab=swap_ab, cdt=cdt, reduce=reduce, **common)
    else:
        block_m = block_m or cfg["block_m"]
        if block_m & (block_m - 1):
            raise ValueError(f"block_m={block_m} must be a power of two")
        y = _fp8_fp8_pallas(x2, w_fp8, w_scale, block_m=block_m, group_m=group_m, **common)
    return y.reshape(*lead, N)
