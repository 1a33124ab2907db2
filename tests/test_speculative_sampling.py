"""Speculative sampling (temperature > 0) follows the target's distribution exactly.

Chi-squared goodness-of-fit tests at significance level alpha = 0.001 (a correct sampler fails one of them
with probability 0.001 per test; the seeds are fixed, so the outcome is reproducible): bins whose expected
count is under 5 are pooled; the p-value is the regularized upper incomplete gamma Q(dof/2, chi2/2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from spec_helpers import configs, random_draft

from mavjax.api import LLM
from mavjax.model import Llama4
from mavjax.sampling import SamplingParams
from mavjax.speculative import speculative_accept, target_probs

ALPHA = 0.001


def chi2_pvalue(counts, probs):
    counts, expected = np.asarray(counts, float), np.asarray(probs, float) * np.sum(counts)
    order = np.argsort(expected)
    obs_b, exp_b, o_acc, e_acc = [], [], 0.0, 0.0
    for i in order:  # pool the smallest bins until each has expected count >= 5
        o_acc, e_acc = o_acc + counts[i], e_acc + expected[i]
        if e_acc >= 5:
            obs_b.append(o_acc), exp_b.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0:
        obs_b[-1] += o_acc
        exp_b[-1] += e_acc
    obs_b, exp_b = np.array(obs_b), np.array(exp_b)
    assert np.all(counts[expected == 0] == 0), "a token the target gives probability 0 was produced"
    chi2 = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    dof = len(obs_b) - 1
    return float(jax.scipy.special.gammaincc(dof / 2.0, chi2 / 2.0)), chi2, dof


@pytest.mark.parametrize("K", [1, 3])
def test_accept_reject_first_token_follows_target(K):
    """speculative_accept on fixed p, q (q far from p): the first emitted token (draft[0] if accepted, else the
    residual sample) is distributed as p[0]; the emitted tokens after an accepted draft token as p[1]."""
    V, n = 7, 40000
    rng = np.random.default_rng(K)
    p = rng.dirichlet(np.full(V, 0.7), size=K + 1).astype(np.float32)
    p[0, 3] = 0.0  # a token the target excludes (top-k/top-p) that the draft proposes often
    p[0] /= p[0].sum()
    q = rng.dirichlet(np.full(V, 0.7), size=K).astype(np.float32)
    q[0, 3] += 0.5
    q[0] /= q[0].sum()
    keys = jax.random.split(jax.random.key(0), 2 * n)
    draft = jnp.stack([jax.vmap(lambda k, j=j: jax.random.categorical(jax.random.fold_in(k, j), jnp.log(q[j])))(keys[:n])
                       for j in range(K)], axis=1).astype(jnp.int32)  # [n, K] drawn from q
    P, Q = jnp.broadcast_to(p, (n, K + 1, V)), jnp.broadcast_to(q, (n, K, V))
    a, fix = speculative_accept(P, Q, draft, keys[n:])
    a, fix, draft = np.asarray(a), np.asarray(fix), np.asarray(draft)
    first = np.where(a >= 1, draft[:, 0], fix)
    pval, chi2, dof = chi2_pvalue(np.bincount(first, minlength=V), p[0])
    assert pval > ALPHA, (chi2, dof)
    assert 0.05 < np.mean(a >= 1) < 0.95  # both branches exercised
    second = np.where(a >= 2, draft[:, 1 % K], fix)[a >= 1]  # the token after an accepted first draft
    pval, chi2, dof = chi2_pvalue(np.bincount(second, minlength=V), p[1])
    assert pval > ALPHA, (chi2, dof)


def test_target_probs_is_what_sample_draws_from():
    """The distribution the accept/reject step uses is the one mavjax.sampling.sample draws from (temperature,
    top-k, then top-p), checked by chi-squared on 20000 draws per row; temperature 0 gives the argmax."""
    from mavjax.sampling import sample

    V, n = 12, 20000
    logits = jax.random.normal(jax.random.key(1), (3, 1, V)) * 2
    t, k, tp = jnp.array([0.7, 1.3, 0.0]), jnp.array([5, 0, 0]), jnp.array([1.0, 0.8, 1.0])
    p = np.asarray(target_probs(logits, t, k, tp))[:, 0]
    assert np.allclose(p.sum(-1), 1, atol=1e-5) and (p[0] > 0).sum() == 5 and 1 < (p[1] > 0).sum() < V
    assert p[2].max() == 1.0 and p[2].argmax() == int(jnp.argmax(logits[2, 0]))
    keys = jax.random.split(jax.random.key(2), n)
    for row in range(2):
        rep = lambda x: jnp.broadcast_to(x[row], (n,) + x.shape[1:])  # noqa: E731
        draws = np.asarray(sample(rep(logits[:, 0]), keys, rep(t), rep(k), rep(tp), all_greedy=False))
        pval, chi2, dof = chi2_pvalue(np.bincount(draws, minlength=V), p[row])
        assert pval > ALPHA, (row, chi2, dof)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 0.9)])
def test_second_token_of_generation_follows_target(top_k, top_p):
    """End to end through LLM.generate with a random draft (K=2), vocabulary 16, temperature 1: the second
    generated token (the first one that goes through draft, verify and accept/reject) over many seeds is
    distributed as sum_u p(u | prompt) p(v | prompt, u) under the plain target with the same top-k/top-p."""
    cfg = configs()["moe"].replace(vocab_size=16, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
    net = Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(7))
    net.lm_head.set_value(net.lm_head.get_value() * 60.0)  # peaked target, so the random draft is often rejected
    draft = random_draft(cfg, seed=8, draft_vocab=12)
    prompt = [3, 9, 4, 11, 6]
    plain = LLM.from_model(net)

    def dist(ids):
        x = jnp.asarray(plain.logits(ids)[-1:][None])  # [1, 1, V]
        return np.asarray(target_probs(x, jnp.array([1.0]), jnp.array([top_k]), jnp.array([top_p])))[0, 0]

    p1 = dist(prompt)
    marginal = sum(p1[u] * dist(prompt + [u]) for u in range(cfg.vocab_size) if p1[u] > 0)
    spec = LLM.from_model(net, draft=draft, num_draft_tokens=2, max_batch_size=256)
    n = 1024
    params = [SamplingParams(max_new_tokens=2, temperature=1.0, top_k=top_k, top_p=top_p, seed=s,
                             ignore_eos=True) for s in range(n)]
    outs = spec.generate([prompt] * n, params)
    second = np.array([o.token_ids[1] for o in outs])
    pval, chi2, dof = chi2_pvalue(np.bincount(second, minlength=cfg.vocab_size), marginal)
    assert pval > ALPHA, (chi2, dof)
    first = np.array([o.token_ids[0] for o in outs])
    pval, chi2, dof = chi2_pvalue(np.bincount(first, minlength=cfg.vocab_size), p1)
    assert pval > ALPHA, (chi2, dof)
    acc = np.mean([o.metrics.mean_acceptance_length for o in outs])
    assert 1.05 < acc < 2.9  # drafts are sometimes accepted, sometimes rejected
