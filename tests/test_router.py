"""pallas_kernels.router: top-1 sigmoid routing in one launch (interpret mode) against mavjax.model.route."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mavjax.model import route
from pallas_kernels.router import MAX_ROWS, route_top1, route_top1_ref


@pytest.mark.parametrize("N,D,E,split", [(1, 256, 128, None), (3, 200, 10, 3), (17, 96, 40, 1), (64, 130, 16, 5)])
def test_route_top1_matches_the_model(N, D, E, split):
    """Same expert ids as the model's route (argmax of the bf16-rounded logits, lowest id on ties) and the same
    scores (sigmoid of the chosen logit, bf16): the in-kernel K sum differs from XLA's only in f32 summation
    order, which can flip a bf16 rounding of a logit, so at most a near tie may pick another expert (none do
    on these inputs) and scores agree to a bf16 ulp (2^-8 relative)."""
    kx, kw = jax.random.split(jax.random.key(N * D + E))
    x = jax.random.normal(kx, (N, D), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (D, E), jnp.float32) / np.sqrt(D)).astype(jnp.bfloat16)
    idx, score = route_top1(x, w, split_k=split, block_k=32, interpret=True)
    ridx, rscore = route(x, w, 1)
    assert idx.shape == (N, 1) and idx.dtype == jnp.int32 and score.shape == (N, 1) and score.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ridx))
    np.testing.assert_allclose(np.asarray(score, np.float32), np.asarray(rscore, np.float32), rtol=2 ** -8)
    np.testing.assert_array_equal(np.asarray(route_top1_ref(x, w)[0]), np.asarray(ridx))


def test_ties_pick_the_lowest_expert_and_bad_shapes_are_rejected():
    x = jnp.ones((2, 64), jnp.bfloat16)
    w = jnp.zeros((64, 8), jnp.bfloat16).at[:, 3].set(1.0).at[:, 6].set(1.0)  # experts 3 and 6 tie
    idx, score = route_top1(x, w, split_k=2, block_k=16, interpret=True)
    np.testing.assert_array_equal(np.asarray(idx), [[3], [3]])
    np.testing.assert_allclose(np.asarray(score, np.float32), 1.0, atol=1e-6)  # sigmoid(64) rounds to 1
    with pytest.raises(ValueError, match="router weight"):
        route_top1(x, w[:10], interpret=True)
    with pytest.raises(ValueError, match="at most"):
        route_top1(jnp.ones((MAX_ROWS + 1, 64), jnp.bfloat16), w, interpret=True)
