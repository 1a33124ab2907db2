"""Shared by the benchmark scripts: the measured ceilings that every timing is compared with."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device copy bandwidth in bytes/s (`a + 1` over an `nbytes` float32 array), counting bytes read plus
    bytes written: the ceiling a memory-bound kernel is measured against."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    del x
    return 2 * nbytes / float(np.median(ts))
