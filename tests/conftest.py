"""Suite-wide set-up, before any test module imports jax.

One persistent XLA compilation cache for every process the suite runs: the two xdist workers and the
subprocesses the CLI, script, multi-process and 8-device tests start (they inherit the environment) compile
many of the same programs (the tiny models' prefill and decode steps, the interpreted kernels), which XLA
then compiles once. JAX keys an entry by the program, its options and the jax/jaxlib versions, so a stale
entry is never used; it reads a damaged one as a miss (a warning, then a compile). Set
JAX_COMPILATION_CACHE_DIR yourself to put it elsewhere (or to an empty string to switch it off).

XLA's CPU compiler at its lowest optimization level, with its older (elemental) fusion emitters: the suite is
compile-bound (tiny shapes, many programs; the interpreted Pallas kernels are large while loops), and the two
took 20-30% off the tests timed alone on jaxlib 0.10.2 (32 -> 21 s, 82 -> 57 s, 60 -> 48 s, 36 -> 27 s); the
optimization level alone most of it (32 -> 24-26 s, 82 -> 61 s). They change how XLA generates CPU code,
not what it computes. Each is added only under the jaxlib releases it was checked on (XLA aborts on a flag it
does not know) and only where XLA_FLAGS does not name it; subprocesses inherit them (tests/helpers.py
`cpu_env` keeps them when it adds a device count).
"""

import os
import tempfile

from mavjax import xla_flags  # imports jax, does not start its backend (XLA reads XLA_FLAGS then)

# flag: (value, the jaxlib releases whose XLA was seen to parse it); jaxlib 0.11.2 no longer knows the second
FAST_CPU_COMPILE = {"xla_backend_optimization_level": ("0", {(0, 10), (0, 11)}),
                    "xla_cpu_use_fusion_emitters": ("false", {(0, 10)})}
for _name, (_value, _releases) in FAST_CPU_COMPILE.items():
    xla_flags.append({_name: _value}, _releases)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mavjax-tests-xla-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # bytes; least recently used go first
