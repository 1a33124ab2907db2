"""mavjax.benchmarking.device_loop: calls stay inside the timed loop (nothing hoisted by XLA)."""

import re

import jax.numpy as jnp

from mavjax.benchmarking import device_loop, device_time


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
