"""Jitted prefill and the on-device decode loop.

`prefill` runs the (right-padded) prompts through the model, writing the KV cache from slot 0, and samples the
first token from each prompt's last real position. `decode` then runs one `lax.while_loop` on the device: feed
the last token at its position, sample the next, stop a row on a stop token or its token budget; no host round
trip per token. The cache is created inside `prefill` and donated to `decode`, so it is updated in place.

Shapes are bucketed (batch, prompt length, cache length, output length: powers of two) so that a new prompt
length reuses a compiled program; a row's slot index equals its token position, and attention masks by the
positions recorded in the cache, so padding slots are never read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mavjax.kv_cache import KVCache
from mavjax.sampling import sample


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class Batch:
    """Host-side arrays of one padded batch (rows past `n_real` are filler)."""
    tokens: np.ndarray  # [B, T] int32, right-padded
    lengths: np.ndarray  # [B] int32
    max_new: np.ndarray  # [B] int32, already clipped to the context
    temperature: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int32
    top_p: np.ndarray  # [B] float32
    seeds: np.ndarray  # [B] uint32
    stop_ids: np.ndarray  # [Ns] int32, -1 padded
    n_real: int


def shard_cache(cache, cfg, mesh):
    """The target's KV cache laid out over `mesh` by the rules (kv heads like wk/wv); unchanged without one."""
    if mesh is None:
        return cache
    from mavjax.sharding import cache_shardings

    return jax.lax.with_sharding_constraint(cache, cache_shardings(cfg, *cache.pos.shape, mesh))


def make_keys(seeds, step):
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds)


class Engine:
    """Owns the split model (graph + state) and its compiled prefill / decode / logits programs."""

    def __init__(self, model, *, kv_dtype=None, pad_id: int = 0):
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.kv_dtype = kv_dtype or model.dtype
        self.pad_id = pad_id
        parallel = getattr(model, "parallel", None)
        self.mesh = None if parallel is None else parallel.mesh  # the KV cache is sharded by the rules over it
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len", "all_greedy"))
        self._decode = jax.jit(self._decode_impl, static_argnames=("out_len", "all_greedy"), donate_argnames=("cache",))
        self._forward = jax.jit(self._forward_impl)

    # ---- programs ----------------------------------------------------------------------------------------
    def _prefill_impl(self, state, tokens, lengths, temperature, top_k, top_p, seeds, *, cache_len, all_greedy):
        model = nnx.merge(self.graphdef, state)
        B, T = tokens.shape
        cache = self._shard_cache(KVCache.create(self.cfg, B, cache_len, self.kv_dtype))
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        h, cache, _ = model.hidden_states(tokens, positions, cache, write_index=jnp.zeros((B,), jnp.int32),
                                          fresh_cache=True)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
        logits = model.logits(last)[:, 0]  # [B, V]
        tok = sample(logits, make_keys(seeds, 0), temperature, top_k, top_p, all_greedy=all_greedy)
        return tok, cache

    def _decode_impl(self, state, cache, first, lengths, max_new, active, stop_ids, temperature, top_k, top_p,
                     seeds, *, out_len, all_greedy):
        model = nnx.merge(self.graphdef, state)
        cache = self._shard_cache(cache)
        B = first.shape[0]
        is_stop = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=-1)  # noqa: E731
        out = jnp.full((B, out_len), self.pad_id, jnp.int32).at[:, 0].set(first)
        n = active.astype(jnp.int32)
        done = ~active | is_stop(first) | (n >= max_new)
        step_limit = jnp.max(jnp.where(active, max_new, 0))

        def cond(c):
            _, _, _, _, _, done, step = c
            return (step < step_limit) & ~jnp.all(done)

        def body(c):
            cache, tok, pos, out, n, done, step = c
            logits, cache = model(tok[:, None], pos[:, None], cache, write_index=pos)
            nxt = sample(logits[:, 0], make_keys(seeds, step), temperature, top_k, top_p, all_greedy=all_greedy)
            nxt = jnp.where(done, self.pad_id, nxt)
            out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], step, axis=1)
            live = ~done
            n = n + live
            pos = pos + live
            done = done | is_stop(nxt) | (n >= max_new)
            return cache, nxt, pos, out, n, done, step + 1

        carry = (cache, first, lengths, out, n, done, jnp.int32(1))
        cache, _, _, out, n, _, _ = jax.lax.while_loop(cond, body, carry)
        return out, n, cache

    def _shard_cache(self, cache):
        return shard_cache(cache, self.cfg, self.mesh)

    def _forward_impl(self, state, tokens):
        model = nnx.merge(self.graphdef, state)
        logits, _ = model(tokens)
        return logits

    # ---- host API ----------------------------------------------------------------------------------------
    def prefill(self, b: Batch, cache_len: int):
        all_greedy = bool(np.all(b.temperature == 0))
        return self._prefill(self.state, b.tokens, b.lengths, b.temperature, b.top_k, b.top_p, b.seeds,
                             cache_len=cache_len, all_greedy=all_greedy)

    def decode(self, b: Batch, first, cache, out_len: int):
        all_greedy = bool(np.all(b.temperature == 0))
        active = np.arange(b.tokens.shape[0]) < b.n_real
        return self._decode(self.state, cache, first, b.lengths, b.max_new, active, b.stop_ids, b.temperature,
                            b.top_k, b.top_p, b.seeds, out_len=out_len, all_greedy=all_greedy)

    def logits(self, token_ids: np.ndarray) -> np.ndarray:
        """float32 logits [T, V] for every position of one sequence (padded to a bucket, causal so exact)."""
        T = len(token_ids)
        padded = np.full((1, bucket(T)), self.pad_id, np.int32)
        padded[0, :T] = token_ids
        return to_host(self._forward(self.state, padded))[0, :T]


def to_host(x) -> np.ndarray:
    """A device array as numpy; under jax.distributed an output spread over other processes' devices is
    gathered first (every process gets the whole value)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
