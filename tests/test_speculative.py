"""EAGLE-3 speculative decoding at temperature 0: token-identical to plain greedy decoding.

Random prompts through tiny targets (MoE and dense; chunked RoPE and global NoPE layers; prompts and outputs
cross the attention chunks), chain drafts with K in {1, 2, 4} and static trees, batches of 1 and 3, a draft that
is often right (partial acceptance) and a random one (acceptance near zero), draft vocabularies full and reduced.
"""

import functools

import numpy as np
import pytest
from spec_helpers import configs, good_draft, random_draft, successor_target

from mavjax.api import LLM
from mavjax.sampling import SamplingParams
from mavjax.speculative import DraftTree


@functools.lru_cache(maxsize=None)
def _target(name):
    return successor_target(configs()[name], seed=3)


@functools.lru_cache(maxsize=None)
def _reference(name, batch, seed):
    net, _ = _target(name)
    prompts = _prompts(seed)
    return [o.token_ids for o in LLM.from_model(net, max_batch_size=batch).generate(prompts, _params())]


def _prompts(seed, n=4):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=int(rng.integers(1, 14))).tolist() for _ in range(n)]


def _params():
    return SamplingParams(max_new_tokens=int(24), temperature=0.0, ignore_eos=True)


CASES = [  # (config, draft kind, draft vocab, K or tree, batch)
    ("moe", "good", None, 1, 1),
    ("moe", "good", None, 2, 3),
    ("moe", "good", 300, 4, 3),
    ("moe", "bad", 128, 1, 3),
    ("dense", "good", None, 4, 1),
    ("moe", "good", None, (2, 2, 1), 3),
    ("dense", "good", 300, (3, 1), 1),
    ("moe", "bad", None, (2, 1), 3),
]


@pytest.mark.parametrize("name,kind,vocab,shape,batch", CASES)
def test_greedy_identical_to_plain_decoding(name, kind, vocab, shape, batch):
    cfg = configs()[name]
    net, perm = _target(name)
    draft = good_draft(cfg, net, perm, seed=5, draft_vocab=vocab) if kind == "good" else \
        random_draft(cfg, seed=5, draft_vocab=vocab)
    tree = None if isinstance(shape, int) else shape
    k = shape if isinstance(shape, int) else 3
    llm = LLM.from_model(net, max_batch_size=batch, draft=draft, num_draft_tokens=k, draft_tree=tree)
    seed = 11 + len(CASES) * batch
    outs = llm.generate(_prompts(seed), _params())
    ref = _reference(name, batch, seed)
    for o, r in zip(outs, ref):
        assert o.token_ids == r
    acc = np.mean([o.metrics.mean_acceptance_length for o in outs])
    if kind == "bad":
        assert acc < 1.2  # a random draft is (almost) never right
    else:
        assert acc > 1.2  # the constructed draft is right often enough to exercise acceptance


def test_tree_accepts_more_than_chain_and_stops_as_plain():
    """The constructed draft's right token is its first or second choice: a tree with two children at depth 1
    accepts more than a chain; stop tokens and per-row budgets end rows exactly where plain decoding does."""
    cfg = configs()["moe"]
    net, perm = _target("moe")
    draft = good_draft(cfg, net, perm, seed=5)
    prompts = _prompts(99, n=3)
    chain = LLM.from_model(net, draft=draft, num_draft_tokens=3).generate(prompts, _params())
    tree = LLM.from_model(net, draft=draft, draft_tree="2,1,1").generate(prompts, _params())
    assert np.mean([o.metrics.mean_acceptance_length for o in tree]) > \
        np.mean([o.metrics.mean_acceptance_length for o in chain]) + 0.2
    # stop tokens (one chosen from inside the reference output) and different budgets per row
    ref = [o.token_ids for o in LLM.from_model(net).generate(prompts, _params())]
    stop = ref[0][7]
    params = [SamplingParams(max_new_tokens=m, temperature=0.0, stop_token_ids=[stop], ignore_eos=True)
              for m in (24, 5, 13)]
    plain = LLM.from_model(net).generate(prompts, params)
    spec = LLM.from_model(net, draft=draft, draft_tree="2,1,1").generate(prompts, params)
    for p, s in zip(plain, spec):
        assert p.token_ids == s.token_ids and p.finish_reason == s.finish_reason
    assert spec[0].token_ids[-1] == stop and len(spec[1].token_ids) <= 5


def test_draft_tree_shapes():
    t = DraftTree((2, 2, 1))
    assert t.size == 2 + 4 + 4 and t.depth == 3
    assert t.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6]
    assert t.ancestors[9].nonzero()[0].tolist() == [0, 2, 5, 9]
    assert DraftTree.chain(3).is_chain and not t.is_chain
    with pytest.raises(ValueError, match="branching"):
        DraftTree.parse("2,x")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        DraftTree.chain(0)


def test_draft_prefill_attention_follows_the_target_kernels():
    """Under a kernels="pallas" target the speculative prefill runs the draft's attention over the prompt as the
    blockwise kernel too (one launch per target layer and one for the draft: 40 query rows x 2 heads a kv head,
    above the split-KV kernel's 64), and gives the XLA path's first token, draft feature and draft logits (float32:
    to 5e-4, as the path's other kernels do; 7.5e-5 here)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from helpers import pallas_call_names
    from mavjax.generate import Batch
    from mavjax.model import Llama4
    from mavjax.speculative import SpecEngine

    cfg = configs()["moe"]
    draft = random_draft(cfg, 5)
    B, T = 2, 40
    rng = np.random.default_rng(0)
    batch = Batch(tokens=rng.integers(3, 500, (B, T)).astype(np.int32), lengths=np.array([T, 23], np.int32),
                  max_new=np.full(B, 4, np.int32), temperature=np.zeros(B, np.float32), top_k=np.zeros(B, np.int32),
                  top_p=np.ones(B, np.float32), seeds=np.zeros(B, np.uint32), stop_ids=np.full(1, -1, np.int32),
                  n_real=B)
    out = {}
    for kernels in ("xla", "pallas"):
        target = Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), kernels=kernels)
        eng = SpecEngine(target, draft, DraftTree.chain(2))
        args = (eng.tstate, eng.dstate, batch.tokens, batch.lengths, batch.temperature, batch.top_k, batch.top_p,
                batch.seeds)
        f = lambda *a: eng._prefill_impl(*a, cache_len=64, all_greedy=True)  # noqa: E731
        names = pallas_call_names(jax.make_jaxpr(f)(*args).jaxpr)
        out[kernels] = names.count("prefill_flash_attention"), eng.prefill(batch, 64)
    assert out["xla"][0] == 0 and out["pallas"][0] == cfg.num_hidden_layers + 1
    (first_x, (_, _, g_x, d_x)), (first_p, (_, _, g_p, d_p)) = out["xla"][1], out["pallas"][1]
    np.testing.assert_array_equal(np.asarray(first_p), np.asarray(first_x))
    for a, b in ((g_p, g_x), (d_p, d_x)):
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)) < 5e-4
