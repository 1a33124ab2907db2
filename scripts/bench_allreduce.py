"""All-reduce latency of a [1, 5120] bf16 vector across the GPUs of one host: XLA's psum under several NCCL / XLA
settings, against the one-shot NVLink peer-memory kernel (pallas_kernels/allreduce.py), each also as the fused
layer boundary (all-reduce + residual add + RMSNorm) the tensor-parallel model runs twice per layer.

Every number is the time of one iteration of a chain of `--iters` dependent all-reduces inside one jitted
`fori_loop` (so launch overhead is amortised as in the decode loop), best of `--reps`. NCCL and XLA settings are
read when the backend starts, so each variant runs in a child process of this script. NVLink multicast is
never used: NCCL_NVLS_ENABLE=0 in every variant, and the one-shot kernel stores through peer mappings only.

Before timing, the one-shot kernel is checked against psum on random data (max |difference| relative to max
|psum|; the kernel sums in float32, psum in bf16, so ~1e-2 is the bf16 rounding, not an error).

  python scripts/bench_allreduce.py                     # all GPUs of the host, all variants
  python scripts/bench_allreduce.py --dry-run           # CPU, 2 simulated devices, the XLA path only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's mavjax and pallas_kernels, installed or not

# name -> environment changes. XLA_FLAGS entries are appended to the inherited XLA_FLAGS.
VARIANTS = {
    "default": {},
    "NCCL_PROTO=LL": {"NCCL_PROTO": "LL"},
    "NCCL_PROTO=LL128": {"NCCL_PROTO": "LL128"},
    "NCCL_ALGO=Ring": {"NCCL_ALGO": "Ring"},
    "NCCL_ALGO=Tree": {"NCCL_ALGO": "Tree"},
    "LL+Ring+1ch": {"NCCL_PROTO": "LL", "NCCL_ALGO": "Ring", "NCCL_MAX_NCHANNELS": "1"},
    "no command buffer": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="},
    "command buffer: collectives": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,COLLECTIVES"},
}


def child(a):
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    from mavjax.parallel import allreduce_residual_rmsnorm

    n = a.devices or len(jax.devices())
    mesh = Mesh(np.array(jax.devices()[:n]), ("tensor",))
    dtype = jnp.dtype(a.dtype)
    shape = (a.rows, a.dim)
    key = jax.random.key(0)
    x = jax.random.normal(key, (n, *shape), dtype)  # one partial per device
    res = jax.random.normal(jax.random.fold_in(key, 1), shape, dtype)
    scale = 1.0 + 0.1 * jax.random.normal(jax.random.fold_in(key, 2), (a.dim,), dtype)
    on_gpu = jax.default_backend() == "gpu"

    def smap(f, n_in):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("tensor"),) + (P(),) * (n_in - 1),
                                     out_specs=P(), check_vma=False))

    def chain(step):  # iters dependent reductions: the next input is the previous output
        def f(p, r, s):
            def body(_, c):
                return step(c, r, s)
            return jax.lax.fori_loop(0, a.iters, body, p[0])
        return smap(f, 3)

    def plain(impl):
        if impl == "xla":
            return lambda c, r, s: (jax.lax.psum(c, "tensor") * (1.0 / n)).astype(c.dtype)
        from pallas_kernels.allreduce import oneshot_allreduce_add

        return lambda c, r, s: (oneshot_allreduce_add(c, jnp.zeros_like(c), ("tensor",)) * (1.0 / n)).astype(c.dtype)

    def fused(impl):
        def step(c, r, s):
            x, h = allreduce_residual_rmsnorm(c, r, s, 1e-5, ("tensor",), impl)
            return (h * 0.5).astype(c.dtype)  # keep the chain bounded
        return step

    rows, check = [], None
    impls = ["xla"] + (["oneshot"] if on_gpu and a.oneshot else [])
    if "oneshot" in impls:  # correctness first: one-shot vs psum on random data
        ref = smap(lambda p, r, s: allreduce_residual_rmsnorm(p[0], r, s, 1e-5, ("tensor",), "xla")[0], 3)
        got = smap(lambda p, r, s: allreduce_residual_rmsnorm(p[0], r, s, 1e-5, ("tensor",), "oneshot")[0], 3)
        try:
            want_v, got_v = np.asarray(ref(x, res, scale), np.float32), np.asarray(got(x, res, scale), np.float32)
            check = float(np.max(np.abs(got_v - want_v)) / np.max(np.abs(want_v)))
        except Exception as e:  # report (the whole traceback in the log), keep timing psum
            import traceback

            traceback.print_exc()
            check = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            impls = ["xla"]
    if not on_gpu and a.oneshot:  # dry run: the kernel must at least build (trace) for this mesh
        smap(lambda p, r, s: allreduce_residual_rmsnorm(p[0], r, s, 1e-5, ("tensor",), "xla")[0], 3)
        from pallas_kernels.allreduce import oneshot_allreduce_add

        jax.jit(jax.shard_map(lambda p, r: oneshot_allreduce_add(p[0], r, ("tensor",)), mesh=mesh,
                              in_specs=(P("tensor"), P()), out_specs=P(), check_vma=False)).trace(x, res)
        check = "one-shot kernel traced (not run: no GPU)"
    for impl in impls:
        for what, step in (("all-reduce", plain(impl)), ("fused AR+add+RMSNorm", fused(impl))):
            f = chain(step)
            f(x, res, scale).block_until_ready()
            best = float("inf")
            for _ in range(a.reps):
                t = time.perf_counter()
                f(x, res, scale).block_until_ready()
                best = min(best, time.perf_counter() - t)
            rows.append(dict(impl=impl, what=what, us=best / a.iters * 1e6))
    print("RESULT " + json.dumps(dict(devices=n, device=jax.devices()[0].device_kind, check=check, rows=rows)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--devices", type=int, default=0, help="0: all")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--no-oneshot", dest="oneshot", action="store_false")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, 2 simulated devices, few iterations")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    base = dict(os.environ, NCCL_NVLS_ENABLE="0")  # never NVLink multicast
    base["PYTHONPATH"] = os.pathsep.join(filter(None, (ROOT, base.get("PYTHONPATH"))))
    variants = a.variants
    if a.dry_run:
        base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
        a.iters, a.reps, a.devices, variants = 20, 2, 2, ["default"]
    results = {}
    for name in variants:
        env = dict(base)
        for k, v in VARIANTS[name].items():
            env[k] = (env.get(k, "") + " " + v).strip() if k == "XLA_FLAGS" else v
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rows", str(a.rows), "--dim", str(a.dim),
               "--dtype", a.dtype, "--devices", str(a.devices), "--iters", str(a.iters), "--reps", str(a.reps)]
        if not a.oneshot or name != "default":  # the kernel does not depend on NCCL settings: time it once
            cmd.append("--no-oneshot")
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{name}: failed (rc {r.returncode})\n{(r.stdout + r.stderr)[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[0][len("RESULT "):])
        res = results[name]
        print(f"[{name}] {res['devices']} x {res['device']}" +
              (f"; one-shot vs psum max rel diff: {res['check']}" if res["check"] is not None else ""), flush=True)
    print(f"\n[{a.rows}, {a.dim}] {a.dtype}, us per all-reduce "
          f"(chain of {a.iters} in one jitted loop, best of {a.reps})")
    print(f"{'variant':>28} {'impl':>8} {'all-reduce':>11} {'fused AR+add+norm':>18}")
    for name, res in results.items():
        for impl in dict.fromkeys(r["impl"] for r in res["rows"]):
            us = {r["what"]: r["us"] for r in res["rows"] if r["impl"] == impl}
            print(f"{name:>28} {impl:>8} {us['all-reduce']:>11.2f} {us['fused AR+add+RMSNorm']:>18.2f}")
    if a.json:
        from mavjax.atomic_write import write_json  # (not at the top: importing mavjax sets XLA_FLAGS, which the
        # variants' processes inherit)

        write_json(a.json, dict(rows=a.rows, dim=a.dim, dtype=a.dtype, results=results), indent=1)
    if not results:
        sys.exit(1)


if __name__ == "__main__":
    main()
