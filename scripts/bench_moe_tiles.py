"""The sorted MoE path (`pallas_kernels.moe_gemm.moe_fp8`, Triton grouped GEMMs) at prefill size over tile
configurations: Maverick's routed experts at full width (128 x 5120 x 8192, FP8, 16 GB), N tokens top-1 uniform
random routing (default 4096: 32 pairs per expert), kernel time traced per (block_m, block_n, block_k, warps),
block_n / block_k shared by both kernels, no split-K, stages from `moe_gemm._stages`; each output's relative
difference from the first configuration's. The weights are arguments of the jitted op (a closure would make them
16 GB of compile-time constants). Needs a GPU. docs/benchmarks.md section 29 (its calls 6-7 ran the first six and
the last eight configurations, which gave `moe_gemm.PREFILL_TILES`):

  python3 scripts/bench_moe_tiles.py [N [block_m,block_n,block_k,warps ...]]
"""
import os
import sys

import numpy as np
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mavjax.benchmarking import kernel_time  # noqa: E402
from pallas_kernels.moe_gemm import moe_fp8, FP8, _stages  # noqa: E402

CONFIGS = ((64, 64, 256, 4), (64, 128, 256, 4), (64, 128, 128, 4), (64, 64, 128, 4), (64, 128, 128, 8),
           (64, 256, 64, 8), (64, 256, 128, 8), (128, 256, 64, 8), (32, 256, 64, 8), (64, 256, 64, 4),
           (64, 512, 64, 8), (128, 128, 64, 8), (16, 256, 64, 8))
key = jax.random.key(0)
E, D, F = 128, 5120, 8192
N = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
if len(sys.argv) > 2:  # only these configurations, each "block_m,block_n,block_k,warps"
    CONFIGS = tuple(tuple(int(v) for v in c.split(",")) for c in sys.argv[2:])
ks = jax.random.split(key, 4)
mk = jax.jit(lambda k, s: (jax.random.normal(k, s, jnp.bfloat16) * 32).clip(-448, 448).astype(FP8), static_argnums=1)
wg, wu, wd = mk(ks[0], (E, D, F)), mk(ks[1], (E, D, F)), mk(ks[2], (E, F, D))
scales = (jnp.full((E, F), 1 / 256, jnp.float32), jnp.full((E, F), 1 / 256, jnp.float32),
          jnp.full((E, D), 1 / 256, jnp.float32))
x = jax.random.normal(key, (N, D), jnp.bfloat16)
rng = np.random.default_rng(N)
idx = jnp.asarray(rng.integers(0, E, (N, 1)), jnp.int32)
sc = jnp.asarray(rng.uniform(0.1, 1, (N, 1)), jnp.bfloat16)
args = (x, idx, sc, wg, wu, wd, scales)
base = None
for bm, bn, bk, nw in CONFIGS:
    st, std = _stages(bm * bk * 2 + 2 * bk * bn), _stages(bm * bk * 2 + bk * bn)
    f = jax.jit(lambda *a, bm=bm, bn=bn, bk=bk, nw=nw, st=st, std=std: moe_fp8(
        *a, block_m=bm, block_n=bn, block_k=bk, block_n_down=bn, block_k_down=bk, split_k=1, split_k_down=1,
        num_warps=nw, num_stages=st, num_stages_down=std))
    try:
        y = f(*args).astype(jnp.float32)
        base = y if base is None else base
        err = float(jnp.linalg.norm(y - base) / jnp.linalg.norm(base))
        t = kernel_time(f, [args], 3) * 1e6
        print(f"bm{bm} bn{bn} bk{bk} w{nw} st{st}/{std}: {t:.0f} us, {2 * N * 3 * D * F / t / 1e6:.0f} TF, e{err:.0e}",
              flush=True)
    except Exception as e:  # noqa: BLE001 - reported (shared memory exceeded, ...)
        print(f"bm{bm} bn{bn} bk{bk} w{nw}: ERR {type(e).__name__} {str(e)[:100]}", flush=True)
