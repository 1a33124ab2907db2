"""A decode step's whole dense-MLP block in one launch: gate/up + SwiGLU, down, residual add and RMSNorm, as
phases of a persistent kernel separated by grid-wide barriers.

    h = silu(x @ deq(wg)) * (x @ deq(wu))           (rounded to x's dtype, as mavjax.model.swiglu_hidden)
    s = residual + (h @ deq(wd))                    (the projection rounded to residual's dtype first)
    y = rms_norm(s) * norm_w                        (mavjax.model.rms_norm's arithmetic)

Why. At one 8-way rank of Maverick the same block is four to six launches (the fused gate/up, XLA's split-K
sum + SwiGLU, the down GEMM, its sum, the add + norm) and each pays 1.2-13 us above its bytes: a launch,
the first loads' round trips, the last programs' tail (docs/benchmarks.md section 12). Pulling the next op's
weights into L2 early (pallas_kernels/prefetch.py, section 13) bought nothing: the time is in the chain of
dependent round trips, not in DRAM. Here one grid of exactly `num_programs` programs (one per SM, all
resident at once) walks the phases; between two phases every program counts its arrival on a global counter
and waits until all have arrived (an acquire-release atomic at GPU scope after a CTA barrier, CUTLASS's and
cooperative groups' grid sync), so a phase costs its own streaming plus one barrier, not a launch.

Phases (work items are dealt round-robin: item = pid + i * num_programs):
  1. gate/up: items (F column tile, K split over D); each stores its scaled f32 partials of g and u [S1, M, F].
  2. down: items (D column tile, K split over F); each K step rebuilds its h tile from the phase-1 partials
     (sum over S1, SwiGLU, rounded to x's dtype) and multiplies it with its w_down tile; f32 partials
     [S2, M, D].
  3. rows: program r sums row r's S2 partials, adds the residual, writes s and the normed y.
The partials are outputs of the kernel (scratch in HBM; L2-resident at these sizes) read with volatile loads
(never a stale L1 line). A last-departure counter resets the barrier counter, so the counters (an XLA
constant, pallas_kernels/split_k.counters) are zero between launches.

Interpret mode (CPU tests) runs programs one after another, so a spinning barrier would wait forever: there the
grid is one program that runs the same phase code for every virtual program id in turn, phase after phase.
The tiling, the partials and every phase's arithmetic are the GPU's; only the barriers are not exercised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import upcast
from pallas_kernels.fp8_gemm import FP8, NUM_SMS_H100, _call, _in_bounds, _load, _mask2, _next_pow2, _silu, _store
from pallas_kernels.fused_gemm import _k_loop, gate_up_swiglu_ref
from pallas_kernels.fused_norm import add_rms_norm_ref
from pallas_kernels.split_k import counters, load_partial

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

__all__ = ["mlp_add_rms_norm", "mlp_add_rms_norm_ref", "phase_config", "MAX_ROWS"]

MAX_ROWS = 16  # tokens per call: one MMA row block (decode; verification of a few draft tokens)


def mlp_add_rms_norm_ref(x, wg, sg, wu, su, wd, sd, residual, norm_w, *, eps):
    """(s, y) as the model computes them on the unfused path (float32 GEMMs on the dequantized weights)."""
    from pallas_kernels.fp8_gemm import fp8_matmul_ref

    h = gate_up_swiglu_ref(x, wg, sg, wu, su, out_dtype=x.dtype)                 # [M, F]
    return add_rms_norm_ref(residual, fp8_matmul_ref(h, wd, sd, out_dtype=residual.dtype), norm_w, eps)


def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 / H200 SXM); NUM_SMS_H100 off-GPU."""
    try:
        n = getattr(jax.devices()[0], "core_count", None)
        return int(n) if n else NUM_SMS_H100
    except Exception:  # pragma: no cover
        return NUM_SMS_H100


def phase_config(n_out: int, k: int, programs: int, block_k: int, block_ns=(64, 128)):
    """(block_n, split, k blocks per split) for a phase of n_out output columns and contraction k over
    `programs` programs: the tiling with the fewest rounds of items (column tiles x splits: fewer, larger
    items and fewer partials to sum), then the one that fills its last round best, then the widest tile.
    Every split is non-empty."""
    nk = pl.cdiv(k, block_k)
    best = None
    for bn in block_ns:
        tiles = pl.cdiv(n_out, bn)
        for s in range(1, nk + 1):
            kbps = pl.cdiv(nk, s)
            s_eff = pl.cdiv(nk, kbps)
            items = tiles * s_eff
            rounds = pl.cdiv(items, programs)
            key = (-rounds, items / (rounds * programs), bn, -s_eff)
            if best is None or key > best[0]:
                best = (key, (bn, s_eff, kbps))
    return best[1]


def _grid_barrier(cnt_ref, target):
    """Wait until `target` arrivals are counted on cnt_ref[0], this program's included (see the module doc):
    CTA barrier, release-acquire atomics at GPU scope, CTA barrier - cooperative groups' grid sync, after which
    plain loads see what every program stored before it."""
    plgpu.debug_barrier()  # every warp's stores are issued before the (release) atomic
    plgpu.atomic_add(cnt_ref, 0, jnp.int32(1))
    lax.while_loop(lambda v: v < target, lambda v: plgpu.atomic_add(cnt_ref, 0, jnp.int32(0)),
                   plgpu.atomic_add(cnt_ref, 0, jnp.int32(0)))
    plgpu.debug_barrier()  # no warp runs ahead of the acquire


def _depart(cnt_ref, programs, arrivals):
    """After the last barrier: the last program to leave it zeroes both counters for the next launch."""
    old = plgpu.atomic_add(cnt_ref, 1, jnp.int32(1))

    @pl.when(old == programs - 1)
    def _():
        plgpu.atomic_add(cnt_ref, 0, jnp.int32(-arrivals))
        plgpu.atomic_add(cnt_ref, 1, jnp.int32(-programs))


def _kernel(x_ref, wg_ref, sg_ref, wu_ref, su_ref, wd_ref, sd_ref, res_ref, nw_ref, cnt_ref,
            gp_ref, up_ref, yp_ref, s_ref, y_ref, *, m, d, f, block_m, p1, p2, block_k1, block_k2, programs, eps,
            cdt, evict, sequential, volatile):
    bn1, s1, kbps1 = p1
    bn2, s2, kbps2 = p2
    m_in = _in_bounds(0, block_m, m) if m != block_m else None
    items1, items2 = pl.cdiv(f, bn1) * s1, pl.cdiv(d, bn2) * s2
    nk1, nk2 = pl.cdiv(d, block_k1), pl.cdiv(f, block_k2)
    hint_w = "evict_first" if evict else None
    # what other programs stored before a barrier: plain loads (the lines were never read by this SM before, so
    # L1 holds nothing stale, and Triton pipelines them with the weight tiles) or volatile ones (A/B)
    ld = load_partial if volatile else _load

    def gate_up(item):
        tile, sp = item // s1, item % s1
        n0 = pl.multiple_of(tile * bn1, bn1)
        n_in = _in_bounds(n0, bn1, f)
        kb_lo = sp * kbps1
        kb_hi = jnp.minimum(kb_lo + kbps1, nk1)
        g, u = _k_loop(x_ref, (wg_ref, wu_ref), (n0, n0), (n_in, n_in), m0=0, m_in=m_in, k=d, block_m=block_m,
                       block_n=bn1, block_k=block_k1, kb_lo=kb_lo, kb_hi=kb_hi, x_fp8=False, cdt=cdt, evict=evict)
        mask = _mask2(m_in, n_in)
        tile_idx = (sp, pl.ds(0, block_m), pl.ds(n0, bn1))
        _store(gp_ref.at[tile_idx], g * _load(sg_ref.at[pl.ds(n0, bn1)], n_in)[None, :], mask)   # [bm, bn1]
        _store(up_ref.at[tile_idx], u * _load(su_ref.at[pl.ds(n0, bn1)], n_in)[None, :], mask)

    def down(item):
        tile, sp = item // s2, item % s2
        n0 = pl.multiple_of(tile * bn2, bn2)
        n_in = _in_bounds(n0, bn2, d)
        kb_lo = sp * kbps2
        kb_hi = jnp.minimum(kb_lo + kbps2, nk2)

        def body(kb, acc):
            k0 = pl.multiple_of(kb * block_k2, block_k2)
            k_in = _in_bounds(k0, block_k2, f)
            hm = _mask2(m_in, k_in)
            g = u = jnp.zeros((block_m, block_k2), jnp.float32)
            for s in range(s1):  # unrolled: the partial loads are in flight together
                g = g + ld(gp_ref.at[jnp.int32(s), pl.ds(0, block_m), pl.ds(k0, block_k2)], hm)
                u = u + ld(up_ref.at[jnp.int32(s), pl.ds(0, block_m), pl.ds(k0, block_k2)], hm)
            h = (_silu(g) * u).astype(x_ref.dtype)                                       # [bm, bk2], as the model
            hc, hs = upcast.to_compute(h, cdt)                                           # f16: a power of 2 a row
            w = _load(wd_ref.at[pl.ds(k0, block_k2), pl.ds(n0, bn2)], _mask2(k_in, n_in), hint_w).astype(cdt)
            part = jnp.dot(hc, w, preferred_element_type=jnp.float32)                    # [bm, bk2] x [bk2, bn2]
            return acc + (part if hs is None else part * hs[:, None])

        acc = lax.fori_loop(kb_lo, kb_hi, body, jnp.zeros((block_m, bn2), jnp.float32))
        acc = acc * _load(sd_ref.at[pl.ds(n0, bn2)], n_in)[None, :]
        _store(yp_ref.at[(sp, pl.ds(0, block_m), pl.ds(n0, bn2))], acc, _mask2(m_in, n_in))

    bd = _next_pow2(d)
    c_in = _in_bounds(0, bd, d)

    def row(r):
        v = jnp.zeros((bd,), jnp.float32)
        for s in range(s2):
            v = v + ld(yp_ref.at[jnp.int32(s), r, pl.ds(0, bd)], c_in)
        res = _load(res_ref.at[r, pl.ds(0, bd)], c_in)
        sv = (res + v.astype(res.dtype)).astype(s_ref.dtype)  # the projection rounded first, then the add
        _store(s_ref.at[r, pl.ds(0, bd)], sv, c_in)
        sf = sv.astype(jnp.float32)                                                   # masked lanes are 0
        rs = lax.rsqrt(jnp.sum(sf * sf) / d + eps)
        w = _load(nw_ref.at[pl.ds(0, bd)], c_in)
        _store(y_ref.at[r, pl.ds(0, bd)], ((sf * rs).astype(s_ref.dtype) * w).astype(y_ref.dtype), c_in)

    def deal(pid, n_items, fn):
        def step(i, c):
            fn(pid + i * programs)
            return c
        lax.fori_loop(0, pl.cdiv(n_items - pid, programs), step, 0)

    if sequential:  # interpret mode: every virtual program of a phase, then the next phase
        for n_items, fn in ((items1, gate_up), (items2, down), (m, row)):
            lax.fori_loop(0, programs, lambda pid, c, n_items=n_items, fn=fn: (deal(pid, n_items, fn), c)[1], 0)
        return
    pid = pl.program_id(0)
    deal(pid, items1, gate_up)
    _grid_barrier(cnt_ref, programs)
    deal(pid, items2, down)
    _grid_barrier(cnt_ref, 2 * programs)
    _depart(cnt_ref, programs, 2 * programs)
    deal(pid, m, row)


_STATIC = ("eps", "block_k1", "block_k2", "num_programs", "programs_per_sm", "num_warps", "num_stages", "compute_dtype", "evict",
           "volatile", "interpret", "poison_output")


@functools.partial(jax.jit, static_argnames=_STATIC)
def mlp_add_rms_norm(x, wg, sg, wu, su, wd, sd, residual, norm_w, *, eps, block_k1=128, block_k2=64,
                     num_programs=None, programs_per_sm=1, num_warps=8, num_stages=3, compute_dtype=None, evict=True,
                     volatile=False, interpret=False, poison_output=False):
    """(s, y) = (residual + mlp(x), rms_norm of it * norm_w) in one persistent launch (module doc).

    x [M, D] (M <= MAX_ROWS), wg / wu [D, F] and wd [F, D] float8_e4m3fn with per-output-channel float32 scales
    sg / su [F], sd [D]; residual [M, D]; norm_w [D]. s has residual's dtype, y too. num_programs: the grid,
    which must fit on the GPU at once (default: programs_per_sm per SM; more than fit would never pass the
    first barrier); block_k1 / block_k2: the K steps of the
    two GEMM phases (their column tiles and splits follow from num_programs: phase_config). compute_dtype,
    evict, num_warps, num_stages: as pallas_kernels.fp8_gemm.fp8_matmul. volatile: read the partials other
    programs stored with volatile loads instead of plain ones. interpret: run on CPU (the phases one after
    another in one program; no barriers)."""
    M, D = x.shape
    F = wg.shape[1]
    if M > MAX_ROWS:
        raise ValueError(f"mlp_add_rms_norm takes at most {MAX_ROWS} rows (decode), got {M}")
    for name, w, shape in (("w_gate", wg, (D, F)), ("w_up", wu, (D, F)), ("w_down", wd, (F, D))):
        if w.shape != shape:
            raise ValueError(f"{name} must be {shape} for x [{M}, {D}] and F={F}, got {w.shape}")
        if w.dtype != FP8:
            raise TypeError(f"{name} must be float8_e4m3fn, got {w.dtype}")
    for name, s, n in (("s_gate", sg, F), ("s_up", su, F), ("s_down", sd, D), ("norm_w", norm_w, D)):
        if s.shape != (n,):
            raise ValueError(f"{name} must be [{n}], got {s.shape}")
    if residual.shape != (M, D):
        raise ValueError(f"residual must be [{M}, {D}], got {residual.shape}")
    programs = num_programs or (8 if interpret else num_sms() * programs_per_sm)
    block_m = max(16, _next_pow2(M))
    p1 = phase_config(F, D, programs, block_k1)
    p2 = phase_config(D, F, programs, block_k2)
    cdt = upcast.compute_dtype(compute_dtype, rows=block_m)
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    args = [x, wg, f32(sg), wu, f32(su), wd, f32(sd), residual, norm_w, counters(2)]
    outs = [jax.ShapeDtypeStruct((p1[1], M, F), jnp.float32)] * 2 + [
        jax.ShapeDtypeStruct((p2[1], M, D), jnp.float32), jax.ShapeDtypeStruct((M, D), residual.dtype),
        jax.ShapeDtypeStruct((M, D), residual.dtype)]
    kernel = functools.partial(_kernel, m=M, d=D, f=F, block_m=block_m, p1=p1, p2=p2, block_k1=block_k1,
                               block_k2=block_k2, programs=programs, eps=float(eps), cdt=cdt, evict=evict,
                               sequential=interpret, volatile=volatile)
    res = _call(kernel, args, outs, (1,) if interpret else (programs,), num_warps=num_warps,
                num_stages=num_stages, interpret=interpret, poison_output=poison_output,
                name=f"persistent_mlp_p{programs}_n{p1[0]}x{p1[1]}_n{p2[0]}x{p2[1]}")
    return res[3], res[4]
