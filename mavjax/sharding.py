"""Device mesh and logical-axis rules: which mesh axes each parameter dimension is split over.

The mesh has two axes, `expert` and `tensor`. Parameters name their dimensions with logical axes
(`mavjax.model`); `RULES` maps each logical axis to mesh axes. Sharding is this table, not code paths:

- attention heads, kv heads, dense-MLP hidden units and the vocabulary: over every device (tensor parallel);
- experts: over `expert`, and each expert's hidden units over `tensor`; so `expert=8,tensor=1` is pure expert
  parallelism, `expert=1,tensor=8` the batch-1 minimum-latency layout (every device reads 1/8 of the active
  expert), `expert=2,tensor=4` lies between;
- everything else (hidden size, head dim, norms, the router's expert scores) is replicated.
"""

from __future__ import annotations

import math

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
}


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
