#!/usr/bin/env python3
"""Train the shipped default model (`default-small`) on the stdlib corpus of scripts/build_corpus.py.

    python scripts/build_corpus.py          # -> .data/corpus (tokenizer + token arrays), ~6 s
    python scripts/train_tiny.py            # -> .data/train_tiny (checkpoints), checkpoints/default (the model)
    python scripts/train_tiny.py --steps 8 --batch 2 --seq-len 256 --workdir /tmp/w --out /tmp/o  # CPU smoke

The default run (2000 steps of 32 x 512 tokens) takes ~80 s on one H100; see DEFAULT_STEPS for why not longer.

The model is `mavjax.model.Llama4` as inference uses it (its own forward, float32 parameters; matmuls in
bfloat16 on accelerators, `--compute-dtype`), trained with next-token cross-entropy on random windows of
the train tokens, AdamW with linear warmup and cosine decay, and global-norm gradient clipping.

The run is resumable: every --ckpt-every steps (and on SIGINT/SIGTERM) an orbax checkpoint of the
parameters, the optimizer state, the step and the data key is written under --workdir/checkpoints
(atomically: a run killed mid-save leaves the previous checkpoint as the latest). Rerunning the same
command continues from the latest checkpoint. The batch of step s is a pure function of (data key, s), so
a resumed run sees the same data, and ends with the same parameters, as an uninterrupted one.

At the end it evaluates held-out perplexity over every non-overlapping window of the held-out tokens with
the bfloat16 model that ships, writes that model with `mavjax.checkpoint.save_model` into --out, and
writes --out/train_report.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from mavjax.config import Llama4Config, preset  # noqa: E402
import mavjax.model as _model_lib  # noqa: E402
from mavjax.model import Llama4  # noqa: E402

# The default run: 2000 steps x 32 x 512 = 32.8M tokens (~9.3 epochs of the 3.5M-token stdlib corpus).
# Measured on one H100 (JAX 0.11.2, bf16): 55 steps/s (~0.9M tok/s), ~20 s compile, ~80 s end to end,
# held-out perplexity 14.6. Longer runs only memorise the small corpus: 3000 steps -> ppl 19.4, 15000
# steps (a 4.5-minute run) -> ppl 171 at train loss 0.19. (1000 steps: ppl 14.8.)
DEFAULT_STEPS = 2000
DEFAULT_BATCH = 32
DEFAULT_SEQ_LEN = 512


# ---- corpus ----------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    train: np.ndarray  # uint16 [N]
    heldout: np.ndarray  # uint16 [M]
    tokenizer_dir: Path
    vocab_size: int
    special_ids: dict  # token -> id
    meta: dict


def load_corpus(path: str | Path) -> Corpus:
    path = Path(path)
    tok_dir = path / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{tok_dir}/tokenizer.json not found: run scripts/build_corpus.py --out {path}")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    names = [tcfg["pad_token"], tcfg["bos_token"], tcfg["eos_token"], "<|eot|>"]
    special = {n: tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None}
    meta_path = path / "corpus_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    train = np.load(path / "train.npy", mmap_mode=None)
    held = np.load(path / "heldout.npy", mmap_mode=None)
    if train.dtype != np.uint16 or held.dtype != np.uint16:
        raise ValueError(f"token arrays in {path} must be uint16, got {train.dtype}/{held.dtype}")
    return Corpus(train, held, tok_dir, tok.get_vocab_size(with_added_tokens=True), special, meta)


def model_config(corpus: Corpus, preset_name: str = "default-small") -> Llama4Config:
    """The preset with the tokenizer's vocabulary and special ids. eos = (<|end_of_text|>, <|eot|>), as
    Llama 4 lists its end-of-text and end-of-turn tokens."""
    tcfg = json.loads((corpus.tokenizer_dir / "tokenizer_config.json").read_text())
    sp = corpus.special_ids
    eos = tuple(sp[t] for t in (tcfg["eos_token"], "<|eot|>") if t in sp)
    return preset(preset_name).replace(vocab_size=corpus.vocab_size, bos_token_id=sp[tcfg["bos_token"]],
                                       eos_token_id=eos, pad_token_id=sp[tcfg["pad_token"]])


def heldout_windows(tokens: np.ndarray, seq_len: int, limit: int = 0) -> np.ndarray:
    """Non-overlapping windows [n, seq_len+1] (stride seq_len: every token after the first is predicted
    exactly once). limit > 0 keeps that many, evenly spaced; deterministic either way."""
    n = (len(tokens) - 1) // seq_len
    if n <= 0:
        raise ValueError(f"held-out set ({len(tokens)} tokens) is shorter than one window of {seq_len + 1}")
    idx = np.arange(n)
    if 0 < limit < n:
        idx = np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))
    return np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in idx]).astype(np.int32)


# ---- parameters as a flat dict ---------------------------------------------------------------------------
class ParamCodec:
    """An nnx.State of Params <-> {"layers.0.attn.wq": array, ...} (a plain pytree for optax and orbax)."""

    def __init__(self, params_state: nnx.State):
        paths_leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params_state)
        self.names = [self._name(p) for p, _ in paths_leaves]
        if len(set(self.names)) != len(self.names):
            raise ValueError("parameter names are not unique")

    @staticmethod
    def _name(path) -> str:
        parts = []
        for k in path:
            if isinstance(k, jax.tree_util.DictKey):
                parts.append(str(k.key))
            elif isinstance(k, jax.tree_util.SequenceKey):
                parts.append(str(k.idx))
            elif isinstance(k, jax.tree_util.GetAttrKey):
                if k.name != "value":
                    parts.append(k.name)
            else:
                parts.append(str(k))
        return ".".join(parts)

    def to_flat(self, state: nnx.State) -> dict:
        return dict(zip(self.names, jax.tree.leaves(state)))

    def to_state(self, flat: dict) -> nnx.State:
        return jax.tree.unflatten(self.treedef, [flat[n] for n in self.names])


def cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@contextlib.contextmanager
def capture_routing(cfg: Llama4Config):
    """Record what each MoE layer's router sees while `model(...)` runs: yields a list that fills with
    (router input [N, D], router weight [D, E], chosen experts [N, k]) per MoE layer, in layer order.

    The model does not return its routing, so `mavjax.model.route` (which `MoE.__call__` looks up at call
    time) is wrapped for the duration of a trace. The forward itself is untouched: training, evaluation and
    these diagnostics all run `model(tokens)`. Checked: one record per MoE layer, or an error."""
    records: list = []
    original = _model_lib.route

    def recording_route(x, router_w, top_k):
        idx, scores = original(x, router_w, top_k)
        records.append((x, router_w, idx))
        return idx, scores

    _model_lib.route = recording_route
    try:
        yield records
    finally:
        _model_lib.route = original
    if len(records) != len(cfg.moe_layers):
        raise RuntimeError(f"captured {len(records)} router calls for {len(cfg.moe_layers)} MoE layers: "
                           f"mavjax.model no longer routes through mavjax.model.route?")


def router_balance_loss(records, num_experts: int):
    """Switch-Transformer load-balancing loss, averaged over MoE layers: E * sum_e f_e * P_e, with f_e the
    share of tokens routed to e (no gradient) and P_e the mean router softmax probability of e. 1.0 when
    balanced. (transformers' Llama 4 uses the same form, `router_aux_loss_coef`.)"""
    losses = []
    for x, w, idx in records:
        logits = jnp.einsum("nd,de->ne", x, w).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).mean(0)  # [E]
        frac = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32).sum(1).mean(0) / idx.shape[1]  # [E]
        losses.append(num_experts * jnp.sum(jax.lax.stop_gradient(frac) * probs))
    return jnp.mean(jnp.stack(losses)) if losses else jnp.zeros((), jnp.float32)


# ---- the training program --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSpec:
    """Everything the compiled training step depends on (hashable: a static argument of the jitted
    functions, so runs of the same spec in one process share compiled code)."""
    cfg: Llama4Config
    batch: int
    seq_len: int
    compute_dtype: str  # "bfloat16" | "float32"
    lr: float
    steps: int
    warmup: int
    weight_decay: float
    clip: float
    min_lr_ratio: float
    router_aux_coef: float


@functools.lru_cache(maxsize=None)
def optimizer(spec: TrainSpec):
    """(optax transform, lr schedule): AdamW (no decay on vectors), linear warmup then cosine decay to
    lr * min_lr_ratio, after global-norm clipping."""
    warmup = max(1, min(spec.warmup, spec.steps // 5 if spec.steps >= 5 else 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=spec.lr, warmup_steps=warmup, decay_steps=max(spec.steps, warmup + 1),
        end_value=spec.lr * spec.min_lr_ratio)
    decay_mask = lambda params: {k: v.ndim >= 2 for k, v in params.items()}  # noqa: E731 (not on norms)
    tx = optax.chain(
        optax.clip_by_global_norm(spec.clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=spec.weight_decay, mask=decay_mask))
    return tx, schedule


@functools.lru_cache(maxsize=None)
def skeleton(cfg: Llama4Config):
    """(graphdef, ParamCodec, rest): the model's structure without allocating parameters; `rest` holds its
    non-trained variables (RoPE inv_freq, derived from the config as the model derives it)."""
    with jax.ensure_compile_time_eval():  # concrete even when first called under a trace (it is cached)
        model = nnx.eval_shape(lambda: Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
        model.inv_freq.set_value(jnp.asarray(cfg.rope_inv_freq(), jnp.float32))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(rest)):
        raise RuntimeError("Llama4 has a non-parameter variable other than inv_freq; teach skeleton() about it")
    return graphdef, ParamCodec(params), rest


def build_model(cfg: Llama4Config, params: dict, dtype=None) -> Llama4:
    """A Llama4 over flat `params` (cast to `dtype` if given); inside jit or eagerly."""
    graphdef, codec, rest = skeleton(cfg)
    return nnx.merge(graphdef, codec.to_state(params if dtype is None else cast_floats(params, dtype)), rest)


def init_params(cfg: Llama4Config, seed: int) -> dict:
    """The model's own initializer (float32), from the seed, as a flat dict."""
    _, p, _ = nnx.split(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    return skeleton(cfg)[1].to_flat(p)


def init_state(spec: TrainSpec, seed: int) -> dict:
    """State: {"params": {name: f32}, "opt": optax state, "step": int32 [], "data_key": uint32 [2]}."""
    params = init_params(spec.cfg, seed)
    state = {"params": params, "opt": optimizer(spec)[0].init(params), "step": jnp.zeros((), jnp.int32),
             "data_key": jax.random.key_data(jax.random.key(seed + 1))}
    # Committed to the device, as a restored state is, so a fresh and a resumed run share compiled code.
    return jax.device_put(state, _device())


def loss_fn(params, windows, spec: TrainSpec):
    """Mean next-token cross-entropy of windows [B, T+1] under model(windows[:, :-1]), plus
    router_aux_coef x the MoE load-balancing loss. Returns (total, (cross-entropy, balance loss))."""
    model = build_model(spec.cfg, params, jnp.dtype(spec.compute_dtype))
    with capture_routing(spec.cfg) as records:
        logits, _ = model(windows[:, :-1])  # float32 [B, T, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
    balance = router_balance_loss(records, spec.cfg.num_local_experts)
    return nll + spec.router_aux_coef * balance, (nll, balance)


def sample_windows(data, data_key, step, batch: int, seq_len: int):
    """Batch of step `step`: `batch` random windows [B, T+1] of the train tokens, from (data_key, step)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(data_key), step)
    starts = jax.random.randint(key, (batch,), 0, data.shape[0] - seq_len)  # last start: n - T - 1
    take = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data, s, seq_len + 1))
    return take(starts).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def train_step(state, data, *, spec: TrainSpec):
    """One optimizer step on the batch of step state["step"]; `state` is donated."""
    tx, schedule = optimizer(spec)
    windows = sample_windows(data, state["data_key"], state["step"], spec.batch, spec.seq_len)
    (_, (loss, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], windows, spec)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = {"loss": loss, "balance": balance, "grad_norm": grad_norm, "lr": schedule(state["step"])}
    return {"params": params, "opt": opt, "step": state["step"] + 1, "data_key": state["data_key"]}, metrics


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def eval_step(params, windows, weights, *, cfg: Llama4Config, dtype: str):
    """(sum of next-token NLL over windows [B, T+1] weighted by weights [B], number of tokens counted)."""
    logits, _ = build_model(cfg, params, jnp.dtype(dtype))(windows[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])  # [B, T]
    w = jnp.broadcast_to(weights[:, None].astype(jnp.float32), nll.shape)
    return (nll * w).sum(), w.sum()


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def routing_counts(params, windows, weights, *, cfg: Llama4Config, dtype: str):
    """Tokens routed to each expert, [MoE layers, E], for windows [B, T+1] weighted by weights [B]."""
    with capture_routing(cfg) as records:
        build_model(cfg, params, jnp.dtype(dtype))(windows[:, :-1])
    B, T, k = windows.shape[0], windows.shape[1] - 1, cfg.num_experts_per_tok
    w = jnp.broadcast_to(weights[:, None, None], (B, T, k)).reshape(-1)  # idx rows are b-major tokens
    return jnp.stack([jnp.bincount(idx.reshape(-1), weights=w, length=cfg.num_local_experts)
                      for _, _, idx in records])


def _batches(windows: np.ndarray, batch: int):
    """Batches of `batch` windows with per-window weights; the last one padded with weight 0."""
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        weights = np.ones((batch,), np.float32)
        if len(w) < batch:
            weights[len(w):] = 0.0
            w = np.concatenate([w, np.repeat(w[:1], batch - len(w), axis=0)])
        yield jnp.asarray(w), jnp.asarray(weights)


def evaluate(cfg: Llama4Config, params, windows: np.ndarray, batch: int, dtype: str) -> tuple[float, int]:
    """Mean next-token NLL over every token predicted in `windows`: (mean NLL, number of tokens)."""
    total, count = 0.0, 0.0
    for w, weights in _batches(windows, batch):
        s, c = eval_step(params, w, weights, cfg=cfg, dtype=dtype)
        total += float(s)
        count += float(c)
    return total / count, int(count)


def expert_usage(cfg: Llama4Config, params, windows: np.ndarray, batch: int, dtype: str) -> dict:
    """{MoE layer: share of the tokens of `windows` that its router sends to each expert}."""
    total = 0
    for w, weights in _batches(windows, batch):
        total = total + np.asarray(routing_counts(params, w, weights, cfg=cfg, dtype=dtype))
    return {layer: [round(float(x) / max(1.0, float(c.sum())), 3) for x in c]
            for layer, c in zip(cfg.moe_layers, total)}


@jax.jit
def bf16_rounded(params: dict) -> dict:
    """float32 params holding exactly the values of the bfloat16 model that ships."""
    return cast_floats(cast_floats(params, jnp.bfloat16), jnp.float32)


to_bf16 = jax.jit(lambda params: cast_floats(params, jnp.bfloat16))


# ---- checkpoints -----------------------------------------------------------------------------------------
def checkpoint_manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_names=("state", "meta"))


def save_checkpoint(mngr, state, meta: dict) -> None:
    """Save `state` at its step (no-op if that step is already saved). Orbax writes into a temporary
    directory and renames it when complete, so an interrupted save never becomes the latest checkpoint."""
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state["step"]))
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def restore_meta(mngr) -> dict:
    import orbax.checkpoint as ocp

    return mngr.restore(mngr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_state(mngr, abstract_state):
    """The latest checkpoint's state, laid out like `abstract_state` (ShapeDtypeStructs) on device 0."""
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(_device())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_state)
    out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return out["state"]


# ---- export ----------------------------------------------------------------------------------------------
def bf16_model(cfg: Llama4Config, params: dict) -> Llama4:
    """A Llama4 built with dtype=bfloat16 (its `dtype` attribute says so) holding `params` cast to bf16."""
    model = nnx.eval_shape(lambda: Llama4(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    _, codec, rest = skeleton(cfg)
    nnx.update(model, codec.to_state(to_bf16(params)), rest)
    return model


def export_model(cfg: Llama4Config, params: dict, out: Path, tokenizer_dir: Path) -> None:
    """Write the bfloat16 model that ships with mavjax.checkpoint.save_model (config, tokenizer files,
    parameters)."""
    try:
        from mavjax.checkpoint import save_model
    except ImportError as e:  # FALLBACK for as long as mavjax/checkpoint.py is missing: nothing is lost
        raise SystemExit(
            f"[train] mavjax.checkpoint.save_model is not available ({e}). The trained state is safe in the "
            f"workdir checkpoint; once mavjax/checkpoint.py exists, rerun the same command (or add "
            f"--export-only) to evaluate and write {out}.") from e
    out.mkdir(parents=True, exist_ok=True)
    save_model(bf16_model(cfg, params), out, tokenizer_src_dir=tokenizer_dir)


def model_megabytes(params: dict, dtype=jnp.bfloat16) -> float:
    return sum(int(np.prod(v.shape)) for v in params.values()) * jnp.dtype(dtype).itemsize / 1e6


# ---- main ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--corpus", type=Path, default=Path(".data/corpus"), help="scripts/build_corpus.py --out")
    ap.add_argument("--workdir", type=Path, default=Path(".data/train_tiny"),
                    help="checkpoints and logs; an existing checkpoint here is resumed")
    ap.add_argument("--out", type=Path, default=Path("checkpoints/default"), help="where the final model goes")
    ap.add_argument("--preset", default="default-small")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * this (cosine decay)")
    ap.add_argument("--warmup", type=int, default=200, help="warmup steps (at most steps/5)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--router-aux-coef", type=float, default=0.01,
                    help="weight of the MoE load-balancing loss (0 = none; without it top-1 routing collapses "
                         "onto one expert within a few steps)")
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    ap.add_argument("--seed", type=int, default=0, help="init and data seed (a resumed run keeps its own)")
    ap.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="matmul dtype; auto = bfloat16 on GPU/TPU, float32 on CPU (params are float32)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows per periodic eval")
    ap.add_argument("--final-eval-windows", type=int, default=0, help="0 = all (the reported perplexity)")
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    ap.add_argument("--resume", action="store_true", help="require a checkpoint in --workdir to resume")
    ap.add_argument("--restart", action="store_true", help="delete --workdir's checkpoints and start over")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop (checkpointed, as if interrupted) once this step is reached; 0 = never")
    ap.add_argument("--export-only", action="store_true",
                    help="skip training: evaluate and export the latest checkpoint")
    ap.add_argument("--no-compile-cache", action="store_true", help="do not keep XLA's cache in --workdir")
    return ap.parse_args(argv)


def _device():
    return jax.devices()[0]


def _device_desc() -> str:
    d = jax.devices()[0]
    return f"{jax.device_count()}x {d.platform}:{getattr(d, 'device_kind', '?')} (jax {jax.__version__})"


def run(args) -> dict:
    """One invocation: train (or resume) to args.steps, then evaluate and export. Returns the report, or
    {"stopped_at": step} when stopped early (--stop-after, SIGINT, SIGTERM) after checkpointing."""
    t_start = time.perf_counter()
    log = lambda msg: print(f"[train] {msg}", flush=True)  # noqa: E731
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.no_compile_cache:  # an optional speed-up for reruns and resumes
        jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    if args.compute_dtype == "auto":
        compute_dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    else:
        compute_dtype = args.compute_dtype
    corpus = load_corpus(args.corpus)
    cfg = model_config(corpus, args.preset)
    if cfg.attention_chunk_size and args.seq_len <= cfg.attention_chunk_size:
        log(f"note: seq-len {args.seq_len} <= attention_chunk_size {cfg.attention_chunk_size}: "
            f"chunked attention is not exercised")
    if args.seq_len > cfg.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if len(corpus.train) <= args.seq_len + 1:
        raise SystemExit(f"train corpus ({len(corpus.train)} tokens) is shorter than one window")
    total, active = cfg.param_counts()
    log(f"device {_device_desc()}; compute {compute_dtype}")
    log(f"model {args.preset}: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), "
        f"{total * 2 / 1e6:.1f} MB in bf16; layers: moe {list(cfg.moe_layers)}, rope {list(cfg.no_rope_layers)}, "
        f"chunk {cfg.attention_chunk_size}")
    log(f"corpus {args.corpus}: {len(corpus.train):,} train / {len(corpus.heldout):,} held-out tokens, "
        f"vocab {corpus.vocab_size}")

    mngr = checkpoint_manager(workdir, args.keep)
    if args.restart and mngr.latest_step() is not None:
        log(f"--restart: removing checkpoints in {workdir / 'checkpoints'}")
        mngr.close()
        shutil.rmtree(workdir / "checkpoints")
        mngr = checkpoint_manager(workdir, args.keep)
    latest = mngr.latest_step()
    if (args.resume or args.export_only) and latest is None:
        mngr.close()
        raise SystemExit(f"--resume/--export-only: no checkpoint in {workdir / 'checkpoints'}")

    seed, meta_prev = args.seed, {}
    if latest is not None:  # a resumed run keeps the identity of its checkpoint
        meta_prev = restore_meta(mngr)
        if meta_prev.get("seed", seed) != seed:
            log(f"resuming with the checkpoint's seed {meta_prev['seed']} (not --seed {seed})")
            seed = meta_prev["seed"]
        for k in ("batch", "seq_len", "preset"):
            if meta_prev.get(k) is not None and meta_prev[k] != getattr(args, k):
                mngr.close()
                raise SystemExit(f"checkpoint in {workdir} was trained with {k}={meta_prev[k]}, "
                                 f"not {getattr(args, k)}: use another --workdir or --restart")
        if meta_prev.get("config") not in (None, cfg.to_dict()):
            mngr.close()
            raise SystemExit(f"checkpoint in {workdir} has another model config (tokenizer or preset changed?)")
        if meta_prev.get("steps") not in (None, args.steps):
            log(f"note: checkpoint was for {meta_prev['steps']} steps; the schedule now spans {args.steps}")

    spec = TrainSpec(cfg=cfg, batch=args.batch, seq_len=args.seq_len, compute_dtype=compute_dtype, lr=args.lr,
                     steps=args.steps, warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
                     min_lr_ratio=args.min_lr_ratio, router_aux_coef=args.router_aux_coef)
    if latest is None:
        state = init_state(spec, seed)
    else:
        state = restore_state(mngr, jax.eval_shape(lambda: init_state(spec, seed)))
        log(f"resumed from {workdir / 'checkpoints'} at step {int(state['step'])}")
    step = int(jax.device_get(state["step"]))
    prior_seconds = float(meta_prev.get("train_seconds", 0.0))
    tokens_per_step = args.batch * args.seq_len

    def meta(step_now, train_seconds, last_loss):
        return {"step": step_now, "steps": args.steps, "seed": seed, "batch": args.batch,
                "seq_len": args.seq_len, "preset": args.preset, "lr": args.lr,
                "router_aux_coef": args.router_aux_coef, "tokens_seen": step_now * tokens_per_step,
                "train_seconds": train_seconds, "last_train_loss": last_loss, "config": cfg.to_dict(),
                "corpus_sha256": corpus.meta.get("sha256", {})}

    eval_windows = heldout_windows(corpus.heldout, args.seq_len, args.eval_windows)
    data = jnp.asarray(corpus.train)  # uint16 on the device; the step cuts its windows itself
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        log(f"signal {signum}: stopping after this step (with a checkpoint)")

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    last_loss = meta_prev.get("last_train_loss")
    history = list(meta_prev.get("history", []))
    train_t0 = time.perf_counter()
    try:
        if step < args.steps and not args.export_only:
            log(f"training steps {step + 1}..{args.steps}: batch {args.batch} x seq {args.seq_len} "
                f"= {tokens_per_step:,} tokens/step, peak lr {args.lr}")
            pending, t_mark, s_mark = [], None, step
            while step < args.steps:
                state, metrics = train_step(state, data, spec=spec)
                step += 1
                pending.append(metrics)
                if t_mark is None:  # the first step of this invocation includes compilation
                    last_loss = float(metrics["loss"])
                    log(f"step {step}: loss {last_loss:.4f} (compile + first step "
                        f"{time.perf_counter() - train_t0:.1f}s)")
                    pending, t_mark, s_mark = [], time.perf_counter(), step
                elif step % args.log_every == 0 or step == args.steps:
                    m = jax.device_get(pending)
                    now = time.perf_counter()
                    sps = (step - s_mark) / max(now - t_mark, 1e-9)
                    last_loss = float(np.mean([x["loss"] for x in m]))
                    bal = float(np.mean([x["balance"] for x in m]))
                    log(f"step {step}: loss {last_loss:.4f} | balance {bal:.3f} | grad norm "
                        f"{float(m[-1]['grad_norm']):.3f} | lr {float(m[-1]['lr']):.2e} | {sps:.2f} steps/s, "
                        f"{sps * tokens_per_step:,.0f} tok/s")
                    history.append({"step": step, "loss": round(last_loss, 5), "balance": round(bal, 4),
                                    "steps_per_s": round(sps, 3)})
                    pending, t_mark, s_mark = [], now, step
                paused = time.perf_counter()
                if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                    loss_e, _ = evaluate(cfg, state["params"], eval_windows, args.batch, compute_dtype)
                    usage = expert_usage(cfg, state["params"], eval_windows, args.batch, compute_dtype)
                    log(f"step {step}: held-out loss {loss_e:.4f} (ppl {math.exp(loss_e):.2f}, "
                        f"{len(eval_windows)} windows) | expert usage {usage}")
                    history.append({"step": step, "heldout_loss": round(loss_e, 5)})
                stopping = stop["signal"] is not None or (args.stop_after and step >= args.stop_after)
                if (args.ckpt_every and step % args.ckpt_every == 0) or step == args.steps or stopping:
                    seconds = prior_seconds + time.perf_counter() - train_t0
                    save_checkpoint(mngr, state, {**meta(step, seconds, last_loss), "history": history})
                if t_mark is not None:
                    t_mark += time.perf_counter() - paused  # evals and checkpoints are not throughput
                if stopping:
                    log(f"stopped at step {step}; rerun the same command to resume")
                    return {"stopped_at": step}
        train_seconds = prior_seconds + (0.0 if args.export_only else time.perf_counter() - train_t0)
        save_checkpoint(mngr, state, {**meta(step, train_seconds, last_loss), "history": history})

        # ---- final evaluation of the model that ships (bf16 weights), and its export
        t_e = time.perf_counter()
        windows = heldout_windows(corpus.heldout, args.seq_len, args.final_eval_windows)
        shipped = bf16_rounded(state["params"])
        held_loss, held_tokens = evaluate(cfg, shipped, windows, args.batch, compute_dtype)
        usage = expert_usage(cfg, shipped, windows, args.batch, compute_dtype)
        log(f"final: held-out loss {held_loss:.4f}, perplexity {math.exp(held_loss):.2f} over {held_tokens:,} "
            f"tokens ({len(windows)} windows of {args.seq_len}; bf16 weights, {compute_dtype} compute) in "
            f"{time.perf_counter() - t_e:.1f}s | expert usage {usage}")
        export_model(cfg, state["params"], args.out, corpus.tokenizer_dir)
        report = {
            "steps": step, "batch": args.batch, "seq_len": args.seq_len, "tokens_seen": step * tokens_per_step,
            "epochs": round(step * tokens_per_step / len(corpus.train), 3),
            "final_train_loss": last_loss, "heldout_loss": held_loss,
            "heldout_perplexity": math.exp(held_loss), "heldout_tokens": held_tokens,
            "heldout_windows": len(windows), "heldout_eval": f"bf16 weights, {compute_dtype} compute",
            "expert_usage": usage, "train_seconds": round(train_seconds, 2),
            "wall_seconds_this_invocation": round(time.perf_counter() - t_start, 2),
            "device": _device_desc(), "compute_dtype": compute_dtype,
            "params": total, "active_params": active, "model_mb_bf16": round(model_megabytes(state["params"]), 3),
            "lr": args.lr, "min_lr_ratio": args.min_lr_ratio, "warmup": args.warmup,
            "weight_decay": args.weight_decay, "clip": args.clip, "router_aux_coef": args.router_aux_coef,
            "seed": seed, "preset": args.preset, "python": platform.python_version(),
            "corpus": {"dir": str(args.corpus), "train_tokens": int(len(corpus.train)),
                       "heldout_tokens": int(len(corpus.heldout)), "sha256": corpus.meta.get("sha256", {})},
            "config": cfg.to_dict(), "history": history,
        }
        (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.out} ({report['model_mb_bf16']:.1f} MB of bf16 weights) and train_report.json "
            f"in {time.perf_counter() - t_start:.1f}s")
        return report
    finally:
        for s_, h in old_handlers.items():
            signal.signal(s_, h)
        mngr.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    if "stopped_at" in report and not (args.stop_after and report["stopped_at"] >= args.stop_after):
        return 130  # stopped by a signal (checkpointed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
