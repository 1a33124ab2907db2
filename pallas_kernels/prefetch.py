"""Warm L2 with the *next* op's weights while this kernel runs: keep DRAM busy across kernel boundaries.

At one 8-way rank of Maverick a decode step is ~15 kernels a layer, most of them reading 1-20 MB of weights,
and every one of them pays a fixed 5-13 us above its bytes (docs/benchmarks.md section 12): the launch, the
ramp of its first loads from DRAM, the tail of its last programs, and the small XLA kernels in between,
during all of which DRAM idles. The weights a decode step reads next are known before it starts (the next
projection's, the next layer's; for a routed expert, once the router has chosen), so a kernel can ask for
them early: each program of a kernel issues `prefetch.global.L2` for its share of the 128-byte lines of the
arrays it is given. The instructions are fire-and-forget (no registers, no shared memory, nothing waited
for), DRAM streams those bytes into L2 (50 MB on an H100/H200) during this kernel's own time and the gaps
after it, and the next kernel finds its first tiles, or all of them, in L2.

A prefetch spec is (array, index): prefetch `array[index[j]]` for every j (index an int32 vector: a routed
expert's weights in a stacked [E, ...] tensor), or, with index None, the whole array. The kernel receives the
arrays as extra inputs (no copy: a custom call's operand is its buffer), and `with_prefetch` wraps any Pallas
kernel body so that the prefetches are issued first, before the body's own loads.

Lowering: the PTX instruction as Triton inline assembly over a tensor of pointers (one per line; non-pure, so
it is neither removed nor reordered across other side effects). Interpret mode (CPU tests) has no cache to
warm: the specs' arrays are passed and ignored there, so the kernel's function is the same with or without
them, which is what the CPU tests check; whether the instructions lower is checked on the GPU
(scripts/check_kernels_gpu.py) and what they buy is measured in docs/benchmarks.md section 13.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jax_core
from jax._src import effects
from jax.experimental import pallas as pl

try:  # the Triton lowering's private API (JAX 0.10-0.11); absent: kernels simply go without prefetches
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith as arith_dialect
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import lowering as _lowering
except ImportError:  # pragma: no cover
    _lowering = None

LINE = 128  # bytes per L2 line (the unit of prefetch.global.L2)
CHUNK = 512  # lines one program issues per loop step: 4 per thread at 4 warps


DEFAULT_DEPTH = 0  # how many weight-streaming ops ahead the model's decode kernels prefetch (MAVJAX_PREFETCH)


def depth() -> int:
    """How many of the following weight-streaming ops' weights each decode kernel of the model prefetches:
    MAVJAX_PREFETCH (0 = none, for A/B timing), default DEFAULT_DEPTH. Read when a step is traced."""
    v = os.environ.get("MAVJAX_PREFETCH", str(DEFAULT_DEPTH)).strip()
    if not v.isdigit() or int(v) > 8:
        raise ValueError(f"MAVJAX_PREFETCH must be an integer 0..8 (ops ahead to prefetch), got {v!r}")
    return int(v)


def first() -> int:
    """The first weight group a decode kernel prefetches, relative to its own: 1 (the next op's, default) or 0
    (its own weights too: every line of its share requested at once instead of a few pipeline stages ahead).
    MAVJAX_PREFETCH_FROM, for A/B timing."""
    v = os.environ.get("MAVJAX_PREFETCH_FROM", "1").strip()
    if v not in ("0", "1"):
        raise ValueError(f"MAVJAX_PREFETCH_FROM must be 0 or 1, got {v!r}")
    return int(v)


WHEN = ("start", "end")


def when() -> str:
    """Where a kernel issues its prefetches: "start" (before its own loads) or "end" (after its work: the
    bytes then stream during its tail and the launch gap instead of competing with its own loads).
    MAVJAX_PREFETCH_AT, default "end"."""
    v = os.environ.get("MAVJAX_PREFETCH_AT", "end").strip()
    if v not in WHEN:
        raise ValueError(f"MAVJAX_PREFETCH_AT must be one of {WHEN}, got {v!r}")
    return v


class Prefetch(NamedTuple):
    """`array[index[j]]` for every j (index: int32 [n]), or the whole array (index None)."""
    array: jax.Array
    index: jax.Array | None = None


def specs(*items) -> tuple[Prefetch, ...]:
    """Normalize arrays / (array, index) pairs / Prefetch / None into a tuple of Prefetch (None dropped)."""
    out = []
    for it in items:
        if it is None:
            continue
        if isinstance(it, Prefetch):
            out.append(it)
        elif isinstance(it, tuple):
            out.append(Prefetch(*it))
        else:
            out.append(Prefetch(it))
    return tuple(out)


def row_lines(shape, dtype, indexed: bool) -> tuple[int, int]:
    """(elements per prefetched row, 128-byte lines per row): a row is array[i] when indexed, else the whole
    array. The row's last partial line counts as a line."""
    elems = int(np.prod(shape[1:] if indexed else shape))
    return elems, math.ceil(elems * jnp.dtype(dtype).itemsize / LINE)


def program_range(pid, num_programs: int, lines: int):
    """Program pid's share [lo, hi) of `lines` lines, contiguous, as even as ceil division allows."""
    per = -(-lines // num_programs)
    lo = jnp.minimum(pid * per, lines)
    return lo, jnp.minimum(lo + per, lines)


class _PrefetchEffect(jax_core.Effect):
    """A kernel-local effect, so that the output-less primitive is not dropped as dead code."""


_EFFECT = _PrefetchEffect()
_prefetch_p = jax_core.Primitive("l2_prefetch_lines")
_prefetch_p.multiple_results = True


def _abstract_eval(ref, row, lines, *, row_elems, line_elems):
    del ref, row, lines, row_elems, line_elems
    return (), {_EFFECT}


_prefetch_p.def_effectful_abstract_eval(_abstract_eval)

if _lowering is not None:
    pallas_core.kernel_local_effects.add_type(_PrefetchEffect)
    effects.control_flow_allowed_effects.add_type(_PrefetchEffect)

    def _lower(ctx, ptr, row, lines, *, row_elems, line_elems):
        """ptr + row * row_elems + lines * line_elems (64-bit offsets: a stacked expert tensor passes 2^31
        bytes), one prefetch.global.L2 per element."""
        i64 = ir.IntegerType.get_signless(64)
        shape = ir.RankedTensorType(lines.type).shape
        t64 = ir.RankedTensorType.get(shape, i64)
        off = arith_dialect.muli(arith_dialect.extsi(t64, lines), _lowering._full(t64, line_elems))
        row64 = arith_dialect.muli(arith_dialect.extsi(i64, row), _lowering._ir_constant(row_elems, i64))
        off = arith_dialect.addi(off, _lowering._bcast_to(row64, shape))
        ptrs = _lowering._add(_lowering._bcast_to(ptr, shape), off)
        i32 = ir.IntegerType.get_signless(32)
        tt_dialect.elementwise_inline_asm([ir.RankedTensorType.get(shape, i32)],
                                          "prefetch.global.L2 [$1]; mov.u32 $0, 0;", constraints="=r,l",
                                          pure=False, packed_element=1, args=[ptrs])
        return []

    _lowering.register_lowering(_prefetch_p)(_lower)


def _issue(ref, row, lo, hi, *, row_elems, line_elems):
    """Lines [lo, hi) of row `row` of ref, CHUNK at a time (the last chunk's extra lanes repeat line hi - 1)."""
    def step(c, carry):
        lines = jnp.minimum(lo + c * CHUNK + jnp.arange(CHUNK, dtype=jnp.int32), hi - 1)
        _prefetch_p.bind(ref, row, lines, row_elems=row_elems, line_elems=line_elems)
        return carry

    lax.fori_loop(0, pl.cdiv(hi - lo, CHUNK), step, 0)


def issue(prefetch_refs, plan, pid, num_programs: int):
    """This program's prefetches: plan[i] = (indexed, n_rows, row_elems, lines, line_elems) for the i-th spec,
    whose refs are (array_ref, index_ref or None) in prefetch_refs. Each row's lines are split over all
    programs."""
    for (arr_ref, idx_ref), (indexed, n_rows, row_elems, lines, line_elems) in zip(prefetch_refs, plan):
        lo, hi = program_range(pid, num_programs, lines)
        for j in range(n_rows):  # static: a handful of routed experts at most
            row = idx_ref[j] if indexed else jnp.int32(0)
            pl.when(hi > lo)(lambda row=row: _issue(arr_ref, row, lo, hi, row_elems=row_elems,
                                                    line_elems=line_elems))


def with_prefetch(kernel, prefetch: Sequence[Prefetch], n_in: int, grid, interpret: bool):
    """(kernel', extra_args): kernel' takes the kernel's n_in inputs, then the prefetch arrays (and index
    vectors), then the rest of its refs; it issues this program's prefetches, then runs `kernel` on the refs
    it expects. Under interpret=True, or without the Triton lowering, the extra refs are ignored."""
    prefetch = specs(*prefetch)
    if not prefetch:
        return kernel, []
    extra, plan = [], []
    for p in prefetch:
        indexed = p.index is not None
        row_elems, lines = row_lines(p.array.shape, p.array.dtype, indexed)
        line_elems = max(1, LINE // jnp.dtype(p.array.dtype).itemsize)
        extra.append(p.array)
        if indexed:
            idx = jnp.asarray(p.index, jnp.int32).reshape(-1)
            extra.append(idx)
            plan.append((True, int(idx.shape[0]), row_elems, lines, line_elems))
        else:
            plan.append((False, 1, row_elems, lines, line_elems))
    n_extra = len(extra)
    active = not interpret and _lowering is not None
    grid = tuple(int(g) for g in grid)
    num_programs = int(np.prod(grid))

    at = when()

    def prefetches(pf):
        pid = jnp.int32(0)
        for axis, g in enumerate(grid):  # row-major linear program id
            pid = pid * g + pl.program_id(axis)
        pairs, i = [], 0
        for indexed, *_ in plan:
            pairs.append((pf[i], pf[i + 1] if indexed else None))
            i += 2 if indexed else 1
        issue(pairs, plan, pid, num_programs)

    def body(*refs):
        ins, pf, rest = refs[:n_in], refs[n_in:n_in + n_extra], refs[n_in + n_extra:]
        if active and at == "start":
            prefetches(pf)
        out = kernel(*ins, *rest)
        if active and at == "end":
            prefetches(pf)
        return out

    return body, extra
