"""A preallocated KV cache: per layer, keys and values [B, S, K, Dh], and one slot-position table [B, S].

Slots are written in place (`write_slots`; the buffers are donated to the jitted step that updates them).
`pos` records the absolute position held by each slot (-1 = never written), and attention masks by it, so
slots past a sequence's end, or left over from a rejected speculative draft, are never read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list  # per layer [B, S, K, Dh]
    v: list  # per layer [B, S, K, Dh]
    pos: jax.Array  # [B, S] int32

    @classmethod
    def create(cls, cfg, batch: int, length: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        L = cfg.num_hidden_layers
        return cls(k=[jnp.zeros(shape, dtype) for _ in range(L)], v=[jnp.zeros(shape, dtype) for _ in range(L)],
                   pos=jnp.full((batch, length), -1, jnp.int32))

    @property
    def length(self) -> int:
        return self.pos.shape[1]


def write_slots(buf, new, start):
    """buf [B, S, ...] <- new [B, T, ...] at slots start[b] .. start[b]+T-1 of each row b."""
    put = jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), i, axis=0))
    return put(buf, new, start)
