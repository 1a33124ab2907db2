"""mavjax.benchmarking.device_loop: calls stay inside the timed loop (nothing hoisted by XLA)."""

import re

import jax.numpy as jnp

import jax

from mavjax import benchmarking, profiling
from mavjax.benchmarking import device_loop, device_time, kernel_time


def _reachable(hlo: str, root: str) -> set[str]:
    """Names of the computations `root` calls, transitively (body=, calls=, to_apply=, ...)."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif cur:
            comps[cur].append(line)
    seen, todo = set(), [root]
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            todo += re.findall(r"(?:body|condition|calls|to_apply|called_computations)=\{?%?([\w.\-]+)", line)
    return seen, comps


def test_the_op_runs_inside_the_loop_body():
    x, w = jnp.ones((4, 64), jnp.float32), jnp.ones((64, 32), jnp.float32) * 0.5
    prog, leaves = device_loop(lambda x, w: x @ w, (x, w), iters=3)  # x (args[0]) perturbed, w not
    hlo = prog.lower(leaves, jnp.zeros((), jnp.float32)).compile().as_text()
    body = re.search(r" while\(.*body=%?([\w.\-]+)", hlo).group(1)
    inside, comps = _reachable(hlo, body)
    with_dot = {c for c, lines in comps.items() if any(" dot(" in ln for ln in lines)}
    assert with_dot and with_dot <= inside, (with_dot, inside)
    assert device_time(lambda x, w: x @ w, (x, w), iters=2, reps=1) > 0


def test_kernel_time_is_the_traced_busy_time_per_call(monkeypatch):
    """kernel_time: None off a GPU; on one, the profile's busy time per step, with one step per call of the op
    (each arg set once per rep), after the program has run."""
    x = [jnp.full((4, 8), float(i)) for i in range(3)]
    assert kernel_time(lambda a: a * 2, [(a,) for a in x]) is None  # a CPU: no device kernels to trace
    seen = {}

    def fake_profile(run, steps):
        out = run()
        seen.update(steps=steps, ran=out is None)
        return dict(busy_us=12.5, kernels_per_step=1.0)

    monkeypatch.setattr(benchmarking, "_on_gpu", lambda: True)
    monkeypatch.setattr(profiling, "profile_kernels", fake_profile)
    assert abs(kernel_time(lambda a: a * 2, [(a,) for a in x], reps=4) - 12.5e-6) < 1e-15
    assert seen == dict(steps=12, ran=True)
    monkeypatch.setattr(profiling, "profile_kernels", lambda run, steps: dict(busy_us=0.0, kernels_per_step=0))
    assert kernel_time(lambda a: a * 2, [(a,) for a in x]) is None  # nothing traced: no time, not 0
    jax.clear_caches()
