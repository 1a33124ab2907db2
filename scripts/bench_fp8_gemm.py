"""Validate, autotune and time the FP8 Pallas GEMMs (pallas_kernels/fp8_gemm.py) on one GPU against XLA.

  PYTHONPATH=. python3 scripts/bench_fp8_gemm.py              # stops starting new cells at --budget-s 170
  PYTHONPATH=. python3 scripts/bench_fp8_gemm.py --budget-s 900 --prefill-shapes all   # every cell
  python3 scripts/bench_fp8_gemm.py --dry-run                 # CPU: the script's flow, interpreter, tiny

1. Device-copy bandwidth (jit(a + 1) on a 2 GiB f32 array, bytes read + written): the memory ceiling.
2. Validation on the GPU before any timing: each variant (weight-only / fp8_fp8, per-channel / 128x128 block
   scales, [K, N] and [N, K] weight layouts, swap_ab, ragged shapes, split-K) on fresh random inputs,
   output buffer poisoned with NaN (an element the kernel does not write fails), against float64 numpy
   references. A variant that fails to lower or to validate is reported and not timed.
3. Autotune: weight-only at M=16 over (block_n, block_k, split_k, num_warps, num_stages, layout, swap_ab)
   candidates per shape, the best used for M in {1, 8, 16, 64}; fp8_fp8 over a few tiles per row.
4. Timing: compile + warm-up, then the median over reps of (one pass over a rotating set of weight buffers,
   blocked until ready) / ops. Each jitted call applies the op to `unroll` different weight buffers in
   sequence (16 for decode, the same for the kernel and for XLA), so Python dispatch is amortised alike;
   the rotating set is >= 3 buffers and >= ~200 MB, so the 50 MB L2 never serves a repeat.
   Baselines in the same run, all on [K, N] weights: XLA bf16 dot with bf16 weights; XLA's FP8 dot
   (lax.dot_general on float8 operands, activations quantized per token in the same jit,
   preferred_element_type=f32, then scales); XLA upcast-then-dot (w_fp8 -> bf16 in the jit, dot, scale).
Time: XLA compiles (with their GEMM autotuning) took 1-3 s each on an H100 and do not overlap, so cells run
in priority order (Pallas everywhere, then XLA at decode M=8/16, XLA fp8 at M=8, prefill, the rest) and
the cells left when --budget-s runs out print as '-'. Compiles go to a persistent cache (--cache-dir), so a
second run of the same command spends almost no time compiling and fills in the rest of the table.
Columns: bytes = weight + scale + activation + output bytes, each once; TB/s and its ratio to the copy
bandwidth; for fp8_fp8 TFLOP/s and its ratio to the H100 SXM datasheet dense FP8 peak (1979 TFLOP/s; 3958
is the 2:4-sparse figure); v.X = XLA variant time / Pallas time (> 1: Pallas faster).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mavjax.atomic_write import write_json  # noqa: E402
from mavjax.benchmarking import DeviceLoop, copy_bandwidth, fmt, speedup  # noqa: E402
from pallas_kernels.fp8_gemm import (  # noqa: E402
    dequantize_activation, dequantize_weight, fp8_matmul, quantize_activation_per_token,
    quantize_weight_blockwise, quantize_weight_per_channel)

FP8_PEAK_TFLOPS = 1979.0  # H100 SXM datasheet, dense FP8
T0 = time.perf_counter()
INTERPRET = False  # --dry-run: Pallas interpreter, tiny shapes (checks this script's flow on a CPU)

# (name, K, N): Maverick, hidden 5120, 40 q / 8 kv heads of 128, dense MLP 16384, routed expert 8192;
# "/8" = the 1/8 tensor-parallel shard (column-parallel: N/8, row-parallel: K/8).
SHAPES = [
    ("q|o 5120x5120", 5120, 5120),
    ("k|v 5120x1024 =expert/8", 5120, 1024),
    ("mlp gate|up 5120x16384", 5120, 16384),
    ("mlp down 16384x5120", 16384, 5120),
    ("expert gate|up 5120x8192", 5120, 8192),
    ("q/8 5120x640", 5120, 640),
    ("o/8 640x5120", 640, 5120),
    ("mlp up/8 5120x2048", 5120, 2048),
    ("mlp down/8 2048x5120", 2048, 5120),
]
PREFILL_DEFAULT = ["q|o 5120x5120", "mlp gate|up 5120x16384", "mlp up/8 5120x2048"]


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def elapsed():
    return time.perf_counter() - T0


# ---------------------------------------------------------------------------------------------------------
# Ops. A weight buffer is a dict {"kn": w_fp8 [K,N], "nk": w_fp8 [N,K], "s": scale [N], "bf16": w [K,N]};
# each op names the arrays it takes, so a jitted call carries no unused arguments.
# ---------------------------------------------------------------------------------------------------------

def xla_bf16(x, wb):
    return jnp.dot(x, wb, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def xla_fp8_dot(x, wq, s):
    xq, xs = quantize_activation_per_token(x)
    y = jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * xs[:, None] * s[None, :]).astype(jnp.bfloat16)


def xla_upcast(x, wq, s):
    y = jnp.dot(x, wq.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return (y * s[None, :]).astype(jnp.bfloat16)


XLA_OPS = {"bf16": (xla_bf16, ("bf16",)), "fp8": (xla_fp8_dot, ("kn", "s")), "upcast": (xla_upcast, ("kn", "s"))}


def pallas_op(mode, cfg):
    """(op, keys) for fp8_matmul with cfg; cfg["layout"] "nk" means w stored [N, K] (w_transposed)."""
    cfg = dict(cfg)
    nk = cfg.pop("layout", "kn") == "nk"

    def op(x, wq, s):
        return fp8_matmul(x, wq, s, mode=mode, w_transposed=nk, interpret=INTERPRET, **cfg)
    return op, ("nk" if nk else "kn", "s")


def make_weights(key, K, N, nbuf):
    @jax.jit
    def one(k):
        w = (jax.random.normal(k, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        wq, s = quantize_weight_per_channel(w)
        return {"kn": wq, "s": s, "bf16": w, "nk": wq.T}
    return [one(jax.random.fold_in(key, i)) for i in range(nbuf)]


def n_buffers(K, N, target=200e6, cap=96):
    return int(min(cap, max(3, math.ceil(target / (K * N)))))


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

class Cell(DeviceLoop):
    """One timed op over up to `unroll` distinct weight buffers, called back to back in a device loop
    (mavjax.benchmarking.DeviceLoop: no host dispatch per call, nothing hoisted). `time` gives microseconds."""

    def __init__(self, op_keys, x, weights, unroll=32):
        op, keys = op_keys
        u = max(1, min(unroll, len(weights)))
        ws = [tuple(weights[j][k] for k in keys) for j in range(u)]
        super().__init__(lambda x, ws: [op(x, *w) for w in ws], (x, ws), iters=max(2, math.ceil(32 / u)),
                         calls_per_iter=u)

    def time(self, reps=50):
        t = super().time(reps)
        return None if t is None else t * 1e6


def compile_parallel(cells, workers=12):
    with cf.ThreadPoolExecutor(workers) as ex:
        list(ex.map(Cell.compile, cells))


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------

VALIDATION = [
    # (mode, M, K, N, scale kind, layout, cfg)
    ("weight_only", 1, 5120, 640, "channel", "kn", {}),
    ("weight_only", 8, 5120, 2048, "channel", "nk", dict(block_n=64, block_k=256, split_k=4)),
    ("weight_only", 16, 640, 5120, "channel", "kn", dict(block_n=64, block_k=128, split_k=1, swap_ab=True)),
    ("weight_only", 64, 5120, 1024, "channel", "nk", dict(block_n=64, block_k=256, split_k=8, num_stages=3,
                                                          swap_ab=True)),
    ("weight_only", 3, 1000, 600, "channel", "kn", dict(block_n=64, block_k=256, split_k=3)),  # ragged
    ("weight_only", 17, 5120, 640, "block", "nk", {}),
    ("weight_only", 5, 1000, 600, "block", "kn", dict(block_n=128, block_k=128, split_k=2, swap_ab=True)),
    ("fp8_fp8", 512, 5120, 2048, "channel", "nk", {}),
    ("fp8_fp8", 300, 1000, 600, "channel", "kn", dict(block_m=64, block_n=128, block_k=128)),    # ragged
    ("fp8_fp8", 512, 5120, 1024, "block", "kn", {}),
    ("fp8_fp8", 100, 1000, 600, "block", "nk", dict(block_m=64, block_n=64, block_k=128)),      # ragged
]


def validate(key, results):
    """Per variant (mode, scale kind): True if every case of it lowered, wrote every element, and met its
    bound (weight-only 1e-2 vs the dequantized reference; fp8_fp8 1e-2 vs the reference with the activation
    quantization emulated and 5e-2 vs the plain one). Quantization runs in its own jit, so its fp8 outputs
    are materialised (inside one jit XLA may fold f32 -> f8 -> f32 away); references are float64 numpy on
    the host (no XLA compile, no TF32)."""
    q = {"channel": jax.jit(quantize_weight_per_channel), "block": jax.jit(quantize_weight_blockwise)}
    qx = jax.jit(quantize_activation_per_token)
    cases = []
    for i, (mode, M, K, N, kind, layout, cfg) in enumerate(VALIDATION):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        x = jax.random.normal(k1, (M, K), jnp.float32).astype(jnp.bfloat16)
        wq, s = q[kind](jax.random.normal(k2, (K, N), jnp.float32) * 0.02)
        nk = layout == "nk"
        args = (x, jnp.asarray(wq.T) if nk else wq, jnp.asarray(s.T) if nk else s)
        f = functools.partial(fp8_matmul, mode=mode, w_transposed=nk, poison_output=True, interpret=INTERPRET,
                              **cfg)
        cases.append((f"{mode} {kind} {layout} M={M} K={K} N={N} {cfg or 'default'}", f, args, x, wq, s))

    def run(c):
        try:
            return np.asarray(jax.block_until_ready(c[1](*c[2])).astype(jnp.float32), np.float64), None
        except Exception as e:  # noqa: BLE001 - lowering / resource errors are reported, not fatal
            return None, f"{type(e).__name__}: {str(e)[:1500]}"
    with cf.ThreadPoolExecutor(12) as ex:  # Pallas/Triton compiles run in parallel
        outs = list(ex.map(run, cases))
    ok = {}
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    for (name, _, _, x, wq, s), (y, err), spec in zip(cases, outs, VALIDATION):
        mode, kind = spec[0], spec[4]
        good, msg = False, err
        if y is not None:
            w64 = np.asarray(dequantize_weight(wq, s), np.float64)
            e_plain = rel(y, np.asarray(x, np.float64) @ w64)
            fin = bool(np.isfinite(y).all())
            if mode == "weight_only":
                good = fin and e_plain < 1e-2
                msg = f"all written={fin}, err vs dequant ref {e_plain:.2e} (bound 1e-2)"
            else:
                xe = np.asarray(dequantize_activation(*qx(x)), np.float64)
                e_emul = rel(y, xe @ w64)
                good = fin and e_emul < 1e-2 and e_plain < 5e-2
                msg = (f"all written={fin}, err vs x-quant-emulated ref {e_emul:.2e} (1e-2), "
                       f"vs dequant ref {e_plain:.2e} (5e-2)")
        log(f"{'PASS' if good else 'FAIL'} {name}: {msg}")
        ok[(mode, kind)] = ok.get((mode, kind), True) and good
        results["validation"].append(dict(case=name, ok=good, msg=msg))
    return ok


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

def decode_candidates(K, N, num_sms):
    out = []
    for block_n, block_k, waves, warps, stages in [
            (64, 256, 2, 4, 4), (64, 512, 2, 4, 3), (128, 256, 2, 4, 4), (128, 128, 2, 4, 4),
            (64, 256, 2, 8, 4), (64, 128, 4, 4, 4)]:
        nk = -(-K // block_k)
        split = max(1, min(nk, -(-waves * num_sms // -(-N // block_n))))
        for layout in ("nk", "kn"):
            for swap in (False, True):
                out.append(dict(block_n=block_n, block_k=block_k, split_k=split, num_warps=warps,
                                num_stages=stages, layout=layout, swap_ab=swap))
    return out


PREFILL_CANDIDATES = [
    dict(block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3),
    dict(block_m=256, block_n=128, block_k=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4),
]


def fmt_cfg(c):
    if c is None:
        return "-"
    keys = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages")
    s = "/".join(str(c[k]) for k in keys if k in c)
    return s + f" {c.get('layout', 'kn')}" + (" sw" if c.get("swap_ab") else "")


# ---------------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=170.0, help="start no new measurement after this")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--decode-m", type=int, nargs="+", default=[1, 8, 16, 64])
    ap.add_argument("--prefill-m", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--prefill-shapes", default="default", help="'default' (3 shapes), 'all' or 'none'")
    ap.add_argument("--shapes", nargs="*", default=None, help="substrings of shape names to keep")
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--buffer-mb", type=float, default=200.0, help="rotating weight bytes per shape (> L2)")
    ap.add_argument("--cache-dir", default="/tmp/jax_cache_bench_fp8_gemm",
                    help="JAX persistent compilation cache ('' = off): a second run skips every compile")
    ap.add_argument("--dry-run", action="store_true", help="CPU flow check: interpreter, tiny shapes")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_fp8_gemm.json"))
    a = ap.parse_args()
    global SHAPES, VALIDATION, PREFILL_DEFAULT, INTERPRET
    if a.dry_run:
        INTERPRET = True
        SHAPES = [("tiny 256x384", 256, 384)]
        PREFILL_DEFAULT = ["tiny 256x384"]
        VALIDATION = [v[:2] + (256, 200) + v[4:] for v in VALIDATION[:2] + VALIDATION[7:8]]

    if a.cache_dir:
        try:
            jax.config.update("jax_compilation_cache_dir", a.cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        except Exception as e:  # noqa: BLE001
            log(f"no persistent compilation cache: {e}")
    dev = jax.devices()[0]
    num_sms = getattr(dev, "core_count", None) or 132
    log(f"jax {jax.__version__}, {dev.device_kind}, {num_sms} SMs")
    res = dict(device=dev.device_kind, jax=jax.__version__, validation=[], decode=[], prefill=[], autotune={})
    key = jax.random.key(0)
    bw = copy_bandwidth(int(a.copy_gib * (1 << 30)))
    res["copy_bw"] = bw
    log(f"device copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")

    ok = validate(key, res)
    shapes = [s for s in SHAPES if a.shapes is None or any(p in s[0] for p in a.shapes)]
    pre_names = {"default": PREFILL_DEFAULT, "all": [s[0] for s in SHAPES], "none": []}[a.prefill_shapes]
    do_wo, do_ff = ok.get(("weight_only", "channel"), False), ok.get(("fp8_fp8", "channel"), False)

    # ---- weights and activations ----
    W, X = {}, {}
    for si, (name, K, N) in enumerate(shapes):
        W[name] = make_weights(jax.random.fold_in(key, 100 + si), K, N, n_buffers(K, N, a.buffer_mb * 1e6))
        for M in set(a.decode_m) | set(a.prefill_m) | {16}:
            if (M, K) not in X:
                X[(M, K)] = jax.random.normal(jax.random.fold_in(key, M * 7 + K), (M, K)).astype(jnp.bfloat16)
    log(f"weights ready ({sum(len(v) for v in W.values())} buffers)")

    # ---- autotune weight-only (M=16), Pallas compiles in parallel (no XLA autotuning inside) ----
    tuned = {}
    if do_wo:
        tune = {name: [(cfg, Cell(pallas_op("weight_only", cfg), X[(16, K)], W[name]))
                       for cfg in decode_candidates(K, N, num_sms)] for name, K, N in shapes}
        compile_parallel([c for v in tune.values() for _, c in v])
        log("weight-only candidates compiled")
        for name, K, N in shapes:
            rows = [(cfg, c.time(reps=15), c.error) for cfg, c in tune[name]]
            res["autotune"][name] = [dict(cfg=fmt_cfg(cfg), us=t, error=e) for cfg, t, e in rows]
            good = sorted((t, i) for i, (_, t, _) in enumerate(rows) if t is not None)
            if good:
                tuned[name] = rows[good[0][1]][0]
                top = ", ".join(f"{fmt_cfg(rows[i][0])}={t:.1f}" for t, i in good[:4])
                log(f"  {name}: best of {len(good)}/{len(rows)} at M=16: {top}")
        del tune

    # ---- measurement cells, in priority order ----
    decode = {(name, M): dict(shape=name, K=K, N=N, M=M) for name, K, N in shapes for M in a.decode_m}
    prefill = {(name, M): dict(shape=name, K=K, N=N, M=M) for name, K, N in shapes if name in pre_names
               for M in a.prefill_m}
    pallas_cells = []
    for (name, M), row in decode.items():
        if name in tuned:
            row["cfg"] = tuned[name]
            pallas_cells.append((row, "pallas_us", Cell(pallas_op("weight_only", tuned[name]),
                                                        X[(M, row["K"])], W[name])))
    pre_tune = []
    if do_ff:
        for (name, M), row in prefill.items():
            for cfg in PREFILL_CANDIDATES:
                for layout in ("nk", "kn"):
                    c = dict(cfg, layout=layout)
                    pre_tune.append((row, c, Cell(pallas_op("fp8_fp8", c), X[(M, row["K"])], W[name][:3], unroll=3)))
    compile_parallel([c for *_, c in pallas_cells] + [c for *_, c in pre_tune])
    log("Pallas timing cells compiled")
    for row, k, c in pallas_cells:
        row[k] = c.time(reps=a.reps)
    for row, cfg, c in pre_tune:
        t = c.time(reps=8)
        if t is not None and (row.get("pallas_us") is None or t < row["pallas_us"]):
            row["pallas_us"], row["cfg"] = t, cfg
    log("Pallas timed; XLA baselines next (one compile at a time, ~1 s each)")

    xla_cells = []
    order = [("bf16", (8, 16)), ("upcast", (8, 16)), ("fp8", (8,)), ("prefill", None), ("bf16", (1, 64)),
             ("upcast", (1, 64)), ("fp8", (1, 16, 64))]
    for what, Ms in order:
        if what == "prefill":
            for (name, M), row in prefill.items():
                for b in ("bf16", "fp8", "upcast"):
                    xla_cells.append((row, b, M, name))
            continue
        for (name, M), row in decode.items():
            if M in Ms:
                xla_cells.append((row, what, M, name))
    skipped = 0
    for row, b, M, name in xla_cells:
        if elapsed() > a.budget_s:
            skipped += 1
            continue
        pre = prefill.get((name, M)) is row
        ws = W[name][:3] if pre else W[name]
        c = Cell(XLA_OPS[b], X[(M, row["K"])], ws, unroll=3 if pre else 32)  # same unroll as the Pallas cells
        row[f"xla_{b}_us"] = c.time(reps=8 if pre else a.reps)
    if skipped:
        log(f"time budget reached: {skipped} XLA cells skipped (raise --budget-s)")

    # ---- derived columns, json, tables ----
    for row in decode.values():
        nbytes = row["K"] * row["N"] + 4 * row["N"] + 2 * row["M"] * (row["K"] + row["N"])
        row["floor_us"] = nbytes / bw * 1e6
        if row.get("pallas_us"):
            row["TBps"] = nbytes / row["pallas_us"] / 1e6
    for row in prefill.values():
        if row.get("pallas_us"):
            row["TFLOPs"] = 2 * row["M"] * row["N"] * row["K"] / row["pallas_us"] / 1e6
    res["decode"] = [dict(r, cfg=fmt_cfg(r.get("cfg"))) for r in decode.values()]
    res["prefill"] = [dict(r, cfg=fmt_cfg(r.get("cfg"))) for r in prefill.values()]
    try:
        write_json(a.json, res, indent=1, default=str)
    except OSError:
        pass

    def f1(v, w=6, p=1):
        return fmt(v, w, p)

    def ratio(r, k):
        return speedup(r, k, 6)

    print(f"\n== {res['device']}, jax {res['jax']}; copy {bw / 1e12:.2f} TB/s (read+write); FP8 peak "
          f"{FP8_PEAK_TFLOPS:.0f} TFLOP/s (H100 SXM datasheet, dense) ==")
    print("validation: " + ", ".join(f"{m}/{k}={'ok' if v else 'FAIL'}" for (m, k), v in ok.items()))
    print("\nweight-only FP8 (decode), per-channel scales. cfg = block_n/block_k/split_k/warps/stages, "
          "layout (nk = w stored [N,K]), sw = swap_ab")
    print(f"{'shape':25s} {'M':>3s} {'cfg':>22s} {'us':>6s} {'TB/s':>5s} {'xcopy':>5s} {'floor':>5s} "
          f"{'bf16':>6s} {'fp8':>6s} {'upcast':>6s} {'v.bf16':>6s} {'v.fp8':>6s} {'v.upc':>6s}")
    for r in decode.values():
        tb = r.get("TBps")
        print(f"{r['shape'][:25]:25s} {r['M']:3d} {fmt_cfg(r.get('cfg')):>22s} {f1(r.get('pallas_us'))} "
              f"{f1(tb, 5, 2)} {f1(tb * 1e12 / bw if tb else None, 5, 2)} {f1(r['floor_us'], 5)} "
              f"{f1(r.get('xla_bf16_us'))} {f1(r.get('xla_fp8_us'))} {f1(r.get('xla_upcast_us'))} "
              f"{ratio(r, 'xla_bf16_us')} {ratio(r, 'xla_fp8_us')} {ratio(r, 'xla_upcast_us')}")
    if prefill:
        print("\nFP8 x FP8 (prefill), per-token x per-channel scales; cfg = block_m/n/k/warps/stages layout")
        print(f"{'shape':25s} {'M':>5s} {'cfg':>20s} {'us':>7s} {'TFLOP/s':>7s} {'xpeak':>5s} {'bf16':>7s} "
              f"{'fp8':>7s} {'upcast':>7s} {'v.bf16':>6s} {'v.fp8':>6s} {'v.upc':>6s}")
        for r in prefill.values():
            tf = r.get("TFLOPs")
            print(f"{r['shape'][:25]:25s} {r['M']:5d} {fmt_cfg(r.get('cfg')):>20s} {f1(r.get('pallas_us'), 7)} "
                  f"{f1(tf, 7, 0)} {f1(tf / FP8_PEAK_TFLOPS if tf else None, 5, 2)} {f1(r.get('xla_bf16_us'), 7)} "
                  f"{f1(r.get('xla_fp8_us'), 7)} {f1(r.get('xla_upcast_us'), 7)} {ratio(r, 'xla_bf16_us')} "
                  f"{ratio(r, 'xla_fp8_us')} {ratio(r, 'xla_upcast_us')}")
    log("done")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
