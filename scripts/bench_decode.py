"""Decode latency of a random-weight model of a preset's width (optionally fewer layers), per kernel path.

One set of random weights (mavjax.bench.random_model: FP8 generated as FP8, no bf16 copy) is shared by every
kernel path (`with_kernels`), so `--kernels xla pallas` compares the two paths on the same arrays in one
process. Each row is a decode step (one new token per sequence over a KV cache of `--context` positions,
greedy, fed back) timed inside a jitted loop (mavjax.bench.StepTimer), next to its bytes-read floor: the
weights one step must read (attention, dense MLPs, the shared expert, the routed experts chosen, the LM head)
plus the KV cache, over the device-copy bandwidth measured in the same run. `--profile` also prints the step's
device kernels (mavjax.profiling).

  python scripts/bench_decode.py --preset maverick --layers 2 --batch 1 --kernels xla pallas --quantize fp8
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np


def decode_rows(model, kernel_paths, batches, context, bw, iters=64, reps=5, profile=False, log=print):
    """[{kernels, batch, ms_per_token, floor_ms, ratio[, profile]}] for each kernel path and batch size, all on
    `model`'s weights."""
    from mavjax.bench import StepTimer, with_kernels
    from mavjax.benchmarking import step_bytes
    from mavjax.profiling import format_profile

    cfg, quantize, dtype = model.cfg, model.quant, model.dtype
    rows = []
    for kernels in kernel_paths:
        m = with_kernels(model, kernels)
        for B in batches:
            timer = StepTimer(m, B, 1, context, iters).compile()
            s = timer.time(reps)
            floor = step_bytes(cfg, B, context, jnp.dtype(dtype).itemsize, 1 if quantize == "fp8" else None) / bw
            row = dict(kernels=kernels, batch=B, ms_per_token=s * 1e3, floor_ms=floor * 1e3, ratio=s / floor,
                       compile_s=timer.compile_s)
            log(f"  {kernels} B={B}: {s * 1e3:.3f} ms/token, floor {floor * 1e3:.3f} ms ({s / floor:.2f}x)")
            if profile:
                row["profile"] = timer.profile()
                log(format_profile(row["profile"], f"  profile of {kernels} B={B}"))
            rows.append(row)
            del timer
    return rows


def time_decode(llm, cfg, a, bw, kernels):
    """Through LLM.generate (any mesh): ms/token from its decode-loop metrics, and the time to first token.
    `a`: batch, prompt_len, new_tokens, dtype, quantize."""
    from mavjax.benchmarking import step_bytes
    from mavjax.sampling import SamplingParams

    rows = []
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(a.dtype)
    for B in a.batch:
        prompts = [rng.integers(0, cfg.vocab_size, a.prompt_len).tolist() for _ in range(B)]
        sp = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, sp)  # compile
        best = None
        for _ in range(3):
            outs = llm.generate(prompts, sp)
            m = outs[0].metrics
            steps = m.num_generated_tokens - 1
            ms = m.decode_time_s / steps * 1e3
            best = ms if best is None else min(best, ms)
        proj = 1 if a.quantize == "fp8" else None
        floor_ms = step_bytes(cfg, B, a.prompt_len + a.new_tokens // 2, dtype.itemsize, proj) / bw * 1e3
        rows.append(dict(kernels=kernels, batch=B, ms_per_token=best, floor_ms=floor_ms, ratio=best / floor_ms,
                         ttft_ms=m.time_to_first_token_s * 1e3))
    return rows


def main():
    from mavjax.bench import random_model
    from mavjax.benchmarking import copy_bandwidth
    from mavjax.config import preset

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="maverick")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-rope-interval", type=int, default=2, help="so that a short model has RoPE and NoPE")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--context", type=int, default=1024, help="KV-cache positions each sequence attends to")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=64, help="decode steps per timed jitted loop")
    ap.add_argument("--reps", type=int, default=5, help="timed loops (the best is reported)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", nargs="+", default=["xla"], choices=["xla", "pallas"],
                    help="time each kernel path in the same run, on the same weights")
    ap.add_argument("--quantize", default=None, choices=["fp8"])
    ap.add_argument("--profile", action="store_true", help="print each step's device kernels")
    a = ap.parse_args()

    cfg = preset(a.preset, num_hidden_layers=a.layers, no_rope_layer_interval=a.no_rope_interval)
    bw = copy_bandwidth()
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"model: random {a.preset} width, {a.layers} layers, quantize={a.quantize}, context {a.context}")
    model = random_model(cfg, dtype=jnp.dtype(a.dtype), quant=a.quantize)
    rows = decode_rows(model, a.kernels, a.batch, a.context, bw, a.iters, a.reps, a.profile)
    print(f"{'kernels':>8} {'batch':>5} {'ms/token':>9} {'floor ms':>9} {'x floor':>8}")
    for r in rows:
        print(f"{r['kernels']:>8} {r['batch']:>5} {r['ms_per_token']:>9.3f} {r['floor_ms']:>9.3f} {r['ratio']:>8.2f}")
    if a.json:
        from mavjax.atomic_write import write_json

        write_json(a.json, dict(preset=a.preset, layers=a.layers, device=jax.devices()[0].device_kind,
                                context=a.context, quantize=a.quantize, copy_tb_s=bw / 1e12, rows=rows), indent=1)


if __name__ == "__main__":
    main()
