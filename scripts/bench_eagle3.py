#!/usr/bin/env python3
"""EAGLE-3 speculative decoding speed at batch 1: tokens/s with and without the draft in the same run.

    python scripts/bench_eagle3.py --json $OUT/bench_eagle3.json            # the shipped pair (GPU)
    python scripts/bench_eagle3.py --tiny --json /tmp/b.json                # random tiny pair (CPU smoke)

For the plain target and each draft shape (chains K=3, K=5 and the static tree, by default), every prompt is
generated alone (batch 1, greedy unless --temperature, --new-tokens each, stop tokens ignored so every run
is the same length) after a warm-up that compiles; decode tokens/s = generated tokens after the first / the
on-device decode loop's time (prefill excluded; end-to-end tokens/s including prefill is reported too). The
speedup is the plain decode time over the speculative one for the same tokens; the mean acceptance length is
tokens per target forward. Then the two halves of a round are timed apart, each as its own jitted program
looping --phase-iters times on the device from a real post-prefill state: "draft" (the draft tree's passes and
the catch-up pass) and "verify" (the target forward over root + N nodes); their shares of (draft + verify),
and the full round time from the loop (decode time / rounds; the rest is acceptance and bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mavjax.api import LLM  # noqa: E402
from mavjax.generate import Batch, bucket  # noqa: E402
from mavjax.sampling import SamplingParams  # noqa: E402
from mavjax.speculative import DraftTree  # noqa: E402

DEFAULT_PROMPTS = ["def fib(n):", "import os\nimport sys\n\n\ndef main(argv):", "class Stack:\n    def __init__(self):",
                   "    for i in range(len(items)):", "def parse_args():\n    parser = argparse.ArgumentParser(",
                   "try:\n    import json\nexcept ImportError:", "    def __repr__(self):\n        return",
                   "# Copyright (C) 2001 Python Software Foundation\n"]


def load_pair(a):
    if a.tiny:  # random target and random draft: exercises every code path on a CPU in seconds
        from mavjax.config import preset
        from mavjax.eagle3 import Eagle3Config, Eagle3Draft
        from mavjax.model import Llama4

        cfg = preset("tiny")
        net = Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
        draft = Eagle3Draft(Eagle3Config.for_target(cfg, draft_vocab_size=256), dtype=jnp.float32, rngs=nnx.Rngs(1))
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, cfg.vocab_size, 12).tolist() for _ in range(a.prompts)]
        return net, None, draft, prompts, "random tiny", "random tiny"
    from mavjax.checkpoint import load_model
    from mavjax.eagle3 import load_draft
    from mavjax.tokenizer import Tokenizer

    model = Path(a.model)
    draft_dir = Path(a.draft) if a.draft else model / "draft"
    _, net = load_model(model)
    _, draft = load_draft(draft_dir)
    tok = Tokenizer.from_dir(model)
    prompts = [tok.encode(p) for p in (DEFAULT_PROMPTS * 4)[:a.prompts]]
    return net, tok, draft, prompts, str(model), str(draft_dir)


def time_generation(llm, prompts, params):
    """Batch 1: each prompt alone. -> (decode tokens/s, end-to-end tokens/s, decode seconds, mean acceptance)."""
    for p in prompts:  # compile every shape bucket the prompts need, untimed
        llm.generate([p], params)
    dec, total, gen, acc = 0.0, 0.0, 0, []
    for p in prompts:
        o = llm.generate([p], params)[0]
        m = o.metrics
        dec += m.decode_time_s
        total += m.decode_time_s + m.time_to_first_token_s
        gen += m.num_generated_tokens
        if m.mean_acceptance_length is not None:
            acc.append(m.mean_acceptance_length)
    return (gen - len(prompts)) / dec, gen / total, dec, (float(np.mean(acc)) if acc else None)


def time_phases(llm, prompt, iters: int):
    """ms per call of the draft-only and verify-only programs of one round, each looped on the device."""
    eng = llm.spec_engine
    tree = eng.tree
    L = len(prompt)
    S = bucket(L + 8 + eng.extra_slots, minimum=64)
    tokens = np.zeros((1, bucket(L)), np.int32)
    tokens[0, :L] = prompt
    b = Batch(tokens=tokens, lengths=np.array([L], np.int32), max_new=np.array([8], np.int32),
              temperature=np.zeros(1, np.float32), top_k=np.zeros(1, np.int32), top_p=np.ones(1, np.float32),
              seeds=np.zeros(1, np.uint32), stop_ids=np.full(8, -1, np.int32), n_real=1)
    first, (tcache, dcache, g_root, d_root) = eng.prefill(b, S)
    pos = jnp.asarray(b.lengths)
    D = tree.depth
    keys = jax.random.split(jax.random.key(0), 1)
    temp = jnp.zeros((1,), jnp.float32)

    @jax.jit
    def draft_only(tstate, dstate, dcache, g_root, d_root):
        target, draft = eng._models(tstate, dstate)

        def body(_, c):
            dcache, g, d = c
            nodes, _, dcache = eng.draft_phase(target, draft, tree, dcache, g, d, pos, keys, temp, False)
            a = jnp.full((1,), D // 2, jnp.int32)
            path = jnp.arange(D + 1, dtype=jnp.int32)[None]
            emitted = jnp.concatenate([first[:, None], nodes], axis=1)[:, :D + 1]
            feats = jnp.zeros((1, tree.size + 1, draft.fc.shape[0]), draft.dtype)
            g, d, dcache = eng.catch_up_phase(target, draft, tree, dcache, feats, path, emitted, a, pos)
            return dcache, g, d

        return jax.lax.fori_loop(0, iters, body, (dcache, g_root, d_root))[1]

    nodes = jnp.zeros((1, tree.size), jnp.int32) + first[:, None]

    @jax.jit
    def verify_only(tstate, tcache):
        target = nnx.merge(eng.tgraph, tstate)

        def body(_, c):
            tc, acc = c
            logits, feats, tc = eng.verify_phase(target, tree, tc, first, nodes, pos)
            return tc, acc + logits[0, 0, 0] + feats[0, 0, 0]

        return jax.lax.fori_loop(0, iters, body, (tcache, jnp.float32(0)))[1]

    out = {}
    for name, fn, args in (("draft", draft_only, (eng.tstate, eng.dstate, dcache, g_root, d_root)),
                           ("verify", verify_only, (eng.tstate, tcache))):
        fn(*args).block_until_ready()  # compile
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            ts.append(time.perf_counter() - t)
        out[name] = float(np.median(ts)) / iters * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "checkpoints" / "default"))
    ap.add_argument("--draft", default=None, help="draft dir (default: MODEL/draft)")
    ap.add_argument("--shapes", nargs="+", default=["3", "5", "3,2,1,1"],
                    help="draft shapes: an integer K (chain) or a tree's branching per depth")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--phase-iters", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="random tiny target + draft (CPU smoke test)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.tiny:
        a.new_tokens, a.phase_iters = min(a.new_tokens, 24), min(a.phase_iters, 5)
    net, tok, draft, prompts, model_name, draft_name = load_pair(a)
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=a.temperature, seed=0, ignore_eos=True)
    dev = jax.devices()[0]
    print(f"device {dev.platform}:{getattr(dev, 'device_kind', '?')}; target {model_name}; draft {draft_name}; "
          f"{len(prompts)} prompts x {a.new_tokens} tokens, batch 1, temperature {a.temperature}")
    plain = LLM.from_model(net, tok, max_batch_size=1)
    base_tps, base_e2e, base_dec, _ = time_generation(plain, prompts, params)
    print(f"{'no draft':>14s}: {base_tps:8.1f} tok/s decode ({base_e2e:.1f} end to end)")
    rows = [{"shape": "none", "decode_tokens_per_s": base_tps, "e2e_tokens_per_s": base_e2e}]
    for shape in a.shapes:
        kw = {"num_draft_tokens": int(shape)} if shape.isdigit() else {"draft_tree": shape}
        llm = LLM.from_model(net, tok, max_batch_size=1, draft=draft, **kw)
        tps, e2e, dec, acc = time_generation(llm, prompts, params)
        ph = time_phases(llm, prompts[0], a.phase_iters)
        rounds = (a.new_tokens - 1) * len(prompts) / acc if acc else None
        name = f"K={shape}" if shape.isdigit() else f"tree {shape}"
        row = {"shape": name, "draft_nodes": DraftTree.chain(int(shape)).size if shape.isdigit()
               else DraftTree.parse(shape).size, "decode_tokens_per_s": tps, "e2e_tokens_per_s": e2e,
               "speedup_decode": base_dec / dec, "speedup_e2e": e2e / base_e2e, "mean_acceptance_length": acc,
               "round_ms": dec / rounds * 1e3 if rounds else None, "draft_ms": ph["draft"],
               "verify_ms": ph["verify"], "draft_share": ph["draft"] / (ph["draft"] + ph["verify"])}
        rows.append(row)
        print(f"{name:>14s}: {tps:8.1f} tok/s decode ({e2e:.1f} end to end), speedup {row['speedup_decode']:.2f}x, "
              f"acceptance {acc:.2f}, round {row['round_ms']:.3f} ms = draft {ph['draft']:.3f} ms "
              f"({row['draft_share']:.0%}) + verify {ph['verify']:.3f} ms + rest")
    report = {"device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}", "jax": jax.__version__,
              "target": model_name, "draft": draft_name, "batch": 1, "prompts": len(prompts),
              "new_tokens": a.new_tokens, "temperature": a.temperature, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                             time.gmtime()),
              "rows": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
