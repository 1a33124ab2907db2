"""Shared by the benchmark scripts: the measured ceilings that every timing is compared with."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def median_call_s(f, x, reps: int) -> float:
    """Median wall seconds of `f(x)` to its result, after one call that compiles and warms up."""
    f(x).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device copy bandwidth in bytes/s (`a + 1` over an `nbytes` float32 array), counting bytes read plus
    bytes written: the ceiling a memory-bound kernel is measured against."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    s = median_call_s(jax.jit(lambda a: a + 1.0), x, reps)
    del x
    return 2 * nbytes / s


def fmt(v, width: int, prec: int = 1) -> str:
    """A table cell: the number, or '-' for a cell that was not measured."""
    return f"{v:{width}.{prec}f}" if isinstance(v, (int, float)) else f"{'-':>{width}s}"


def speedup(row: dict, baseline_key: str, width: int) -> str:
    """baseline time / Pallas time of a result row, as a table cell."""
    b, p = row.get(baseline_key), row.get("pallas_us")
    return fmt(b / p, width, 2) if b and p else fmt(None, width)


def step_bytes(cfg, batch, context, dtype_bytes, proj_bytes=None, tokens_per_row=1):
    """Fewest bytes one decode step reads: every weight used by the step's tokens once, plus the KV cache of
    `batch` sequences of `context` tokens. `proj_bytes`: bytes per projection weight (1 for FP8; embedding, LM
    head and router stay dtype_bytes). `tokens_per_row`: tokens per sequence in the step (K+1 for a
    speculative verify step), which route to more distinct experts."""
    pb = dtype_bytes if proj_bytes is None else proj_bytes
    D, H, K, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    F, Fm, E, k = cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.num_local_experts, cfg.num_experts_per_tok
    n = D * (H + 2 * K) * Dh + H * Dh * D
    per_layer_attn = n
    total = cfg.hidden_size * cfg.vocab_size * dtype_bytes  # LM head
    # Expected distinct experts hit by batch*k uniform routings.
    distinct = E * (1 - (1 - 1 / E) ** (batch * tokens_per_row * k))
    for i in range(cfg.num_hidden_layers):
        total += per_layer_attn * pb
        if cfg.is_moe_layer(i):
            total += 3 * D * F * (1 + distinct) * pb + D * E * dtype_bytes
        else:
            total += 3 * D * Fm * pb
    kv = cfg.num_hidden_layers * 2 * batch * context * K * Dh * dtype_bytes
    return total + kv


def device_loop(fn, args, iters: int, vary: int = 0):
    """A jitted program running fn(*args) `iters` times inside one lax.fori_loop, so that timing it measures the
    device (no host dispatch per call). The floating-point leaves of args[vary] (the activations: every call
    must read one of them) get a runtime zero added that depends on the previous iteration's outputs, so no
    call is loop-invariant and XLA cannot hoist it out of the loop; the weights are passed untouched. Returns
    (jit(run), leaves) for run(leaves, zero) with zero = 0.0 (float32)."""
    leaves, treedef = jax.tree.flatten(args)
    first = len(jax.tree.leaves(args[:vary]))
    small = [i for i in range(first, first + len(jax.tree.leaves(args[vary])))
             if jnp.issubdtype(leaves[i].dtype, jnp.floating)]

    def run(leaves, zero):
        def body(_, carry):
            ls = list(leaves)
            for i in small:
                ls[i] = ls[i] + carry.astype(ls[i].dtype)
            outs = jax.tree.leaves(fn(*jax.tree.unflatten(treedef, ls)))
            s = sum(o.reshape(-1)[0].astype(jnp.float32) for o in outs if o.size)
            return s * zero  # 0, but only known at run time: the next iteration waits for these outputs

        return jax.lax.fori_loop(0, iters, body, jnp.zeros((), jnp.float32))

    return jax.jit(run), leaves


class DeviceLoop:
    """fn(*args), which makes `calls_per_iter` calls of the op being timed, run `iters` times in one device loop
    (`device_loop`). `compile` keeps a compile error in `error` (e.g. one config's shared memory overflows)
    instead of raising, so that sweeps compile many in threads; `time` gives the best seconds per call."""

    def __init__(self, fn, args, iters: int, calls_per_iter: int = 1, vary: int = 0):
        self.prog, self.leaves = device_loop(fn, args, iters, vary)
        self.calls = iters * calls_per_iter
        self.compiled, self.error = None, None

    def compile(self) -> "DeviceLoop":
        try:
            self.compiled = self.prog.lower(self.leaves, jnp.zeros((), jnp.float32)).compile()
        except Exception as e:  # noqa: BLE001 - reported by the caller
            self.error = f"{type(e).__name__}: {str(e)[:300]}"
        return self

    def time(self, reps: int = 5) -> float | None:
        """Best seconds per call over `reps` loops after a warm-up loop; None if it did not compile."""
        if self.compiled is None and self.error is None:
            self.compile()
        if self.compiled is None:
            return None
        zero = jnp.zeros((), jnp.float32)
        jax.block_until_ready(self.compiled(self.leaves, zero))  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(self.compiled(self.leaves, zero))
            best = min(best, time.perf_counter() - t)
        return best / self.calls


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def kernel_time(fn, arg_sets, reps: int = 5) -> float | None:
    """Seconds of device kernel time per call of fn(*args): the union of the traced intervals of its kernels
    (mavjax.profiling) over one jitted program that calls it once per tuple in `arg_sets` (distinct copies, so
    calls do not hit each other's L2), run `reps` times after a warm-up. Unlike `device_time` it counts neither a
    timing loop's own kernels nor the gaps between launches: what the op's kernels take. None off a GPU (a
    CPU trace holds no device kernels)."""
    p = kernel_profile(fn, arg_sets, reps)
    return p["busy_us"] * 1e-6 if p and p["kernels_per_step"] else None


def kernel_profile(fn, arg_sets, reps: int = 5) -> dict | None:
    """`kernel_time`'s trace, summarized per call (mavjax.profiling.summarize: busy time, and each kernel's time;
    format_profile prints it). None off a GPU."""
    if not _on_gpu():
        return None
    from mavjax.profiling import profile_kernels

    prog = jax.jit(lambda sets: [fn(*a) for a in sets])
    sets = [tuple(a) for a in arg_sets]
    jax.block_until_ready(prog(sets))

    def run():
        jax.block_until_ready([prog(sets) for _ in range(reps)])

    return profile_kernels(run, steps=reps * len(sets))


def device_time(fn, args, iters: int = 8, reps: int = 5, calls_per_iter: int = 1, vary: int = 0) -> float:
    """Best seconds per call of fn(*args) (which makes `calls_per_iter` calls) over `reps` loops of `iters`
    iterations on the device (`device_loop`), after one warm-up loop."""
    loop = DeviceLoop(fn, args, iters, calls_per_iter, vary).compile()
    if loop.error:
        raise RuntimeError(loop.error)
    return loop.time(reps)
