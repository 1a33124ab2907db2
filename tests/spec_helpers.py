"""Tiny targets and drafts for the speculative-decoding tests (imported by tests/test_speculative*.py)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mavjax.config import preset
from mavjax.eagle3 import Eagle3Config, Eagle3Draft
from mavjax.model import Llama4


def successor_target(cfg, seed):
    """A random-weight target whose greedy continuation is mostly x -> perm(x): a large random embedding
    dominates the residual stream and the LM head scores v by <h, embed[perm^-1(v)]>. Returns (model, perm)."""
    net = Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    V, D = cfg.vocab_size, cfg.hidden_size
    perm = rng.permutation(V)
    emb = rng.standard_normal((V, D)).astype(np.float32)
    net.embed.set_value(jnp.asarray(emb))
    inv = np.argsort(perm)
    net.lm_head.set_value(jnp.asarray(0.3 * emb[inv].T))  # logit(v) ~ <h, emb[perm^-1(v)]>
    return net, perm


def good_draft(cfg, target, perm, seed, draft_vocab=None):
    """A draft that reads the target's last-layer feature (~ embed[x_p]) and scores perm(perm(x_p)) and a
    decoy token equally (noise decides which is its top-1): so the right token is its first or second choice
    at depth 1, and its own output does not advance, so deeper guesses are mostly wrong. Acceptance is partial,
    and a tree with two children at depth 1 accepts more than a chain."""
    dc = Eagle3Config.for_target(cfg, draft_vocab_size=draft_vocab)
    assert dc.aux_layers[-1] == cfg.num_hidden_layers - 1
    d = Eagle3Draft(dc, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    D, n = cfg.hidden_size, len(dc.aux_layers)
    fc = np.zeros((n * D, D), np.float32)
    fc[(n - 1) * D:, :] = np.eye(D)
    d.fc.set_value(jnp.asarray(fc))
    d.wo.set_value(jnp.zeros_like(d.wo.get_value()))
    d.mlp.w_down.set_value(jnp.zeros_like(d.mlp.w_down.get_value()))
    emb = np.asarray(target.embed.get_value())
    rng = np.random.default_rng(seed)
    d2t = np.sort(rng.choice(cfg.vocab_size, dc.draft_vocab_size, replace=False)) if draft_vocab else \
        np.arange(cfg.vocab_size)
    inv2 = np.argsort(perm[perm])  # perm(perm(u)) = v  <=>  u = inv2[v]
    decoy = rng.permutation(cfg.vocab_size)
    d.lm_head.set_value(jnp.asarray(0.3 * (emb[inv2[d2t]] + emb[decoy[d2t]]).T))
    d.d2t.set_value(jnp.asarray(d2t, jnp.int32))
    return d


def random_draft(cfg, seed, draft_vocab=None):
    dc = Eagle3Config.for_target(cfg, draft_vocab_size=draft_vocab)
    d = Eagle3Draft(dc, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    if draft_vocab:
        d2t = np.sort(np.random.default_rng(seed).choice(cfg.vocab_size, draft_vocab, replace=False))
        d.d2t.set_value(jnp.asarray(d2t, jnp.int32))
    return d


def configs():
    tiny = preset("tiny")  # MoE + dense layers, chunked RoPE (chunk 8) + global NoPE layers
    dense = tiny.replace(interleave_moe_layer_step=0, no_rope_layer_interval=3, attention_chunk_size=4)
    return {"moe": tiny, "dense": dense}
