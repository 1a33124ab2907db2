"""Decode latency of a random-weight model of a preset's width (optionally fewer layers), through plain XLA.

Prints ms/token at the given batch sizes next to the bytes-read floor: the weight bytes one decode step must
read (attention, dense MLPs, the shared expert and the routed experts actually chosen, the LM head) plus the KV
cache, over the device-copy bandwidth measured in the same run.

  python scripts/bench_decode.py --preset maverick --layers 2 --batch 1 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mavjax.benchmarking import copy_bandwidth, step_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="maverick")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-rope-interval", type=int, default=2, help="so that a short model has RoPE and NoPE")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", nargs="+", default=["xla"], choices=["xla", "pallas"],
                    help="time each kernel path in the same run")
    ap.add_argument("--quantize", default=None, choices=["fp8"])
    a = ap.parse_args()

    from mavjax.api import LLM
    from mavjax.config import preset
    from mavjax.model import Llama4

    cfg = preset(a.preset, num_hidden_layers=a.layers, no_rope_layer_interval=a.no_rope_interval)
    dtype = jnp.dtype(a.dtype)
    bw = copy_bandwidth()
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for kernels in a.kernels:
        t = time.perf_counter()
        model = Llama4(cfg, dtype=dtype, rngs=nnx.Rngs(0), kernels=kernels)  # same seed: same weights
        if a.quantize == "fp8":
            from mavjax.quantize import quantize_model

            model = quantize_model(model)
        nparams = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        print(f"model: {a.preset} width, {a.layers} layers, {nparams / 1e9:.2f}B params, kernels={kernels}, "
              f"quantize={a.quantize}, init {time.perf_counter() - t:.1f}s")
        rows += time_decode(LLM.from_model(model, max_batch_size=max(a.batch)), cfg, a, bw, kernels)
        del model
    print(f"{'kernels':>8} {'batch':>5} {'ms/token':>9} {'floor ms':>9} {'x floor':>8} {'TTFT ms':>8}")
    for r in rows:
        print(f"{r['kernels']:>8} {r['batch']:>5} {r['ms_per_token']:>9.3f} {r['floor_ms']:>9.3f} "
              f"{r['ratio']:>8.2f} {r['ttft_ms']:>8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(preset=a.preset, layers=a.layers, device=jax.devices()[0].device_kind,
                           quantize=a.quantize, copy_tb_s=bw / 1e12, rows=rows), f, indent=1)


def time_decode(llm, cfg, a, bw, kernels):
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


if __name__ == "__main__":
    main()
