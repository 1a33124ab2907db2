"""The Mosaic GPU split-KV attention (pallas_kernels/decode_attention_mgpu.py) on a GPU against XLA's attention
(`decode_attention_reference`, float32) over shapes its CPU tests cannot reach: Maverick's heads (40 / 8 and the
1/8 shard's 5 / 1) at 8K-32K slots, caches that are not whole tiles (the last tile masked by slot), chunked
layers, verification's 4 positions, batch 8 with rows of different lengths, both merges. One line per case:
the relative error ||out - ref|| / ||ref|| (bound 2e-2, bench_attention's) and whether every value is finite.

  PYTHONPATH=. python3 scripts/check_attention_mgpu.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.decode_attention import decode_attention_reference  # noqa: E402
from pallas_kernels.decode_attention_mgpu import decode_attention_mgpu  # noqa: E402

# (B, T, H, K, S, lengths, chunk, merge)
CASES = [
    (1, 1, 40, 8, 8192, [8192], None, None),
    (1, 1, 40, 8, 8200, [8200], None, None),  # 8200: the last tile masked by slot
    (1, 1, 40, 8, 4112, [4100], None, "xla"),
    (1, 4, 40, 8, 8200, [8000], None, None),
    (8, 1, 40, 8, 8192, [8192, 1, 4000, 8191, 64, 5000, 7777, 2], None, None),
    (1, 1, 40, 8, 32776, [32776], 8192, None),
    (1, 1, 5, 1, 8200, [8200], None, None),
    (1, 4, 5, 1, 8192, [8190], 8192, None),
]


def main():
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    bad = 0
    for i, (B, T, H, K, S, lengths, chunk, merge) in enumerate(CASES):
        ks = jax.random.split(jax.random.PRNGKey(i), 3)
        q = jax.random.normal(ks[0], (B, T, H, 128), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, S, K, 128), jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, S, K, 128), jnp.bfloat16)
        L = jnp.asarray(lengths, jnp.int32)[:, None]
        k_pos = jnp.where(jnp.arange(S)[None] < L, jnp.arange(S)[None], -1).astype(jnp.int32)
        q_pos = (L - T + jnp.arange(T)[None]).astype(jnp.int32)
        kw = dict(chunk_size=chunk, scale=128 ** -0.5)
        try:
            out = decode_attention_mgpu(q, k, v, q_pos, k_pos, merge=merge, **kw)
            ref = decode_attention_reference(q, k, v, q_pos, k_pos, compute_dtype=jnp.float32, **kw)
            out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            ok = bool(np.isfinite(out).all()) and err <= 2e-2
            msg = f"err {err:.1e}, finite {bool(np.isfinite(out).all())}"
        except Exception as e:  # noqa: BLE001
            ok, msg = False, f"{type(e).__name__}: {str(e)[:300]}"
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} B={B} T={T} H={H} K={K} S={S} chunk={chunk} merge={merge or 'default'}: "
              f"{msg}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
