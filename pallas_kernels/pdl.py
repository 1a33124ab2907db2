"""Programmatic dependent launch (PDL) from inside the Pallas kernels: let the next kernel launch early.

With `--xla_gpu_enable_pdl=true` (mavjax turns it on: mavjax/xla_flags.py) XLA launches each kernel with
CUDA's programmatic-stream-serialization attribute and puts a `griddepcontrol.wait` at its start: the kernel
may be launched while its predecessor still runs, and waits there until the predecessor has finished and its
writes are visible. When the predecessor lets it launch is up to the predecessor: at its
`griddepcontrol.launch_dependents`, or, without one, only as it completes. XLA emits that trigger only in its
own Triton GEMMs, never in a Pallas kernel, so after every Pallas kernel the next launch starts from cold: at
one 8-way rank of Maverick (~730 kernels a decode step, each a few microseconds) that launch latency and the
next kernel's ramp are much of the step (docs/benchmarks.md sections 10-12).

`launch_dependents()` issues the trigger (PTX `griddepcontrol.launch_dependents`), and `wait()` the wait, as
inline assembly with side effects (never removed or moved across other side effects). Every Pallas kernel
here calls `kernel_prologue()` first: the wait (XLA's own may be absent under a jaxlib that does not insert
it into custom Triton calls; a second wait returns at once), then the trigger. The trigger is safe at any
point: the dependent grid only launches; its own wait still holds it until this grid has completed and its
memory is flushed; and the trigger takes effect only once every program of this grid has issued it (or
exited), i.e. all of them are resident, so the dependent's programs never take an SM this grid still needs.
A kernel launched without the attribute (PDL off, pre-Hopper) waits for full completion as always, and both
instructions are no-ops for a grid without programmatic dependencies.

`MAVJAX_PDL_TRIGGER=0` leaves the kernels without either instruction (A/B timing); read when a kernel is
traced. Interpret mode (CPU tests) has no grids to overlap: the kernels go without them there.
"""

from __future__ import annotations

import os

from jax._src import core as jax_core
from jax._src import effects

try:  # the Triton lowering's private API (JAX 0.10-0.11); absent: the kernels simply go without the trigger
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import lowering as _lowering
except ImportError:  # pragma: no cover
    _lowering = None

ASM = {"launch_dependents": "griddepcontrol.launch_dependents;", "wait": "griddepcontrol.wait;"}


def enabled() -> bool:
    """Whether the kernels traced now get the prologue (MAVJAX_PDL_TRIGGER, default on)."""
    v = os.environ.get("MAVJAX_PDL_TRIGGER", "1").strip().lower()
    if v not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"MAVJAX_PDL_TRIGGER must be 0 or 1, got {v!r}")
    return v in ("1", "true", "on")


class _PdlEffect(jax_core.Effect):
    """An effect local to the kernel (as Pallas' own barrier has), so that the output-less primitives are not
    dropped from the kernel's jaxpr as dead code."""


_EFFECT = _PdlEffect()
if _lowering is not None:
    pallas_core.kernel_local_effects.add_type(_PdlEffect)
    effects.control_flow_allowed_effects.add_type(_PdlEffect)


def _primitive(name):
    p = jax_core.Primitive(f"pdl_{name}")
    p.multiple_results = True
    p.def_effectful_abstract_eval(lambda: ((), {_EFFECT}))
    if _lowering is not None:
        def lower(ctx):
            # a non-pure asm statement with a dummy result: LLVM keeps it and keeps its order among side effects
            tt_dialect.elementwise_inline_asm([ir.IntegerType.get_signless(32)], f"{ASM[name]} mov.u32 $0, 0;",
                                              constraints="=r", pure=False, packed_element=1, args=[])
            return []
        _lowering.register_lowering(p)(lower)
    return p


_launch_p, _wait_p = _primitive("launch_dependents"), _primitive("wait")


def launch_dependents():
    """PTX griddepcontrol.launch_dependents: the next kernel on the stream may launch (see the module doc)."""
    _launch_p.bind()


def wait():
    """PTX griddepcontrol.wait: block until the grids this one depends on have completed and flushed."""
    _wait_p.bind()


def kernel_prologue(interpret: bool):
    """The wait, then the trigger; first thing in every Pallas kernel of this package (MAVJAX_PDL_TRIGGER).
    Nothing under interpret=True (no grids to overlap; the interpreter has no rule for them)."""
    if enabled() and not interpret and _lowering is not None:
        wait()
        launch_dependents()


def with_prologue(kernel, interpret: bool):
    """kernel (a Pallas kernel body) with kernel_prologue() first: what this package's pallas_calls run."""
    def body(*refs):
        kernel_prologue(interpret)
        return kernel(*refs)

    return body
