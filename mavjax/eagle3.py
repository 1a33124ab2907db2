"""The EAGLE-3 draft model (Li et al., 2025, arXiv:2503.01840) in Flax NNX, and its checkpoint format.

EAGLE-3 drafts from the target's own features: the residual-stream outputs of three target layers (low,
middle, high) are concatenated and projected by `fc` [3 Dt -> D]; one Llama decoder layer then reads the
concatenation [input_layernorm(embedding of the next token) ; hidden_norm(feature)] (q/k/v project from 2 D),
adds attention to the *feature* (the residual), runs a SwiGLU MLP, and `norm` + `lm_head` give logits over a
reduced draft vocabulary whose ids map to target ids through `d2t`. The layer's output hidden state stands in
for the next target feature, so the draft can run several steps on its own; its KV cache is its own.

Pairing: the draft step at position p reads (feature of position p, token at p+1) and predicts the token at p+2.

Conventions kept from the published models, so converted checkpoints compute what they computed:
- RoPE in the draft is Llama's half-split (rotate_half) layout, not Llama 4's interleaved pairs;
- the token embedding is the target's (EAGLE-3 copies and freezes it), so the draft holds none;
- `aux_layers` are indices into the target's layers whose *output* is tapped (`Llama4.hidden_states`'
  `collect_layers`). EAGLE-3's reference taps the *input* of layers (2, L/2, L-3), i.e. the outputs of
  (1, L/2-1, L-4), which is also what the Llama-4-Maverick EAGLE-3 release lists ([1, 23, 44] for L=48).
- `d2t` here holds absolute target ids [draft_vocab]; the reference stores offsets (target = i + d2t[i]).

Checkpoint (`save_draft` / `load_draft`): config.json (`Eagle3Config.to_dict()`), params/<name>/ one orbax
checkpoint per array, mavjax_manifest.json written last (format "mavjax-eagle3"), as `mavjax.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mavjax.config import ConfigError, Llama4Config
from mavjax.kv_cache import KVCache, write_slots
from mavjax.model import PALLAS_MAX_ROWS, MLP, RMSNorm, _param, attend_by_position, rope_tables

FORMAT = "mavjax-eagle3"
FORMAT_VERSION = 1
MANIFEST = "mavjax_manifest.json"  # the marker files of mavjax.checkpoint (its save_array / seal write drafts too)
PENDING = "mavjax_pending.json"


class Buffer(nnx.Variable):
    """A saved, untrained array (the draft -> target vocabulary map)."""


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low/middle/high taps: inputs of layers (2, L/2, L-3) = outputs of (1, L/2-1, L-4). For
    targets too shallow for those to be distinct, three evenly spaced layers (first, middle, last)."""
    L = num_layers
    ids = (1, L // 2 - 1, L - 4)
    if len(set(ids)) == 3 and all(0 <= i < L for i in ids) and list(ids) == sorted(ids):
        return ids
    return tuple(int(round(x)) for x in np.linspace(0, L - 1, 3))


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int  # D, the draft layer's width; equals the target's (the embedding is the target's)
    target_hidden_size: int  # Dt: fc reads len(aux_layers) * Dt
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    aux_layers: tuple[int, ...]  # target layers whose outputs are tapped (see module doc)
    target_num_layers: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # as Llama4Config (llama3 scaling or None)
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("aux_layers", tuple(int(i) for i in self.aux_layers))
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))

        def need(c, msg):
            if not c:
                raise ConfigError(f"EAGLE-3 config: {msg}")

        for f in ("hidden_size", "target_hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "vocab_size", "draft_vocab_size", "target_num_layers"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f"{f} must be a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads")
        need(self.head_dim % 2 == 0, "head_dim must be even")
        need(self.draft_vocab_size <= self.vocab_size, f"draft_vocab_size {self.draft_vocab_size} exceeds the "
             f"target vocabulary {self.vocab_size}")
        need(len(self.aux_layers) >= 1, "aux_layers is empty")
        need(all(0 <= i < self.target_num_layers for i in self.aux_layers),
             f"aux_layers {list(self.aux_layers)} must lie in 0..{self.target_num_layers - 1}")

    @classmethod
    def for_target(cls, target: Llama4Config, *, draft_vocab_size: int | None = None,
                   intermediate_size: int | None = None, aux_layers=None) -> "Eagle3Config":
        """A draft shaped like one layer of `target` (EAGLE-3's choice)."""
        return cls(hidden_size=target.hidden_size, target_hidden_size=target.hidden_size,
                   num_attention_heads=target.num_attention_heads, num_key_value_heads=target.num_key_value_heads,
                   head_dim=target.head_dim, intermediate_size=intermediate_size or target.intermediate_size_mlp,
                   vocab_size=target.vocab_size, draft_vocab_size=draft_vocab_size or target.vocab_size,
                   aux_layers=tuple(aux_layers or default_aux_layers(target.num_hidden_layers)),
                   target_num_layers=target.num_hidden_layers, rms_norm_eps=target.rms_norm_eps,
                   rope_theta=target.rope_theta, rope_scaling=target.rope_scaling,
                   max_position_embeddings=target.max_position_embeddings,
                   initializer_range=target.initializer_range)

    def check_target(self, target: Llama4Config) -> None:
        """Raise ConfigError naming the mismatch if this draft cannot serve `target`."""
        for mine, theirs, what in ((self.vocab_size, target.vocab_size, "vocab_size"),
                                   (self.target_hidden_size, target.hidden_size, "target hidden size"),
                                   (self.hidden_size, target.hidden_size, "hidden size (the embedding is shared)"),
                                   (self.target_num_layers, target.num_hidden_layers, "number of target layers")):
            if mine != theirs:
                raise ConfigError(f"the draft does not fit this target: {what} is {mine} in the draft, "
                                  f"{theirs} in the target")

    # Llama4Config.rope_inv_freq reads only head_dim, rope_theta and rope_scaling, which this class has.
    def rope_inv_freq(self):
        return Llama4Config.rope_inv_freq(self)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        d = {"model_type": "mavjax_eagle3"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = (dict(v) if v else None) if f.name == "rope_scaling" else (list(v) if isinstance(v, tuple) else v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Eagle3Config":
        d = dict(d)
        if d.pop("model_type", None) != "mavjax_eagle3":
            raise ConfigError("not a mavjax EAGLE-3 draft config (model_type must be 'mavjax_eagle3')")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown EAGLE-3 config field(s): {unknown}")
        return cls(**d)


def apply_rope_half(x, cos, sin):
    """Llama's half-split rotation (rotate_half). x [B, T, N, Dh], cos/sin [B, T, Dh/2]."""
    xf = x.astype(jnp.float32)
    h = x.shape[-1] // 2
    x1, x2 = xf[..., :h], xf[..., h:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class Eagle3Draft(nnx.Module):
    def __init__(self, cfg: Eagle3Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        D, H, K, Dh, std = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
            cfg.initializer_range
        n_aux = len(cfg.aux_layers)
        self.fc = _param(rngs, (n_aux * cfg.target_hidden_size, D), ("mlp", "embed"), dtype, std)
        self.hidden_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs)
        self.input_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs)
        self.wq = _param(rngs, (2 * D, H, Dh), ("embed", "heads", "head_dim"), dtype, std)
        self.wk = _param(rngs, (2 * D, K, Dh), ("embed", "kv_heads", "head_dim"), dtype, std)
        self.wv = _param(rngs, (2 * D, K, Dh), ("embed", "kv_heads", "head_dim"), dtype, std)
        self.wo = _param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), dtype, std)
        self.post_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs)
        self.mlp = MLP(cfg, cfg.intermediate_size, dtype, rngs)  # reads cfg.hidden_size, initializer_range
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs)
        self.lm_head = _param(rngs, (D, cfg.draft_vocab_size), ("embed", "vocab"), dtype, std)
        self.d2t = Buffer(jnp.arange(cfg.draft_vocab_size, dtype=jnp.int32))  # draft id -> target id
        self.inv_freq = nnx.Variable(jnp.asarray(cfg.rope_inv_freq(), jnp.float32))  # derived, not saved

    def project(self, aux):
        """Concatenated target features [B, T, n_aux * Dt] -> draft hidden [B, T, D]."""
        return jnp.einsum("btf,fd->btd", aux.astype(self.dtype), self.fc[...])  # [B, T, F] x [F, D]

    def qkv(self, tokens, hidden, embed, positions):
        """Attention inputs of one draft layer pass: tokens [B, T] (target ids), hidden [B, T, D] (the projected
        target feature or the draft's previous output), embed: the target's table [V, D], or its lookup
        (`Llama4.embed_tokens`, vocabulary-parallel over a mesh). Returns q [B, T, H, Dh], k, v [B, T, K, Dh]
        (RoPE applied at `positions` [B, T])."""
        e = (embed(tokens) if callable(embed) else embed[tokens]).astype(self.dtype)  # [B, T, D]
        x = jnp.concatenate([self.input_norm(e), self.hidden_norm(hidden.astype(self.dtype))], axis=-1)  # [B, T, 2D]
        q = jnp.einsum("btc,chd->bthd", x, self.wq[...])  # [B, T, 2D] x [2D, H, Dh] -> [B, T, H, Dh]
        k = jnp.einsum("btc,ckd->btkd", x, self.wk[...])  # [B, T, 2D] x [2D, K, Dh] -> [B, T, K, Dh]
        v = jnp.einsum("btc,ckd->btkd", x, self.wv[...])  # [B, T, 2D] x [2D, K, Dh] -> [B, T, K, Dh]
        cos, sin = rope_tables(self.inv_freq[...], positions)
        return apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin), v

    def finish(self, hidden, o):
        """Residual (the input feature) + attention output o [B, T, H, Dh], then the MLP. Returns the layer
        output [B, T, D] (fed to the next draft step) and draft logits [B, T, Vd] (float32)."""
        h = hidden.astype(self.dtype) + jnp.einsum("bthd,hdc->btc", o, self.wo[...])  # [B, T, H, Dh] x [H, Dh, D]
        h = h + self.mlp(self.post_norm(h))
        return h, self.logits(h)

    def logits(self, h):
        return jnp.einsum("btd,dv->btv", self.norm(h), self.lm_head[...],
                          preferred_element_type=jnp.float32)  # [B, T, D] x [D, Vd] -> [B, T, Vd]

    def __call__(self, tokens, hidden, embed, positions, cache: KVCache, write_index, attn_mask=None,
                 kernels: str = "xla"):
        """One draft pass through its KV cache (one layer): writes this call's keys at slots `write_index` [B]
        onward; `attn_mask` [B, T, S] is ANDed into the position mask (tree drafting). `kernels`: the target's;
        "pallas" runs a prefill-sized attention (more than PALLAS_MAX_ROWS query rows a kv head, no attn_mask)
        as the target's does, the blockwise kernel. Returns (output hidden [B, T, D], logits [B, T, Vd], cache)."""
        q, k, v = self.qkv(tokens, hidden, embed, positions)
        ck, cv = write_slots(cache.k[0], k, write_index), write_slots(cache.v[0], v, write_index)
        pos = write_slots(cache.pos, positions, write_index)
        prefill_sized = q.shape[1] * (q.shape[2] // k.shape[2]) > PALLAS_MAX_ROWS  # query rows a kv head
        o = attend_by_position(q, ck.astype(q.dtype), cv.astype(q.dtype), positions, pos, None,
                               self.cfg.head_dim ** -0.5, attn_mask,
                               kernels if prefill_sized else "xla")  # [B, T, H, Dh]
        h, logits = self.finish(hidden, o)
        return h, logits, KVCache(k=[ck], v=[cv], pos=pos)

    def cache(self, batch: int, length: int, dtype=None) -> KVCache:
        c = self.cfg
        shape = (batch, length, c.num_key_value_heads, c.head_dim)
        dt = dtype or self.dtype
        return KVCache(k=[jnp.zeros(shape, dt)], v=[jnp.zeros(shape, dt)], pos=jnp.full((batch, length), -1, jnp.int32))

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(self, nnx.Param)))


# ---- checkpoint ------------------------------------------------------------------------------------------
def _saved_state(model):
    return nnx.to_flat_state(nnx.state(model, (nnx.Param, Buffer)))


def _dotted(path) -> str:
    return ".".join(str(k) for k in path)


def param_specs(cfg: Eagle3Config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """name -> (shape, fixed dtype or None). d2t is int32 whatever the checkpoint's float dtype."""
    model = nnx.eval_shape(lambda: Eagle3Draft(cfg, dtype=jnp.bfloat16))
    out = {}
    for path, var in _saved_state(model):
        v = var.get_value()
        out[_dotted(path)] = (tuple(v.shape), v.dtype if isinstance(var, Buffer) else None)
    return out


class DraftWriter:
    """Writes a draft checkpoint array by array; re-opening an unfinished one of the same config resumes it
    (a finished one is left alone: `complete`). Same layout and guarantees as mavjax.checkpoint."""

    def __init__(self, out_dir, cfg: Eagle3Config, dtype, *, overwrite: bool = False):
        from mavjax.atomic_write import write_json
        from mavjax.checkpoint import CheckpointError

        self.dir, self.cfg, self.dtype = Path(out_dir), cfg, jnp.dtype(dtype)
        self.specs = param_specs(cfg)
        self._params, self._partial = self.dir / "params", self.dir / "params" / ".partial"
        pending = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": self.dtype.name,
                   "config": cfg.to_dict()}
        found = None
        if self.dir.exists() and any(self.dir.iterdir()):
            if (self.dir / MANIFEST).is_file():
                m = json.loads((self.dir / MANIFEST).read_text())
                found = {"format": m.get("format"), "dtype": m.get("dtype"),
                         "config": json.loads((self.dir / "config.json").read_text()), "complete": True}
            elif (self.dir / PENDING).is_file():
                found = {**json.loads((self.dir / PENDING).read_text()), "complete": False}
            else:
                raise CheckpointError(f"{self.dir} is not empty and holds no mavjax draft checkpoint; choose a new "
                                      f"or empty directory")
        if found is not None and overwrite:
            (self.dir / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(self._params, ignore_errors=True)
            found = None
        if found is not None and (found.get("format") != FORMAT or found["dtype"] != self.dtype.name
                                  or found["config"] != cfg.to_dict()):
            raise CheckpointError(f"{self.dir} holds another checkpoint (format, dtype or config differ); pass "
                                  f"overwrite=True (--overwrite) to replace it, or write elsewhere")
        self.complete = bool(found and found["complete"])
        if not self.complete:
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / PENDING, pending)

    def has(self, name: str) -> bool:
        return (self._params / name).is_dir()

    def write(self, name: str, value) -> None:
        from mavjax.checkpoint import CheckpointError, save_array

        if name not in self.specs:
            raise CheckpointError(f"{name!r} is not an array of this draft config")
        shape, fixed = self.specs[name]
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{name}: got shape {tuple(value.shape)}, the draft config needs {shape}")
        save_array(self.dir, name, np.asarray(value).astype(fixed or self.dtype))

    def finalize(self, extra_files: dict[str, str] | None = None) -> None:
        from mavjax.atomic_write import write_json
        from mavjax.checkpoint import CheckpointError, seal

        missing = [n for n in self.specs if not self.has(n)]
        if missing:
            raise CheckpointError(f"cannot finalize {self.dir}: {len(missing)} array(s) not written, e.g. {missing[0]!r}")
        write_json(self.dir / "config.json", self.cfg.to_dict())
        for name, text in (extra_files or {}).items():
            (self.dir / name).write_text(text)
        arrays = {n: {"shape": list(s), "dtype": jnp.dtype(f or self.dtype).name} for n, (s, f) in self.specs.items()}
        seal(self.dir, {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": self.dtype.name,
                        "params": arrays})
        self.complete = True


def save_draft(model: Eagle3Draft, out_dir) -> None:
    """Write an in-memory draft in `model.dtype`, replacing a draft checkpoint already in `out_dir`."""
    w = DraftWriter(out_dir, model.cfg, model.dtype, overwrite=True)
    for path, var in _saved_state(model):
        w.write(_dotted(path), np.asarray(var.get_value()))
    w.finalize()


def is_draft_dir(path) -> bool:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT


def load_draft(path, *, dtype=None) -> tuple[Eagle3Config, Eagle3Draft]:
    """(config, draft) from a draft checkpoint directory; `dtype=None` keeps the stored float dtype."""
    import orbax.checkpoint as ocp

    from mavjax.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no draft checkpoint directory at {path}")
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"incomplete draft checkpoint {path}: no {MANIFEST} (conversion or training "
                              f"interrupted? re-run it to resume)")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a mavjax EAGLE-3 draft checkpoint (format {manifest.get('format')!r})")
    cfg = Eagle3Config.from_dict(json.loads((path / "config.json").read_text()))
    dtype = jnp.dtype(manifest["dtype"] if dtype is None else dtype)
    model = nnx.eval_shape(lambda: Eagle3Draft(cfg, dtype=dtype))
    stored = manifest["params"]
    arrays = {_dotted(p): v for p, v in _saved_state(model)}
    for name, var in arrays.items():
        if name not in stored:
            raise CheckpointError(f"{path}: array {name!r} is missing from the draft checkpoint")
        if tuple(stored[name]["shape"]) != var.get_value().shape:
            raise CheckpointError(f"{path}: {name!r} has shape {tuple(stored[name]['shape'])}, the config needs "
                                  f"{var.get_value().shape}")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        for name, var in arrays.items():
            v = var.get_value()
            want = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
            var.set_value(ckptr.restore((path / "params" / name).absolute(), {"value": want})["value"])
    model.inv_freq.set_value(jnp.asarray(cfg.rope_inv_freq(), jnp.float32))
    d2t = np.asarray(model.d2t.get_value())
    if d2t.min() < 0 or d2t.max() >= cfg.vocab_size or len(np.unique(d2t)) != len(d2t):
        raise CheckpointError(f"{path}: d2t must map draft ids to distinct target ids in 0..{cfg.vocab_size - 1}")
    return cfg, model
