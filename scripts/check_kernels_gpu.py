"""Every Pallas kernel the model calls, at the shapes one GPU sees when Maverick is split n ways (the 1/n
shard of heads, dense-MLP and expert hidden units) and M tokens (prefill: M = 1024; decode: M = 1), run on the
GPU against its jax.numpy reference; then a 2-layer model of those shapes, greedy-decoding a prompt of M tokens
on the Pallas path against the XLA path on the same weights ("model", the fraction of tokens that differ), and
the rank benchmark's step of M tokens over a 1024-position cache through 4 layers on both paths ("steps", the
fraction of token rows whose logits differ by over 10%; NaN if any is not finite). Each check runs in its own
process (an illegal memory access poisons the process that made it), spread over the visible GPUs; one line
per check: ok and the relative error ||out - ref|| / ||ref|| (or the fraction above), or the error.

  python3 scripts/check_kernels_gpu.py --shard 2 --tokens 1024
  python3 scripts/check_kernels_gpu.py --interpret --small        # CPU smoke test of this script
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TIMES: dict = {}  # compile / first-run seconds of the last kernel call (printed with the result)
CHECKS = ["gemm_wo", "gemm_down", "gemm_add_norm", "gate_up", "mosaic", "qkv_rope", "qkv_nope", "qkv_cache", "moe",
          "moe_route", "add_norm", "norm_router", "attention", "model", "steps"]
REPEATS = 3  # each kernel runs this many times on the same inputs: a split-K counter a launch left non-zero
# (pallas_kernels.split_k) would change a later launch's result


def rel(out, ref):
    import numpy as np

    out, ref = (np.asarray(a, np.float32) for a in (out, ref))
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def run_one(name, n, M, interpret, small, mesh_devices=0):
    """One check's error. mesh_devices > 1: the kernel runs inside jax.shard_map over that many devices, each
    on the same (replicated) operands: a Pallas call in a shard_map body, as mavjax.parallel runs them."""
    import jax
    import jax.numpy as jnp

    def call(fn, *args):
        if mesh_devices > 1:
            from jax.sharding import Mesh, PartitionSpec as P

            mesh = Mesh(jax.devices()[:mesh_devices], ("x",))
            fn = jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
        t = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()  # timed apart: a Triton compile can take minutes
        TIMES["compile_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        TIMES["run_s"] = time.perf_counter() - t
        for _ in range(REPEATS - 1):
            again = jax.block_until_ready(compiled(*args))
            if not all(bool(jnp.array_equal(a, b, equal_nan=True)) for a, b in
                       zip(jax.tree.leaves(out), jax.tree.leaves(again))):
                raise RuntimeError("a repeated launch on the same inputs gave a different result")
        return out

    from mavjax.config import preset
    from mavjax.bench import rank_slice_config

    # (tiny's 256 positions would refuse the model check's M + 16-token context)
    full = preset("tiny", num_hidden_layers=2, max_position_embeddings=max(256, M + 16)) if small else \
        preset("maverick", num_hidden_layers=2)
    cfg = rank_slice_config(full, n) if n > 1 else full
    D, H, K, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    keys = iter(jax.random.split(jax.random.key(0), 16))
    bf = jnp.bfloat16

    def w8(*shape):  # FP8 codes and a per-output-channel scale giving weights of std ~ 1/sqrt(fan-in)
        codes = jnp.clip(jax.random.normal(next(keys), shape, bf) * 64, -448, 448).astype(jnp.float8_e4m3fn)
        return codes, jnp.full(shape[-1:], 1.0 / (64 * shape[-2] ** 0.5), jnp.float32)

    x = jax.random.normal(next(keys), (M, D), bf)
    if name in ("gemm_wo", "gemm_down"):
        from pallas_kernels.fp8_gemm import fp8_matmul, fp8_matmul_ref

        Kin = H * Dh if name == "gemm_wo" else cfg.intermediate_size_mlp
        xi = jax.random.normal(next(keys), (M, Kin), bf)
        w, s = w8(Kin, D)
        out = call(lambda a: fp8_matmul(a, w, s, out_dtype=bf, interpret=interpret), xi)
        mode = "fp8_fp8" if M > 64 else "weight_only"
        return rel(out, fp8_matmul_ref(xi, w, s, quantize_x=mode == "fp8_fp8", out_dtype=jnp.float32))
    if name == "gemm_add_norm":  # wo, the residual add and the next RMSNorm in one launch
        from pallas_kernels.fp8_gemm import fp8_matmul_add_rms_norm, fp8_matmul_ref
        from pallas_kernels.fused_norm import add_rms_norm_ref

        xi = jax.random.normal(next(keys), (M, H * Dh), bf)
        w, s = w8(H * Dh, D)
        scale = (1.0 + 0.1 * jax.random.normal(next(keys), (D,), jnp.float32)).astype(bf)
        out = call(lambda a, r: fp8_matmul_add_rms_norm(a, w, s, r, scale, eps=1e-5, interpret=interpret), xi, x)
        mode = "fp8_fp8" if M > 64 else "weight_only"
        y = fp8_matmul_ref(xi, w, s, quantize_x=mode == "fp8_fp8", out_dtype=bf)
        return max(rel(o, r) for o, r in zip(out, add_rms_norm_ref(x, y, scale, 1e-5)))
    if name == "gate_up":
        from pallas_kernels.fused_gemm import gate_up_swiglu, gate_up_swiglu_ref

        (wg, sg), (wu, su) = w8(D, cfg.intermediate_size_mlp), w8(D, cfg.intermediate_size_mlp)
        out = call(lambda a: gate_up_swiglu(a, wg, sg, wu, su, out_dtype=bf, interpret=interpret), x)
        mode = "fp8_fp8" if M > 64 else "weight_only"
        return rel(out, gate_up_swiglu_ref(x, wg, sg, wu, su, mode=mode, out_dtype=jnp.float32))
    if name == "mosaic":  # the Mosaic GPU GEMM (decode: up to 16 tokens): wo and down, and gate/up from the
        # norm kernel's widened x, as the model calls it
        from pallas_kernels.fp8_gemm import fp8_matmul, fp8_matmul_ref
        from pallas_kernels.fused_gemm import gate_up_swiglu, gate_up_swiglu_ref
        from pallas_kernels.fused_norm import add_rms_norm
        from pallas_kernels.mgpu_gemv import padded_rows

        if M > 16:
            return 0.0  # not its regime (prefill: Triton's fp8 x fp8 kernels)
        errs = []
        for Kin in (H * Dh, cfg.intermediate_size_mlp):
            xi = jax.random.normal(next(keys), (M, Kin), bf)
            w, s = w8(Kin, D)
            out = call(lambda a: fp8_matmul(a, w, s, out_dtype=bf, mosaic=True, interpret=interpret), xi)
            errs.append(rel(out, fp8_matmul_ref(xi, w, s, out_dtype=jnp.float32)))
        (wg, sg), (wu, su) = w8(D, cfg.intermediate_size_mlp), w8(D, cfg.intermediate_size_mlp)
        scale = jnp.ones((D,), bf)
        h = jax.random.normal(next(keys), (M, D), bf)

        def norm_gate_up(a, b):
            _, y, *wide = add_rms_norm(a, b, scale, eps=1e-5, widen_rows=padded_rows(M), interpret=interpret)
            return y, gate_up_swiglu(y, wg, sg, wu, su, out_dtype=bf, x_widened=tuple(wide), mosaic=True,
                                     interpret=interpret)

        y, out = call(norm_gate_up, x, h)
        errs.append(rel(out, gate_up_swiglu_ref(y, wg, sg, wu, su, out_dtype=jnp.float32)))
        return max(errs)
    if name in ("qkv_rope", "qkv_nope"):
        from mavjax.model import attn_temperature, rope_tables
        from pallas_kernels.fused_gemm import qkv_rope, qkv_rope_ref

        (wq, sq), (wk, sk), (wv, sv) = w8(D, H * Dh), w8(D, K * Dh), w8(D, K * Dh)
        pos = jnp.arange(M, dtype=jnp.int32)[None]
        kw = dict(head_dim=Dh)
        if name == "qkv_rope":
            cos, sin = rope_tables(jnp.asarray(cfg.rope_inv_freq(), jnp.float32), pos)
            kw.update(rope=(cos.reshape(M, -1), sin.reshape(M, -1)), qk_norm_eps=cfg.rms_norm_eps)
        else:
            kw.update(q_row_scale=attn_temperature(pos, cfg.floor_scale, cfg.attn_scale).reshape(M))
        outs = call(lambda a: qkv_rope(a, wq, sq, wk, sk, wv, sv, out_dtype=bf, interpret=interpret, **kw), x)
        mode = "fp8_fp8" if M > 64 else "weight_only"
        refs = qkv_rope_ref(x, wq, sq, wk, sk, wv, sv, mode=mode, out_dtype=jnp.float32, **kw)
        return max(rel(o, r) for o, r in zip(outs, refs))
    if name == "qkv_cache":  # k and v written into a KV cache by the kernel, against write_slots of its k, v
        from mavjax.kv_cache import FP8, encode_kv, write_slots
        from mavjax.model import rope_tables
        from pallas_kernels.fused_gemm import qkv_rope

        (wq, sq), (wk, sk), (wv, sv) = w8(D, H * Dh), w8(D, K * Dh), w8(D, K * Dh)
        pos = jnp.arange(M, dtype=jnp.int32)[None]
        cos, sin = rope_tables(jnp.asarray(cfg.rope_inv_freq(), jnp.float32), pos)
        kw = dict(head_dim=Dh, rope=(cos.reshape(M, -1), sin.reshape(M, -1)), qk_norm_eps=cfg.rms_norm_eps,
                  out_dtype=bf, interpret=interpret)
        start = jnp.array([37], jnp.int32)
        errs = []
        for dt in (bf, FP8):
            kc, vc = (jax.random.normal(next(keys), (1, M + 64, K, Dh), bf).astype(dt) for _ in range(2))
            q, k, v = call(lambda a: qkv_rope(a, wq, sq, wk, sk, wv, sv, **kw), x)
            q2, kc2, vc2 = call(lambda a, c1, c2: qkv_rope(a, wq, sq, wk, sk, wv, sv, cache=(c1, c2, start),
                                                           cache_encode=encode_kv, **kw), x, kc, vc)
            errs += [rel(q2, q), rel(kc2, write_slots(kc, k.reshape(1, M, K, Dh), start)),
                     rel(vc2, write_slots(vc, v.reshape(1, M, K, Dh), start))]
        return max(errs)
    if name == "moe":
        from pallas_kernels.moe_gemm import moe_fp8, moe_reference

        E, F = cfg.num_local_experts, cfg.intermediate_size
        ws = [w8(E, D, F), w8(E, D, F), w8(E, F, D)]
        (wg, sg), (wu, su), (wd, sd) = ws
        sg, su, sd = (jnp.broadcast_to(s, (E, s.shape[-1])) for s in (sg, su, sd))
        idx = jax.random.randint(next(keys), (M, 1), 0, E)
        sc = jax.nn.sigmoid(jax.random.normal(next(keys), (M, 1), jnp.float32)).astype(bf)
        # the experts as arguments: closed over, 2 GB of constants made the XLA compile run for minutes
        out = call(lambda a, *w: moe_fp8(a, idx, sc, *w[:3], w[3:], interpret=interpret), x, wg, wu, wd, sg, su, sd)
        return rel(out, moe_reference(x, idx, sc, wg, wu, wd, scales=(sg, su, sd)))
    if name == "moe_route":  # the pair kernels routing each token from the router's logits (top-1 sigmoid)
        from mavjax.model import route_logits
        from pallas_kernels.moe_gemm import moe_fp8_pairs, moe_reference

        E, F = cfg.num_local_experts, cfg.intermediate_size
        (wg, sg), (wu, su), (wd, sd) = w8(E, D, F), w8(E, D, F), w8(E, F, D)
        sg, su, sd = (jnp.broadcast_to(s, (E, s.shape[-1])) for s in (sg, su, sd))
        xm = x[:min(M, 16)]  # the pair path's tokens
        logits = (jax.random.normal(next(keys), (xm.shape[0], E), jnp.float32) * 2).astype(bf)
        def routed(lg):
            return call(lambda a, lg, *w: moe_fp8_pairs(a, None, None, *w[:3], w[3:], router_logits=lg,
                                                         interpret=interpret), xm, lg, wg, wu, wd, sg, su, sd)

        idx, sc = route_logits(logits, 1)
        ref = moe_reference(xm, idx, sc, wg, wu, wd, scales=(sg, su, sd))
        # the same logits as float32 partials [P, N, E] (fused_norm.add_rms_norm(router=...)'s form)
        lf = logits.astype(jnp.float32)
        parts = jnp.stack([lf / 2 + 0.5, lf / 4 - 0.5, lf / 4])
        return max(rel(routed(logits), ref), rel(routed(parts), ref))
    if name == "add_norm":
        from pallas_kernels.fused_norm import add_rms_norm, add_rms_norm_ref

        h = jax.random.normal(next(keys), (M, D), bf)
        scale = jnp.ones((D,), bf)
        out = call(lambda a, b: add_rms_norm(a, b, scale, eps=1e-5, interpret=interpret), x, h)
        ref = add_rms_norm_ref(x, h, scale, 1e-5)
        return max(rel(o, r) for o, r in zip(out, ref))
    if name == "norm_router":  # add + norm that also gives a router's logits as partials (the MoE's decode)
        from pallas_kernels.fused_norm import add_rms_norm, add_rms_norm_ref, sum_router_partials

        h = jax.random.normal(next(keys), (M, D), bf)
        scale = jnp.ones((D,), bf)
        router = (0.02 * jax.random.normal(next(keys), (D, cfg.num_local_experts))).astype(bf)
        s, y, parts = call(lambda a, b: add_rms_norm(a, b, scale, eps=1e-5, router=router, interpret=interpret),
                           x, h)
        ref = add_rms_norm_ref(x, h, scale, 1e-5, router=router)
        return max(rel(o, r) for o, r in zip((s, y, sum_router_partials(parts, bf)), ref))
    if name == "attention":  # split-KV decode attention, M query positions (verify-like), 1024-slot cache
        from pallas_kernels.decode_attention import decode_attention, decode_attention_reference

        S = 1024
        q = jax.random.normal(next(keys), (1, M, H, Dh), bf)
        k, v = (jax.random.normal(next(keys), (1, S, K, Dh), bf) for _ in range(2))
        q_pos = jnp.arange(S - M, S, dtype=jnp.int32)[None]
        k_pos = jnp.arange(S, dtype=jnp.int32)[None]
        kw = dict(chunk_size=None, scale=Dh ** -0.5)
        out = call(lambda a, b, c: decode_attention(a, b, c, q_pos, k_pos, interpret=interpret, **kw), q, k, v)
        return rel(out, decode_attention_reference(q, k, v, q_pos, k_pos, **kw))
    if name == "model":
        import numpy as np

        from mavjax.api import LLM
        from mavjax.bench import random_model, with_kernels
        from mavjax.sampling import SamplingParams

        _no_fp8_prefill()
        net = random_model(cfg, quant="fp8", kernels="pallas")
        prompt = [int(t) for t in np.random.default_rng(0).integers(1, cfg.vocab_size, M)]
        sp = SamplingParams(max_new_tokens=8, temperature=0.0)
        got = LLM.from_model(net, max_model_len=M + 16, max_batch_size=1).generate([prompt], sp)[0].token_ids
        want = LLM.from_model(with_kernels(net, "xla"), max_model_len=M + 16,
                              max_batch_size=1).generate([prompt], sp)[0].token_ids
        agree = sum(a == b for a, b in zip(got, want)) / len(want)
        return 1.0 - agree  # fraction of the 8 greedy tokens that differ (random weights: small logit margins)
    if name == "steps":  # the rank benchmark's step (M new tokens over a 1024-position cache, StepTimer) through
        # 4 layers (2 dense, 2 MoE), Pallas against XLA on the same weights and inputs, 4 steps with XLA's argmax
        # fed back: under XLA's real buffer assignment, where a kernel writing past its output clobbers a live
        # buffer (docs/benchmarks.md section 20), which a kernel's own check does not see
        import numpy as np
        from flax import nnx

        from mavjax.bench import _context_cache, random_model, with_kernels
        from mavjax.generate import bucket
        from mavjax.kv_cache import KVCache

        _no_fp8_prefill()  # above 64 rows (M = 1024) the x rounding alone moves 99.9-100% of the rows by > 10%
        cfg4 = cfg.replace(num_hidden_layers=4)
        net = random_model(cfg4, quant="fp8", kernels="pallas")
        C = 1024
        pos = jnp.broadcast_to(C + jnp.arange(M, dtype=jnp.int32), (1, M))
        at = jnp.full((1,), C, jnp.int32)

        def stepper(model):
            graphdef, state = nnx.split(model)

            def step(st, c, t):  # the logits, the cache and every layer's residual stream (more buffers live)
                m = nnx.merge(graphdef, st)
                h, c, taps = m.hidden_states(t, pos, c, at, collect_layers=tuple(range(4)))
                return m.logits(h), c, taps

            f = jax.jit(step)
            return lambda c, t: f(state, c, t)

        pal, ref = stepper(net), stepper(with_kernels(net, "xla"))
        cache = _context_cache(lambda b, s: KVCache.create(cfg4, b, s, net.dtype), 1, bucket(C + M, minimum=64), C)
        tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg4.vocab_size, (1, M)), jnp.int32)
        off = []
        for _ in range(4):
            (got, _, taps), (want, cache, _) = pal(cache, tok), ref(cache, tok)
            got, want = np.asarray(got, np.float32)[0], np.asarray(want, np.float32)[0]  # [M, V]
            if not (np.isfinite(got).all() and all(np.isfinite(np.asarray(v, np.float32)).all() for v in taps.values())):
                return float("nan")
            off += list(np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1) > 0.1)
            tok = jnp.asarray(want.argmax(-1)[None], jnp.int32)
        return float(np.mean(off))  # token rows off by > 10% (random weights: a near-tie routes one elsewhere)
    raise ValueError(f"unknown check {name!r}")


def _no_fp8_prefill():
    """Switch the family "fp8_prefill" off (MAVJAX_PALLAS_DISABLE) for the model-level checks: its FP8 x FP8
    projections round x to e4m3, which on random weights (small logit margins) moves greedy tokens and logits
    however right the kernels are (docs/benchmarks.md sections 32-33), so the checks would not compare the kernels;
    that product is checked against its reference on its own (bench_weight_layout.py, tests)."""
    os.environ["MAVJAX_PALLAS_DISABLE"] = ",".join(
        [f for f in os.environ.get("MAVJAX_PALLAS_DISABLE", "").split(",") if f] + ["fp8_prefill"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shard", type=int, nargs="+", default=[2])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024])
    ap.add_argument("--checks", nargs="+", default=CHECKS, choices=CHECKS)
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--small", action="store_true", help="the tiny preset instead of maverick")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per check (a Triton compile can take minutes)")
    ap.add_argument("--mesh", type=int, default=0, metavar="N",
                    help="run each kernel inside jax.shard_map over N devices (one check at a time)")
    ap.add_argument("--one", nargs=4, metavar=("CHECK", "SHARD", "TOKENS", "MESH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        err = run_one(a.one[0], int(a.one[1]), int(a.one[2]), a.interpret, a.small, int(a.one[3]))
        times = " ".join(f"{k} {v:.1f}" for k, v in TIMES.items())
        print(f"RESULT {err:.3e} {times}")
        return
    # Count GPUs without starting a JAX backend here: this process would preallocate most of every GPU's memory
    # (XLA_PYTHON_CLIENT_MEM_FRACTION) and leave the checks' own processes the rest.
    try:
        ngpu = 0 if a.interpret else len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                                          check=True).stdout.strip().splitlines())
    except (OSError, subprocess.CalledProcessError):
        ngpu = 0
    jobs = [(c, n, M) for n in a.shard for M in a.tokens for c in a.checks]

    def launch(i, job):
        env = dict(os.environ)
        if ngpu and not a.mesh:
            env["CUDA_VISIBLE_DEVICES"] = str(i % ngpu)
        cmd = [sys.executable, __file__, "--one", *map(str, job), str(a.mesh)] + ["--interpret"] * a.interpret + \
            ["--small"] * a.small
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            return job, f"TIMEOUT after {a.timeout} s"
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
        if r.returncode == 0 and lines:
            value = lines[-1].split(maxsplit=1)[1]
            return job, ("FAIL non-finite output " if value.startswith("nan") else "ok ") + value
        errs = [ln for ln in r.stderr.splitlines() if "Error" in ln or "error" in ln]
        return job, f"FAIL rc {r.returncode}: " + (errs[0][:300] if errs else r.stderr[-300:])

    with cf.ThreadPoolExecutor(1 if a.mesh else max(1, ngpu)) as ex:
        for (c, n, M), res in ex.map(lambda ij: launch(*ij), enumerate(jobs)):
            where = f" in shard_map over {a.mesh}" if a.mesh else ""
            print(f"{c:>10} shard 1/{n} M={M:<5}{where} {res}", flush=True)


if __name__ == "__main__":
    main()
