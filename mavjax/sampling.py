"""Sampling parameters (vLLM's names and meanings) and the jit-friendly sampler.

Each sequence in a batch carries its own temperature, top-k, top-p and seed as arrays, so one compiled decode
loop serves any mix of values; a batch that is greedy throughout compiles a variant without the sort.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """An invalid sampling value."""


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = fresh randomness each call
    stop: Sequence[str] | str | None = None  # stop strings (not included in the output text)
    stop_token_ids: Sequence[int] | None = None  # stop tokens in addition to the model's EOS
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(msg):
            raise SamplingError(msg)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be an integer >= 1, or 0/-1 to disable, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits, temperature, top_k, top_p):
    """The sampler's filter: logits [B, ..., V] float32 over per-row temperature, top_k, top_p [B] ->
    (order [B, ..., V], the tempered logits in that descending order with the tokens top-k / top-p drop set
    to -inf). `sample` draws from it; speculative decoding (mavjax.speculative) needs the same distribution."""
    V = logits.shape[-1]
    row = lambda v: v.reshape(v.shape + (1,) * (logits.ndim - 1))  # noqa: E731  [B] -> [B, 1, ..., 1]
    x = logits / jnp.maximum(row(temperature), 1e-6)
    order = jnp.argsort(-x, axis=-1)  # descending
    xs = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.arange(V)
    keep = (row(top_k) <= 0) | (rank < row(top_k))  # top-k first, then top-p on what is left (vLLM)
    xs = jnp.where(keep, xs, -jnp.inf)
    p = jax.nn.softmax(xs, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # mass strictly above each token
    return order, jnp.where(before < row(top_p), xs, -jnp.inf)  # the top token always survives


def sample(logits, keys, temperature, top_k, top_p, *, all_greedy: bool):
    """logits [B, V] float32; keys [B] (typed PRNG keys); temperature, top_p [B] float32; top_k [B] int32.
    Returns token ids [B] int32. Temperature 0 rows take the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        return greedy
    order, xs = filtered_logits(logits, temperature, top_k, top_p)  # [B, V]
    choice = jax.vmap(jax.random.categorical)(keys, xs)  # index into the sorted order
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature == 0, greedy, sampled)
