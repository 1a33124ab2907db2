"""Prefill attention at Maverick's shapes, kernel time traced (`kernel_time`): the blockwise Pallas kernel
(pallas_kernels.prefill_attention; kernels="pallas") at its default tiles and others, XLA's attention as the model
computes it on the XLA path (`attend`: the [.., T, T] scores materialized; skipped where they would not fit), and
JAX's own `pallas.ops.gpu.attention.mha` (causal, segment ids = the chunks, kv heads repeated to the query heads:
it has no GQA). Batch 1, full width (40 query / 8 kv heads) and the 1/8 shard one GPU of 8 holds (5 / 1), head dim
128, bf16, a global (causal) layer and a chunked one (8192-token chunks). Per cell: us, the TFLOP/s of the visible
(query, key) pairs (4 * Dh FLOPs each: QK^T and PV), the ratio to the FLOP floor (those FLOPs at the bf16 rate
this process measures with one large XLA dot), and the error against XLA's attention (or, where that is skipped,
against the Pallas kernel at its default tiles). Needs a GPU.

  python3 scripts/bench_prefill_attention.py 512 2048 4096 8192 16384 32768
"""
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mavjax.benchmarking import kernel_time  # noqa: E402
from mavjax.model import attend, attention_mask  # noqa: E402
from pallas_kernels.prefill_attention import prefill_attention  # noqa: E402

TS = [int(t) for t in sys.argv[1:]] or [512, 2048, 4096, 8192, 16384, 32768]
HEADS = [("full", 40, 8), ("1/8", 5, 1)]
DH, CHUNK = 128, 8192
TILES = [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 2)]  # the default first
XLA_MAX_SCORE_BYTES = 24 << 30  # float32 scores [H, T, T]; XLA keeps about three such tensors alive


def bf16_rate() -> float:
    """FLOP/s of one 8192^3 bf16 XLA dot (kernel time): the matrix rate the floor is taken at."""
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    t = kernel_time(lambda x, y: jnp.dot(x, y), [(a, a)] * 2, 3)
    return 2 * 8192 ** 3 / t


def visible_pairs(T: int, chunk) -> int:
    """(query, key) pairs a causal prefill of T tokens attends (within each chunk on a chunked layer)."""
    if chunk is None or chunk >= T:
        return T * (T + 1) // 2
    full, rest = divmod(T, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def jax_mha(q, k, v, pos, chunk, scale):
    from jax.experimental.pallas.ops.gpu.attention import mha

    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    seg = None if chunk is None else (pos // chunk).astype(jnp.int32)
    return mha(q, k, v, seg, sm_scale=scale, causal=True)


def main():
    rate = bf16_rate()
    print(f"device {jax.devices()[0].device_kind}; bf16 XLA dot rate {rate / 1e12:.0f} TFLOP/s "
          f"({time.strftime('%Y-%m-%d')})", flush=True)
    scale = DH ** -0.5
    for T in TS:
        for name, H, K in HEADS:
            key = jax.random.key(T * 100 + H)
            kq, kk, kv = jax.random.split(key, 3)
            q = jax.random.normal(kq, (1, T, H, DH), jnp.bfloat16)
            k = jax.random.normal(kk, (1, T, K, DH), jnp.bfloat16)
            v = jax.random.normal(kv, (1, T, K, DH), jnp.bfloat16)
            pos = jnp.arange(T, dtype=jnp.int32)[None]
            for chunk in (None, CHUNK) if T > CHUNK else (None,):
                flops = 4 * DH * H * visible_pairs(T, chunk)
                floor_us = flops / rate * 1e6
                cells = {}
                variants = {f"pallas {bq}x{bk} w{w}s{s}": (lambda bq=bq, bk=bk, w=w, s=s: lambda q, k, v, p: (
                    prefill_attention(q, k, v, p, p, chunk_size=chunk, scale=scale, block_q=bq, block_k=bk,
                                      num_warps=w, num_stages=s))) for bq, bk, w, s in TILES}
                if H * T * T * 4 <= XLA_MAX_SCORE_BYTES:
                    variants["xla attend"] = lambda: lambda q, k, v, p: attend(
                        q, k, v, attention_mask(p, p, chunk), scale)
                variants["jax mha"] = lambda: lambda q, k, v, p: jax_mha(q, k, v, p[0], chunk, scale)
                for vn, make in variants.items():
                    f = make()
                    try:
                        y = jax.jit(f)(q, k, v, pos).astype(jnp.float32)
                        t = kernel_time(f, [(q, k, v, pos)] * 2, 3) * 1e6
                        cells[vn] = (t, y)
                    except Exception as e:  # noqa: BLE001 - reported in the table (OOM, shared memory)
                        cells[vn] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:70]}")
                base = cells.get("xla attend", (None,))[0]
                want = cells["xla attend"][1] if base else next(y for t, y in cells.values() if t is not None)
                for vn, (t, y) in cells.items():
                    if t is None:
                        print(f"T={T:6d} {name:4s} {'chunked' if chunk else 'global':7s} {vn:24s} ERR {y}",
                              flush=True)
                        continue
                    err = float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want))
                    vs = f"{base / t:5.2f}x xla" if base else "   - xla"
                    print(f"T={T:6d} {name:4s} {'chunked' if chunk else 'global':7s} {vn:24s} {t:9.1f} us "
                          f"{flops / t / 1e6:5.0f} TF/s {t / floor_us:5.2f}x floor ({floor_us:7.1f} us) {vs} "
                          f"err {err:.1e}", flush=True)
                del cells, want
            del q, k, v


if __name__ == "__main__":
    main()
