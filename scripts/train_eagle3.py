#!/usr/bin/env python3
"""Train an EAGLE-3 draft (mavjax.eagle3) for a mavjax target checkpoint, on features the target computes from
the token corpus of scripts/build_corpus.py.

    python scripts/train_eagle3.py                                  # checkpoints/default -> checkpoints/default/draft
    python scripts/train_eagle3.py --target DIR --out DIR --steps 4000 --batch 32 --seq-len 512
    python scripts/train_eagle3.py --steps 4 --batch 2 --seq-len 64 --workdir /tmp/w --out /tmp/d --eval-prompts 2  # smoke

Each step cuts random windows [B, T+1] of the train tokens, runs the frozen target over them (tapping the
draft's feature layers; its softmax is the label), and trains the draft with EAGLE-3's training-time test: step 0
reads (target feature at p, token p+1) at position p and predicts token p+2; step k reads (its own step k-1 output,
token p+k+1) at position p+k and predicts token p+k+2. Every step's query attends to the step-0 keys at
positions <= p (the target-feature context a draft sees at inference) and to its own chain's keys of steps
1..k, at the positions inference gives them, so training sees exactly the attention pattern of drafting.
The loss of step k is the cross-entropy against the target's next-token distribution restricted to the draft
vocabulary (renormalised), weighted 0.8^k (later steps matter less: they are only reached if earlier ones
are accepted). The draft vocabulary is the --draft-vocab most frequent tokens of the train corpus; the LM head
and final norm start from the target's (restricted) ones; the token embedding is the target's, frozen.

The run is resumable (orbax checkpoints of params, optimizer state, step and data key under --workdir, every
--ckpt-every steps and on SIGINT/SIGTERM; reuses scripts/train_tiny.py's machinery): rerun the same command to
continue. At the end the bf16 draft is written to --out (mavjax.eagle3.save_draft) with train_report.json:
the measured mean acceptance length (tokens per target forward, greedy) of speculative decoding on held-out
text at K=3, K=5 (--eval-chains) and the --eval-tree tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "scripts")):
    if p not in sys.path:
        sys.path.insert(0, p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import train_tiny as tt  # noqa: E402  (corpus, windows, orbax checkpoint manager)
from mavjax.eagle3 import Eagle3Config, Eagle3Draft, save_draft  # noqa: E402

STEP_DECAY = 0.8


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything the compiled step depends on (hashable: a static argument)."""
    dcfg: Eagle3Config
    batch: int
    seq_len: int
    ttt_steps: int
    compute_dtype: str
    lr: float
    steps: int
    warmup: int
    weight_decay: float
    clip: float


# ---- target side ------------------------------------------------------------------------------------------
class Target:
    """The frozen target: graphdef + state (in the compute dtype), and its features/labels program."""

    def __init__(self, model, compute_dtype):
        self.cfg = model.cfg
        self.graphdef, state = nnx.split(model)
        self.state = jax.tree.map(lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                                  and a.ndim > 0 else a, state)


def target_outputs(tgraph, tstate, tokens, aux_layers):
    """tokens [B, T] -> (features [B, T, n_aux * D], log-probs [B, T, V] float32) of the frozen target."""
    target = nnx.merge(tgraph, tstate)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h, _, taps = target.hidden_states(tokens, positions, collect_layers=aux_layers)
    feats = jnp.concatenate([taps[i] for i in aux_layers], axis=-1)
    return jax.lax.stop_gradient(feats), jax.lax.stop_gradient(jax.nn.log_softmax(target.logits(h), axis=-1))


# ---- the training-time test -------------------------------------------------------------------------------
def ttt_attend(q, k0, v0, diag_k, diag_v, scale):
    """q [B, T, H, Dh]; step-0 keys/values k0, v0 [B, T, K, Dh] (causal); diag_k/diag_v: lists of [B, T, K, Dh]
    of steps 1..k, each seen only by its own position (the same chain). -> [B, T, H, Dh]."""
    B, T, H, Dh = q.shape
    K = k0.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    s0 = jnp.einsum("btkgd,bskd->bkgts", qg, k0, preferred_element_type=jnp.float32) * scale  # [B, K, G, T, S]
    causal = jnp.tril(jnp.ones((T, T), bool))
    s0 = jnp.where(causal, s0, -1e30)
    sd = [jnp.einsum("btkgd,btkd->bkgt", qg, kj, preferred_element_type=jnp.float32)[..., None] * scale
          for kj in diag_k]  # each [B, K, G, T, 1]
    p = jax.nn.softmax(jnp.concatenate([s0] + sd, axis=-1), axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p[..., :T].astype(v0.dtype), v0)  # [B, T, K, G, Dh]
    for j, vj in enumerate(diag_v):
        o = o + jnp.einsum("bkgt,btkd->btkgd", p[..., T + j].astype(vj.dtype), vj)
    return o.reshape(B, T, H, Dh)


def ttt_loss(draft: Eagle3Draft, embed, feats, logp, tokens, n_steps: int):
    """feats [B, T, F], logp [B, T, V] (target log-probs at positions 0..T-1 of tokens[:, :T]), tokens [B, T+1].
    Returns (weighted loss, per-step loss [n], per-step top-1 agreement with the target [n])."""
    B, T = feats.shape[:2]
    d2t = draft.d2t[...]
    p_lab = jnp.exp(logp[..., d2t])  # [B, T, Vd] target probabilities on the draft vocabulary
    in_vocab = p_lab.sum(-1)  # mass the draft can express
    p_lab = p_lab / jnp.maximum(in_vocab, 1e-9)[..., None]
    t_top = jnp.argmax(logp, -1)  # [B, T] the target's greedy token
    t2d = jnp.full((logp.shape[-1],), -1, jnp.int32).at[d2t].set(jnp.arange(d2t.shape[0], dtype=jnp.int32))
    pos0 = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    hidden = draft.project(feats)  # [B, T, D]
    k0 = v0 = None
    diag_k, diag_v, losses, accs = [], [], [], []
    scale = draft.cfg.head_dim ** -0.5
    for k in range(n_steps):
        idx = jnp.minimum(jnp.arange(T) + k + 1, T)  # token p+k+1 is the input; label: target at p+k+1
        tok = tokens[:, idx]  # [B, T]
        lab_i = jnp.minimum(jnp.arange(T) + k + 1, T - 1)
        valid = (jnp.arange(T) + k + 1 <= T - 1).astype(jnp.float32)[None, :]  # [1, T]
        q, kk, vv = draft.qkv(tok, hidden, embed, pos0 + k)
        if k == 0:
            k0, v0 = kk, vv
        else:
            diag_k.append(kk)
            diag_v.append(vv)
        o = ttt_attend(q, k0, v0, diag_k, diag_v, scale)
        hidden, logits = draft.finish(hidden, o)  # [B, T, D], [B, T, Vd]
        lab = p_lab[:, lab_i]  # [B, T, Vd]
        ce = -jnp.sum(lab * jax.nn.log_softmax(logits, -1), -1)  # [B, T]
        losses.append(jnp.sum(ce * valid) / jnp.sum(valid * jnp.ones_like(ce)))
        hit = jnp.argmax(logits, -1) == t2d[t_top[:, lab_i]]
        accs.append(jnp.sum(hit * valid) / jnp.sum(valid * jnp.ones_like(ce)))
    losses, accs = jnp.stack(losses), jnp.stack(accs)
    w = STEP_DECAY ** jnp.arange(n_steps)
    return jnp.sum(w * losses) / jnp.sum(w), (losses, accs)


# ---- parameters, optimizer, step --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def draft_skeleton(dcfg: Eagle3Config):
    with jax.ensure_compile_time_eval():
        model = nnx.eval_shape(lambda: Eagle3Draft(dcfg, dtype=jnp.float32))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, tt.ParamCodec(params), rest


def build_draft(dcfg, params, rest, dtype=None):
    graphdef, codec, _ = draft_skeleton(dcfg)
    return nnx.merge(graphdef, codec.to_state(params if dtype is None else tt.cast_floats(params, dtype)), rest)


@functools.lru_cache(maxsize=None)
def optimizer(spec: Spec):
    warmup = max(1, min(spec.warmup, spec.steps // 5 if spec.steps >= 5 else 1))
    sched = optax.warmup_cosine_decay_schedule(0.0, spec.lr, warmup, max(spec.steps, warmup + 1), spec.lr * 0.1)
    mask = lambda params: {k: v.ndim >= 2 for k, v in params.items()}  # noqa: E731 (no decay on norms)
    return optax.chain(optax.clip_by_global_norm(spec.clip),
                       optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=spec.weight_decay, mask=mask)), sched


@functools.partial(jax.jit, static_argnames=("spec", "tgraph"), donate_argnums=(0,))
def train_step(state, rest, tstate, data, *, spec: Spec, tgraph):
    tx, sched = optimizer(spec)
    windows = tt.sample_windows(data, state["data_key"], state["step"], spec.batch, spec.seq_len)  # [B, T+1]
    feats, logp = target_outputs(tgraph, tstate, windows[:, :-1], spec.dcfg.aux_layers)
    embed = nnx.merge(tgraph, tstate).embed[...]

    def loss_fn(params):
        draft = build_draft(spec.dcfg, params, rest, jnp.dtype(spec.compute_dtype))
        return ttt_loss(draft, embed, feats, logp, windows, spec.ttt_steps)

    (loss, (losses, accs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "step_losses": losses, "step_acc": accs, "lr": sched(state["step"])}
    return {"params": params, "opt": opt, "step": state["step"] + 1, "data_key": state["data_key"]}, metrics


@functools.partial(jax.jit, static_argnames=("spec", "tgraph"))
def eval_step(params, rest, tstate, windows, *, spec: Spec, tgraph):
    feats, logp = target_outputs(tgraph, tstate, windows[:, :-1], spec.dcfg.aux_layers)
    draft = build_draft(spec.dcfg, params, rest, jnp.dtype(spec.compute_dtype))
    return ttt_loss(draft, nnx.merge(tgraph, tstate).embed[...], feats, logp, windows, spec.ttt_steps)[1]


def init_params(dcfg: Eagle3Config, target, d2t: np.ndarray, seed: int) -> tuple[dict, nnx.State]:
    """Random draft layer; LM head and final norm from the target's (restricted to the draft vocabulary)."""
    draft = Eagle3Draft(dcfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    draft.d2t.set_value(jnp.asarray(d2t, jnp.int32))
    if target.lm_head is not None:
        draft.lm_head.set_value(jnp.asarray(target.lm_head[...], jnp.float32)[:, d2t])
    draft.norm.scale.set_value(jnp.array(target.norm.scale[...], jnp.float32, copy=True))  # own buffer: donated
    _, params, rest = nnx.split(draft, nnx.Param, ...)
    return draft_skeleton(dcfg)[1].to_flat(params), rest


# ---- acceptance length on held-out text -------------------------------------------------------------------
def acceptance_lengths(target, draft, heldout: np.ndarray, *, prompts: int, prompt_len: int, new_tokens: int,
                       shapes: dict) -> dict:
    """Greedy speculative generation from `prompts` held-out prompts (evenly spaced windows of prompt_len
    tokens): mean over prompts of tokens per target forward, for each named draft shape (K or a tree)."""
    from mavjax.api import LLM
    from mavjax.sampling import SamplingParams

    starts = np.linspace(0, len(heldout) - prompt_len - 1, prompts).astype(int)
    ps = [heldout[s:s + prompt_len].astype(int).tolist() for s in starts]
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for name, shape in shapes.items():
        kw = {"num_draft_tokens": shape} if isinstance(shape, int) else {"draft_tree": shape}
        llm = LLM.from_model(target, draft=draft, max_batch_size=len(ps), **kw)
        res = llm.generate(ps, sp)
        out[name] = round(float(np.mean([r.metrics.mean_acceptance_length for r in res])), 4)
    return out


# ---- main -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=REPO / "checkpoints" / "default", help="mavjax checkpoint dir")
    ap.add_argument("--corpus", type=Path, default=Path(".data/corpus"), help="scripts/build_corpus.py --out")
    ap.add_argument("--workdir", type=Path, default=Path(".data/train_eagle3"), help="resumable checkpoints")
    ap.add_argument("--out", type=Path, default=None, help="draft output dir (default: TARGET/draft)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ttt-steps", type=int, default=5, help="unrolled draft steps in the training-time test")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--draft-vocab", type=int, default=3072, help="draft vocabulary: most frequent train tokens")
    ap.add_argument("--intermediate-size", type=int, default=None, help="draft MLP width (default: target's)")
    ap.add_argument("--aux-layers", default=None, help="target layers tapped, e.g. 1,2,5 (default: EAGLE-3's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--stop-after", type=int, default=0, help="checkpoint and stop at this step (0 = never)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="end training after this many minutes of this invocation, then evaluate and export what "
                         "there is (a bounded run; 0 = train all --steps)")
    ap.add_argument("--restart", action="store_true", help="delete --workdir's checkpoints first")
    ap.add_argument("--eval-windows", type=int, default=32, help="held-out windows for the final TTT accuracy")
    ap.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for acceptance length")
    ap.add_argument("--eval-prompt-len", type=int, default=64)
    ap.add_argument("--eval-new-tokens", type=int, default=128)
    ap.add_argument("--eval-chains", type=lambda v: [int(k) for k in v.split(",")], default=[3, 5],
                    help="draft chain lengths K whose acceptance length is measured, e.g. 3,5")
    ap.add_argument("--eval-tree", default="3,2,1,1", help="tree whose acceptance length is also measured")
    return ap.parse_args(argv)


def run(args) -> dict:
    from mavjax.checkpoint import load_model

    log = lambda m: print(f"[eagle3] {m}", flush=True)  # noqa: E731
    t_start = time.perf_counter()
    out = args.out or (args.target / "draft")
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    platform = jax.devices()[0].platform
    compute = ("float32" if platform == "cpu" else "bfloat16") if args.compute_dtype == "auto" else args.compute_dtype
    tcfg, target = load_model(args.target)
    corpus = tt.load_corpus(args.corpus)
    if corpus.vocab_size > tcfg.vocab_size:
        raise SystemExit(f"corpus vocabulary {corpus.vocab_size} exceeds the target's {tcfg.vocab_size}")
    counts = np.bincount(corpus.train, minlength=tcfg.vocab_size)
    vd = min(args.draft_vocab, tcfg.vocab_size)
    d2t = np.sort(np.argsort(-counts, kind="stable")[:vd]).astype(np.int32)
    coverage = float(counts[d2t].sum() / counts.sum())
    aux = tuple(int(x) for x in args.aux_layers.split(",")) if args.aux_layers else None
    dcfg = Eagle3Config.for_target(tcfg, draft_vocab_size=vd, intermediate_size=args.intermediate_size,
                                   aux_layers=aux)
    spec = Spec(dcfg=dcfg, batch=args.batch, seq_len=args.seq_len, ttt_steps=args.ttt_steps, compute_dtype=compute,
                lr=args.lr, steps=args.steps, warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip)
    log(f"device {tt._device_desc()}; compute {compute}; target {args.target} ({tcfg.num_hidden_layers} layers, "
        f"D {tcfg.hidden_size}, V {tcfg.vocab_size}); taps {list(dcfg.aux_layers)}; draft vocab {vd} "
        f"({coverage:.1%} of train tokens)")
    tgt = Target(target, jnp.dtype(compute))

    mngr = tt.checkpoint_manager(workdir, keep=2)
    if args.restart and mngr.latest_step() is not None:
        import shutil

        mngr.close()
        shutil.rmtree(workdir / "checkpoints")
        mngr = tt.checkpoint_manager(workdir, keep=2)
    params0, rest = init_params(dcfg, target, d2t, args.seed)
    tx, _ = optimizer(spec)

    def fresh():
        return jax.device_put({"params": params0, "opt": tx.init(params0), "step": jnp.zeros((), jnp.int32),
                               "data_key": jax.random.key_data(jax.random.key(args.seed + 1))}, jax.devices()[0])

    meta_prev = {}
    if mngr.latest_step() is None:
        state = fresh()
    else:
        meta_prev = tt.restore_meta(mngr)
        if meta_prev.get("draft_config") != dcfg.to_dict() or meta_prev.get("batch") != args.batch \
                or meta_prev.get("seq_len") != args.seq_len or meta_prev.get("ttt_steps") != args.ttt_steps:
            mngr.close()
            raise SystemExit(f"checkpoint in {workdir} is of another run (draft config, batch, seq-len or "
                             f"ttt-steps differ): use another --workdir or --restart")
        state = tt.restore_state(mngr, jax.eval_shape(fresh))
        log(f"resumed at step {int(state['step'])}")
    step = int(state["step"])
    data = jnp.asarray(corpus.train)
    stop = {"sig": None}
    handlers = {s: signal.signal(s, lambda n, _f: stop.update(sig=n)) for s in (signal.SIGINT, signal.SIGTERM)}
    history = list(meta_prev.get("history", []))
    prior = float(meta_prev.get("train_seconds", 0.0))
    t0 = time.perf_counter()

    def meta():
        return {"step": step, "batch": args.batch, "seq_len": args.seq_len, "ttt_steps": args.ttt_steps,
                "draft_config": dcfg.to_dict(), "history": history,
                "train_seconds": prior + time.perf_counter() - t0}

    try:
        pending, t_mark, s_mark, first = [], time.perf_counter(), step, True
        while step < args.steps:
            state, m = train_step(state, rest, tgt.state, data, spec=spec, tgraph=tgt.graphdef)
            step += 1
            pending.append(m)
            if step % args.log_every == 0 or step == args.steps or first:
                first = False
                ms = jax.device_get(pending)
                now = time.perf_counter()
                sl = np.mean([x["step_losses"] for x in ms], 0)
                sa = np.mean([x["step_acc"] for x in ms], 0)
                log(f"step {step}: loss {np.mean([x['loss'] for x in ms]):.4f} | per-step acc "
                    f"{' '.join(f'{a:.3f}' for a in sa)} | lr {float(ms[-1]['lr']):.2e} | "
                    f"{(step - s_mark) / max(now - t_mark, 1e-9):.2f} steps/s")
                history.append({"step": step, "loss": round(float(np.mean([x["loss"] for x in ms])), 5),
                                "step_loss": [round(float(x), 4) for x in sl],
                                "step_acc": [round(float(x), 4) for x in sa]})
                pending, t_mark, s_mark = [], now, step
            out_of_time = args.max_minutes and (time.perf_counter() - t0) / 60 >= args.max_minutes
            halt = stop["sig"] is not None or (args.stop_after and step >= args.stop_after)
            if step % args.ckpt_every == 0 or step == args.steps or halt or out_of_time:
                tt.save_checkpoint(mngr, state, meta())
            if halt:
                log(f"stopped at step {step} (checkpointed); rerun the same command to resume")
                return {"stopped_at": step}
            if out_of_time:
                log(f"--max-minutes {args.max_minutes} reached at step {step}: evaluating and exporting")
                break
        tt.save_checkpoint(mngr, state, meta())
        train_seconds = prior + time.perf_counter() - t0

        # ---- evaluation and export (the bf16 draft that ships)
        shipped = tt.cast_floats(state["params"], jnp.bfloat16)
        windows = tt.heldout_windows(corpus.heldout, args.seq_len, args.eval_windows)
        accs = []
        for w, _ in tt._batches(windows, args.batch):
            accs.append(np.asarray(eval_step(tt.cast_floats(shipped, jnp.float32), rest, tgt.state, w, spec=spec,
                                             tgraph=tgt.graphdef)[1]))
        heldout_acc = [round(float(x), 4) for x in np.mean(accs, 0)]
        draft = nnx.eval_shape(lambda: Eagle3Draft(dcfg, dtype=jnp.bfloat16))
        g, codec, _ = draft_skeleton(dcfg)
        nnx.update(draft, codec.to_state(shipped), rest)
        draft.d2t.set_value(jnp.asarray(d2t, jnp.int32))
        out.mkdir(parents=True, exist_ok=True)
        save_draft(draft, out)
        shapes = {**{f"K={k}": k for k in args.eval_chains}, f"tree {args.eval_tree}": args.eval_tree}
        t_e = time.perf_counter()
        acc_len = acceptance_lengths(target, draft, corpus.heldout, prompts=args.eval_prompts,
                                     prompt_len=args.eval_prompt_len, new_tokens=args.eval_new_tokens, shapes=shapes)
        log(f"held-out top-1 agreement per draft step {heldout_acc}; mean acceptance length {acc_len} "
            f"({time.perf_counter() - t_e:.0f}s)")
        report = {
            "command": "python scripts/train_eagle3.py " + " ".join(sys.argv[1:]),
            "target": _rel(args.target), "target_heldout_perplexity": _target_ppl(args.target),
            "steps": step, "batch": args.batch, "seq_len": args.seq_len, "ttt_steps": args.ttt_steps,
            "tokens_seen": step * args.batch * args.seq_len, "lr": args.lr, "seed": args.seed,
            "train_seconds": round(train_seconds, 1), "device": tt._device_desc(), "compute_dtype": compute,
            "draft_params": int(sum(int(np.prod(v.shape)) for v in shipped.values())),
            "draft_mb_bf16": round(tt.model_megabytes(shipped), 3),
            "draft_vocab": vd, "draft_vocab_train_coverage": round(coverage, 4),
            "aux_layers": list(dcfg.aux_layers),
            "heldout_ttt_top1_agreement_per_step": heldout_acc,
            "acceptance_length": acc_len,
            "acceptance_eval": f"greedy, {args.eval_prompts} held-out prompts of {args.eval_prompt_len} tokens, "
                               f"{args.eval_new_tokens} new tokens each; tokens per target forward, mean over prompts",
            "history": history, "wall_seconds_this_invocation": round(time.perf_counter() - t_start, 1),
        }
        (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {out} ({report['draft_mb_bf16']} MB bf16, {report['draft_params']:,} params)")
        return report
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        mngr.close()


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _target_ppl(target_dir: Path):
    p = Path(target_dir) / "train_report.json"
    return json.loads(p.read_text()).get("heldout_perplexity") if p.exists() else None


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    return 0 if "stopped_at" not in report or (args.stop_after and report["stopped_at"] >= args.stop_after) else 130


if __name__ == "__main__":
    sys.exit(main())
