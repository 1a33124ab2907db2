"""Split-KV decode attention on Hopper through Mosaic GPU (Pallas' `plgpu` backend): `decode_attention`'s function
(pallas_kernels/decode_attention.py, whose module doc gives the shapes, the masking and the slot ranges) for a bf16
cache, the K and V tiles streamed by TMA through a multi-stage shared-memory pipeline and both products on the
tensor cores (WGMMA).

Why beside the Triton kernel: at batch 1 and 8K slots that kernel read the cache at 64-71% of the copy bandwidth
(docs/benchmarks.md section 25; issue 3's target is 80%), about what one plain XLA read of the same 34 MB reaches,
while the Mosaic GPU GEMM, whose weight tiles travel the same way, streams 26-84 MB at 81-105% of it (sections 18,
33). A TMA copy moves a whole tile per instruction with no address arithmetic, so a program keeps several tiles in
flight from its first cycle.

Grid (splits, kv heads, batch), one program a (batch row, kv head, split):

    q rows     r = t * Gp + g: query head h * G + g at position t, Gp = G rounded up to 8     [ROWS, Dh] bf16
    per tile   s = q k^T * scale (log2 units), masked by k_pos against each row's q_pos      [ROWS, bs] f32
               online softmax (m, l per row), acc += p v                                     [ROWS, Dh] f32
    partials   o = acc, m, l of the rows r < Rw = Gp * T                                     [Rw, Dh], [Rw]
    merge      the pair's last split: out = sum over splits, weighted by 2^(m - M), / L     [Rw, Dh] -> out

The WGMMA's M is 64 rows, so the G query heads of a kv head at T positions (Maverick: 5 heads, T = 1 at decode, 4
at verification) fill Gp * T of them and the rest are padding: the products are cheap next to the bytes (a 64-slot
tile's two WGMMAs are ~0.5 us of one SM's tensor core against ~1 us of its share of the bandwidth). The splits are
merged in the kernel where `merge_fits` (`attention(merge="kernel")`: semaphores, one WGMMA), else by XLA's
`decode_attention.combine_partials`. Measured on an H200 (docs/benchmarks.md section 34): verification at 8K (T =
4) 21% and batch 8 6% faster than the Triton kernel, batch 1 at 8K a tie (the kernel alone reads at 86% of copy
bandwidth; a merge, in the kernel or in XLA, costs ~3 us more), the 8-way rank's 1K context slower (Triton's kept).
Each program derives its rows' slot range from q_pos as `decode_attention` does (slot i holds position i; on chunked
layers the chunk of the smallest query) and takes an even share of the bs-slot tiles that overlap it, so at long
contexts only the filled part of the cache is read; an empty share stores o = 0, m = -inf, l = 0 (weight 0 in the
merge). Visibility inside a tile is decided by k_pos alone, as there.

interpret (an `InterpretGPUParams`, mgpu_gemv.interpret_params: Pallas' GPU interpreter on a CPU, which has no
register layouts or register operands): the products are plain dots on the tiles the pipeline loaded; the grid,
slot ranges, pipeline, masking, softmax and stores are the GPU's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import mgpu_gemv
from pallas_kernels.decode_attention import _span, combine_partials
from pallas_kernels.mgpu_gemv import plgpu, smem_transforms

ROWS = 64  # the WGMMA's M: every (query head, position) row of one kv head
ROW_GROUP = 8  # a position's G heads take G rounded up to this many rows
BLOCK_S = 64  # slots a tile: K and V tiles of 16 KB each at Dh = 128
LOG2E = math.log2(math.e)
SMEM_BUDGET = 220 << 10  # of an H100/H200 SM's 227 KB, what one program may take


def rows_per_position(G) -> int:
    """Rows of one query position: its G heads rounded up to ROW_GROUP."""
    return -(-G // ROW_GROUP) * ROW_GROUP


def supported(T, H, K, S, Dh, q_dtype, kv_dtype, block_s=BLOCK_S) -> bool:
    """Whether `decode_attention_mgpu` takes this problem: bf16 q and cache, H a multiple of K, every position's
    heads within ROWS rows (rows_per_position(H // K) * T <= 64), Dh a multiple of 64 up to 256, and a cache of at
    least one tile whose slots are a multiple of 8 (k_pos's rows, TMA-copied, must be 16-byte aligned; a last tile
    past S is masked by slot)."""
    bf16 = jnp.dtype(jnp.bfloat16)
    return (plgpu is not None and jnp.dtype(q_dtype) == bf16 and jnp.dtype(kv_dtype) == bf16 and K > 0
            and H % K == 0 and rows_per_position(H // K) * T <= ROWS and Dh % 64 == 0 and Dh <= 256
            and block_s % 8 == 0 and S >= block_s and S % 8 == 0)


def stages_for(block_s, Dh) -> int:
    """Pipeline depth: the most of 4, 3, 2 whose K + V slots and the q tiles fit SMEM_BUDGET."""
    per = 2 * block_s * Dh * 2 + block_s * 4 + 16  # K and V tiles, the k_pos tile, a barrier
    fixed = 2 * ROWS * Dh * 2  # q: its rows as copied, and the WGMMA's tile
    return next((s for s in (4, 3) if fixed + s * per <= SMEM_BUDGET), 2)


def default_num_splits(batch, kv_heads, num_slots, chunk_size, block_s, T, num_sms=None) -> int:
    """Programs per (batch row, kv head): one wave of one program per SM over the B * K pairs (each program's
    pipeline keeps its share of the bandwidth in flight: a second wave would only queue behind the first; docs/
    benchmarks.md section 34: 24 splits of 8 pairs, 1.5 waves, 30% slower than 16), at most the tiles a query can
    see, lowered to the fewest splits with the same tiles per split."""
    if num_sms is None:
        num_sms = int(getattr(jax.devices()[0], "core_count", 0) or 132)
    tiles = -(-_span(num_slots, chunk_size, block_s, T) // block_s)
    ns = max(1, min(num_sms // max(1, batch * kv_heads), tiles))
    return -(-tiles // -(-tiles // ns))


def _iota(shape, dim, interpret):
    if interpret is not None:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _vector(x, n, interpret):
    """A float32 [n] vector of value x in the layout of a WGMMA result's row statistics."""
    v = jnp.full((n,), x, jnp.float32)
    return v if interpret is not None else plgpu.layout_cast(v, plgpu.Layout.WGMMA.reduce(1))


def merge_fits(num_splits, G, T) -> bool:
    """Whether the kernel can merge these splits itself (`attention(merge="kernel")`): one split, or splits whose
    partial rows (num_splits * rows_per_position(G) * T: the merge's WGMMA K, which takes a register operand 64 deep
    at a time) are a multiple of 64 and at most MERGE_ROWS (a TMA copy moves at most 256 along a dimension)."""
    kc = num_splits * rows_per_position(G) * T
    return num_splits == 1 or (kc % 64 == 0 and kc <= MERGE_ROWS)


MERGE_ROWS = 256


def attention(q, k, v, q_pos, k_pos, *, chunk_size, scale, block_s=BLOCK_S, num_splits=1, stages=None,
              merge="kernel", interpret=None):
    """The kernel. q [B, T, H, Dh] bf16; k, v [B, S, K, Dh] bf16; q_pos [B, T], k_pos [B, S] int32.

    merge "kernel" (`merge_fits`): every split stores its partial (o in bf16, m and l in float32) and signals its
    pair's semaphore; the pair's last split in launch order waits for the others, reads the pair's partials and
    merges them with one WGMMA: out[r] = sum_c W[r, c] o[c] / L[r] over the partial rows c = split * Rw + r' with
    W[r, c] = 2^(m[c] - M[r]) where r' = r (0 elsewhere; m in log2 units), M[r] its largest m and L[r] = sum_c
    W[r, c] l[c] (the log-sum-exp merge, with the masks and row statistics of the softmax above), and stores the
    output [B, T, H, Dh] bf16 itself: the op is one launch. (Programs launch in grid order, the split axis
    fastest, so a pair's other splits are running or done when its last one waits: the wait cannot deadlock,
    whatever the grid. The semaphores are global, one per pair, and the wait takes them back to zero.) The
    interpreter, which has no semaphores, runs the grid in order: the last split finds the partials written. With
    one split the output is written from the registers.

    merge "xla": returns float32 partials o [B, K, NS, Gp * T, Dh] (not normalised), m, l [B, K, NS, Gp * T] (m in
    natural-log units; -inf and 0 where a split saw no key) for `combine_partials`."""
    B, S, K, Dh = k.shape
    T, H = q.shape[1:3]
    G = H // K
    Gp = rows_per_position(G)
    Rw = Gp * T
    NS = num_splits
    bs = block_s
    st = stages or stages_for(bs, Dh)
    lane = interpret is None
    c = float(scale) * LOG2E  # scores in log2 units: exp2 below
    in_kernel = merge == "kernel"
    if merge not in ("kernel", "xla") or (in_kernel and not merge_fits(NS, G, T)):
        raise ValueError(f"merge must be 'kernel' (for {NS} splits of {Rw} rows: merge_fits says no) or 'xla', "
                         f"got {merge!r}")
    Kc = NS * Rw  # the merge's partial rows
    ragged = S % bs != 0
    swizzled = smem_transforms(jnp.bfloat16, Dh) if lane else ()  # the WGMMA operands' tiles (K, V, q)

    def body(qpos_gmem, q_gmem, kpos_gmem, k_gmem, v_gmem, *outs):
        if lane:  # under programmatic dependent launch, wait for the kernel before (see mgpu_gemv)
            plgpu.griddepcontrol_wait()
        si, h, b = lax.axis_index("s"), lax.axis_index("h"), lax.axis_index("b")
        # This row's query positions -> the slots holding every visible key (decode_attention's derivation)
        qp = [qpos_gmem[b, t] for t in range(T)]
        hi = functools.reduce(jnp.maximum, [jnp.where(p >= 0, p, -1) for p in qp]) + 1
        big = jnp.int32(jnp.iinfo(jnp.int32).max)
        qlo_t = [jnp.int32(0) if chunk_size is None else lax.div(jnp.maximum(p, 0), jnp.int32(chunk_size)) * chunk_size
                 for p in qp]  # each query's first visible position
        lo = functools.reduce(jnp.minimum, [jnp.where(p >= 0, lq, big) for p, lq in zip(qp, qlo_t)])
        lo, hi = jnp.clip(lo, 0, S), jnp.clip(hi, 0, S)
        lo_t, hi_t = lax.div(lo, jnp.int32(bs)), lax.div(hi + (bs - 1), jnp.int32(bs))
        per = lax.div(jnp.maximum(hi_t - lo_t, 0) + (NS - 1), jnp.int32(NS))
        t0 = lo_t + si * per
        n = jnp.clip(jnp.minimum(t0 + per, hi_t) - t0, 0, per)  # this split's tiles

        @functools.partial(pl.run_scoped, q_smem=plgpu.SMEM((ROWS, Dh), jnp.bfloat16, transforms=swizzled),
                           q_rows=plgpu.SMEM((ROWS, Dh), jnp.bfloat16), bar=plgpu.Barrier(num_arrivals=T))
        def _scope(q_smem, q_rows, bar):
            # q's rows straight from [B, T, H, Dh]: position t's G heads of kv head h, one TMA copy each, to rows
            # t * Gp.. of a plain buffer, then through registers into the WGMMA's swizzled tile. The rows between
            # are never written: their garbage stays in their own rows, which see no key (q_hi = -1 below), so
            # the mask replaces their scores and they add nothing.
            for t in range(T):
                plgpu.copy_gmem_to_smem(q_gmem.at[b, t, pl.ds(h * G, G)], q_rows.at[pl.ds(t * Gp, G)], bar)
            plgpu.barrier_wait(bar)
            # (optimized=False: JAX 0.10 finds no bank-conflict-free plan for this one-off copy and would refuse it)
            q_smem[...] = plgpu.load(q_rows, (), layout=plgpu.Layout.WGMMA, optimized=False) if lane else q_rows[...]
            plgpu.commit_smem()
            shape = (ROWS, bs)
            row = _iota(shape, 0, interpret)
            pos, grp = lax.div(row, jnp.int32(Gp)), lax.rem(row, jnp.int32(Gp))
            q_hi = jnp.full(shape, -1, jnp.int32)  # padding rows see nothing
            q_lo = jnp.zeros(shape, jnp.int32)
            for t in range(T):
                mine = (pos == t) & (grp < G)
                q_hi = jnp.where(mine, qp[t], q_hi)
                q_lo = jnp.where(mine, qlo_t[t], q_lo)

            def step(idx, k_smem, v_smem, kp_smem, carry):
                acc, m, l = carry
                if lane:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
                        return acc_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))
                    kp = plgpu.load(kp_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
                else:
                    s = lax.dot_general(q_smem[...], k_smem[...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                    kp = kp_smem[...]
                kp = lax.broadcast_in_dim(kp, shape, [1])
                vis = (kp >= q_lo) & (kp <= q_hi)
                if ragged:  # the last tile runs past S: TMA reads zeros there (k_pos 0 too), so mask by slot
                    vis &= (t0 + idx[0]) * bs + _iota(shape, 1, interpret) < S
                s = jnp.where(vis, s * c, -jnp.inf)  # [ROWS, bs]
                m_new = jnp.maximum(m, s.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no (-inf) - (-inf)
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, shape, [0]))
                l = alpha * l + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(jnp.bfloat16)
                acc = _mma(acc, p16, v_smem, lane)  # += [ROWS, bs] @ [bs, Dh]
                return acc, m_new, l

            acc0 = jnp.zeros((ROWS, Dh), jnp.float32)
            if lane:
                acc0 = plgpu.layout_cast(acc0, plgpu.Layout.WGMMA)
            init = (acc0, _vector(-jnp.inf, ROWS, interpret), _vector(0.0, ROWS, interpret))
            kv_spec = dict(block_shape=(None, bs, None, Dh), index_map=lambda i: (b, t0 + i, h, 0),
                           transforms=swizzled)
            acc, m, l = plgpu.emit_pipeline(
                step, grid=(n,), in_specs=[plgpu.BlockSpec(**kv_spec), plgpu.BlockSpec(**kv_spec),
                                           plgpu.BlockSpec((None, bs), lambda i: (b, t0 + i))],
                max_concurrent_steps=st, init_carry=init)(k_gmem, v_gmem, kpos_gmem)
            if not in_kernel:
                _store_partials(acc, m * math.log(2.0), l, outs, (b, h, si), Rw, Dh, jnp.float32)
                return
            out_gmem, po_gmem, pm_gmem, pl_gmem = outs
            if NS == 1:  # no partials: the output from the registers
                return _store_out(acc, l, out_gmem, b, h, T, G, Gp, Dh, interpret)
            rows = pl.ds(si * Rw, Rw)  # this split's partial rows
            last = si == NS - 1
            # the others wait for their writes to land before they signal; the last split's own write lands while
            # it waits for their signals
            _store_partials(acc, m, l, (po_gmem.at[b, h, rows], pm_gmem.at[b, h, rows], pl_gmem.at[b, h, rows]), (),
                            Rw, Dh, jnp.bfloat16, finished=jnp.logical_not(last))
            sem = None if not lane else pl.get_global(plgpu.SemaphoreType.REGULAR((B * K,))).at[b * K + h]
            if lane:
                pl.when(jnp.logical_not(last))(lambda: pl.semaphore_signal(sem))

            @pl.when(last)
            def _merge():
                if lane:
                    pl.semaphore_wait(sem, NS - 1)  # the other splits' partials are in memory (and back to zero)
                plgpu.wait_smem_to_gmem(0, wait_read_only=False)  # and this one's
                _merge_partials(po_gmem.at[b, h], pm_gmem.at[b, h], pl_gmem.at[b, h], out_gmem, b, h, T, G, Gp, Dh,
                                Kc, interpret)

    if in_kernel:
        out = (jax.ShapeDtypeStruct((B, T, H, Dh), jnp.bfloat16),
               jax.ShapeDtypeStruct((B, K, Kc, Dh), jnp.bfloat16),
               jax.ShapeDtypeStruct((B, K, Kc), jnp.float32), jax.ShapeDtypeStruct((B, K, Kc), jnp.float32))
    else:
        out = (jax.ShapeDtypeStruct((B, K, NS, Rw, Dh), jnp.float32),
               jax.ShapeDtypeStruct((B, K, NS, Rw), jnp.float32), jax.ShapeDtypeStruct((B, K, NS, Rw), jnp.float32))
    kern = plgpu.kernel(body, out_type=out, grid=(NS, K, B), grid_names=("s", "h", "b"), interpret=interpret,
                        compiler_params=plgpu.CompilerParams(approx_math=True),
                        kernel_name=f"mgpu_split_kv_attention_bs{bs}_st{st}_ns{NS}_{merge}")
    k_pos = k_pos.astype(jnp.int32)
    if ragged and not lane:  # the interpreter refuses a copy past S, which TMA fills with zeros: pad as it fills
        pad = -S % bs
        k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)))
    res = kern(q_pos.astype(jnp.int32), q, k_pos, k, v)
    return res[0] if in_kernel else res


def _mma(acc, a, b_smem, lane):
    """acc + a @ b: a [ROWS, K] bf16 in registers, b [K, N] in shared memory (the WGMMA; the interpreter: a dot)."""
    if not lane:
        return acc + jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)
    return pl.run_state(mma)(plgpu.ACC.init(acc))


def _store_partials(acc, m, l, dsts, at, Rw, Dh, o_dtype, finished=False):
    """A split's partial rows 0..Rw-1 (o in o_dtype, m, l float32) to the GMEM refs dsts (indexed by `at`); waits
    for the writes to land where `finished` (a bool, or a traced one: before a semaphore tells another program),
    else only for the reads of the shared-memory buffers, which are released on return."""
    po, pm, pls = (d.at[at] if at else d for d in dsts)

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((ROWS, Dh), o_dtype),
                       m_smem=plgpu.SMEM((ROWS,), jnp.float32), l_smem=plgpu.SMEM((ROWS,), jnp.float32))
    def _(o_smem, m_smem, l_smem):
        o_smem[...] = acc.astype(o_dtype)
        m_smem[...] = m
        l_smem[...] = l
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, Rw)], po)
        plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, Rw)], pm)
        plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, Rw)], pls)
        if isinstance(finished, bool):
            plgpu.wait_smem_to_gmem(0, wait_read_only=not finished)
        else:
            pl.when(finished)(lambda: plgpu.wait_smem_to_gmem(0, wait_read_only=False))
            pl.when(jnp.logical_not(finished))(lambda: plgpu.wait_smem_to_gmem(0, wait_read_only=True))


def _store_out(o, L, out_gmem, b, h, T, G, Gp, Dh, interpret):
    """Rows t * Gp + g of o / L (L = 0: 0) -> out[b, t, h * G + g], bf16, one TMA copy a position."""
    Lb = lax.broadcast_in_dim(L, o.shape, [0])
    o = jnp.where(Lb > 0, o / jnp.where(Lb > 0, Lb, 1.0), 0.0).astype(jnp.bfloat16)

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((ROWS, Dh), jnp.bfloat16))
    def _(o_smem):
        o_smem[...] = o
        plgpu.commit_smem()
        for t in range(T):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(t * Gp, G)], out_gmem.at[b, t, pl.ds(h * G, G)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _merge_partials(po, pm, pls, out_gmem, b, h, T, G, Gp, Dh, Kc, interpret):
    """One pair's Kc partial rows (po [Kc, Dh] bf16, pm, pl [Kc] float32; row c = split * Rw + r', m in log2
    units) -> its output rows: out[r] = sum_c W[r, c] o[c] / L[r], W[r, c] = 2^(m[c] - M[r]) where c % Rw == r
    (else 0), M[r] the largest such m, L[r] = sum_c W[r, c] l[c]. W is [ROWS, Kc] in the WGMMA's layout (the
    partials' m and l broadcast as its columns, M and L reduced over them as the softmax reduces its rows)."""
    lane = interpret is None

    swizzled = smem_transforms(jnp.bfloat16, Dh) if lane else ()  # the merge WGMMA's B operand

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((Kc, Dh), jnp.bfloat16, transforms=swizzled),
                       m_smem=plgpu.SMEM((Kc,), jnp.float32), l_smem=plgpu.SMEM((Kc,), jnp.float32),
                       bar=plgpu.Barrier(num_arrivals=3))
    def _(o_smem, m_smem, l_smem, bar):
        plgpu.copy_gmem_to_smem(po, o_smem, bar)
        plgpu.copy_gmem_to_smem(pm, m_smem, bar)
        plgpu.copy_gmem_to_smem(pls, l_smem, bar)
        plgpu.barrier_wait(bar)
        shape = (ROWS, Kc)
        if lane:
            mc = plgpu.load(m_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
            lc = plgpu.load(l_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
        else:
            mc, lc = m_smem[...], l_smem[...]
        r, col = _iota(shape, 0, interpret), _iota(shape, 1, interpret)
        mine = lax.rem(col, jnp.int32(Gp * T)) == r  # row r's partials: c = split * Rw + r
        mm = jnp.where(mine, lax.broadcast_in_dim(mc, shape, [1]), -jnp.inf)  # [ROWS, Kc]
        M = mm.max(axis=1)
        M = jnp.where(M == -jnp.inf, 0.0, M)
        # 0 off row r's partials and for empty splits; rounded to bf16 for the WGMMA, and L sums the same weights
        w = jnp.exp2(mm - lax.broadcast_in_dim(M, shape, [0])).astype(jnp.bfloat16)
        L = (w.astype(jnp.float32) * lax.broadcast_in_dim(lc, shape, [1])).sum(axis=1)
        acc = jnp.zeros((ROWS, Dh), jnp.float32)
        if lane:
            acc = plgpu.layout_cast(acc, plgpu.Layout.WGMMA)
        o = _mma(acc, w, o_smem, lane)  # [ROWS, Kc] @ [Kc, Dh]
        _store_out(o, L, out_gmem, b, h, T, G, Gp, Dh, interpret)


@functools.partial(jax.jit, static_argnames=("chunk_size", "scale", "block_s", "num_splits", "stages", "merge",
                                             "interpret"))
def decode_attention_mgpu(q, k, v, q_pos, k_pos, *, chunk_size, scale, block_s=BLOCK_S, num_splits=None,
                          stages=None, merge=None, interpret=None):
    """`decode_attention.decode_attention`'s function (q [B, T, H, Dh], cache k, v [B, S, K, Dh], q_pos [B, T],
    k_pos [B, S]; slot i holding position i for the slot range, visibility by k_pos) on the Mosaic GPU kernel, for
    what `supported` takes (bf16, the heads of a position within 64 rows, S a multiple of block_s). num_splits:
    `default_num_splits` where None; stages: `stages_for`; merge: "kernel" (one launch) where `merge_fits`, else
    "xla" (`attention`). interpret: mgpu_gemv.interpret_params(...). Returns [B, T, H, Dh] in q's dtype."""
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    if k.shape != (B, S, K, Dh) or v.shape != k.shape or q_pos.shape != (B, T) or k_pos.shape != (B, S):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape}, q_pos {q_pos.shape}, k_pos {k_pos.shape} "
                         f"do not match [B, T, H, Dh], [B, S, K, Dh], [B, T], [B, S]")
    if not supported(T, H, K, S, Dh, q.dtype, k.dtype, block_s) or v.dtype != k.dtype:
        raise ValueError(f"decode_attention_mgpu takes bf16 q and cache, H % K == 0, G rounded up to "
                         f"{ROW_GROUP} times T <= {ROWS} rows, Dh % 64 == 0 (<= 256), S >= block_s and S % 8 == 0; "
                         f"got q {q.dtype} {q.shape}, cache {k.dtype} {k.shape}, block_s={block_s}")
    G = H // K
    ns = num_splits or default_num_splits(B, K, S, chunk_size, block_s, T)
    merge = merge or ("kernel" if merge_fits(ns, G, T) else "xla")
    kw = dict(chunk_size=chunk_size, scale=scale, block_s=block_s, num_splits=ns, stages=stages, interpret=interpret)
    if merge == "kernel":
        return attention(q, k, v, q_pos, k_pos, merge="kernel", **kw).astype(q.dtype)
    po, pm, pls = attention(q, k, v, q_pos, k_pos, merge="xla", **kw)
    out = combine_partials(po, pm, pls)  # [B, K, Gp * T, Dh]
    Gp = rows_per_position(G)
    out = out.reshape(B, K, T, Gp, Dh)[:, :, :, :G].transpose(0, 2, 1, 3, 4)  # [B, T, K, G, Dh]
    return out.reshape(B, T, H, Dh).astype(q.dtype)


def wanted(mosaic, T, H, K, S, Dh, q_dtype, kv_dtype) -> bool:
    """Whether decode_attention runs here: mosaic False never, True always (a ValueError where `supported` says
    no), None where supported on a Hopper GPU."""
    if mosaic is False:
        return False
    ok = supported(T, H, K, S, Dh, q_dtype, kv_dtype)
    if mosaic and not ok:
        raise ValueError(f"the Mosaic GPU attention takes bf16 q and cache, G rounded up to {ROW_GROUP} times T <= "
                         f"{ROWS}, Dh % 64 == 0, S >= {BLOCK_S} and S % 8 == 0; got T={T}, H={H}, K={K}, S={S}, "
                         f"Dh={Dh}, {jnp.dtype(q_dtype).name} q, {jnp.dtype(kv_dtype).name} cache")
    return ok and (bool(mosaic) or mgpu_gemv.on_hopper())

