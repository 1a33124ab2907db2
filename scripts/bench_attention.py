"""Split-KV decode attention (pallas_kernels.decode_attention) vs the XLA path (mavjax.model.attend under jit)
vs jax's own Pallas op (jax.experimental.pallas.ops.gpu.decode_attention), on Maverick shapes. GPU only.

For each config: checks the relative error ||out - ref|| / ||ref|| of each implementation against the XLA
reference (on dequantized KV for FP8), then times each one. Times are per call, the median over repetitions
of one jitted program that runs the op `--inner` times back to back (one dispatch; cycling over enough copies
of the cache that the working set is several times L2), so they are device times, not Python dispatch.
TB/s counts only the K/V bytes a query can see (visible slots x K x Dh x itemsize x 2), and "%copy" compares
it with the device-copy bandwidth measured here (a + 1 on 2 GiB, bytes read + written). Beside the loop times,
the kernels' own traced device time (`mavjax.benchmarking.kernel_time`: ours, XLA's, and XLA's plain read of
the same visible bytes): the loop time also holds the timing loop's small kernels and launch gaps, ~8-9 us a
call at 8K (docs/benchmarks.md section 25).

Cache state: every batch row is full (k_pos = slot), the T queries sit at positions S-T .. S-1; chunked layers
(chunk 8192) therefore see the last 8192 slots, global layers all S.

jax's op (`gqa`-style, called per kv head through `mqa` on a pre-transposed [B, K, S, Dh] cache, so its time
excludes the transpose its `gqa` wrapper would add) takes T = 4 as 4*G heads with kv_seq_len = S, i.e.
without the causal mask among the 4 queries (same bytes, slightly different function; its error is reported
against the reference only for T = 1). It does not take FP8 KV.

Each op is compiled once per config (its first timed call is the one checked). The full grid (96 configs) takes
longer than 3 minutes, mostly compilation: by default no new cache shape is started after --budget-s (150 s),
so the run ends in < 3 min with the configs in priority order (S = 131072 first, Maverick's full H=40/K=8 head
split first, B = 8 first, bf16 then FP8); `--budget-s 1e9` runs them all.

  python scripts/bench_attention.py            # as many configs as fit in ~3 min, then the table
  python scripts/bench_attention.py --quick    # a few configs
  python scripts/bench_attention.py --tune     # batch-1 decode at 8K-128K: split count x tile, XLA's merge
  python scripts/bench_attention.py --tune --mosaic --breakdown
                                               # the Mosaic GPU kernel beside Triton's (bf16), each kernel's time
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.decode_attention import decode_attention, dequantize_kv  # noqa: E402

from mavjax.benchmarking import copy_bandwidth, device_time, fmt, kernel_profile, kernel_time  # noqa: E402
from mavjax.profiling import format_profile  # noqa: E402
from mavjax.model import attend, attention_mask  # noqa: E402

try:
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
except Exception as e:  # pragma: no cover
    print(f"(jax.experimental.pallas.ops.gpu.decode_attention not importable: {e!r})")
    jax_decode = None

FP8 = jnp.float8_e4m3fn
CHUNK = 8192
Dh = 128


def time_op(fn, args_list, qs, inner, reps):
    """Best seconds per call of fn(q, *args) over `reps` device loops (mavjax.benchmarking.device_loop: no
    host dispatch per call, nothing hoisted), each iteration calling it `inner` times, cycling over args_list
    (distinct cache copies, so repeated calls don't hit L2) and over `inner` distinct queries qs. Also returns
    fn(qs[0], *args_list[0]) (one untimed call) for the caller's check."""
    n = len(args_list)

    def many(qs, all_args):
        return [fn(qs[i], *all_args[i % n]) for i in range(inner)]

    first = jax.block_until_ready(jax.jit(fn)(qs[0], *args_list[0]))
    return device_time(many, (qs, args_list), iters=4, reps=reps, calls_per_iter=inner), first


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def make_cache(key, B, S, K, kv_dtype, copies):
    """copies x (k, v, k_scale, v_scale): bf16 normal values; FP8 with per-kv-head scales (amax / 448)."""
    out = []
    for c in range(copies):
        kk, kv = jax.random.split(jax.random.fold_in(key, c))
        k = jax.random.normal(kk, (B, S, K, Dh), jnp.bfloat16)
        v = jax.random.normal(kv, (B, S, K, Dh), jnp.bfloat16)
        if kv_dtype == FP8:
            ks = jnp.max(jnp.abs(k.astype(jnp.float32)), axis=(0, 1, 3)) / 448.0
            vs = jnp.max(jnp.abs(v.astype(jnp.float32)), axis=(0, 1, 3)) / 448.0
            k = (k.astype(jnp.float32) / ks[:, None]).astype(FP8)
            v = (v.astype(jnp.float32) / vs[:, None]).astype(FP8)
        else:
            ks = vs = None
        out.append((k, v, ks, vs))
    jax.block_until_ready(out)
    return out


def ref_fn(q, k, v, ks, vs, q_pos, k_pos, *, chunk, scale):
    """The model's XLA path: dequantize (FP8) and cast the cache to q.dtype, mask, attend."""
    if k.dtype == FP8:
        k, v = dequantize_kv(k, ks), dequantize_kv(v, vs)
    return attend(q, k.astype(q.dtype), v.astype(q.dtype), attention_mask(q_pos, k_pos, chunk), scale)


def read_fn(q, k, v, ks, vs, q_pos, k_pos, *, lo):
    """Only the read: XLA's float32 sum of the visible cache slots [lo, S) of k and v."""
    return jnp.sum(k[:, lo:].astype(jnp.float32)) + jnp.sum(v[:, lo:].astype(jnp.float32))


def jax_op_fn(q, kt, vt, start, length, *, scale, T, G):
    """jax's Pallas decode attention per kv head on pre-transposed kt, vt [B, K, S, Dh]; T queries as T*G
    heads (no causal mask among them)."""
    B, _, H, _ = q.shape
    K = kt.shape[1]
    qh = q.reshape(B, T, K, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, Dh)
    mqa = functools.partial(jax_decode.mqa, sm_scale=scale, block_h=max(16, 1 << (T * G - 1).bit_length()),
                            block_k=128, k_splits=16)
    o = jax.vmap(mqa, in_axes=(1, 1, 1, None, None), out_axes=1)(qh, kt, vt, start, length)  # [B, K, T*G, Dh]
    return o.reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)


def visible_slots(S, T, chunk):
    lo = 0 if chunk is None else ((S - T) // chunk) * chunk
    return S - lo


def run_config(key, cache, B, S, H, K, T, chunk, kv_dtype, bw, args, kern_kw=None, with_others=True):
    G = H // K
    scale = Dh ** -0.5
    q = jax.random.normal(jax.random.fold_in(key, 7), (B, T, H, Dh), jnp.bfloat16)
    q_pos = jnp.broadcast_to(jnp.arange(S - T, S, dtype=jnp.int32), (B, T))
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    kern_kw = kern_kw or {}
    ours = functools.partial(decode_attention, chunk_size=chunk, scale=scale, **kern_kw)
    ours_fn = lambda q, k, v, ks, vs, qp, kp: ours(q, k, v, qp, kp, k_scale=ks, v_scale=vs)  # noqa: E731
    ref = functools.partial(ref_fn, chunk=chunk, scale=scale)
    k0, v0, ks0, vs0 = cache[0]
    row = dict(kv="fp8" if kv_dtype == FP8 else "bf16", B=B, H=H, K=K, S=S, T=T, chunk=chunk or "-", **kern_kw)
    nbytes = B * visible_slots(S, T, chunk) * K * Dh * jnp.dtype(kv_dtype).itemsize * 2
    row["MB"] = nbytes / 1e6

    # Each timed program's first call is fn(qs[0], cache[0]): its output is the one checked, so every op is
    # compiled once.
    qs = [q] + [jax.random.normal(jax.random.fold_in(key, 100 + i), q.shape, q.dtype) for i in range(1, args.inner)]
    targs = [(k, v, ks, vs, q_pos, k_pos) for (k, v, ks, vs) in cache]
    row["t_ours"], o_ours = time_op(ours_fn, targs, qs, args.inner, args.reps)
    row["TBs"] = nbytes / row["t_ours"] / 1e12
    row["pct_copy"] = 100 * nbytes / row["t_ours"] / bw
    if with_others or not args.tune:
        row["t_xla"], o_ref = time_op(ref, targs, qs, args.inner, args.reps)
    else:  # tuning: reference output only
        o_ref = jax.jit(ref)(q, k0, v0, ks0, vs0, q_pos, k_pos)
    row["err"] = rel_err(o_ours, o_ref)
    # The kernels' own device time (traced; None off a GPU): the loop times above also hold the timing loop's
    # own small kernels and launch gaps, ~9 us a call at 8K (docs/benchmarks.md section 25). "read": XLA's sum
    # over the same visible K/V bytes, what one plain read of them costs on this device.
    lo = S - visible_slots(S, T, chunk)
    sets = [(qs[i % len(qs)], *targs[i]) for i in range(len(targs))]
    if getattr(args, "breakdown", False):  # each kernel of the op (the Mosaic GPU path: its kernel and XLA's merge)
        prof = kernel_profile(ours_fn, sets, args.reps)
        row["k_ours"] = prof["busy_us"] * 1e-6 if prof and prof["kernels_per_step"] else None
        if prof:
            print(format_profile(prof, f"  {kern_kw or 'default'}"), flush=True)
    else:
        row["k_ours"] = kernel_time(ours_fn, sets, args.reps)
    row["pct_copy_k"] = 100 * nbytes / row["k_ours"] / bw if row["k_ours"] else None
    if with_others or not args.tune:
        row["k_xla"] = kernel_time(ref, sets, args.reps)
        row["k_read"] = kernel_time(functools.partial(read_fn, lo=lo), sets, args.reps)
    if with_others:
        row["t_jax"] = row["err_jax"] = float("nan")
        if jax_decode is not None and kv_dtype != FP8:
            try:
                start = jnp.full((B,), 0 if chunk is None else ((S - T) // chunk) * chunk, jnp.int32)
                length = jnp.full((B,), S, jnp.int32)
                jfn = functools.partial(jax_op_fn, scale=scale, T=T, G=G)
                tc = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), start, length) for (k, v, _, _) in cache]
                row["t_jax"], o_jax = time_op(jfn, tc, qs, args.inner, args.reps)
                if T == 1:
                    row["err_jax"] = rel_err(o_jax, o_ref)
                del tc
            except Exception as e:  # noqa: BLE001
                print(f"  jax op failed: {type(e).__name__}: {str(e)[:300]}")
    return row


def fmt_us(t):
    return "     -" if t is None or not math.isfinite(t) else f"{t * 1e6:8.1f}"


def print_table(rows):
    """Loop times (ours, XLA, jax's op), then the kernels' own traced times (ours, XLA, XLA's plain read of the
    same bytes) and ours as % of copy bandwidth on each."""
    print(f"\n{'kv':>4} {'B':>2} {'H':>2} {'K':>2} {'S':>6} {'T':>2} {'chunk':>5} {'MB':>7} {'err':>8} "
          f"{'ours us':>8} {'xla us':>8} {'jax us':>8} {'TB/s':>5} {'%copy':>5} {'xla/ours':>8} {'jax/ours':>8}"
          f" {'errjax':>8} {'kern us':>8} {'xla kern':>8} {'read':>8} {'%copy k':>7}")
    for r in rows:
        tx, tj = r.get("t_xla", float("nan")), r.get("t_jax", float("nan"))
        ko, pk = r.get("k_ours"), fmt(r.get("pct_copy_k"), 7, 0)
        print(f"{r['kv']:>4} {r['B']:>2} {r['H']:>2} {r['K']:>2} {r['S']:>6} {r['T']:>2} {str(r['chunk']):>5} "
              f"{r['MB']:7.1f} {r['err']:8.1e} {fmt_us(r['t_ours'])} {fmt_us(tx)} {fmt_us(tj)} {r['TBs']:5.2f} "
              f"{r['pct_copy']:5.0f} {tx / r['t_ours']:8.2f} {tj / r['t_ours']:8.2f} {r.get('err_jax', float('nan')):8.1e}"
              f" {fmt_us(ko)} {fmt_us(r.get('k_xla'))} {fmt_us(r.get('k_read'))} {pk}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--mosaic", action="store_true",
                    help="with --tune: the Mosaic GPU kernel's cases and variants")
    ap.add_argument("--breakdown", action="store_true", help="print each kernel's traced time per variant")
    ap.add_argument("--inner", type=int, default=8, help="calls per timed program")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new cache shape after this many seconds")
    ap.add_argument("--l2-bytes", type=float, default=50e6)
    a = ap.parse_args()
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, device {dev.device_kind} ({getattr(dev, 'core_count', '?')} SMs)")
    if dev.platform != "gpu":
        sys.exit("bench_attention.py needs a GPU")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    key = jax.random.PRNGKey(0)
    rows = []
    tol = {"bf16": 2e-2, "fp8": 2e-2}

    if a.tune:
        # batch-1 decode at the contexts where the target (80% of copy) is missed or the split rule changes:
        # split count x tile (3-deep), the default, and the default split with XLA's merge (the kernel without
        # its in-kernel merge, then XLA's merge kernels); the kernels' own traced time is the figure
        cases = [(jnp.bfloat16, 8192, None), (FP8, 8192, None), (FP8, 32768, None), (FP8, 131072, None),
                 (FP8, 131072, CHUNK)]
        cases = [(d, S, chunk, 1, 40, 8, 1) for d, S, chunk in cases]  # + B, H, K, T
        variants = [{}] + [dict(block_s=bs, num_splits=ns, num_stages=3)
                           for ns in (8, 16, 22, 32) for bs in (64, 128)] + [dict(combine="xla")]
        if a.mosaic:  # the Mosaic GPU kernel (bf16 cache) beside Triton's default, its tiles and splits swept
            cases = [(jnp.bfloat16, 8192, None, 1, 40, 8, 1), (jnp.bfloat16, 32768, None, 1, 40, 8, 1),
                     (jnp.bfloat16, 131072, None, 1, 40, 8, 1), (jnp.bfloat16, 131072, CHUNK, 1, 40, 8, 1),
                     (jnp.bfloat16, 8192, None, 1, 40, 8, 4), (jnp.bfloat16, 8192, None, 8, 40, 8, 1),
                     (jnp.bfloat16, 8192, None, 1, 5, 1, 1), (jnp.bfloat16, 1024, None, 1, 5, 1, 1)]
            variants = [{}, dict(mosaic=None), dict(mosaic=True), dict(mosaic=True, combine="xla"),
                        dict(mosaic=True, num_splits=32), dict(mosaic=True, num_splits=8, combine="xla")]
        for kv_dtype, S, chunk, B, H, K, T in cases:
            lo = S - visible_slots(S, T, chunk)
            read_bytes = 2 * B * (S - lo) * K * Dh * jnp.dtype(kv_dtype).itemsize
            cache = make_cache(key, B, S, K, kv_dtype, int(min(8, max(2, math.ceil(4 * a.l2_bytes / read_bytes)))))
            q_pos = jnp.full((B, T), S - 1, jnp.int32)
            k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            sets = [(None, k, v, ks, vs, q_pos, k_pos) for (k, v, ks, vs) in cache]
            t_read = kernel_time(functools.partial(read_fn, lo=lo), sets, a.reps)
            print(f"{'bf16' if kv_dtype != FP8 else 'fp8'} S={S} chunk={chunk} B={B} H={H} K={K} T={T}: XLA's plain "
                  f"read of the {read_bytes / 1e6:.1f} MB: {fmt_us(t_read)} us", flush=True)
            for kw in variants:
                if time.perf_counter() - t_start > a.budget_s:
                    break
                try:
                    r = run_config(key, cache, B, S, H, K, T, chunk, kv_dtype, bw, a, kern_kw=kw, with_others=False)
                    r["k_read"] = t_read
                    rows.append(r)
                except Exception as e:  # noqa: BLE001
                    print(f"  {kw} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            del cache
        print(f"\n{'kv':>4} {'B':>2} {'H':>2} {'K':>2} {'T':>2} {'S':>6} {'chunk':>5} {'variant':40s} {'kern us':>8} "
              f"{'%copy':>5} {'loop us':>8} {'read us':>8} {'err':>8}")
        for r in rows:
            var = ", ".join(f"{k}={v}" for k, v in r.items()
                            if k in ("mosaic", "block_s", "num_splits", "num_stages", "combine"))
            ko, pk = r.get("k_ours"), fmt(r.get("pct_copy_k"), 5, 0)
            print(f"{r['kv']:>4} {r['B']:>2} {r['H']:>2} {r['K']:>2} {r['T']:>2} {r['S']:>6} {str(r['chunk']):>5} "
                  f"{var or 'default':40s} {fmt_us(ko)} {pk} "
                  f"{fmt_us(r['t_ours'])} {fmt_us(r.get('k_read'))} {r['err']:8.1e}")
        return

    if a.quick:
        grid = [(jnp.bfloat16, 8, (40, 8), 32768), (FP8, 1, (40, 8), 131072)]
    else:
        grid = [(d, B, hk, S) for S in (131072, 32768, 8192) for hk in ((40, 8), (5, 1)) for B in (8, 1)
                for d in (jnp.bfloat16, FP8)]
    failures = []
    for kv_dtype, B, (H, K), S in grid:
        if time.perf_counter() - t_start > a.budget_s:
            print(f"(time budget reached: skipping the remaining configs from {kv_dtype.__name__} B={B} H={H} S={S})")
            break
        itemsize = jnp.dtype(kv_dtype).itemsize
        # enough copies that the fewest slots a config reads (a chunked layer's window) span 4x L2
        read_bytes = 2 * B * min(S, CHUNK) * K * Dh * itemsize
        copies = int(min(8, max(1, math.ceil(4 * a.l2_bytes / read_bytes))))
        cache = make_cache(jax.random.fold_in(key, S * 8 + B), B, S, K, kv_dtype, copies)
        for T, chunk in itertools.product((1, 4), (CHUNK, None)):
            try:
                r = run_config(key, cache, B, S, H, K, T, chunk, kv_dtype, bw, a)
            except Exception as e:  # noqa: BLE001
                print(f"FAILED {kv_dtype.__name__} B={B} H={H} K={K} S={S} T={T} chunk={chunk}: "
                      f"{type(e).__name__}: {str(e)[:600]}", flush=True)
                failures.append((B, H, K, S, T, chunk))
                continue
            rows.append(r)
            ok = r["err"] <= tol[r["kv"]]
            if not ok:
                failures.append((B, H, K, S, T, chunk))
            print(f"{r['kv']} B={B} H={H} K={K} S={S} T={T} chunk={chunk}: err {r['err']:.1e} "
                  f"{'ok' if ok else 'FAIL'}  ours {r['t_ours'] * 1e6:.1f} us ({r['TBs']:.2f} TB/s)  "
                  f"xla {r['t_xla'] * 1e6:.1f} us  jax {r['t_jax'] * 1e6:.1f} us  [{time.perf_counter() - t_start:.0f}s]",
                  flush=True)
        del cache
    print_table(rows)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; error bound {tol}; {len(failures)} failures; "
          f"{time.perf_counter() - t_start:.0f} s")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
