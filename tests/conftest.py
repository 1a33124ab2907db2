"""Suite-wide set-up, before any test module imports jax.

One persistent XLA compilation cache for every process the suite runs: the two xdist workers and the
subprocesses the CLI, script, multi-process and 8-device tests start (they inherit the environment) compile
many of the same programs (the tiny models' prefill and decode steps, the interpreted kernels), which XLA
then compiles once. JAX keys an entry by the program, its options and the jax/jaxlib versions, so a stale
entry is never used; it reads a damaged one as a miss (a warning, then a compile). Set
JAX_COMPILATION_CACHE_DIR yourself to put it elsewhere (or to an empty string to switch it off).
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mavjax-tests-xla-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # bytes; least recently used go first
