"""Sharded decode latency on the GPUs of one host: a reduced-depth Maverick-width model (random weights), decode
ms/token at batch 1 and 64 on one GPU and over meshes (expert=2,tensor=1) and (expert=1,tensor=2) through the
shard_map layers of mavjax.parallel (psum all-reduce, and the one-shot kernel with --oneshot), plus the [1, D]
all-reduce latency in the same process, and a projection to 8 GPUs and the full 48-layer model.

Projection (printed with its inputs): a decode step is a memory-bound part that splits over devices plus two
all-reduces per layer that do not,

    t(n, L) = head + L * layer_1 / n + 2 * L * ar(n)

with layer_1 = (t_1 - head) / L_measured from the one-GPU run, head = the LM head + embedding bytes over the
measured copy bandwidth (divided by n: the vocabulary is sharded too), and ar(n) the all-reduce latency: ar(2)
is measured here; ar(8) is taken as ar(2) for the one-shot path (each device stores to 7 peers at once, the same
single NVLink hop) and as ar(2) * log2(8) for NCCL's psum (tree/ring steps grow with n): an assumption to be
replaced by an 8-GPU measurement. The 2-GPU residual (measured - predicted) is printed so the model's error is
visible.

  python scripts/bench_sharded_decode.py --layers 2 --batch 1 64 --exchange all_to_all ragged --oneshot
  python scripts/bench_sharded_decode.py --dry-run     # CPU, 2 simulated devices, tiny model
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def shard_like(model, mesh, allreduce, exchange="all_to_all"):
    """A copy of `model` whose parameters are placed by the sharding rules over `mesh`, running the shard_map
    layers. The copy shares nothing mutable with `model` (new Variables; arrays are immutable)."""
    import jax
    from flax import nnx

    from mavjax.parallel import Parallel
    from mavjax.sharding import param_shardings

    shardings = param_shardings(model, mesh)
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for path, var in nnx.to_flat_state(nnx.state(copy, nnx.Param)):
        var.set_value(jax.device_put(var.get_value(), shardings[".".join(str(k) for k in path)]))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for path, var in nnx.to_flat_state(nnx.state(copy, nnx.Not(nnx.Param))):
        var.set_value(jax.device_put(var.get_value(), repl))
    return copy.set_parallel(Parallel(mesh, allreduce=allreduce, exchange=exchange))


def allreduce_us(mesh, dim, dtype, impl, iters):
    """One [1, dim] all-reduce + residual + RMSNorm (the fused layer boundary) in a chain of `iters`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from mavjax.parallel import allreduce_residual_rmsnorm

    n = mesh.devices.size
    x = jax.random.normal(jax.random.key(0), (n, 1, dim), dtype)
    r = jnp.zeros((1, dim), dtype)
    s = jnp.ones((dim,), dtype)

    def f(p, r, s):
        def step(_, c):  # the next input is the previous output: a chain, as layers are
            return (allreduce_residual_rmsnorm(c, r, s, 1e-5, mesh.axis_names, impl)[1] * 0.5).astype(c.dtype)
        return jax.lax.fori_loop(0, iters, step, p[0])

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(mesh.axis_names), P(), P()), out_specs=P(),
                              check_vma=False))
    g(x, r, s).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        g(x, r, s).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best / iters * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="maverick")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-rope-interval", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--meshes", nargs="+", default=["expert=2,tensor=1", "expert=1,tensor=2"])
    ap.add_argument("--oneshot", action="store_true", help="also time the one-shot all-reduce (unverified kernel)")
    ap.add_argument("--exchange", nargs="+", default=["all_to_all"], choices=["all_to_all", "ragged"],
                    help="MoE token exchange at prefill / batch >= 64 (meshes with expert > 1)")
    ap.add_argument("--ar-iters", type=int, default=1000)
    ap.add_argument("--project-gpus", type=int, default=8)
    ap.add_argument("--project-layers", type=int, default=48)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, 2 simulated devices, tiny model")
    a = ap.parse_args()
    if a.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        a.preset, a.layers, a.batch, a.prompt_len, a.new_tokens, a.ar_iters = "tiny", 2, [1, 4], 16, 8, 20
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench_decode import time_decode
    from mavjax.api import LLM
    from mavjax.atomic_write import write_json
    from mavjax.benchmarking import copy_bandwidth
    from mavjax.config import preset
    from mavjax.model import Llama4
    from mavjax.sharding import make_mesh, parse_mesh

    cfg = preset(a.preset, num_hidden_layers=a.layers, no_rope_layer_interval=a.no_rope_interval)
    dtype = jnp.dtype(a.dtype)
    bw = copy_bandwidth(nbytes=(2 << 30) if not a.dry_run else (16 << 20))
    dev = jax.devices()[0].device_kind
    print(f"{len(jax.devices())} x {dev}; copy bandwidth {bw / 1e12:.2f} TB/s")
    t = time.perf_counter()
    model = Llama4(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    print(f"model: {a.preset} width, {a.layers} layers, init {time.perf_counter() - t:.1f}s", flush=True)
    args = argparse.Namespace(batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens, dtype=a.dtype,
                              quantize=None)
    ref = LLM.from_model(model, max_batch_size=max(a.batch))
    rows = [dict(r, mesh="1 GPU", allreduce="-", exchange="-") for r in time_decode(ref, cfg, args, bw, "xla")]
    probe = list(range(3, 3 + min(a.prompt_len, 96)))
    want = ref.logits(probe)
    ar = {}
    impls = ["xla"] + (["oneshot"] if a.oneshot else [])
    for text in a.meshes:
        mesh = make_mesh(**parse_mesh(text))
        exchanges = a.exchange if mesh.shape["expert"] > 1 else ["all_to_all"]
        for impl, exchange in [(i, x) for i in impls for x in exchanges]:
            tag = f"{text} allreduce={impl} exchange={exchange}"
            try:
                if (text, impl) not in ar:
                    ar[(text, impl)] = allreduce_us(mesh, cfg.hidden_size, dtype, impl, a.ar_iters)
                sharded = shard_like(model, mesh, impl, exchange)
                llm = LLM.from_model(sharded, max_batch_size=max(a.batch))
                # same function as one GPU up to reduction order in the dtype; 96 tokens: the exchange path
                got = llm.logits(probe)
                print(f"{tag}: logits vs 1 GPU, max |diff| / max |logit| = "
                      f"{float(abs(got - want).max() / abs(want).max()):.2e}", flush=True)
                rows += [dict(r, mesh=text, allreduce=impl, exchange=exchange)
                         for r in time_decode(llm, cfg, args, bw, "xla")]
                del llm, sharded
            except Exception as e:  # the one-shot kernel and ragged_all_to_all are unverified on GPU: go on
                print(f"{tag}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print(f"\n{'mesh':>20} {'allreduce':>9} {'exchange':>10} {'batch':>5} {'ms/token':>9} {'1-GPU floor ms':>14} "
          f"{'TTFT ms':>8}")
    for r in rows:
        print(f"{r['mesh']:>20} {r['allreduce']:>9} {r['exchange']:>10} {r['batch']:>5} {r['ms_per_token']:>9.3f} "
              f"{r['floor_ms']:>14.3f} {r['ttft_ms']:>8.1f}")
    print("\nfused all-reduce + residual + RMSNorm, [1, %d] %s, us:" % (cfg.hidden_size, a.dtype))
    for (text, impl), us in ar.items():
        print(f"{text:>20} {impl:>9} {us:8.2f}")
    proj = project(cfg, rows, ar, bw, dtype.itemsize, a)
    if a.json:
        ar_us = {f"{m} {i}": v for (m, i), v in ar.items()}
        write_json(a.json, dict(preset=a.preset, layers=a.layers, device=dev, n_devices=len(jax.devices()),
                                copy_tb_s=bw / 1e12, rows=rows, allreduce_us=ar_us, projection=proj), indent=1)


def project(cfg, rows, ar, bw, itemsize, a):
    """The projection of the module docstring, per batch and all-reduce implementation."""
    n, L, Lp = a.project_gpus, a.layers, a.project_layers
    head_ms = 2 * cfg.hidden_size * cfg.vocab_size * itemsize / bw * 1e3  # LM head read + embedding rows (upper)
    out = []
    print(f"\nprojection to {n} GPUs, {Lp} layers: t = head/n + {Lp} * layer_1/n + {2 * Lp} * ar({n}); "
          f"head = {head_ms:.3f} ms (LM head + embedding bytes / copy bandwidth)")
    for r1 in (r for r in rows if r["mesh"] == "1 GPU"):
        layer_1 = max(r1["ms_per_token"] - head_ms, 0.0) / L
        for (text, impl), us2 in ar.items():
            ar_n = us2 * (1 if impl == "oneshot" else math.log2(n)) / 1e3  # ms; assumption, see the docstring
            m2 = [r for r in rows if r["mesh"] == text and r["allreduce"] == impl and r["batch"] == r1["batch"]
                  and r["exchange"] == "all_to_all"]
            pred2 = head_ms / 2 + L * layer_1 / 2 + 2 * L * us2 / 1e3
            t_n = head_ms / n + Lp * layer_1 / n + 2 * Lp * ar_n
            t_1 = head_ms + Lp * layer_1
            res = (m2[0]["ms_per_token"] - pred2) if m2 else None
            out.append(dict(batch=r1["batch"], mesh2=text, allreduce=impl, layer_1_ms=layer_1, ar2_us=us2,
                            ar_n_us=ar_n * 1e3, pred_2gpu_ms=pred2, residual_2gpu_ms=res, proj_ms=t_n,
                            proj_1gpu_ms=t_1))
            print(f"  batch {r1['batch']:>3}, from {text} {impl}: layer_1 {layer_1:.3f} ms, ar(2) {us2:.1f} us -> "
                  f"ar({n}) {ar_n * 1e3:.1f} us; 2-GPU predicted {pred2:.3f} ms" +
                  (f", measured {m2[0]['ms_per_token']:.3f} (residual {res:+.3f})" if m2 else "") +
                  f"; {Lp} layers: 1 GPU {t_1:.2f} ms/token (if it fit), {n} GPUs {t_n:.2f} ms/token "
                  f"({1e3 / t_n:.0f} tokens/s per sequence)")
    return out


if __name__ == "__main__":
    main()
