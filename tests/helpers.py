"""Helpers shared by the tests."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def cpu_env(devices: int, **extra) -> dict:
    """The environment of a subprocess on `devices` simulated CPU devices: this process's, its XLA_FLAGS (the
    suite's compile flags, conftest.py) kept, with the device count added (fixed when jax starts, so a test
    needing another count runs a fresh process)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)


def run_on_8_devices(code: str) -> str:
    """Run a snippet in a fresh Python process with 8 simulated CPU devices."""
    env = cpu_env(8)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def equations(jaxpr):
    """Every equation of a jaxpr (`jax.make_jaxpr(f)(...).jaxpr`) and of the jaxprs nested in it (loop bodies,
    a pallas_call's kernel...), in order, each before its own nested ones."""
    from jax.extend import core as jcore

    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from equations(sub)


def kernel_calls(jaxpr):
    """Every pallas_call equation of a jaxpr, nested calls included, one per call site, in order. (Mosaic GPU
    kernels, `plgpu.kernel`, trace to an mpmd_map.)"""
    return (e for e in equations(jaxpr) if e.primitive.name in ("pallas_call", "mpmd_map"))


def pallas_call_names(jaxpr) -> list[str]:
    """The `name` of every kernel_calls equation: what a traced step launches, countable per kernel."""
    return [str(e.params.get("name")) for e in kernel_calls(jaxpr)]


def ref64(q, k, v, q_pos, k_pos, chunk, scale):
    """float64 numpy version of attend(q, k, v, attention_mask(q_pos, k_pos, chunk), scale)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp <= qp) & (kp >= 0)
    if chunk is not None:
        mask &= (kp // chunk) == (qp // chunk)
    s = np.einsum("btkgd,bskd->btkgs", q.reshape(B, T, K, H // K, Dh), k) * scale
    mk = mask[:, :, None, None, :]
    s = np.where(mk, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(mk, np.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    o = np.einsum("btkgs,bskd->btkgd", p / np.where(l > 0, l, 1.0), v)
    return o.reshape(B, T, H, Dh)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (out: any float dtype; asserts it is finite)."""
    import jax.numpy as jnp

    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.all(np.isfinite(out)), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def lower_for_cuda(fn, *shapes, monkeypatch):
    """(StableHLO text, [Triton IR text of each pallas_call]) of fn lowered for CUDA from shapes (no GPU)."""
    import jax
    from jax._src.pallas.triton import lowering as triton_lowering

    texts = []
    orig = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        res = orig(*a, **k)
        texts.append(res.module.operation.get_asm())
        return res

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text(), texts
