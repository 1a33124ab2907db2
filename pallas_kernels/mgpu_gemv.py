"""Weight-only FP8 GEMM for decode (M <= 64 tokens) on Hopper through Mosaic GPU (Pallas' `plgpu` backend):
each program streams its [tile_k, tile_n] FP8 weight tiles by TMA through a multi-stage shared-memory pipeline,
widens them to float16 in registers and hands them to the tensor cores as the WGMMA's A operand, transposed
(y^T = w^T x^T: the weight's output channels are the MMA's rows, the tokens, padded to a multiple of 8, its
columns).

Why beside the Triton kernels (`fp8_gemm`, `fused_gemm`): at decode every Triton weight-streaming kernel paid
6-13 us above its bytes (docs/benchmarks.md sections 12-16). This one, on one H200 at the 8-way rank's shapes
(section 18): the down projection's kernel 5.6 against 8.7 us, the fused gate|up 8.1 against 14.7, the full
5120x16384 one 22.7 against 33.2 (below the copy-bandwidth floor: a read-only stream). TMA issues a whole tile
per instruction with no address arithmetic, so the pipeline is several tiles deep from the first cycle.

The op (`fp8_gemv`, `fp8_gemv_multi`), x padded to a multiple of 8 rows, on one of two paths:
- bfloat16 (bf16 x, the default for it; up to 64 rows): x goes in as it is and the weight tile is widened to
  bf16 (through float32: Hopper converts e4m3 to f16 only), a bf16 WGMMA;
- float16 (other x, or `compute_dtype=jnp.float16`; up to 16 rows): x widened to f16 with an exact power of two
  per row (`pallas_kernels.upcast`, as the Triton kernels do, so any bf16 magnitude is safe), or handed over widened
  already (`widened=`, what the add + norm kernel before the dense MLPs' gate/up writes:
  fused_norm.add_rms_norm(widen_rows=...)); the widening in XLA costs two small kernels, which ate the kernel's
  gain on the output and down projections (section 18); the bf16 path has none (section 19);
- float8_e4m3fn (`compute_dtype=FP8`, weights stored [N, K] or tiled; up to 64 rows): x quantized per token to
  e4m3 (one float32 scale per row, `fp8_gemm.quantize_activation_per_token`), and the WGMMA reads both operands
  as they sit in shared memory (FP8 WGMMA takes K-major operands only: the [N, K] weight tile and x's [Mp, K] tile
  are): no widening in registers at all, so the kernel is TMA copies and MMAs (docs/benchmarks.md section 33).
The kernel writes float32 partial sums per K split [S, N, Mp]; XLA sums them, applies the per-channel scales
(and x's row factors) and transposes (one fusion). Several weights sharing x (gate and up) go in one launch.
With expert ids (`gemv_partials(ids=...)`) each program row streams the expert whose id it reads from stacked
[E, K, N] weights: the MoE decode path, pallas_kernels/moe_mgpu.py.
`reference` is the plain jnp function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Pallas' Mosaic GPU backend
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - a jax without it: `supported` says no, Triton's kernels run
    plgpu = None

from pallas_kernels import upcast
from pallas_kernels.split_k import sum_in_xla

FP8 = jnp.float8_e4m3fn
TILE_K = 128  # FP8 values per tile row: one 128-byte swizzle span (64 where K is an odd multiple of 64)
MAX_ROWS = 16  # the f16 path's rows (upcast.F16_MAX_ROWS)
# The bf16 path's rows: x goes in as it is (no row scaling to bound), the WGMMA's N up to 64 tokens, issue 3's
# decode range (section 26: at 32 and 64 rows the op's kernels 1.1-2.1x faster than Triton's at seven of eight
# shapes, 7-9% slower at the 640-wide q/8)
MAX_ROWS_BF16 = 64
LARGE_WEIGHT_BYTES = 16 << 20  # from here 128-wide tiles (section 18's sweep)


def tile_weight(w, tile_n, tile_k, w_layout="kn"):
    """w [K, N] (w_layout "kn") or [N, K] ("nk") -> the "tiled" layout [N / tile_n, K / tile_k, tile_n, tile_k]:
    each [tile_n, tile_k] tile one contiguous block of memory, so every TMA copy of the kernel reads whole DRAM
    pages instead of tile_n rows of 128 bytes (docs/benchmarks.md section 28, 8-16 tokens: the full-width gate|up
    3-4% faster than in [N, K] and 7-10% than in [K, N]; down and o as fast as in [N, K])."""
    w = w.T if w_layout == "kn" else w  # [N, K]
    N, K = w.shape
    if N % tile_n or K % tile_k:
        raise ValueError(f"[N, K] = {[N, K]} must divide by the tiles ({tile_n}, {tile_k})")
    return w.reshape(N // tile_n, tile_n, K // tile_k, tile_k).transpose(0, 2, 1, 3)


def kn_shape(shape, w_layout):
    """(K, N) of a weight of this shape in w_layout ("kn", "nk" or "tiled")."""
    if w_layout == "tiled":
        return shape[1] * shape[3], shape[0] * shape[2]
    return tuple(shape) if w_layout == "kn" else tuple(shape)[::-1]


def _as_kn(w, w_layout):
    """w in w_layout ("kn", "nk" or "tiled") -> [K, N]."""
    if w_layout == "tiled":
        return w.transpose(1, 3, 0, 2).reshape(kn_shape(w.shape, w_layout))
    return w if w_layout == "kn" else w.T


def reference(x, w, scale, out_dtype=None, w_layout="kn"):
    """y[M, N] = x[M, K] @ (w * scale), w [K, N] (or [N, K] for w_layout "nk", `tile_weight`'s layout for
    "tiled"), in float32, cast to out_dtype (x's by default)."""
    w = _as_kn(w, w_layout).astype(jnp.float32)  # [K, N]
    y = jnp.einsum("mk,kn->mn", x.astype(jnp.float32), w * scale.astype(jnp.float32)[None, :])  # [M, N]
    return y.astype(out_dtype or x.dtype)


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x: WGMMA and TMA as used here)."""
    d = jax.devices()[0]
    return d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9")


def tile_k_for(K) -> int:
    """The K tile: TILE_K where it divides K, else 64."""
    return TILE_K if K % TILE_K == 0 else 64


def path_dtype(x_dtype, widened=False, compute_dtype=None):
    """The compute dtype of the kernel's path for x of x_dtype (`operand`): compute_dtype if given (float16,
    bfloat16 or float8_e4m3fn), else bfloat16 for bf16 x not handed over widened (x read as it is), float16
    otherwise."""
    if compute_dtype is not None:
        return jnp.dtype(compute_dtype)
    return jnp.dtype(jnp.bfloat16 if jnp.dtype(x_dtype) == jnp.bfloat16 and not widened else jnp.float16)


def max_rows(compute_dtype=jnp.float16) -> int:
    """The most rows (tokens) of x the kernel takes on the path of this compute dtype (`operand`): 16 on the float16
    path (its row factors' bound, upcast.F16_MAX_ROWS), 64 on the bfloat16 and FP8 ones."""
    return MAX_ROWS if jnp.dtype(compute_dtype) == jnp.float16 else MAX_ROWS_BF16


def supported(M, K, Ns, scale_kind="channel", compute_dtype=jnp.float16) -> bool:
    """Whether `fp8_gemv_multi` takes this problem on the path of `compute_dtype` (float16: x widened, the
    model's and `wanted`'s; bfloat16: bf16 x taken as it is): at most `max_rows` rows, per-output-channel scales,
    K a multiple of 64 and every N a multiple of 64 (other shapes: the Triton kernels)."""
    return (plgpu is not None and 0 < M <= max_rows(compute_dtype) and scale_kind == "channel" and K > 0
            and K % 64 == 0 and all(n % 64 == 0 and n for n in Ns))


def wanted(mosaic, M, K, Ns, scale_kind="channel", auto=True, compute_dtype=jnp.float16) -> bool:
    """Whether a weight-only FP8 GEMM runs here instead of in Triton. mosaic: False never; True always (a
    ValueError if `supported` says no on the path of `compute_dtype`); None when `auto` (the caller's own
    condition: no Triton tiles asked for, x already widened...), supported on that path (up to 16 rows on the
    float16 path, 64 on the bfloat16 one: docs/benchmarks.md sections 18-26) and on a Hopper GPU."""
    if mosaic is False or (mosaic is None and not auto):
        return False
    ok = supported(M, K, Ns, scale_kind, compute_dtype)
    if mosaic and not ok:
        raise ValueError(f"the Mosaic GPU GEMM takes 1..{max_rows(compute_dtype)} rows "
                         f"({jnp.dtype(compute_dtype).name} path), per-channel scales, K % 64 == 0 and N % 64 == 0; "
                         f"got M={M}, K={K}, N={list(Ns)}, {scale_kind} scales")
    return ok and (bool(mosaic) or on_hopper())


def interpret_params(interpret: bool):
    """The `interpret` value of this module's kernels for a caller's boolean (Pallas' GPU interpreter on a CPU)."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name in JAX 0.10

    return InterpretGPUParams(uninitialized_memory="nan")  # an element never written shows as NaN


SMEM_PER_SM = 233472  # Hopper: 228 KB of shared memory per SM, 1 KB of it reserved per resident program


def smem_bytes(tile_n, tile_k, rows, stages, x_bytes=2) -> int:
    """One program's shared memory: `stages` pipeline slots of a [tile_k, tile_n] FP8 weight tile, an x tile
    [rows, tile_k] of x_bytes a value (2 on the 16-bit paths, 1 on the FP8 one) and a barrier; the float32 output
    tile [tile_n, rows] reuses the slots after the loop."""
    return max(stages * (tile_k * tile_n + rows * tile_k * x_bytes + 8), tile_n * rows * 4)


def resident(tile_n, tile_k, rows, stages, x_bytes=2) -> int:
    """Programs of these tiles that fit one SM at once by shared memory (what bounds them: `smem_bytes`)."""
    return SMEM_PER_SM // (smem_bytes(tile_n, tile_k, rows, stages, x_bytes) + 1024)


def default_config(K, Ns, num_sms=132, copies=1, rows=8, tile_n=None, tile_k=None, w_layout="kn", x_bytes=2):
    """tile_n, split_k, stages. Tiles: up to 16 rows 128 wide for [K, N] weights of 16 MB and more (a tile row then one
    whole 128-byte line), else 64 (section 18's sweep; in the [N, K] and tiled layouts a tile row is 128 bytes of K
    already, and 64-wide tiles were 2-10% faster there, section 28); above 16 rows (rows: x's padded rows, the bf16
    path's 24..64) 64 wide. Split and stages: the most programs that run in one wave (all resident at once, `resident`
    per SM by shared memory, and at most about three per SM), over 4 or 3 stages (more stages where the count ties);
    above 16 rows only splits whose float32 partials [split, N, rows] stay within a quarter of the weight's bytes (at 64
    rows the three-per-SM split wrote half the weight's bytes again as partials: q|o 5120x5120 28.8 us against 18.7 with
    two splits, section 26). What the wave rule removes (section 27): the down projection 16384x5120 at 16 tokens, 320
    programs of which two fit an SM at 4 stages, a wave and a fifth, took 34.7 us against 26.5 at 3 stages (three per
    SM, one wave) and 26.6 at 8 tokens (three fit at 4 stages). copies: weights of this shape streamed side by side in
    one launch (the MoE path's experts, `gemv_partials(ids=...)`). tile_n, tile_k: tiles fixed by the caller (a
    `tile_weight` weight's), the split and stages chosen for them. x_bytes: 1 on the FP8 path (`smem_bytes`)."""
    nbytes = K * sum(Ns)
    wide = w_layout == "kn" and rows <= MAX_ROWS and nbytes >= LARGE_WEIGHT_BYTES and all(n % 128 == 0 for n in Ns)
    tile_n, tile_k = tile_n or (128 if wide else 64), tile_k or tile_k_for(K)
    tiles, nk = copies * sum(Ns) // tile_n, K // tile_k
    most = nk if rows <= MAX_ROWS else max(1, K // (16 * rows))  # 4 * split * rows bytes per K <= 1/4 byte
    best = None
    for stages in (4, 3):
        for d in (d for d in range(1, nk + 1) if nk % d == 0 and (d == 1 or d <= most)):
            st = min(stages, nk // d)
            fit = min(resident(tile_n, tile_k, rows, st, x_bytes), 3.1)
            if d > 1 and tiles * d > fit * num_sms:
                continue
            key = (tiles * d, st)  # the most programs in the wave, then the deeper pipeline
            if best is None or key > best[0]:
                best = (key, dict(tile_n=tile_n, split_k=d, stages=st))
    return best[1]


def smem_transforms(dtype, row_elems):
    """Shared-memory tiling + swizzle of a tile whose rows hold row_elems values of dtype (TMA and WGMMA
    operands: 8 rows by one swizzle span)."""
    swz = plgpu.find_swizzle(row_elems * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swz // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swz))


def widen(a, cdt):
    """FP8 e4m3 values a in registers -> cdt (float16 or bfloat16), exactly. Hopper converts e4m3 to float16 only;
    to bfloat16 through float32 (section 19: as fast as float16 at the rank's shapes, up to 25% slower at
    16 tokens, and ~2x faster than moving the f16 exponent field with integer ops)."""
    return a.astype(cdt) if jnp.dtype(cdt) == jnp.float16 else a.astype(jnp.float32).astype(cdt)


def gemv_partials(xp, ws, *, ids=None, shared_ws=(), x_per_id=False, w_layout="kn", tile_n=64, tile_k=None,
                  split_k=1, stages=4, compute_dtype=jnp.float16, interpret=None):
    """xp [Mp, K] in compute_dtype (float16 or bfloat16: the weight tiles are widened to it, `widen`; float8_e4m3fn:
    FP8 x FP8 products, weights "nk" or "tiled" only; Mp a multiple of 8, at most 256), or [2, Mp, K] with
    shared_ws: the shared row's program reads xp[1], the others xp[0]; or [P, Mp, K] with x_per_id (ids, no
    shared_ws): program row p reads xp[p], its own rows (the MoE prefill path, `moe_mgpu.moe_fp8_mgpu_sorted`: row
    block p of the tokens sorted by expert, expert ids[p]); ws: float8_e4m3fn weights, each [K, N_i]
    (w_layout "kn", the model's layout), [N_i, K] ("nk") or `tile_weight`'s [N_i / tile_n, K / tile_k, tile_n,
    tile_k] ("tiled": each TMA copy one contiguous block; not with ids) -> float32 [split_k, sum N_i, Mp]: split s holds
    the sum over its K range of w[k, n] * xp[m, k] (no scales), the weights' columns one after another. Each N_i
    % tile_n == 0, K % (tile_k * split_k) == 0.
    ids: None, or int32 [P] expert ids with each weight stacked per expert ([E, K, N_i] / [E, N_i, K]): the grid
    gains an axis over the P ids, program p streams expert ids[p]'s tiles (read by its id from the stacked
    weights: only the experts named are read) and the result is [split_k, P, sum N_i, Mp]; an id outside [0, E)
    reads nothing and leaves its slice unwritten (the caller masks it). shared_ws (with ids): unstacked weights,
    one per ws entry, of one expert's shape (the MoE's shared expert): one more program row, after the P ids',
    streams them and the result is [split_k, P + 1, sum N_i, Mp]. The MoE decode path (pallas_kernels.moe_mgpu)
    hands the tokens' (or the pairs') inputs over as xp's rows and keeps each pair's own row of its slice, and
    the tokens' rows of the shared slice.
    interpret (an `InterpretGPUParams`: Pallas' GPU interpreter on a CPU, which has no register operands, layouts
    or transposed refs): the widened tile goes through shared memory and x is handed over transposed, the rest
    (grid, splits, pipeline) as on the GPU."""
    ws = tuple(ws)
    if xp.ndim not in (2, 3):
        raise ValueError(f"xp must be [Mp, K], or [2, Mp, K] with shared_ws; got {xp.shape}")
    groups = xp.ndim == 3 and not x_per_id  # [2, Mp, K]: the shared row's own x
    Mp, K = xp.shape[-2:]
    tile_k = tile_k or tile_k_for(K)
    stacked = ids is not None
    if x_per_id and (not stacked or shared_ws or xp.ndim != 3 or xp.shape[0] != ids.shape[0]):
        raise ValueError(f"x_per_id takes xp [P, Mp, K] with P = the ids' count and no shared_ws; got xp "
                         f"{xp.shape}, ids {None if ids is None else ids.shape}, {len(tuple(shared_ws))} shared")
    if stacked and (ids.ndim != 1 or ids.dtype != jnp.int32 or any(w.ndim != 3 for w in ws)
                    or len({w.shape[0] for w in ws}) != 1):
        raise ValueError(f"ids must be int32 [P] with weights stacked [E, ...] alike, got {ids.dtype} {ids.shape} "
                         f"and {[w.shape for w in ws]}")
    E, P = (ws[0].shape[0], ids.shape[0]) if stacked else (None, None)  # experts, ids
    shapes = [w.shape[1:] if stacked else w.shape for w in ws]  # one expert's (or the one) weight
    shared_ws = tuple(shared_ws)
    Q = 1 if shared_ws else 0  # the shared weights' program row
    if Q and (not stacked or [w.shape for w in shared_ws] != shapes or any(w.dtype != FP8 for w in shared_ws)):
        raise ValueError(f"shared_ws must go with ids, one FP8 weight per expert weight of its shape {shapes}, got "
                         f"{[(w.shape, str(w.dtype)) for w in shared_ws]}")
    if groups and (not Q or xp.shape[0] != 2):
        raise ValueError(f"xp must be [Mp, K], or [2, Mp, K] with shared_ws (the shared row's x second); got "
                         f"{xp.shape} with {len(shared_ws)} shared weights")
    tiled = w_layout == "tiled"  # `tile_weight`'s [N / tile_n, K / tile_k, tile_n, tile_k], read as [N, K]
    if tiled:
        if stacked or any(len(sh) != 4 or sh[2:] != (tile_n, tile_k) for sh in shapes):
            raise ValueError(f"tiled weights (no ids) must be [N / {tile_n}, K / {tile_k}, {tile_n}, {tile_k}] "
                             f"(the tiles given), got {shapes}")
    kns = [kn_shape(sh, w_layout) for sh in shapes]  # (K, N) of each weight
    Ns = [n for _, n in kns]
    cdt = jnp.dtype(compute_dtype)
    if xp.dtype != cdt or cdt not in (jnp.float16, jnp.bfloat16, FP8) or any(w.dtype != FP8 for w in ws):
        raise TypeError(f"need {cdt} x and float8_e4m3fn weights, got {xp.dtype} and {[w.dtype for w in ws]}")
    fp8 = cdt == FP8  # FP8 x FP8 WGMMA, both operands from shared memory, where it takes them: K-major
    if fp8 and w_layout == "kn":
        raise ValueError("FP8 x FP8 products need the weight K-major: w_layout 'nk' or 'tiled', not 'kn'")
    if any(k != K for k, _ in kns):
        raise ValueError(f"x has K={K}, weights {[w.shape for w in ws]} (w_layout={w_layout})")
    if Mp % 8 or Mp > 256:
        raise ValueError(f"x's rows must be padded to a multiple of 8 (at most 256), got {Mp}")
    if any(n % tile_n for n in Ns) or K % (tile_k * split_k):
        raise ValueError(f"each N {Ns} must divide by tile_n={tile_n} and K={K} by tile_k*split_k="
                         f"{tile_k * split_k}")
    k_per = K // tile_k // split_k
    lane = w_layout == "kn" and interpret is None  # the transposed register load: Lane semantics, own layouts
    starts = [sum(Ns[:i]) // tile_n for i in range(len(ws) + 1)]  # each weight's first tile in the grid

    def body(*refs):
        ids_gmem, refs = (refs[0], refs[1:]) if stacked else (None, refs)
        x_gmem, w_gmems, out_gmem = refs[0], refs[1:1 + len(ws)], refs[-1]
        shared_gmems = refs[1 + len(ws):-1]
        # under programmatic dependent launch (mavjax.xla_flags) a kernel may start while its predecessor runs;
        # a Mosaic GPU kernel waits for it only where it says so: before its first read (a no-op without PDL)
        if interpret is None:
            plgpu.griddepcontrol_wait()
        ni, si = lax.axis_index("n"), lax.axis_index("s")
        if stacked:
            pi = lax.axis_index("p")
            e = ids_gmem[jnp.minimum(pi, P - 1)]  # (a shared row's program reads a valid id it does not use)
            out_gmem = out_gmem.at[:, pi]  # [split_k, sum N, Mp]: this row's slice

        def program(x_gmem, w_gmem, nj):  # output tile nj of one weight, K split si
            def acc_scope(acc_ref, a_smem=None):
                def step(_, w_smem, x_smem):
                    if fp8:  # the tile as TMA left it: no register pass at all
                        a = w_smem
                    elif lane:  # [tile_k, tile_n] stored, loaded as its transpose, widened, re-laid for the WGMMA
                        a = plgpu.load(plgpu.transpose_ref(w_smem, (1, 0)), (),
                                       layout=plgpu.Layout.WGMMA_TRANSPOSED)
                        a = plgpu.layout_cast(widen(a, cdt), plgpu.Layout.WGMMA)
                    elif w_layout == "kn":  # the interpreter: a plain transpose
                        a = widen(w_smem[...], cdt).T
                    else:
                        a = widen(w_smem[...], cdt)  # [tile_n, tile_k]
                    if interpret is not None and not fp8:
                        a_smem[...] = a
                        plgpu.commit_smem()
                        a = a_smem
                    xt = x_smem if interpret is not None else plgpu.transpose_ref(x_smem, (1, 0))
                    plgpu.wgmma(acc_ref, a, xt)  # += [tile_n, tile_k] @ [tile_k, Mp]
                    plgpu.wgmma_wait(0)

                w_spec = ((tile_k, tile_n), lambda k: (si * k_per + k, nj)) if w_layout == "kn" else \
                    ((tile_n, tile_k), lambda k: (nj, si * k_per + k))
                if tiled:  # one contiguous [tile_n, tile_k] block, as "nk" from here on
                    w_spec = ((None, None, tile_n, tile_k), lambda k: (nj, si * k_per + k, 0, 0))
                x_spec = ((tile_k, Mp), lambda k: (si * k_per + k, 0)) if interpret is not None else \
                    ((Mp, tile_k), lambda k: (0, si * k_per + k))
                plgpu.emit_pipeline(
                    step, grid=(k_per,),
                    in_specs=[plgpu.BlockSpec(*w_spec, transforms=smem_transforms(FP8, w_spec[0][1]) if lane else ()),
                              plgpu.BlockSpec(*x_spec, transforms=smem_transforms(cdt, x_spec[0][1]) if lane else ())],
                    max_concurrent_steps=stages)(w_gmem, x_gmem)
                return acc_ref[...]

            if interpret is not None:  # the interpreter keeps register (ACC) and shared-memory scopes apart
                acc = pl.run_scoped(lambda a_smem: pl.run_scoped(lambda acc_ref: acc_scope(acc_ref, a_smem),
                                                                 plgpu.ACC((tile_n, Mp))),
                                    plgpu.SMEM((tile_n, tile_k), cdt))
            else:
                acc = pl.run_scoped(acc_scope, plgpu.ACC((tile_n, Mp)))

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((tile_n, Mp), jnp.float32))
            def _store(o_smem):
                o_smem[...] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[si, pl.ds(ni * tile_n, tile_n)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def programs(x, gm):
            if len(ws) == 1:
                program(x, gm[0], ni)
            for i, w_gmem in enumerate(gm if len(ws) > 1 else ()):
                pl.when((ni >= starts[i]) & (ni < starts[i + 1]))(
                    functools.partial(program, x, w_gmem, ni - starts[i]))

        if not stacked:
            programs(x_gmem, w_gmems)
            return
        # a dropped id: no weight read, its slice left unwritten
        x_pairs, x_shared = (x_gmem.at[0], x_gmem.at[1]) if groups else (x_gmem, x_gmem)
        if x_per_id:
            x_pairs = x_gmem.at[pi]
        pl.when((pi < P) & (e >= 0) & (e < E))(lambda: programs(x_pairs, [w.at[e] for w in w_gmems]))
        if Q:
            pl.when(pi >= P)(lambda: programs(x_shared, shared_gmems))

    sem = plgpu.LoweringSemantics.Lane if lane else plgpu.LoweringSemantics.Warpgroup
    rows = [P + Q] if stacked else []
    kern = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split_k, *rows, sum(Ns), Mp), jnp.float32),
        grid=(starts[-1], split_k, *rows), grid_names=("n", "s", "p")[:3 if stacked else 2],
        interpret=interpret, compiler_params=plgpu.CompilerParams(lowering_semantics=sem),
        kernel_name=f"mgpu_fp8_{'moe' if stacked else 'gemv'}_{w_layout}_n{tile_n}_k{tile_k}_s{split_k}_st{stages}")
    return kern(*([ids] if stacked else []), jnp.swapaxes(xp, -1, -2) if interpret is not None else xp, *ws,
                *shared_ws)


def padded_rows(M) -> int:
    """The kernel's x rows for M tokens: the WGMMA's N, a multiple of 8."""
    return -(-M // 8) * 8


def operand(x, widened=None, compute_dtype=None, padded=None):
    """x [M, K] -> the kernel's x (xp [padded_rows(M), K] in the compute dtype), its row factors (rs [M] float32
    with x = xp[:M] * rs[:, None], or None) and the compute dtype: compute_dtype=float8_e4m3fn quantizes x per
    token (rs its scales; x = xp * rs only to e4m3's rounding); bfloat16 for bf16 x not handed over widened
    (taken as it is, or as `padded` gives it: [padded_rows(M), K] bf16, x's rows then zeros, what
    fused_norm.add_rms_norm(pad_rows=...) writes: no XLA pad kernel), else float16 (x widened with an exact
    power of two per row, `upcast.to_compute`, or as `widened` gives it: (xc [padded_rows(M), K] float16, rs
    [padded_rows(M)] float32))."""
    M, K = x.shape
    Mp = padded_rows(M)
    cdt = path_dtype(x.dtype, widened is not None, compute_dtype)
    if cdt == FP8:
        if widened is not None or padded is not None:
            raise ValueError("the FP8 path quantizes x itself: no widened or padded x")
        from pallas_kernels.fp8_gemm import quantize_activation_per_token  # (fp8_gemm imports this module)

        xq, rs = quantize_activation_per_token(x)  # [M, K] e4m3, [M] float32
        return jnp.pad(xq, ((0, Mp - M), (0, 0))), rs, cdt
    if cdt == jnp.bfloat16:
        if widened is not None or x.dtype != jnp.bfloat16:
            raise ValueError(f"the bfloat16 path takes bf16 x as it is, got {x.dtype} x, widened={widened is not None}")
        if padded is None:
            return jnp.pad(x, ((0, Mp - M), (0, 0))), None, cdt  # [Mp, K]
        if padded.shape != (Mp, K) or padded.dtype != jnp.bfloat16:
            raise ValueError(f"padded must be bfloat16 [{Mp}, {K}] for x {x.shape}, got {padded.dtype} {padded.shape}")
        return padded, None, cdt
    if padded is not None:
        raise ValueError(f"padded is the bfloat16 path's x (bf16 x, not widened); got {x.dtype} x, compute dtype "
                         f"{jnp.dtype(cdt).name}")
    if widened is None:
        xc, rs = upcast.to_compute(x, jnp.float16)  # x = xc * rs[:, None], exactly
        return jnp.pad(xc, ((0, Mp - M), (0, 0))), rs, cdt  # [Mp, K]
    xp, rs = widened
    if xp.shape != (Mp, K) or xp.dtype != jnp.float16 or rs.shape != (Mp,):
        raise ValueError(f"widened must be float16 [{Mp}, {K}] and [{Mp}] for x {x.shape}, got {xp.dtype} "
                         f"{xp.shape} and {rs.shape}")
    return xp, rs[:M], cdt


@functools.partial(jax.jit, static_argnames=("w_layout", "tile_n", "split_k", "stages", "out_dtype", "compute_dtype",
                                             "interpret"))
def fp8_gemv_multi(x, ws, scales, *, widened=None, w_layout="kn", tile_n=None, split_k=None, stages=None,
                   out_dtype=None, compute_dtype=None, interpret=None):
    """[x @ dequant(w_i, scale_i) for each weight] in one launch: x [M, K] (M <= `max_rows` of the path: 16 on
    the float16 path, 64 on the bfloat16 one), ws FP8 [K, N_i]
    (w_layout "kn"), [N_i, K] ("nk") or `tile_weight`'s layout ("tiled": its tiles are the kernel's), scales
    float32 [N_i]. widened: x already in the kernel's form, (xc
    [padded_rows(M), K] float16, rs [padded_rows(M)] float32) with x = xc[:M] * rs[:M, None] (what
    fused_norm.add_rms_norm(widen_rows=...) writes): XLA's two widening kernels are not launched. compute_dtype:
    the MMA's operand type; None: bfloat16 for bf16 x not handed over widened (x read as it is, the weight widened
    to bf16 in registers), float16 otherwise; float8_e4m3fn: x quantized per token, FP8 x FP8 products (weights
    "nk" or "tiled"). Tiles: `default_config` where not given."""
    ws, scales = tuple(ws), tuple(scales)
    M, K = x.shape
    Ns = [kn_shape(w.shape, w_layout)[1] for w in ws]
    if [s.shape for s in scales] != [(n,) for n in Ns]:
        raise ValueError(f"scales {[s.shape for s in scales]} must be [N] per weight, N = {Ns}")
    cdt = path_dtype(x.dtype, widened is not None, compute_dtype)
    if not supported(M, K, Ns, compute_dtype=cdt):
        raise ValueError(f"mgpu_gemv takes 1..{max_rows(cdt)} rows on its {jnp.dtype(cdt).name} path, K % 64 == 0 "
                         f"and N % 64 == 0; got M={M}, K={K}, N={Ns}")
    tile_k = None
    if w_layout == "tiled":  # the tiles are the weight's
        if tile_n not in (None, ws[0].shape[2]):
            raise ValueError(f"tile_n={tile_n} for tiled weights of tile {ws[0].shape[2:]}")
        tile_n, tile_k = ws[0].shape[2:]
    if cdt == FP8 and w_layout == "kn":
        raise ValueError("the FP8 path (FP8 x FP8 products) needs K-major weights: w_layout 'nk' or 'tiled'")
    cfg = default_config(K, Ns, rows=padded_rows(M), tile_n=tile_n, tile_k=tile_k, w_layout=w_layout,
                         x_bytes=jnp.dtype(cdt).itemsize)
    tile_n, split_k, stages = tile_n or cfg["tile_n"], split_k or cfg["split_k"], stages or cfg["stages"]
    xp, rs, cdt = operand(x, widened, cdt)
    parts = gemv_partials(xp, ws, w_layout=w_layout, tile_n=tile_n, tile_k=tile_k, split_k=split_k, stages=stages,
                          compute_dtype=cdt, interpret=interpret)  # [S, sum N, Mp]
    yt = sum_in_xla(parts)[:, :M]  # [sum N, M]
    yt = yt if rs is None else yt * rs[None, :]
    outs, at = [], 0
    for n, s in zip(Ns, scales):
        outs.append((yt[at:at + n].T * s.astype(jnp.float32)[None, :]).astype(out_dtype or x.dtype))  # [M, N_i]
        at += n
    return outs


def fp8_gemv(x, w, scale, **kw):
    """y[M, N] = x[M, K] @ dequant(w, scale[N]): `fp8_gemv_multi` with one weight."""
    return fp8_gemv_multi(x, (w,), (scale,), **kw)[0]
