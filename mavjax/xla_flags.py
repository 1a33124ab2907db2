"""XLA flags mavjax turns on by default, added to XLA_FLAGS when mavjax is imported (before JAX's backend
starts; XLA reads XLA_FLAGS once, at its first client).

* `--xla_gpu_enable_pdl=true`: programmatic dependent launch (Hopper and later). A kernel may launch while its
  predecessor drains; XLA puts a grid-dependency wait ahead of its kernels' first reads, so results do not
  change. On one H200 it took the 8-way rank's batch-1 decode step from 2.888 / 2.898 ms to 2.818 / 2.799 ms
  (docs/benchmarks.md section 11: off and on twice, alternating, in one call), and the 2-layer model decoded
  the same tokens on the Pallas and XLA paths with it on. It is the launch-gap removal TensorRT-LLM does by
  hand; off by default in this XLA.

* `--xla_gpu_autotune_level=3`: XLA still times every GEMM candidate and picks the fastest, but no longer checks
  each candidate's output against a reference GEMM (level 4, the default). That check is what made the FP8 x FP8
  prefill projections (mavjax.model.fp8_prefill_matmul, XLA's FP8 GEMM) take 15-37 s to compile per shape on one
  H200, against 0.7-1.2 s at level 3, with the same kernel chosen (573.7 / 824.6 us at 4096 x 5120 x 16384 and
  16384 x 5120 x 5120 either way; docs/benchmarks.md section 32): minutes per new prompt-length bucket of a
  48-layer model otherwise.

A flag the user's XLA_FLAGS already names is left as given (`--xla_gpu_enable_pdl=false` turns it off);
MAVJAX_DEFAULT_XLA_FLAGS=0 adds none. XLA aborts on a flag it does not know, so the defaults are added only
under jaxlib releases known to carry them (KNOWN_JAXLIB); a later release gets none until it is checked.
"""

from __future__ import annotations

import os
import re

DEFAULTS = {"xla_gpu_enable_pdl": "true", "xla_gpu_autotune_level": "3"}
KNOWN_JAXLIB = {(0, 10), (0, 11)}  # (major, minor) releases whose XLA parses every flag in DEFAULTS


def _jaxlib_release():
    try:
        import jaxlib

        major, minor = (int(p) for p in jaxlib.__version__.split(".")[:2])
        return major, minor
    except Exception:  # pragma: no cover - an unparseable version: treat as unknown
        return None


def _backends_started():
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except Exception:  # pragma: no cover - a JAX without the helper: assume not started
        return False


def apply_defaults(environ=None, release=None):
    """Append DEFAULTS' flags that XLA_FLAGS does not name; returns the flags added (none when opted out, when
    the jaxlib release is not in KNOWN_JAXLIB, or when JAX's backend has already read its flags)."""
    environ = os.environ if environ is None else environ
    if environ.get("MAVJAX_DEFAULT_XLA_FLAGS", "1") == "0":
        return []
    return append(DEFAULTS, KNOWN_JAXLIB, environ, release)


def append(wanted: dict, known_releases, environ=None, release=None):
    """Append the flags of `wanted` ({name: value}) that XLA_FLAGS does not name, where the jaxlib release is one
    of `known_releases` and JAX's backend has not read its flags yet; returns the flags added."""
    environ = os.environ if environ is None else environ
    if (release or _jaxlib_release()) not in known_releases or (environ is os.environ and _backends_started()):
        return []
    flags = environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in wanted.items()
             if not re.search(rf"(^|\s)--{name}(=|\s|$)", flags)]
    if added:
        environ["XLA_FLAGS"] = " ".join([flags.strip()] + added).strip()
    return added
