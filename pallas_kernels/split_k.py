"""Split-K sums finished by the kernel that made them: the last split of each output tile reduces them.

At decode a weight-streaming kernel splits K over several programs per output tile to fill the GPU, so each
tile ends as S float32 partials. Summing them in XLA costs one more kernel launch (and applying a nonlinear
epilogue, SwiGLU or the qk norm, often another): at one 8-way rank of Maverick about 1.3 us each, ~10 of them
per layer (docs/benchmarks.md section 9). Here every split stores its partial, then counts its
arrival on the tile's counter with an atomic add; the program that arrives last (it reads S - 1) sums the S
partials and runs the epilogue itself, so the GEMM's launch is the only one.

Ordering. Before counting, a barrier makes every warp's partial stores precede the (acquire-release, GPU
scope) atomic; the last program reads the partials after its atomic with volatile loads (not cached in L1),
so it sees what the other programs released. This is CUTLASS's serial split-K semaphore.

Counters. An int32 vector that is zero before the kernel and zero after it: the last arrival subtracts the S
arrivals again. They are a numpy constant of the calling function (`counters`), i.e. an XLA constant buffer
allocated once per executable and never re-initialised: no memset per launch. Because every launch leaves the
counters at zero, XLA's view of that constant (all zeros) holds at every kernel boundary; kernels that share
such a buffer run one after the other on the stream, so they never see each other's counts.

`default_reduce(family)` is the default of every such kernel's `reduce` argument: DEFAULTS (measured: only the
attention keeps its sum in the kernel), overridden by MAVJAX_SPLIT_K_REDUCE for A/B timing.

Interpret mode (CPU tests) runs the programs one by one: the atomics are plain read-modify-writes there and
the barrier, which the interpreter lacks, is skipped.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:  # Triton-specific primitives; absent from CPU-only installs of some versions.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


# Where each kernel family sums its split-K partials by default, from one 8-way rank of Maverick on an H200
# (docs/benchmarks.md section 9): only the attention gains from its in-kernel merge (it replaces three XLA
# kernels and lets a split be one tile); for the weight GEMMs the last arrival's tail (barrier, atomic, a
# dependent L2 read of the partials) costs as much as the small XLA reduction it replaces, which XLA often
# fuses into the consumer anyway (the KV-cache write, the residual add), and each family moved into its kernel
# made the decode step slower (2.78 ms with attention alone in-kernel, 2.99 with all five).
DEFAULTS = {"gemm": "xla", "gate_up": "xla", "qkv": "xla", "moe": "xla", "attention": "kernel"}
FAMILIES = tuple(DEFAULTS)


def default_reduce(family: str, reduce: str | None = None) -> str:
    """Where kernel `family` (one of FAMILIES) sums split-K partials: `reduce` if given ("kernel" or "xla",
    checked), else DEFAULTS, overridden by MAVJAX_SPLIT_K_REDUCE: "kernel" or "xla" (every family), or a comma
    list of family=kernel|xla. Read when a kernel is traced: A/B runs on a GPU without code changes."""
    assert family in FAMILIES, family
    if reduce is not None:
        if reduce not in ("kernel", "xla"):
            raise ValueError(f"reduce must be 'kernel' or 'xla', got {reduce!r}")
        return reduce
    v = os.environ.get("MAVJAX_SPLIT_K_REDUCE", "").strip()
    if v in ("kernel", "xla"):
        return v
    where = dict(DEFAULTS)
    for item in filter(None, (t.strip() for t in v.split(","))):
        name, _, value = item.partition("=")
        if name.strip() not in DEFAULTS or value.strip() not in ("kernel", "xla"):
            raise ValueError(f"MAVJAX_SPLIT_K_REDUCE must be 'kernel', 'xla' or a comma list of family=kernel|xla "
                             f"(families: {', '.join(FAMILIES)}); got {v!r}")
        where[name.strip()] = value.strip()
    return where[family]


def counters(n: int) -> np.ndarray:
    """n tile counters, zero, as a numpy array (under jit an XLA constant, see the module doc), plus one last
    element that is never counted on and holds an odd value: XLA's simplifier turns an all-equal constant into
    a broadcast and [0, 1] into an iota, and either is then materialized by a kernel before every launch."""
    c = np.zeros((max(1, int(n)) + 1,), np.int32)
    c[-1] = 0x5EED
    return c


def arrive(cnt_ref, idx, arrivals: int, *, interpret: bool):
    """Count this program's arrival at counter `idx` after its partial stores; True (a traced bool) in the
    program that arrives last of `arrivals`, which also resets the counter to zero. Call it once per program
    and counter, after every store the last program must see, where every thread of the program gets to (a
    pl.when on a program-uniform condition is fine). `idx` may be traced (a program id)."""
    if interpret:  # the interpreter's atomics take 1-element slices, not scalar indices
        add = lambda v: plgpu.atomic_add(cnt_ref, pl.ds(idx, 1), jnp.full((1,), v, jnp.int32))[0]  # noqa: E731
    else:
        plgpu.debug_barrier()  # every warp's stores are issued before the (release) atomic
        # scalar index and value: JAX's lowering picks an integer add only for a scalar value (a 1-element
        # tensor of int32 would become a float add on the counter's bits)
        add = lambda v: plgpu.atomic_add(cnt_ref, idx, jnp.int32(v))  # noqa: E731
    last = add(1) == arrivals - 1

    @pl.when(last)
    def _reset():
        add(-arrivals)

    return last


def load_partial(ref, mask=None):
    """A partial another program stored in this launch, read as a volatile load: PTX ld.volatile is not
    cached in L1, so it never returns a stale L1 line. (Pallas' cache_modifier=".cg" would say the same
    more narrowly, but its Triton lowering rejects every spelling of it in JAX 0.10-0.11.)"""
    other = None if mask is None else jnp.zeros((), ref.dtype)
    return plgpu.load(ref, mask=mask, other=other, volatile=True)


def sum_partials(part_ref, num_splits: int, index, shape, mask=None):
    """float32 sum over the leading split axis of part_ref: part_ref.at[s, *index] for s < num_splits, each
    a `shape` tile (index: the tile's slices of the remaining axes). Unrolled, so the loads are in flight
    together (a loop would wait one L2 round trip per split)."""
    acc = jnp.zeros(shape, jnp.float32)
    for s in range(num_splits):
        acc = acc + load_partial(part_ref.at[(jnp.int32(s), *index)], mask).astype(jnp.float32)
    return acc


def sum_in_xla(parts):
    """parts [S, ...] summed over the leading (split) axis as S - 1 elementwise adds, in order: elementwise work
    that XLA fuses into whatever consumes it - also into a reduction (the top-1 routing over the router's logit
    partials), which cannot take another reduction's output into its fusion (docs/benchmarks.md section 23)."""
    acc = parts[0]
    for s in range(1, parts.shape[0]):
        acc = acc + parts[s]
    return acc

