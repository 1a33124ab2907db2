"""The sampler (top-k, top-p, temperature, seeds) and SamplingParams validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mavjax.sampling import SamplingError, SamplingParams, sample


def _draw(logits, n, temperature=1.0, top_k=0, top_p=1.0):
    """n independent samples from one row of logits, as n rows with different seeds."""
    L = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1))
    keys = jax.vmap(jax.random.key)(jnp.arange(n, dtype=jnp.uint32))
    f = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    return np.asarray(sample(L, keys, f(temperature, jnp.float32), f(top_k, jnp.int32), f(top_p, jnp.float32),
                             all_greedy=False))


LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))


def test_temperature_one_follows_softmax():
    n = 20000
    counts = np.bincount(_draw(LOGITS, n), minlength=6)
    expected = np.exp(LOGITS) * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.5, (chi2, counts)  # chi-squared, 5 dof: p = 0.001


def test_top_k_restricts_and_renormalises():
    s = _draw(LOGITS, 4000, top_k=2)
    assert set(np.unique(s)) == {0, 1}
    assert abs((s == 0).mean() - 0.4 / 0.65) < 0.03


def test_top_p_keeps_smallest_prefix_reaching_p():
    s = _draw(LOGITS, 4000, top_p=0.7)  # 0.4 + 0.25 < 0.7 <= 0.4 + 0.25 + 0.15
    assert set(np.unique(s)) == {0, 1, 2}
    assert set(np.unique(_draw(LOGITS, 500, top_p=0.01))) == {0}  # the top token always survives


def test_low_temperature_sharpens_and_zero_is_greedy():
    assert (_draw(LOGITS, 500, temperature=0.05) == 0).mean() > 0.99
    assert set(np.unique(_draw(LOGITS[::-1], 50, temperature=0.0))) == {5}


def test_same_seed_same_sample():
    L = jnp.tile(jnp.asarray(LOGITS, jnp.float32)[None], (4, 1))
    keys = jax.vmap(jax.random.key)(jnp.array([7, 7, 7, 7], jnp.uint32))
    f = lambda v, dt: jnp.full((4,), v, dt)  # noqa: E731
    s = sample(L, keys, f(1.0, jnp.float32), f(0, jnp.int32), f(1.0, jnp.float32), all_greedy=False)
    assert len(set(np.asarray(s).tolist())) == 1


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"seed": "x"}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_invalid_values_are_named(kw, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**kw)
