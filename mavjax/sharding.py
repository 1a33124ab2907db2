"""Device mesh and logical-axis rules: which mesh axes each parameter dimension is split over.

The mesh has two axes, `expert` and `tensor`. Parameters name their dimensions with logical axes
(`mavjax.model`); `RULES` maps each logical axis to mesh axes. Sharding is this table, not code paths:

- attention heads, kv heads, dense-MLP hidden units and the vocabulary: over every device (tensor parallel);
- experts: over `expert`, and each expert's hidden units over `tensor`; so `expert=8,tensor=1` is pure expert
  parallelism, `expert=1,tensor=8` the batch-1 minimum-latency layout (every device reads 1/8 of the active
  expert), `expert=2,tensor=4` lies between;
- the KV cache [B, S, K, Dh] like the kv heads of wk/wv (`cache_batch`, `cache_seq` replicated), so each
  device holds the cache of the kv heads its query heads read;
- everything else (hidden size, head dim, norms, the router's expert scores) is replicated.

Fewer kv heads than devices (Maverick has 8; a 16-device mesh, or the tiny test models): axes in `SPLIT_PREFIX`
are split over the longest leading run of their mesh axes that divides them, and replicated over the rest,
instead of being an error. Query heads are laid over ("expert", "tensor") expert-major, so splitting kv heads
over a leading prefix ("expert") keeps each device's kv heads exactly those its query heads need: attention
stays local, and the cache costs K/E heads per device instead of K/(E*T). (Sharding the cache over the batch
instead would put a row's cache on other devices than the query heads reading it, and fails at batch 1.)
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flax import nnx

AXES = ("expert", "tensor")
ALL = ("expert", "tensor")  # tensor parallelism over every device of the mesh

RULES: dict[str, tuple[str, ...] | None] = {
    "vocab": ALL,
    "embed": None,
    "heads": ALL,
    "kv_heads": ALL,
    "head_dim": None,
    "mlp": ALL,
    "expert": ("expert",),
    "expert_mlp": ("tensor",),
    "router_expert": None,
    "norm": None,
    "cache_batch": None,
    "cache_seq": None,
}

# Logical axes that, when the mesh does not divide them, are split over a leading prefix of their mesh axes
# (or replicated) rather than refused: kv heads (see the module docstring).
SPLIT_PREFIX = frozenset({"kv_heads"})


class ShardingError(ValueError):
    """A mesh that does not fit the model (a dimension it does not divide), or a bad mesh description."""


def parse_mesh(text: str) -> dict[str, int]:
    """'expert=2,tensor=4' -> {'expert': 2, 'tensor': 4} (a missing axis is 1)."""
    sizes = {a: 1 for a in AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.isdigit() or int(value) < 1:
            raise ShardingError(f"bad mesh entry {part!r}: expected expert=N or tensor=N with N >= 1")
        sizes[name] = int(value)
    return sizes


def make_mesh(expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """An (expert, tensor) mesh over the first expert*tensor devices (all processes' devices under
    jax.distributed, so the same call serves one host and many)."""
    devices = list(jax.devices() if devices is None else devices)
    n = expert * tensor
    if n > len(devices):
        raise ShardingError(f"mesh expert={expert},tensor={tensor} needs {n} devices, {len(devices)} available")
    return Mesh(np.array(devices[:n]).reshape(expert, tensor), AXES)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, name: str = "",
             rules=None) -> PartitionSpec:
    """The PartitionSpec of one parameter, checking that every split dimension divides evenly."""
    rules = RULES if rules is None else rules
    parts = []
    for logical, size in zip(axes, shape):
        if logical is not None and logical not in rules:
            raise ShardingError(f"{name}: logical axis {logical!r} has no sharding rule")
        mesh_axes = tuple(a for a in (rules.get(logical) or ()) if mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        while logical in SPLIT_PREFIX and size % ways:
            mesh_axes = mesh_axes[:-1]
            ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % ways:
            raise ShardingError(f"{name}: dimension {logical!r} of size {size} cannot be split {ways} ways over "
                                f"mesh axes {mesh_axes} ({dict(mesh.shape)}); choose a mesh that divides it")
        parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*parts)


def param_shardings(model, mesh: Mesh, rules=None) -> dict[str, NamedSharding]:
    """Dotted parameter path -> NamedSharding, for every parameter of a (possibly abstract) model; the form
    `mavjax.checkpoint.load_model(shardings=...)` takes to restore each shard straight into place."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(k) for k in path)
        axes = var.get_metadata()["logical_axes"]
        out[name] = NamedSharding(mesh, spec_for(axes, var.get_value().shape, mesh, name, rules))
    return out


CACHE_AXES = ("cache_batch", "cache_seq", "kv_heads", "head_dim")  # KVCache.k / .v [B, S, K, Dh]


def cache_shardings(cfg, batch: int, length: int, mesh: Mesh, rules=None):
    """A KVCache-shaped tree of NamedShardings for a cache of `batch` rows and `length` slots."""
    from mavjax.kv_cache import KVCache

    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    kv = NamedSharding(mesh, spec_for(CACHE_AXES, shape, mesh, "kv cache", rules))
    pos = NamedSharding(mesh, spec_for(CACHE_AXES[:2], shape[:2], mesh, "kv cache positions", rules))
    L = cfg.num_hidden_layers
    return KVCache(k=[kv] * L, v=[kv] * L, pos=pos)


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
              "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"= (\(?[a-z0-9]+\[[^=]*?) (all-gather|all-reduce|all-to-all|collective-permute|"
                         r"reduce-scatter|ragged-all-to-all)(?:-start)?\(")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective produces in a compiled (SPMD-partitioned, per-device) HLO module's text,
    e.g. `jax.jit(f).lower(...).compile().as_text()`: {"all-gather": ..., "all-reduce": ...}. A decode step over
    a mesh should move activations only (kilobytes); a parameter in there means some op outside shard_map that
    GSPMD cannot partition (an opaque Pallas call) is gathering weights every step."""
    out: dict[str, int] = {}
    for m in _COLLECTIVE.finditer(hlo_text):
        shapes, op = m.groups()
        n = 0
        for dt, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", shapes):
            n += _HLO_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
        out[op] = out.get(op, 0) + n
    return out
