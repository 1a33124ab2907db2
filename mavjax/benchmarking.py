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


def fmt(v, width: int, prec: int = 1) -> str:
    """A table cell: the number, or '-' for a cell that was not measured."""
    return f"{v:{width}.{prec}f}" if isinstance(v, (int, float)) else f"{'-':>{width}s}"


def speedup(row: dict, baseline_key: str, width: int) -> str:
    """baseline time / Pallas time of a result row, as a table cell."""
    b, p = row.get(baseline_key), row.get("pallas_us")
    return fmt(b / p, width, 2) if b and p else fmt(None, width)
