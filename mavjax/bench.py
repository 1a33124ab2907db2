"""`mavjax bench`: latency/throughput sweeps, and one rank of an 8-GPU Maverick deployment timed on one GPU.

Sweep (`--batch-sizes 1 8 64 --input-len 128 1024 --output-len 128`): for every (batch, input, output) a batch
of random prompts is generated greedily with EOS ignored, through `LLM.generate` (jitted prefill, on-device
decode loop), once to compile and warm up, then `--iters` times; the best run is reported. Metric names are
vLLM's (benchmark_serving) where one exists:
  ttft_ms                 time to first token: prefill of the batch and the first sample
  tpot_ms                 time per output token after the first: decode-loop time / (output_len - 1)
  itl_ms                  inter-token latency; the loop runs on the device, no host step per token, so the mean
                          ITL is TPOT (reported so that tables line up with vLLM's)
  e2el_ms                 end-to-end latency of the batch (ttft + decode)
  tokens_per_s_per_user   one sequence's decode rate, 1000 / tpot_ms
  output_throughput       generated tokens/s of the whole batch, batch * output_len / e2el
  total_token_throughput  (input + generated) tokens/s of the whole batch
  mean_acceptance_length  with a draft: tokens produced per target step (from the LLM's metrics)
Weights: a checkpoint (`--model DIR`), or `--random-weights --preset NAME [--layers N] [--quantize fp8]`,
built abstractly and filled parameter by parameter on the device (chunked, FP8 weights generated as FP8),
never as a float32 copy of the model.

Rank slice (`--rank-slice N`, with `--random-weights --preset maverick`): the parameters one of N GPUs holds
in the minimum-latency layout (mesh expert=1, tensor=N; `rank_slice_config`): 1/N of the query and kv heads,
of the dense-MLP units, of every expert's units (all experts kept) and of the shared expert, the embedding
and LM head vocabulary-sharded; FP8 projections. Its decode step (batch 1 and 8), verify step (K+1 tokens) and
draft round (the EAGLE-3 module's passes of one K-token chain) are timed on one device; the collectives the N-way model would run are not executed but their
latency is added (`--collective-us`, `--collectives-per-layer`), as stated in the output. From these it prints
the bytes-read floor, the ratio to it and a PROJECTION of tokens/s per user of the full model on N GPUs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import sys
import time

import numpy as np

# Logical axes split N ways in the (expert=1, tensor=N) layout: mavjax.sharding.RULES with expert=1.
TENSOR_AXES = ("vocab", "heads", "kv_heads", "mlp", "expert_mlp")
# FP8 random weights: codes N(0, 1) * FP8_SPREAD (spread over e4m3's range), scale std / FP8_SPREAD.
FP8_SPREAD = 32.0


# ---- the per-rank config -------------------------------------------------------------------------------------
def rank_slice_config(cfg, n: int):
    """The config of what one of n GPUs holds under tensor parallelism over n (mesh expert=1, tensor=n): the
    same model code runs it. Heads, kv heads, dense-MLP units, every expert's units (shared expert included)
    and the vocabulary are divided by n; token ids the slice cannot hold (pad/bos/eos) are dropped."""
    from mavjax.config import ConfigError

    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"rank slice must be a positive integer, got {n!r}")
    dims = dict(num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                intermediate_size=cfg.intermediate_size, intermediate_size_mlp=cfg.intermediate_size_mlp,
                vocab_size=cfg.vocab_size)
    for name, size in dims.items():
        if size % n:
            raise ConfigError(f"rank slice {n}: {name} = {size} is not divisible by {n}")
    sliced = {k: v // n for k, v in dims.items()}
    V = sliced["vocab_size"]
    keep = lambda t: t if t is not None and t < V else None  # noqa: E731
    return cfg.replace(**sliced, pad_token_id=keep(cfg.pad_token_id) or 0, bos_token_id=keep(cfg.bos_token_id),
                       eos_token_id=tuple(t for t in cfg.eos_token_id if t < V))


# ---- random weights on the device ----------------------------------------------------------------------------
def random_model(cfg, *, dtype="bfloat16", quant=None, kernels="xla", mesh=None, seed=0,
                 chunk_elems: int = 1 << 27, allreduce: str = "xla"):
    """A Llama4 with random weights, built abstractly and filled one parameter at a time on the device (or
    sharded over `mesh`). Large parameters are generated in chunks of about `chunk_elems` elements along their
    leading axis, FP8 weights directly as FP8 codes, so the peak is the model plus one chunk's temporaries.
    With a mesh the model runs its shard_map layers over it (`mavjax.parallel`, all-reduce `allreduce`), as
    `LLM(path, mesh=...)` does: sharded weights alone would leave every Pallas call (opaque to GSPMD) to
    gather its weights to every device each step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mavjax.model import Llama4
    from mavjax.sharding import param_shardings

    dtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: Llama4(cfg, dtype=dtype, kernels=kernels, quant=quant))
    graphdef, state = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh) if mesh is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    std = cfg.initializer_range
    key = jax.random.key(seed)
    flat = nnx.to_flat_state(state)
    for i, (path, var) in enumerate(flat):
        name = ".".join(str(p) for p in path)
        v = var.get_value()
        sharding = shardings.get(name, default)
        if name == "inv_freq":
            var.set_value(jnp.asarray(cfg.rope_inv_freq(), jnp.float32))  # uncommitted: goes where jit needs it
            continue
        meta = var.get_metadata()
        if meta.get("logical_axes") == ("norm",):
            kind = "ones"
        elif name.endswith("_scale"):
            kind = "scale"
        elif v.dtype == jnp.float8_e4m3fn:
            kind = "fp8"
        else:
            kind = "normal"
        if kind in ("ones", "scale"):  # small constants: from the host, no program to compile
            const = 1.0 if kind == "ones" else std / FP8_SPREAD
            var.set_value(jax.device_put(np.full(v.shape, const, v.dtype), sharding))
            continue
        chunked = mesh is None and v.size > chunk_elems and len(v.shape) > 1
        fill = _filler(tuple(v.shape), str(v.dtype), kind, std, chunked, chunk_elems, sharding)
        var.set_value(fill(jax.random.fold_in(key, i)))
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        from mavjax.parallel import Parallel

        model.set_parallel(Parallel(mesh, allreduce=allreduce))
    return model


_FILLERS: dict = {}


def _filler(shape, dtype, kind, std, chunked, chunk_elems, sharding):
    """A jitted generator of one parameter (cached by shape/dtype/kind, so repeated layers compile once)."""
    import jax
    import jax.numpy as jnp

    sig = (shape, dtype, kind, std, chunked, chunk_elems, sharding)
    if sig in _FILLERS:
        return _FILLERS[sig]
    dt = jnp.dtype(dtype)

    def gen(k, shp):
        if kind == "fp8":  # codes N(0,1)*FP8_SPREAD, scale std/FP8_SPREAD: the weight is N(0, std^2). Drawn in
            # bf16 and cast per chunk, so no wider copy of the whole tensor ever exists
            x = jax.random.normal(k, shp, jnp.bfloat16) * FP8_SPREAD
            return jnp.clip(x, -448, 448).astype(dt)
        return (jax.random.normal(k, shp, dt) * std).astype(dt)

    def make(k):
        if not chunked:
            return gen(k, shape)
        rows = shape[0]
        per_row = math.prod(shape[1:])
        batch = max(1, chunk_elems // per_row)
        return jax.lax.map(lambda kk: gen(kk, shape[1:]), jax.random.split(k, rows), batch_size=min(batch, rows))

    _FILLERS[sig] = jax.jit(make, out_shardings=sharding)
    return _FILLERS[sig]


def with_kernels(model, kernels: str):
    """The same weights (shared arrays, no copy) under another kernel path ("xla" or "pallas")."""
    from flax import nnx

    from mavjax.model import Llama4

    if model.kernels == kernels:
        return model
    abstract = nnx.eval_shape(lambda: Llama4(model.cfg, dtype=model.dtype, kernels=kernels, quant=model.quant))
    return nnx.merge(nnx.split(abstract)[0], nnx.state(model))


def param_bytes(model) -> int:
    import jax
    from flax import nnx

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---- sweep -----------------------------------------------------------------------------------------------------
MAX = "max"  # --batch-sizes max: the largest batch that fits in device memory (`largest_fitting_batch`)


def batch_size_arg(text: str):
    """argparse type of --batch-sizes: a positive int, or "max"."""
    if text == MAX:
        return MAX
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch size or 'max', got {text!r}") from None


def is_out_of_memory(e: BaseException) -> bool:
    """An XLA allocation failure (at compile or run time), as opposed to any other error."""
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def largest_fitting_batch(run, ceiling: int, log=print) -> int:
    """The largest power of two b <= ceiling for which run(b) completes without running out of device memory:
    tried largest first, halving after each allocation failure (what a whole batch's prefill needs is easier
    to find by trying than to predict). Any other error, or running out of memory at batch 1, propagates."""
    b = 1 << (int(ceiling).bit_length() - 1)
    while True:
        try:
            run(b)
            return b
        except Exception as e:
            if b == 1 or not is_out_of_memory(e):
                raise
            log(f"batch {b}: out of device memory ({str(e).splitlines()[0][:120]}); trying {b // 2}")
            b //= 2


def profile_generate(llm, vocab: int, row: dict, seed: int = 0, log=print) -> dict:
    """One more generate call of a sweep row's shape (compiled by the sweep) under the profiler: GPU 0's
    kernels per output token, prefill included (a short prompt keeps its share small), and the busy time
    against the span (what host round trips and launch gaps cost)."""
    from mavjax.profiling import format_profile, profile_kernels
    from mavjax.sampling import SamplingParams

    rng = np.random.default_rng(seed + 1)
    B, L_in, L_out = row["batch_size"], row["input_len"], row["output_len"]
    prompts = [rng.integers(0, vocab, L_in).tolist() for _ in range(B)]
    sp = SamplingParams(max_new_tokens=L_out, temperature=0.0, ignore_eos=True)
    prof = profile_kernels(lambda: llm.generate(prompts, sp), steps=L_out, device=0)
    log(format_profile(prof, f"profile, batch {B}, input {L_in}, output {L_out}, GPU 0, per output token"))
    return prof


def sweep(llm, vocab: int, batch_sizes, input_lens, output_lens, iters: int = 3, seed: int = 0, log=print):
    """One row of vLLM-named metrics per (batch, input, output). A batch size of "max" is the largest power of
    two up to `llm.max_batch_size` whose warm-up run fits in device memory, found anew for each (input,
    output) pair (its row says `largest_fitting: true`)."""
    from mavjax.sampling import SamplingParams

    rng = np.random.default_rng(seed)
    rows = []
    for B_arg in batch_sizes:
        for L_in in input_lens:
            for L_out in output_lens:
                if L_in + L_out > llm.max_model_len:
                    raise ValueError(f"input {L_in} + output {L_out} exceeds max_model_len {llm.max_model_len}")
                sp = SamplingParams(max_new_tokens=L_out, temperature=0.0, ignore_eos=True)
                make = lambda b: [rng.integers(0, vocab, L_in).tolist() for _ in range(b)]  # noqa: E731
                if B_arg == MAX:
                    B = largest_fitting_batch(lambda b: llm.generate(make(b), sp), llm.max_batch_size, log)
                else:
                    B = B_arg
                    llm.generate(make(B), sp)  # compile and warm up
                prompts = make(B)
                best = None
                for _ in range(iters):
                    outs = llm.generate(prompts, sp)
                    m = outs[0].metrics
                    if best is None or m.time_to_first_token_s + m.decode_time_s < best[0]:
                        best = (m.time_to_first_token_s + m.decode_time_s, outs)
                e2el, outs = best
                m = outs[0].metrics
                n_out = sum(len(o.token_ids) for o in outs)
                tpot = m.decode_time_s / max(L_out - 1, 1)
                acc = [getattr(o.metrics, a) for o in outs for a in ("mean_acceptance_length", "acceptance_length")
                       if getattr(o.metrics, a, None) is not None]
                row = dict(batch_size=B, input_len=L_in, output_len=L_out, ttft_ms=m.time_to_first_token_s * 1e3,
                           tpot_ms=tpot * 1e3, itl_ms=tpot * 1e3, e2el_ms=e2el * 1e3,
                           tokens_per_s_per_user=1.0 / tpot if L_out > 1 else None,
                           output_throughput=n_out / e2el, total_token_throughput=(n_out + B * L_in) / e2el,
                           mean_acceptance_length=float(np.mean(acc)) if acc else None,
                           largest_fitting=B_arg == MAX)
                rows.append(row)
                log(format_rows([row], header=len(rows) == 1))
    return rows


SWEEP_COLUMNS = (("batch_size", "batch", 5, 0), ("input_len", "in", 6, 0), ("output_len", "out", 5, 0),
                 ("ttft_ms", "ttft_ms", 9, 2), ("tpot_ms", "tpot_ms", 9, 3), ("itl_ms", "itl_ms", 8, 3),
                 ("tokens_per_s_per_user", "tok/s/user", 10, 1), ("output_throughput", "output_tok/s", 12, 1),
                 ("total_token_throughput", "total_tok/s", 12, 1), ("mean_acceptance_length", "accept", 7, 2))


def format_rows(rows, header=True) -> str:
    from mavjax.benchmarking import fmt

    lines = [" ".join(f"{title:>{w}s}" for _, title, w, _ in SWEEP_COLUMNS)] if header else []
    for r in rows:
        lines.append(" ".join(fmt(r[k], w, p) for k, _, w, p in SWEEP_COLUMNS))
    return "\n".join(lines)


# ---- timing one step on the device -------------------------------------------------------------------------
class _LoopTimer:
    """A jitted fori_loop of `iters` steps (no host in the loop), traced by the subclass into `self.lowered`
    with arguments `self.args`; the loop's carry (`self.args[1]`, donated) is fed back between calls."""

    iters: int

    def compile(self) -> "_LoopTimer":
        """XLA compilation (thread-safe: timers compile in parallel threads; tracing stays on the main thread)."""
        t = time.perf_counter()
        self.step = self.lowered.compile()
        self.compile_s = time.perf_counter() - t
        return self

    def _call(self):
        import jax

        state, carry, *rest = self.args
        carry = self.step(state, carry, *rest)
        jax.block_until_ready(carry)
        self.args = (state, carry, *rest)

    def time(self, reps: int) -> float:
        """Seconds per step, best of `reps` loops, after one warm-up loop."""
        best = math.inf
        for r in range(reps + 1):
            t = time.perf_counter()
            self._call()
            if r:
                best = min(best, (time.perf_counter() - t) / self.iters)
        return best

    def profile(self) -> dict:
        """The device kernels of one loop, per step (mavjax.profiling)."""
        from mavjax.profiling import profile_kernels

        return profile_kernels(self._call, self.iters)


def _context_cache(create, B, S, context):
    """A KV cache of S slots whose first `context` hold positions 0..context-1."""
    import jax.numpy as jnp

    cache = create(B, S)
    slots = jnp.arange(S, dtype=jnp.int32)
    return dataclasses.replace(cache, pos=jnp.broadcast_to(jnp.where(slots < context, slots, -1), (B, S)))


class StepTimer(_LoopTimer):
    """One forward step of `tokens` new tokens per row for `batch` rows over a KV cache holding `context`
    positions, sampled greedily and fed back. tokens=1 is a decode step, K+1 a speculative verify step.
    The loop also carries whether every step's logits were finite (`all_finite`): a step computing NaN can
    run faster than a correct one (an MoE kernel routes NaN logits nowhere and reads no expert), and its time
    is then no measurement (docs/benchmarks.md section 19)."""

    def __init__(self, model, batch: int, tokens: int, context: int, iters: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from mavjax.generate import bucket
        from mavjax.kv_cache import KVCache

        cfg = model.cfg
        graphdef, state = nnx.split(model)
        S = bucket(context + tokens, minimum=64)
        B, T = batch, tokens
        self.iters = iters

        def run(state, carry):
            m = nnx.merge(graphdef, state)
            pos = jnp.broadcast_to(context + jnp.arange(T, dtype=jnp.int32), (B, T))
            at = jnp.full((B,), context, jnp.int32)

            def body(_, c):
                cache, tok, finite = c
                logits, cache = m(tok, pos, cache, write_index=at)  # [B, T, V]
                return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32), finite & jnp.isfinite(logits).all()

            return jax.lax.fori_loop(0, iters, body, carry)

        cache = _context_cache(lambda b, s: KVCache.create(cfg, b, s, model.dtype), B, S, context)
        tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
        # Committed to the device like the step's outputs, which are fed back in.
        self.args = (state, jax.device_put((cache, tok, jnp.asarray(True)), jax.devices()[0]))
        self.lowered = jax.jit(run, donate_argnums=(1,)).lower(*self.args)

    def all_finite(self) -> bool:
        """Whether every step run so far (warm-up, timed loops, profile) produced finite logits."""
        return bool(self.args[1][2])


class DraftRoundTimer(_LoopTimer):
    """The draft's share of one speculative round of a K-token chain, through the EAGLE-3 module and
    SpecEngine's own phases: `draft_phase` (K-1 single-token draft passes, the first token coming from the
    previous round's logits) and `catch_up_phase` (the fc projection of the target's K+1 features and one
    K+1-token pass, all K drafts accepted). The target contributes only its embedding table."""

    def __init__(self, target, draft, batch: int, K: int, context: int, iters: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from mavjax.generate import bucket
        from mavjax.speculative import DraftTree, SpecEngine

        tree = DraftTree.chain(K)
        eng = SpecEngine(target, draft, tree, check=False)  # the rank's fc reads 1/n of the features
        dcfg = draft.cfg
        B, S = batch, bucket(context + 2 * (K + 1), minimum=64)
        self.iters = iters
        root_pos = jnp.full((B,), context, jnp.int32)
        keys = jax.random.split(jax.random.key(0), B)
        path = jnp.broadcast_to(jnp.arange(K + 1, dtype=jnp.int32), (B, K + 1))
        accepted = jnp.full((B,), K, jnp.int32)

        def run(states, carry, feats):
            tgt, dr = eng._models(*states)

            def body(_, c):
                dcache, g_root, d_root, root_tok = c
                toks, _, dcache = eng.draft_phase(tgt, dr, tree, dcache, g_root, d_root, root_pos, keys,
                                                  jnp.zeros((B,)), sampling=False)  # [B, K]
                emitted = jnp.concatenate([root_tok[:, None], toks], axis=1)  # [B, K+1]
                g_root, d_root, dcache = eng.catch_up_phase(tgt, dr, tree, dcache, feats, path, emitted,
                                                            accepted, root_pos)
                return dcache, g_root, d_root, toks[:, -1]

            return jax.lax.fori_loop(0, iters, body, carry)

        dcache = _context_cache(lambda b, s: draft.cache(b, s), B, S, context)
        rng = np.random.default_rng(1)
        g_root = jnp.asarray(rng.standard_normal((B, dcfg.hidden_size)) * 0.5, draft.dtype)
        d_root = jnp.asarray(rng.standard_normal((B, dcfg.draft_vocab_size)), jnp.float32)
        root_tok = jnp.asarray(rng.integers(0, dcfg.vocab_size, (B,)), jnp.int32)
        n_in = len(dcfg.aux_layers) * dcfg.target_hidden_size
        feats = jnp.asarray(rng.standard_normal((B, K + 1, n_in)) * 0.5, draft.dtype)  # [B, K+1, F]
        states = (nnx.state(target), nnx.state(draft))
        self.args = (states, jax.device_put((dcache, g_root, d_root, root_tok), jax.devices()[0]), feats)
        self.lowered = jax.jit(run, donate_argnums=(1,)).lower(*self.args)


# ---- the rank slice --------------------------------------------------------------------------------------------
def rank_draft_config(full, n: int, intermediate_size: int, draft_vocab_size: int):
    """One rank's share of an EAGLE-3 draft for `full` under tensor parallelism over n: 1/n of its heads, MLP
    units and draft vocabulary, and an fc that reads 1/n of the tapped target features (row-parallel, its
    output all-reduced). Its vocabulary is the rank's slice of the target's."""
    from mavjax.config import ConfigError
    from mavjax.eagle3 import Eagle3Config

    d = Eagle3Config.for_target(full, draft_vocab_size=draft_vocab_size, intermediate_size=intermediate_size)
    for name, size in (("draft intermediate size", d.intermediate_size), ("draft vocabulary", d.draft_vocab_size),
                       ("hidden size", d.target_hidden_size)):
        if size % n:
            raise ConfigError(f"rank slice {n}: {name} = {size} is not divisible by {n}")
    return dataclasses.replace(d, num_attention_heads=d.num_attention_heads // n,
                               num_key_value_heads=max(1, d.num_key_value_heads // n),
                               intermediate_size=d.intermediate_size // n, target_hidden_size=d.target_hidden_size // n,
                               draft_vocab_size=d.draft_vocab_size // n, vocab_size=full.vocab_size // n)


def rank_slice(a, log=print) -> dict:
    """Build one rank of the N-way minimum-latency layout, time its steps, print the floor and the projection."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mavjax.benchmarking import copy_bandwidth, step_bytes
    from mavjax.config import preset
    from mavjax.eagle3 import Eagle3Draft
    from mavjax.model import Llama4
    from mavjax.profiling import format_profile

    n = a.rank_slice
    over = {} if a.layers is None else dict(num_hidden_layers=a.layers)
    full = preset(a.preset, **over)
    cfg = rank_slice_config(full, n)
    dcfg = rank_draft_config(full, n, a.draft_intermediate_size, a.draft_vocab_size)
    K, C, L = a.num_draft_tokens or 3, a.context, full.num_hidden_layers
    dtype = jnp.dtype(a.dtype or "bfloat16")
    n_coll = a.collectives_per_layer * L + 2  # + the embedding's and the logits' all-reduces (mavjax.parallel)
    # per draft pass: its layer's all-reduces, the embedding's and the draft token's gather; + the fc's, once
    n_coll_draft = K * (a.collectives_per_layer + 2) + 1
    coll_s, coll_draft_s = n_coll * a.collective_us * 1e-6, n_coll_draft * a.collective_us * 1e-6
    kernel_paths = list(dict.fromkeys(a.rank_kernels or [a.kernels]))
    abstract = nnx.eval_shape(lambda: Llama4(cfg, dtype=dtype, quant="fp8"))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    out = dict(mode="rank_slice", preset=a.preset, rank_slice=n, layers=L, kernels=kernel_paths, quantize="fp8",
               context=C, num_draft_tokens=K, rank_param_bytes=nbytes, collective_us=a.collective_us,
               collectives_per_layer=a.collectives_per_layer,
               collectives_per_step=n_coll, collectives_per_draft_round=n_coll_draft,
               device=jax.devices()[0].device_kind)
    log(f"rank slice 1/{n} of {a.preset} ({L} layers) in the expert=1,tensor={n} layout: "
        f"{cfg.num_attention_heads} q heads, {cfg.num_key_value_heads} kv heads, "
        f"dense MLP {cfg.intermediate_size_mlp}, "
        f"{cfg.num_local_experts} experts of {cfg.intermediate_size} units, vocab {cfg.vocab_size}; FP8 projections; "
        f"{nbytes / 1e9:.2f} GB of parameters")
    log(f"draft: the EAGLE-3 module (mavjax.eagle3, random weights, {dtype.name}), the rank's 1/{n}: heads "
        f"{dcfg.num_attention_heads}/{dcfg.num_key_value_heads}, MLP {dcfg.intermediate_size}, fc "
        f"{len(dcfg.aux_layers) * dcfg.target_hidden_size}->{dcfg.hidden_size}, draft vocabulary "
        f"{dcfg.draft_vocab_size}; timed as one round of a K={K} chain (K-1 draft passes + the catch-up pass)")
    if a.dry_run:
        log("dry run: nothing allocated or timed")
        return out
    bw = copy_bandwidth(a.copy_bytes)
    out["copy_tb_s"] = bw / 1e12
    log(f"device: {out['device']}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    t = time.perf_counter()
    model = random_model(cfg, dtype=dtype, quant="fp8", seed=a.seed)
    jax.block_until_ready(nnx.state(model))
    out["init_s"] = time.perf_counter() - t
    log(f"random FP8 weights on the device in {out['init_s']:.1f} s")
    draft = Eagle3Draft(dcfg, dtype=dtype, rngs=nnx.Rngs(a.seed + 1))
    fc_bytes = draft.fc.get_value().size * dtype.itemsize
    pass_bytes = param_bytes(draft) - fc_bytes  # what each draft pass reads (the embedding: rows only)

    plan = []  # (kernels, step, batch, tokens, timer factory); every kernel path reads the same weights
    # a projected batch size needs its decode step too, whether or not --rank-batch-sizes names it
    decode_batches = list(dict.fromkeys([*a.rank_batch_sizes, *a.verify_batch_sizes]))
    for kern in kernel_paths:
        m = with_kernels(model, kern)
        for B in decode_batches:
            plan.append((kern, "decode", B, 1, functools.partial(StepTimer, m, B, 1, C, a.step_iters)))
            if B in a.verify_batch_sizes:
                plan.append((kern, "verify", B, K + 1, functools.partial(StepTimer, m, B, K + 1, C, a.step_iters)))
    # The draft module has one (XLA) path; its round does not depend on the target's kernels.
    plan += [("-", "draft", B, K, functools.partial(DraftRoundTimer, model, draft, B, K, C, a.step_iters))
             for B in a.verify_batch_sizes]
    t = time.perf_counter()
    timers = [make() for *_, make in plan]
    with concurrent.futures.ThreadPoolExecutor(max(1, a.compile_threads)) as pool:  # XLA compiles in parallel
        list(pool.map(_LoopTimer.compile, timers))
    out["compile_s"] = time.perf_counter() - t
    log(f"compiled {len(plan)} step programs in {out['compile_s']:.0f} s ({a.compile_threads} threads)")
    steps, profiles = [], []
    for (kern, what, B, T, _), timer in zip(plan, timers):
        s = timer.time(a.iters)
        if what == "draft":
            floor_bytes = K * pass_bytes + fc_bytes + K * 2 * B * C * dcfg.num_key_value_heads * dcfg.head_dim * \
                dtype.itemsize
            coll = coll_draft_s
        else:
            floor_bytes = step_bytes(cfg, B, C, dtype.itemsize, 1, tokens_per_row=T)
            coll = coll_s
        floor = floor_bytes / bw
        prof = timer.profile() if a.profile else None  # before the check: the profiled steps are checked too
        finite = timer.all_finite() if isinstance(timer, StepTimer) else None
        steps.append(dict(kernels=kern, step=what, batch=B, tokens=T, ms=s * 1e3, floor_bytes=floor_bytes,
                          floor_ms=floor * 1e3, x_floor=s / floor, collectives_ms=coll * 1e3,
                          compile_s=timer.compile_s, finite=finite))
        log(f"  {kern} {what} B={B} T={T}: {s * 1e3:.3f} ms (floor {floor * 1e3:.3f} ms, x{s / floor:.2f})"
            + ("" if finite is not False else "  NON-FINITE LOGITS: the step computed NaN/inf, its time is no "
               "measurement"))
        if prof is not None:
            profiles.append(dict(kernels=kern, step=what, batch=B, **prof))
            log(format_profile(prof, f"  profile of {kern} {what} B={B}"))
    out["steps"] = steps
    if profiles:
        out["profiles"] = profiles
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    if "peak_bytes_in_use" in stats:
        out["peak_device_gb"] = stats["peak_bytes_in_use"] / 1e9
        log(f"peak device memory in use: {out['peak_device_gb']:.1f} GB (of {stats.get('bytes_limit', 0) / 1e9:.1f} "
            f"GB this process may use)")
    drafts = [s for s in steps if s["step"] == "draft"]
    out["projection"] = [dict(kernels=kern, **row) for kern in kernel_paths for row in
                         project([s for s in steps if s["kernels"] == kern] + drafts, coll_s, coll_draft_s,
                                 a.verify_batch_sizes)]
    return out


def project(steps, coll_s, coll_draft_s, batches):
    """PROJECTED tokens/s per user of the full model on N GPUs at acceptance lengths 1 (no draft), 2, 3, 4:
    a = 1:  1 / (t_decode + c)
    a > 1:  a / (t_draft_round + c_draft + t_verify + c)
    with c (c_draft) the collectives' latency per target step (per draft round). Also the same at the
    bytes-read floor. A step whose logits were not finite projects nothing (its time is no measurement)."""
    get = {(s["step"], s["batch"]): s for s in steps if s.get("finite") is not False}
    rows = []
    for B in batches:
        dec, ver, dr = get.get(("decode", B)), get.get(("verify", B)), get.get(("draft", B))
        if not (dec and ver and dr):
            continue
        for a_len in (1, 2, 3, 4):
            row = dict(batch=B, acceptance_length=a_len)
            for key, suffix in (("ms", ""), ("floor_ms", "_at_floor")):
                if a_len == 1:
                    t = dec[key] * 1e-3 + coll_s
                else:
                    t = dr[key] * 1e-3 + coll_draft_s + ver[key] * 1e-3 + coll_s
                row["step_ms" + suffix] = t * 1e3
                row["tokens_per_s_per_user" + suffix] = a_len / t
            rows.append(row)
    return rows


def print_rank_slice(r, log=print):
    if "steps" not in r:
        return
    log(f"\nOne rank of {r['rank_slice']} (min-latency layout), {r['layers']} layers, FP8, context {r['context']}, "
        f"kernels {'/'.join(r['kernels'])}, on {r['device']} (copy {r['copy_tb_s']:.2f} TB/s).")
    log(f"Collectives are NOT run: {r['collectives_per_step']} per target step ({r['collectives_per_layer']} "
        f"all-reduces per layer x {r['layers']} layers, + the embedding's and the logits' all-reduces, "
        f"mavjax.parallel) and {r['collectives_per_draft_round']} per draft round ({r['num_draft_tokens']} passes x "
        f"({r['collectives_per_layer']} per layer + the embedding's + the draft token's gather), + the fc's) are "
        f"added at {r['collective_us']:g} us each.")
    log("floor = bytes the step must read (weights it uses + KV cache) / copy bandwidth; "
        "+coll = measured step + the collectives' latency")
    log("logits: whether every timed step's logits were finite (a NaN step can be fast and is no measurement)")
    log(f"{'kernels':>7} {'step':>7} {'batch':>5} {'tokens':>6} {'ms':>8} {'floor GB':>9} {'floor ms':>9} "
        f"{'x floor':>8} {'+coll ms':>9} {'logits':>7}")
    for s in r["steps"]:
        check = {True: "finite", False: "NaN", None: "-"}[s.get("finite")]
        log(f"{s['kernels']:>7} {s['step']:>7} {s['batch']:>5} {s['tokens']:>6} {s['ms']:>8.3f} "
            f"{s['floor_bytes'] / 1e9:>9.3f} "
            f"{s['floor_ms']:>9.3f} {s['x_floor']:>8.2f} {s['ms'] + s['collectives_ms']:>9.3f} {check:>7}")
    if r["projection"]:
        K = r["num_draft_tokens"]
        log(f"\nPROJECTION (not a measurement) of the full model on {r['rank_slice']} GPUs, tokens/s per user:")
        log(f"  acceptance 1 (no draft): 1 / (t_decode + c);  acceptance a > 1: a / (t_draft_round(K={K}) + "
            f"c_draft + t_verify({K + 1} tokens) + c);  c = {r['collectives_per_step']} x {r['collective_us']:g} us, "
            f"c_draft = {r['collectives_per_draft_round']} x {r['collective_us']:g} us")
        log(f"{'kernels':>7} {'batch':>5} {'accept':>6} {'step ms':>8} {'tok/s/user':>11} {'at floor':>9}")
        for p in r["projection"]:
            log(f"{p['kernels']:>7} {p['batch']:>5} {p['acceptance_length']:>6} {p['step_ms']:>8.3f} "
                f"{p['tokens_per_s_per_user']:>11.0f} {p['tokens_per_s_per_user_at_floor']:>9.0f}")


# ---- command line ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from mavjax.batch import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--random-weights", action="store_true", help="random weights of --preset (no checkpoint)")
    p.add_argument("--preset", default=None, help="with --random-weights: maverick, scout, tiny, default-small")
    p.add_argument("--layers", type=int, default=None, help="with --random-weights: cut the preset to N layers")
    p.add_argument("--batch-sizes", type=batch_size_arg, nargs="+", default=[1],
                   help="batch sizes to sweep; 'max': the largest power of two up to --max-num-seqs that fits in "
                        "device memory (tried largest first, halving on each allocation failure)")
    p.add_argument("--max-num-seqs", type=int, default=1024, help="ceiling of --batch-sizes max")
    p.add_argument("--input-len", type=int, nargs="+", default=[128])
    p.add_argument("--output-len", type=int, nargs="+", default=[128])
    p.add_argument("--iters", type=int, default=3, help="timed repetitions after the warm-up (best is reported)")
    p.add_argument("--random-draft", action="store_true",
                   help="with --random-weights: also a random EAGLE-3 draft (sizes: --draft-intermediate-size, "
                        "--draft-vocab-size), speculative decoding with --num-draft-tokens")
    p.add_argument("--forced-acceptance", type=float, default=None, metavar="M",
                   help="with --random-draft: make every greedy round accept a fixed schedule averaging M tokens "
                        "(random weights accept nothing); the work per round is unchanged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--profile", action="store_true",
                   help="also trace and print where the device time goes, kernel by kernel (rank slice: each "
                        "timed step; sweep: one more generate call of the first row's shape, GPU 0's kernels "
                        "per output token)")
    r = p.add_argument_group("rank slice")
    r.add_argument("--rank-slice", type=int, default=None, metavar="N",
                   help="time one rank of an N-GPU (expert=1, tensor=N) deployment of --preset")
    r.add_argument("--rank-kernels", nargs="+", default=None, choices=["xla", "pallas"],
                   help="time each kernel path on the same weights in one run (default: --kernels)")
    r.add_argument("--rank-batch-sizes", type=int, nargs="+", default=[1, 8],
                   help="batch sizes at which the decode step is timed")
    r.add_argument("--verify-batch-sizes", type=int, nargs="*", default=[1],
                   help="batch sizes at which the verify and draft steps (and the decode step) are timed and "
                        "projected; none: no draft, no projection")
    r.add_argument("--context", type=int, default=1024, help="KV-cache positions each row attends to")
    r.add_argument("--step-iters", type=int, default=32, help="steps per timed jitted loop")
    r.add_argument("--compile-threads", type=int, default=4, help="step programs compiled in parallel")
    r.add_argument("--copy-bytes", type=int, default=2 << 30, help="array size of the copy-bandwidth measurement")
    r.add_argument("--collective-us", type=float, default=19.0, help="latency of one all-reduce (us)")
    r.add_argument("--collectives-per-layer", type=int, default=2)
    r.add_argument("--draft-intermediate-size", type=int, default=16384)
    r.add_argument("--draft-vocab-size", type=int, default=32000)
    p.add_argument("--dry-run", action="store_true",
                   help="random weights: print the plan and the parameter bytes, allocate and time nothing")


def main(a) -> int:
    import jax
    import jax.numpy as jnp

    from mavjax.config import preset

    if a.rank_slice is not None:
        if not a.random_weights or not a.preset:
            raise ValueError("--rank-slice needs --random-weights --preset NAME")
        if a.quantize not in (None, "fp8") or a.mesh or a.draft:
            raise ValueError("--rank-slice runs on one device with FP8 weights: no --mesh or --draft")
        if a.num_draft_tokens is not None and a.num_draft_tokens < 1:
            raise ValueError(f"--num-draft-tokens must be >= 1, got {a.num_draft_tokens}")
        result = rank_slice(a)
        print_rank_slice(result)
    else:
        for name in ("batch_sizes", "input_len", "output_len"):
            if any(v != MAX and v < 1 for v in getattr(a, name)):
                raise ValueError(f"--{name.replace('_', '-')} values must be >= 1")
        if a.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {a.max_num_seqs}")
        B = max(a.max_num_seqs if v == MAX else v for v in a.batch_sizes)
        if a.random_draft and not a.random_weights:
            raise ValueError("--random-draft goes with --random-weights (a checkpoint brings its own --draft)")
        if a.forced_acceptance is not None:
            K = a.num_draft_tokens or 3
            if not a.random_draft:
                raise ValueError("--forced-acceptance needs --random-draft")
            if not 1 <= a.forced_acceptance <= K + 1:
                raise ValueError(f"--forced-acceptance must lie in [1, {K + 1}] (tokens per round with "
                                 f"--num-draft-tokens {K}), got {a.forced_acceptance}")
        if a.random_weights:
            if not a.preset:
                raise ValueError("--random-weights needs --preset NAME")
            if a.model or a.draft:
                raise ValueError("--random-weights takes no --model or --draft (a draft needs its trained target; "
                                 "--random-draft gives a random one)")
            from mavjax.api import LLM

            cfg = preset(a.preset, **({} if a.layers is None else dict(num_hidden_layers=a.layers)))
            if a.dry_run:
                from flax import nnx

                from mavjax.model import Llama4

                abstract = nnx.eval_shape(lambda: Llama4(cfg, dtype=jnp.dtype(a.dtype or "bfloat16"),
                                                         quant=a.quantize))
                print(f"dry run: random {a.preset} ({cfg.num_hidden_layers} layers), quantize={a.quantize}: "
                      f"{param_bytes(abstract) / 1e9:.2f} GB of parameters; nothing allocated or timed")
                return 0
            mesh = None
            if a.mesh:
                from mavjax.sharding import make_mesh, parse_mesh

                mesh = make_mesh(**parse_mesh(a.mesh))
            t = time.perf_counter()
            net = random_model(cfg, dtype=jnp.dtype(a.dtype or "bfloat16"), quant=a.quantize, kernels=a.kernels,
                               mesh=mesh, seed=a.seed, allreduce=a.allreduce)
            desc = f"random {a.preset}" + (f" ({a.layers} layers)" if a.layers else "")
            print(f"{desc}: {param_bytes(net) / 1e9:.2f} GB of parameters, quantize={a.quantize}, "
                  f"built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            draft = None
            if a.random_draft:
                from flax import nnx

                from mavjax.eagle3 import Eagle3Config, Eagle3Draft

                dcfg = Eagle3Config.for_target(cfg, draft_vocab_size=min(a.draft_vocab_size, cfg.vocab_size),
                                               intermediate_size=a.draft_intermediate_size)
                draft = Eagle3Draft(dcfg, dtype=jnp.dtype(a.dtype or "bfloat16"), rngs=nnx.Rngs(a.seed + 1))
                desc += f" + random EAGLE-3 draft ({draft.num_params / 1e6:.0f}M parameters)"
            llm = LLM.from_model(net, max_model_len=a.max_model_len, max_batch_size=B, draft=draft,
                                 num_draft_tokens=a.num_draft_tokens or 3)
            if a.forced_acceptance is not None:
                llm.spec_engine.forced_acceptance = a.forced_acceptance
                desc += f", acceptance FORCED to a mean of {a.forced_acceptance:g} tokens per round"
            if draft is not None:
                print(desc, file=sys.stderr)
        else:
            from mavjax.api import LLM
            from mavjax.batch import llm_kwargs

            if a.preset or a.layers:
                raise ValueError("--preset/--layers go with --random-weights")
            llm = LLM(a.model, **llm_kwargs(a, B))
            desc = str(a.model or "default model")
            cfg = llm.cfg
        if a.dry_run:
            print("dry run: model loaded, nothing timed")
            return 0
        rows = sweep(llm, cfg.vocab_size, a.batch_sizes, a.input_len, a.output_len, a.iters, a.seed)
        if a.profile:
            rows[0]["profile"] = profile_generate(llm, cfg.vocab_size, rows[0], a.seed)
        result = dict(mode="sweep", model=desc, kernels=a.kernels, quantize=a.quantize, mesh=a.mesh,
                      draft=a.draft, random_draft=a.random_draft, forced_acceptance=a.forced_acceptance,
                      num_draft_tokens=a.num_draft_tokens, device=jax.devices()[0].device_kind, rows=rows)
    if a.json:
        from mavjax.atomic_write import write_json

        write_json(a.json, result, indent=1)
    return 0
