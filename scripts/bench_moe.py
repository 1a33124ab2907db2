"""Validate and time the FP8 MoE grouped GEMM (pallas_kernels/moe_gemm.py) on one GPU against XLA.

  PYTHONPATH=. python3 scripts/bench_moe.py               # GPU; stops starting new cells at --budget-s 150
  python3 scripts/bench_moe.py --dry-run                  # CPU: the script's flow, interpreter, tiny shapes

Maverick routed experts: E=128, D=5120, F=8192 ("full", FP8 16.1 GB / bf16 32.2 GB) and the 1/8
tensor-parallel shard F=1024 ("shard", FP8 2.0 GB / bf16 4.0 GB); top-1 uniform random routing; N tokens in
{1, 8, 64} (decode) and {512, 4096} (prefill).
1. Device-copy bandwidth (jit(a + 1) on a 2 GiB f32 array, bytes read + written): the memory ceiling.
2. Validation on the GPU before any timing, against `moe_reference` (float32, HIGHEST, dequantized weights),
   every kernel output poisoned with NaN: shard FP8 at N = 1 / 64 (k=2) / 512 with the default config, bf16
   weights, all tokens on one expert, a ragged small shape (D, F not multiples of the blocks, split-K), and
   NaN weights in every expert no token is routed to. If any case fails, Pallas cells are not timed (unless
   --time-invalid).
3. Short autotune per shape on a few block configs, at N=8 (used for decode) and N=512 (prefill); every
   candidate's output is also checked against the reference where that is cheap.
4. Timing: compile + warm-up, then the median over --reps of (a pass over G groups of U routing sets, each
   group one jitted call applying the op U times, blocked at the end) / (G*U). The routing sets differ
   (G*U = 32 at decode), so the experts hit change from call to call and the 50 MB L2 does not serve
   repeats (one shard expert is 15.7 MB in FP8). Columns:
     hit      distinct experts per routing set (mean); bytes = hit x (3*D*F weight bytes + scale bytes)
     pallas   moe_fp8 end to end (method auto: on Hopper the Mosaic GPU pair path up to 16 pairs
              (pallas_kernels/moe_mgpu.py), else the Triton pair path up to PAIRS_MAX pairs, else sort,
              gather, 2 kernels, combine), us; TB/s = bytes / time; %cp = TB/s over the copy bandwidth;
              `sorted`: the sorted path end to end at the same N (the column = pallas where auto is sorted)
     kern     the sorted path's two pallas_calls alone (sorted, gathered input prepared outside), us and TB/s
     xla      mavjax.model.moe_experts with bf16 weights (<= 8 pairs: per-pair weight gather; more:
              lax.ragged_dot), us, and x = xla / pallas (> 1: Pallas faster); xla8 = the same with FP8 weights
              + scales (decode only: above 8 pairs the model's ragged path upcasts all experts every call)
   The full-size bf16 baseline needs 32 GB on top of the 16 GB FP8 weights; it is skipped when the device
   reports less than 60 GB, and the full shape's XLA cells come last in priority.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
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
from mavjax.model import moe_experts  # noqa: E402
from pallas_kernels import mgpu_gemv  # noqa: E402
from pallas_kernels.fp8_gemm import quantize_weight_per_channel  # noqa: E402
from pallas_kernels.moe_gemm import (  # noqa: E402
    PAIRS_MAX, _down, _gate_up, default_config, moe_fp8, moe_reference, quantize_experts, sort_tokens)

T0 = time.perf_counter()
INTERPRET = False  # --dry-run: Pallas interpreter, tiny shapes
E, D = 128, 5120
SHAPES = [("shard F=1024", 1024), ("full F=8192", 8192)]
DECODE_N, PREFILL_N = [1, 8, 64], [512, 4096]
TUNE_N = {"decode": 8, "prefill": 512}
CANDIDATES = {  # split-K stays automatic (it depends on N); the full shape tries default + the shard's best
    "decode": [{}, dict(block_n=32, block_n_down=32), dict(block_n=128, block_k=128, block_n_down=128,
                                                           block_k_down=128),
               dict(block_k=512, block_k_down=512, num_stages=3, num_stages_down=3), dict(num_warps=8)],
    "prefill": [{}, dict(block_m=64), dict(block_m=32, block_n=128, block_n_down=128, num_warps=8),
                dict(block_k=128, block_k_down=128, num_stages=4, num_stages_down=4), dict(evict=False)],
}
BOUND = 1e-2
VAL = dict(ragged=(1000, 600), nan=(512, 256), big_n=512)  # validation shapes: (D, F) of two 16-expert sets


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def elapsed():
    return time.perf_counter() - T0


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------------------
# Weights and routings (generated on the device, one expert at a time: no float32 copy of all experts)
# ---------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def gen_bf16(key, n_exp, K, M):
    return jax.lax.map(lambda k: (jax.random.normal(k, (K, M), jnp.float32) * 0.02).astype(jnp.bfloat16),
                       jax.random.split(key, n_exp))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def gen_fp8(key, n_exp, K, M):
    return jax.lax.map(lambda k: quantize_weight_per_channel(jax.random.normal(k, (K, M), jnp.float32) * 0.02),
                       jax.random.split(key, n_exp))


def make_weights(key, n_exp, F, kinds, dim=None):
    dim = dim or D
    k = jax.random.split(key, 3)
    shapes = [(dim, F), (dim, F), (F, dim)]
    out = {}
    if "bf16" in kinds:
        out["bf16"] = tuple(gen_bf16(k[i], n_exp, *s) for i, s in enumerate(shapes))
    if "fp8" in kinds:
        if "bf16" in out:  # the same weights, quantized
            q, s = jax.jit(functools.partial(quantize_experts, batch_size=8))(*out["bf16"])
        else:
            q, s = zip(*(gen_fp8(k[i], n_exp, *sh) for i, sh in enumerate(shapes)))
        out["fp8"], out["scales"] = tuple(q), tuple(s)
    jax.block_until_ready(out)
    return out


def make_sets(key, N, n_sets, n_exp, k=1, dim=None, experts=None):
    """n_sets routing sets (x [N, D] bf16, expert_idx [N, k], scores [N, k]), uniform random routing."""
    dim = dim or D
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    pool = np.arange(n_exp) if experts is None else np.asarray(experts)
    sets = []
    for i in range(n_sets):
        idx = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(N)]).astype(np.int32)
        x = jax.random.normal(jax.random.fold_in(key, i), (N, dim), jnp.float32).astype(jnp.bfloat16)
        sc = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((N, k)))), jnp.bfloat16)
        sets.append((x, jnp.asarray(idx), sc))
    return sets


# ---------------------------------------------------------------------------------------------------------
# Ops: f(weights, scales, sets) -> list of outputs, one per routing set
# ---------------------------------------------------------------------------------------------------------

def pallas_op(cfg, poison=False):
    def f(w, s, sets):
        return [moe_fp8(x, i, sc, *w, s, interpret=INTERPRET, poison_output=poison, **cfg) for x, i, sc in sets]
    return f


def kernels_only_prep(cfg, w, sets):
    """Sorted / gathered inputs of the two kernels for each set (outside the timed call)."""
    out = []
    for x, i, sc in sets:
        N, F = x.shape[0], w[0].shape[2]
        bm = cfg.get("block_m") or default_config(i.size, w[0].shape[0], x.shape[1], F)["block_m"]
        r = sort_tokens(i, w[0].shape[0], bm)
        k = i.shape[1]
        row_token = jnp.minimum(r.row_pair // k, N - 1)
        row_score = jnp.concatenate([sc.reshape(-1), jnp.zeros((1,), sc.dtype)])[r.row_pair]
        out.append((x[row_token], row_score, r))
    return out


def kernels_op(cfg, P):
    def f(w, s, prepped):
        R = prepped[0][0].shape[0]
        dd, F = w[0].shape[1], w[0].shape[2]
        c = dict(default_config(P, w[0].shape[0], dd, F, jnp.dtype(w[0].dtype).itemsize), **cfg)
        bm = R // prepped[0][2].block_expert.shape[0]
        sg, su, sd = s
        outs = []
        for xs, rs, r in prepped:
            common = dict(block_m=bm, num_warps=c["num_warps"], evict=c.get("evict", True), interpret=INTERPRET,
                          poison_output=False)
            h = _gate_up(xs, rs, r, w[0], w[1], sg, su, block_n=c["block_n"], block_k=c["block_k"],
                         split_k=c["split_k"], num_stages=c["num_stages"], cdt=jnp.dtype(jnp.bfloat16), **common)
            outs.append(_down(h, r, w[2], sd, block_n=c["block_n_down"], block_k=c["block_k_down"],
                              split_k=c["split_k_down"], num_stages=c["num_stages_down"],
                              out_dtype=jnp.bfloat16, **common))
        return outs
    return f


def xla_op(w, s, sets):
    return [moe_experts(x, i, sc, *w, scales=s) for x, i, sc in sets]


class Cell(DeviceLoop):
    """One timed op over G groups of U routing sets: fn(w, s, sets) over all G*U sets called back to back in a
    device loop (mavjax.benchmarking.DeviceLoop: no host dispatch per call, nothing hoisted). `time` gives
    microseconds and keeps fn's outputs on the first group (one untimed call) in `first` for the caller's check."""

    def __init__(self, fn, w, s, groups):
        self.fn, self.w, self.s, self.groups = fn, w, s, groups
        sets = [st for grp in groups for st in grp]
        # the dry run's interpreter takes ~1 s a call of the Mosaic GPU path: one loop trip there is the flow check
        super().__init__(lambda sets, w, s: fn(w, s, sets), (sets, w, s),
                         iters=1 if INTERPRET else max(2, -(-32 // len(sets))), calls_per_iter=len(sets))
        self.first = None

    def time(self, reps):
        if self.compiled is None and self.error is None:
            self.compile()
        if self.compiled is None:
            return None
        try:
            self.first = jax.block_until_ready(jax.jit(self.fn)(self.w, self.s, self.groups[0]))
            return super().time(reps) * 1e6
        except Exception as e:  # noqa: BLE001 - e.g. out of memory
            self.error = f"{type(e).__name__}: {str(e)[:300]}"
            return None


def compile_parallel(cells, workers=12):
    with cf.ThreadPoolExecutor(workers) as ex:
        list(ex.map(Cell.compile, cells))


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------

ref_fn = jax.jit(moe_reference)


def validate(key, shard, res):
    """Each case: poisoned outputs, finite and within BOUND of the float32 reference. Returns all-ok."""
    (dr, fr), (dn, fn), big_n = VAL["ragged"], VAL["nan"], VAL["big_n"]
    small = make_weights(jax.random.fold_in(key, 1), 16, fr, ("fp8",), dim=dr)  # ragged D, F
    nanw = make_weights(jax.random.fold_in(key, 2), 16, fn, ("fp8",), dim=dn)
    used = [0, 5, 9]
    dead = jnp.asarray([e not in used for e in range(16)])
    nanw["fp8"] = tuple(jnp.where(dead[:, None, None], jnp.asarray(jnp.nan, w.dtype), w) for w in nanw["fp8"])
    nanw["scales"] = tuple(jnp.where(dead[:, None], jnp.nan, s) for s in nanw["scales"])
    fp8, sc, bf = shard["fp8"], shard["scales"], shard.get("bf16")
    n_e = fp8[0].shape[0]
    cases = [  # (name, weights, scales, set, cfg, reference weights/scales)
        ("shard fp8 N=1 k=1 default (pairs)", fp8, sc, make_sets(key, 1, 1, n_e)[0], {}),
        ("shard fp8 N=1 k=1 sorted", fp8, sc, make_sets(key, 1, 1, n_e)[0], dict(method="sorted")),
        ("shard fp8 N=8 k=2 pairs, split-K 3/2", fp8, sc, make_sets(key, 8, 1, n_e, k=2)[0],
         dict(method="pairs", split_k=3, split_k_down=2)),
        (f"ragged D={dr} F={fr} N=5 k=2 pairs", small["fp8"], small["scales"],
         make_sets(key, 5, 1, 16, k=2, dim=dr)[0], dict(method="pairs", block_k=128, block_k_down=128)),
        ("shard fp8 N=64 k=2 default", fp8, sc, make_sets(key, 64, 1, n_e, k=2)[0], {}),
        (f"shard fp8 N={big_n} k=1 default", fp8, sc, make_sets(key, big_n, 1, n_e)[0], {}),
        ("shard fp8 N=64 all on expert 5", fp8, sc, make_sets(key, 64, 1, n_e, experts=[5])[0], {}),
        (f"ragged D={dr} F={fr} N=37 k=2 split-K", small["fp8"], small["scales"],
         make_sets(key, 37, 1, 16, k=2, dim=dr)[0],
         dict(block_m=32, block_n=64, block_k=128, split_k=3, block_n_down=64, block_k_down=128, split_k_down=2)),
        ("NaN weights in unrouted experts N=8", nanw["fp8"], nanw["scales"],
         make_sets(key, 8, 1, 16, dim=dn, experts=used)[0], {}),
    ]
    if bf is not None:
        cases.append(("shard bf16 weights N=8", bf, None, make_sets(key, 8, 1, n_e)[0], {}))
    if mosaic_here():  # the Mosaic GPU pair path (pallas_kernels/moe_mgpu.py): its shapes are multiples of 64
        mos = dict(mosaic=True)
        cases += [("shard fp8 N=1 k=1 mosaic", fp8, sc, make_sets(key, 1, 1, n_e)[0], mos),
                  ("shard fp8 N=8 k=2 mosaic", fp8, sc, make_sets(key, 8, 1, n_e, k=2)[0], mos)]
        if dn % 64 == 0 and fn % 64 == 0:
            cases.append(("NaN weights in unrouted experts N=8 mosaic", nanw["fp8"], nanw["scales"],
                          make_sets(key, 8, 1, 16, dim=dn, experts=used)[0], mos))

    def run(c):
        name, w, s, (x, i, scr), cfg = c
        try:
            y = jax.block_until_ready(pallas_op(cfg, poison=True)(w, s, [(x, i, scr)])[0])
            return np.asarray(y.astype(jnp.float32)), None
        except Exception as e:  # noqa: BLE001 - lowering errors are reported, not fatal
            return None, f"{type(e).__name__}: {str(e)[:1500]}"
    with cf.ThreadPoolExecutor(8) as ex:  # Pallas/Triton compiles in parallel
        outs = list(ex.map(run, cases))
    ok = True
    for (name, w, s, (x, i, scr), cfg), (y, err) in zip(cases, outs):
        good, msg = False, err
        if y is not None:
            if name.startswith("NaN"):  # the reference sees the original (finite) experts: zero the NaNs
                w = tuple(jnp.nan_to_num(a.astype(jnp.float32)) for a in w)
                s = tuple(jnp.nan_to_num(a) for a in s)
            ref = np.asarray(ref_fn(x, i, scr, *w, scales=s).astype(jnp.float32))
            fin = bool(np.isfinite(y).all())
            e = rel_err(y, ref)
            good = fin and e < BOUND
            msg = f"all written & finite={fin}, err {e:.2e} (bound {BOUND:g})"
        log(f"{'PASS' if good else 'FAIL'} {name}: {msg}")
        res["validation"].append(dict(case=name, ok=good, msg=msg))
        ok &= good
    return ok


# ---------------------------------------------------------------------------------------------------------

def mosaic_here():
    """Whether moe_fp8(mosaic=True) runs here: on a Hopper GPU, or anywhere under the interpreter."""
    return mgpu_gemv.plgpu is not None and (INTERPRET or mgpu_gemv.on_hopper())


def fmt_cfg(c):
    if not c:
        return "default"
    short = dict(block_m="m", block_n="n", block_k="k", split_k="s", block_n_down="nd", block_k_down="kd",
                 split_k_down="sd", num_warps="w", num_stages="st", num_stages_down="std", evict="ev")
    return ",".join(f"{short.get(k, k)}{int(v) if isinstance(v, bool) else v}" for k, v in c.items())


def expert_bytes(n_hit, F, itemsize, scales):
    return n_hit * (3 * D * F * itemsize + (4 * (2 * F + D) if scales else 0))


def main():
    global SHAPES, DECODE_N, PREFILL_N, TUNE_N, CANDIDATES, INTERPRET, E, D, VAL
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new measurement after this")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--shapes", nargs="*", default=None, help="substrings of shape names to keep")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--time-invalid", action="store_true", help="time Pallas even if validation failed")
    ap.add_argument("--cache-dir", default="/tmp/jax_cache_bench_moe", help="persistent compile cache ('' = off)")
    ap.add_argument("--dry-run", action="store_true", help="CPU flow check: interpreter, tiny shapes")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_moe.json"))
    a = ap.parse_args()
    if a.dry_run:
        INTERPRET = True
        E, D = 8, 64
        SHAPES = [("tiny F=48", 48), ("tiny F=96", 96)]
        DECODE_N, PREFILL_N = [1, 8], [64]
        TUNE_N = {"decode": 8, "prefill": 64}
        CANDIDATES = {"decode": [{}, dict(block_n=32, block_k=32, block_n_down=32, block_k_down=32)],
                      "prefill": [{}, dict(block_m=32)]}
        VAL = dict(ragged=(200, 120), nan=(96, 48), big_n=64)
        a.reps, a.copy_gib = 2, 1 / 64
    if a.cache_dir and not a.dry_run:
        try:
            jax.config.update("jax_compilation_cache_dir", a.cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        except Exception as e:  # noqa: BLE001
            log(f"no persistent compilation cache: {e}")
    dev = jax.devices()[0]
    try:
        mem_limit = (dev.memory_stats() or {}).get("bytes_limit", 0)
    except Exception:  # noqa: BLE001
        mem_limit = 0
    log(f"jax {jax.__version__}, {dev.device_kind}, memory limit {mem_limit / 1e9:.1f} GB")
    res = dict(device=dev.device_kind, jax=jax.__version__, validation=[], rows=[], tune={})
    key = jax.random.key(0)
    bw = copy_bandwidth(int(a.copy_gib * (1 << 30)), reps=5 if a.dry_run else 20)
    res["copy_bw"] = bw
    log(f"device copy bandwidth {bw / 1e12:.3f} TB/s (read + write)")

    shapes = [s for s in SHAPES if a.shapes is None or any(p in s[0] for p in a.shapes)]
    rows = {(name, N): dict(shape=name, F=F, N=N) for name, F in shapes for N in DECODE_N + PREFILL_N}
    sets = {}
    for N in DECODE_N + PREFILL_N:  # G groups of U routing sets per N (all shapes share them)
        G, U = (4, 8) if N <= 64 else (1, 2)
        flat = make_sets(jax.random.fold_in(key, 10 + N), N, G * U, E)
        sets[N] = [flat[g * U:(g + 1) * U] for g in range(G)]
        for name, F in shapes:
            hits = [len(np.unique(np.asarray(i))) for _, i, _ in flat]
            rows[(name, N)]["hit"] = float(np.mean(hits))
    valid = None
    ref_ok_flops = 3e12  # check a timed cell's first output against the reference below this many flops
    tuned = {}

    def run_shape(si, name, F):
        """Everything for one shape; its weights (and every cell holding them) are freed on return."""
        nonlocal valid
        full = F > 2048 or (a.dry_run and si > 0)  # FP8 first, bf16 after the Pallas cells (dry run: 2nd shape)
        kinds = ("fp8",) if full else ("bf16", "fp8")
        W = make_weights(jax.random.fold_in(key, 100 + si), E, F, kinds)
        log(f"{name}: weights ready ({', '.join(kinds)})")
        if valid is None:  # first shape: the validation suite (on its weights)
            valid = validate(key, W, res)
            log(f"validation {'PASSED' if valid else 'FAILED'}")
        do_pallas = valid or a.time_invalid

        refs = {}

        def check(N, outs, set_idx=0):
            """First output of a cell vs the reference of its first routing set (where that is cheap)."""
            if 6 * N * E * D * F > ref_ok_flops or outs is None:
                return None
            if N not in refs:
                x, i, scr = sets[N][0][set_idx]
                refs[N] = np.asarray(ref_fn(x, i, scr, *W["fp8"], scales=W["scales"]).astype(jnp.float32))
            return rel_err(np.asarray(outs[set_idx].astype(jnp.float32)), refs[N])

        # ---- autotune (Pallas, fp8) ----
        if do_pallas:
            for regime, NT in TUNE_N.items():
                cands = [{}] if a.no_tune else CANDIDATES[regime]
                if si > 0 and not a.no_tune:  # later shapes: default and the first shape's winner
                    best = tuned.get(shapes[0][0], {}).get(regime, ({}, None))[0]
                    cands = [{}] + ([best] if best else [])
                cells = [(c, Cell(pallas_op(c), W["fp8"], W["scales"], sets[NT][:2])) for c in cands]
                compile_parallel([c for _, c in cells])
                scores = []
                for c, cell in cells:
                    t = cell.time(reps=max(2, a.reps // 3))
                    e = check(NT, cell.first)
                    bad = e is not None and not e < BOUND
                    scores.append((c, t, e, cell.error))
                    if t is not None and not bad and (regime not in tuned.get(name, {})
                                                      or t < tuned[name][regime][1]):
                        tuned.setdefault(name, {})[regime] = (c, t)
                res["tune"][f"{name} {regime} N={NT}"] = [
                    dict(cfg=fmt_cfg(c), us=t, err=e, error=err) for c, t, e, err in scores]
                top = ", ".join(f"{fmt_cfg(c)}={t:.1f}us" + (f"(err {e:.1e})" if e is not None else "")
                                for c, t, e, _ in sorted(scores, key=lambda s: s[1] or 1e30) if t is not None)
                fails = [f"{fmt_cfg(c)}: {err}" for c, t, _, err in scores if t is None]
                log(f"  tune {name} {regime} (N={NT}): {top}" + (f"; failed: {fails}" if fails else ""))

        # ---- Pallas cells: end to end and kernels only (all compiled in parallel first) ----
        pcells = []
        for N in DECODE_N + PREFILL_N:
            if not do_pallas or elapsed() > a.budget_s:
                continue
            regime = "decode" if N in DECODE_N else "prefill"
            cfg = tuned.get(name, {}).get(regime, ({}, None))[0]
            rows[(name, N)]["cfg"] = fmt_cfg(cfg)
            scfg = {kk: v for kk, v in cfg.items() if kk != "method"}
            prepped = [kernels_only_prep(scfg, W["fp8"], g) for g in sets[N]]
            sorted_cell = Cell(pallas_op(dict(method="sorted")), W["fp8"], W["scales"], sets[N]) \
                if N <= PAIRS_MAX else None  # the auto path is the pair path here: time the sorted one too
            pcells.append((N, Cell(pallas_op(cfg), W["fp8"], W["scales"], sets[N]),
                           Cell(kernels_op(scfg, N), W["fp8"], W["scales"], prepped), sorted_cell))
        compile_parallel([c for _, *cs in pcells for c in cs if c is not None])
        for N, cell, kcell, scell in pcells:
            row = rows[(name, N)]
            if elapsed() > a.budget_s:
                continue
            row["pallas_us"] = cell.time(a.reps)
            row["path"] = "pairs" if N <= PAIRS_MAX and cfg.get("method") != "sorted" else "sorted"
            row["err"] = check(N, cell.first)
            row["kern_us"] = kcell.time(a.reps)
            row["sorted_us"] = scell.time(a.reps) if scell else row["pallas_us"]
            for k, c in (("pallas", cell), ("kern", kcell), ("sorted", scell)):
                if c is None:
                    continue
                if c.error:
                    row[f"{k}_error"] = c.error
                    log(f"  {name} N={N} {k}: {c.error}")
            log(f"  {name} N={N}: pallas {row['pallas_us']} us, kernels {row['kern_us']} us, err {row['err']}")

        # ---- XLA baselines (bf16 weights; FP8 at decode) ----
        if "bf16" not in W:
            need = 3 * E * D * F * 2
            if mem_limit and mem_limit < need + 28e9:
                log(f"  {name}: skip XLA bf16 ({need / 1e9:.0f} GB of bf16 weights; device limit "
                    f"{mem_limit / 1e9:.0f} GB)")
            elif elapsed() < a.budget_s:
                try:
                    W.update(make_weights(jax.random.fold_in(key, 200 + si), E, F, ("bf16",)))
                except Exception as e:  # noqa: BLE001 - out of memory
                    log(f"  {name}: no bf16 weights: {type(e).__name__}: {str(e)[:200]}")
        for kind, Ns in (("bf16", DECODE_N), ("fp8", [n for n in DECODE_N if n <= 8]), ("bf16", PREFILL_N)):
            for N in Ns:
                row = rows[(name, N)]
                if (kind == "bf16" and "bf16" not in W) or elapsed() > a.budget_s:
                    continue
                w, s = (W["bf16"], None) if kind == "bf16" else (W["fp8"], W["scales"])
                cell = Cell(xla_op, w, s, sets[N])
                row[f"xla_{kind}_us"] = cell.time(a.reps)
                if cell.error:
                    row[f"xla_{kind}_error"] = cell.error
                log(f"  {name} N={N} XLA {kind}: {row[f'xla_{kind}_us']} us" +
                    (f" ({cell.error})" if cell.error else ""))

    for si, (name, F) in enumerate(shapes):
        if elapsed() > a.budget_s:
            log(f"time budget reached before {name}")
            break
        run_shape(si, name, F)
        res["rows"] = list(rows.values())

    # ---- derived columns, json, table ----
    for r in rows.values():
        b8 = expert_bytes(r["hit"], r["F"], 1, True)
        r["bytes_fp8"], r["bytes_bf16"] = b8, expert_bytes(r["hit"], r["F"], 2, False)
        for k in ("pallas", "kern"):
            if r.get(f"{k}_us"):
                r[f"{k}_TBps"] = b8 / r[f"{k}_us"] / 1e6
        if r.get("xla_bf16_us"):
            r["xla_bf16_TBps"] = r["bytes_bf16"] / r["xla_bf16_us"] / 1e6
    res["rows"] = list(rows.values())
    try:
        write_json(a.json, res, indent=1, default=str)
    except OSError:
        pass

    def f1(v, w=7, p=1):
        return fmt(v, w, p)

    def ratio(r, k):
        return speedup(r, k, 5)

    print(f"\n== {res['device']}, jax {res['jax']}; copy {bw / 1e12:.2f} TB/s (read+write); E={E} D={D}, "
          f"top-1 uniform routing; validation {'PASSED' if valid else 'FAILED' if valid is False else 'not run'} ==")
    print("TB/s = FP8 bytes of the experts hit / time; %cp = vs copy; x = XLA bf16 time / Pallas time; "
          "xbytes = XLA bf16 bytes of the experts hit / its time")
    print(f"{'shape':12s} {'N':>5s} {'hit':>5s} {'pallas':>7s} {'TB/s':>5s} {'%cp':>4s} {'kern':>7s} {'TB/s':>5s} "
          f"{'xla':>7s} {'xbytes':>6s} {'x':>5s} {'xla8':>7s} {'x8':>5s} {'sorted':>7s} {'err':>7s}  path cfg")
    for r in rows.values():
        tb, kt = r.get("pallas_TBps"), r.get("kern_TBps")
        err_s = format(r["err"], ".1e") if r.get("err") is not None else "-"
        print(f"{r['shape'][:12]:12s} {r['N']:5d} {r['hit']:5.1f} {f1(r.get('pallas_us'))} {f1(tb, 5, 2)} "
              f"{f1(tb * 1e12 / bw * 100 if tb else None, 4, 0)} {f1(r.get('kern_us'))} {f1(kt, 5, 2)} "
              f"{f1(r.get('xla_bf16_us'))} {f1(r.get('xla_bf16_TBps'), 6, 2)} {ratio(r, 'xla_bf16_us')} "
              f"{f1(r.get('xla_fp8_us'))} {ratio(r, 'xla_fp8_us')} "
              f"{f1(r.get('sorted_us'))} {err_s:>7s}  {r.get('path', '-')} {r.get('cfg', '-')}")
    log("done")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
