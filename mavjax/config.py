"""Llama 4 text-decoder configuration: one frozen dataclass, Hugging Face `config.json` in, named presets.

Field names and defaults are those of transformers' `Llama4TextConfig`, so a Hugging Face config maps onto
this class key for key. Derived per-layer facts (which layers are MoE, which use RoPE) are resolved once in
`__post_init__`, as transformers does, so the model code never re-derives them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that is unknown, incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Llama4Config:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # per routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # dense (non-MoE) layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: tuple[int, ...] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    rope_theta: float = 500000.0
    # None, or a llama3-style scaling: (("factor", 16.0), ("low_freq_factor", 1.0), ...), kept as sorted pairs
    # so the dataclass stays hashable (it is a static argument of jitted functions).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    no_rope_layers: tuple[int, ...] | None = None  # 1 = this layer uses RoPE, 0 = NoPE (transformers' convention)
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: tuple[str, ...] | None = None  # "chunked_attention" | "full_attention"
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        L = self.num_hidden_layers
        if self.no_rope_layers is None or len(self.no_rope_layers) == 0:
            set_("no_rope_layers", tuple(int((i + 1) % self.no_rope_layer_interval != 0) for i in range(L)))
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            set_("moe_layers", tuple(range(step - 1, L, step)) if step > 0 else ())
        if self.layer_types is None:
            set_("layer_types", tuple("chunked_attention" if r else "full_attention" for r in self.no_rope_layers))
        if isinstance(self.eos_token_id, int):
            set_("eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is None:
            set_("eos_token_id", ())
        set_("eos_token_id", tuple(int(t) for t in self.eos_token_id))
        set_("no_rope_layers", tuple(int(r) for r in self.no_rope_layers))
        set_("moe_layers", tuple(int(m) for m in self.moe_layers))
        set_("layer_types", tuple(self.layer_types))
        set_("attn_temperature_tuning", bool(self.attn_temperature_tuning))  # the hub's Scout config says 4
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        self._validate()

    def _validate(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        L = self.num_hidden_layers
        for name in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                     "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (Llama 4 uses 'silu')")
        need(1 <= self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_local_experts "
             f"({self.num_local_experts})")
        need(len(self.no_rope_layers) >= L,
             f"no_rope_layers has {len(self.no_rope_layers)} entries, fewer than num_hidden_layers ({L})")
        need(all(r in (0, 1) for r in self.no_rope_layers), "no_rope_layers entries must be 0 or 1")
        need(len(self.layer_types) >= L,
             f"layer_types has {len(self.layer_types)} entries, fewer than num_hidden_layers ({L})")
        bad = [t for t in self.layer_types if t not in ("chunked_attention", "full_attention")]
        need(not bad, f"layer_types has unknown entries {bad}; expected 'chunked_attention' or 'full_attention'")
        need(all(0 <= m < L for m in self.moe_layers), f"moe_layers {list(self.moe_layers)} must lie in 0..{L - 1}")
        need(len(set(self.moe_layers)) == len(self.moe_layers), "moe_layers has duplicate entries")
        if "chunked_attention" in self.layer_types[:L]:
            need(isinstance(self.attention_chunk_size, int) and self.attention_chunk_size > 0,
                 f"attention_chunk_size must be a positive integer when a layer is chunked, "
                 f"got {self.attention_chunk_size!r}")
        need(self.floor_scale > 0, f"floor_scale must be positive, got {self.floor_scale}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(not self.attention_bias, "attention_bias=True is not supported (no Llama 4 checkpoint uses it)")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            kind = rs.get("rope_type", rs.get("type"))
            need(kind in ("llama3", "default"), f"rope_scaling type {kind!r} is not supported (llama3 or default)")
            if kind == "llama3":
                missing = {"factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings"} - set(rs)
                need(not missing, f"llama3 rope_scaling is missing {sorted(missing)}")
                need(rs["high_freq_factor"] > rs["low_freq_factor"] or rs["high_freq_factor"] == rs["low_freq_factor"],
                     "rope_scaling high_freq_factor must be >= low_freq_factor")

    # ---- per-layer facts -------------------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    def uses_rope(self, i: int) -> bool:
        return bool(self.no_rope_layers[i])

    def is_chunked(self, i: int) -> bool:
        return self.layer_types[i] == "chunked_attention"

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- parameter counts ------------------------------------------------------------------------------------
    def param_counts(self) -> tuple[int, int]:
        """(total, active per token). Active counts the embedding row gather as the full table, as Meta's
        '17B active' figure does, the shared expert, and `num_experts_per_tok` routed experts."""
        D, V, hd = self.hidden_size, self.vocab_size, self.head_dim
        H, KV = self.num_attention_heads, self.num_key_value_heads
        attn = D * H * hd + 2 * D * KV * hd + H * hd * D
        norms = 2 * D
        embed = V * D + (0 if self.tie_word_embeddings else D * V)
        total = active = embed + D
        for i in range(self.num_hidden_layers):
            total += attn + norms
            active += attn + norms
            if self.is_moe_layer(i):
                expert = 3 * D * self.intermediate_size
                router = D * self.num_local_experts
                total += router + expert * (self.num_local_experts + 1)
                active += router + expert * (self.num_experts_per_tok + 1)
            else:
                mlp = 3 * D * self.intermediate_size_mlp
                total += mlp
                active += mlp
        return total, active

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Llama4Config":
        """From a Hugging Face config dict: a `llama4_text` config, or a `llama4` (multimodal) config whose
        `text_config` holds the decoder. Generic `PretrainedConfig` bookkeeping keys are ignored; any other
        unknown key is an error, so a config of another architecture is never silently misread."""
        d = dict(d)
        if "text_config" in d:
            outer = d
            d = dict(outer["text_config"] or {})
            if "tie_word_embeddings" in outer and "tie_word_embeddings" not in d:
                d["tie_word_embeddings"] = outer["tie_word_embeddings"]
        model_type = d.get("model_type")
        if model_type not in (None, "llama4_text", "llama4"):
            raise ConfigError(f"model_type {model_type!r} is not a Llama 4 text model (expected 'llama4_text')")
        # transformers >= 5 writes rope settings as `rope_parameters`; older configs as rope_theta/rope_scaling.
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                d.setdefault("rope_scaling", rp)
        if d.get("rope_scaling"):
            rs = dict(d["rope_scaling"])
            if rs.get("rope_type", rs.get("type")) == "default":
                d["rope_scaling"] = None
        else:
            d["rope_scaling"] = None
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for k, v in d.items():
            if k in fields:
                kwargs[k] = tuple(v) if isinstance(v, list) else v
            elif k.startswith("_") or k in _HF_GENERIC_KEYS:
                continue
            else:
                unknown.append(k)
        if unknown:
            raise ConfigError(f"unknown Llama 4 config field(s): {sorted(unknown)}")
        if isinstance(kwargs.get("rope_scaling"), dict):
            kwargs["rope_scaling"] = tuple(sorted(kwargs["rope_scaling"].items()))
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "Llama4Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face-style `llama4_text` config dict (lists for tuples), readable by `from_dict` and
        by transformers' `Llama4TextConfig`."""
        out: dict[str, Any] = {"model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"]}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "rope_scaling":
                v = dict(v) if v else None
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def replace(self, **kw) -> "Llama4Config":
        # Derived fields are recomputed unless given explicitly.
        base = dataclasses.asdict(self)
        for derived in ("no_rope_layers", "moe_layers", "layer_types"):
            if "num_hidden_layers" in kw or "interleave_moe_layer_step" in kw or "no_rope_layer_interval" in kw:
                base[derived] = None
        base.update(kw)
        return Llama4Config(**base)

    def rope_inv_freq(self):
        """Inverse rotary frequencies [head_dim/2], float64 numpy: default RoPE or llama3 scaling."""
        import numpy as np

        hd = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32).astype(np.float64) / hd))
        inv = inv.astype(np.float32).astype(np.float64)  # transformers computes these in float32
        if self.rope_scaling is None:
            return inv
        rs = dict(self.rope_scaling)
        if rs.get("rope_type", rs.get("type")) != "llama3":
            return inv
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wav, hi_wav = old / lo, old / hi
        wav = 2 * math.pi / inv
        scaled = np.where(wav > lo_wav, inv / factor, inv)
        smooth = (old / wav - lo) / (hi - lo) if hi != lo else np.zeros_like(wav)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wav < hi_wav) & ~(wav > lo_wav)
        return np.where(medium, smoothed, scaled)


# Keys every transformers PretrainedConfig may carry; they say nothing about the architecture.
_HF_GENERIC_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type", "name_or_path",
    "attn_implementation", "quantization_config", "for_llm_compressor", "auto_map", "base_model_tp_plan",
    "base_model_pp_plan", "num_labels", "vision_config", "boi_token_index", "eoi_token_index",
    "image_token_index", "chunk_size", "label_smoothing",
})


def _maverick() -> Llama4Config:
    # meta-llama/Llama-4-Maverick-17B-128E-Instruct, config.json text_config.
    return Llama4Config(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=1048576, rms_norm_eps=1e-5, pad_token_id=200018, bos_token_id=200000,
        eos_token_id=(200001, 200007, 200008), num_experts_per_tok=1, num_local_experts=128,
        interleave_moe_layer_step=2, use_qk_norm=False, rope_theta=500000.0, rope_scaling=None,
        no_rope_layer_interval=4, attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192,
        attn_scale=0.1,
    )


def _scout() -> Llama4Config:
    # meta-llama/Llama-4-Scout-17B-16E-Instruct, config.json text_config.
    return Llama4Config(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=10485760, rms_norm_eps=1e-5, pad_token_id=200018, bos_token_id=200000,
        eos_token_id=(200001, 200007, 200008), num_experts_per_tok=1, num_local_experts=16,
        interleave_moe_layer_step=1, use_qk_norm=True, rope_theta=500000.0,
        rope_scaling=(("factor", 16.0), ("high_freq_factor", 1.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
        no_rope_layer_interval=4, attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192,
        attn_scale=0.1,
    )


def _tiny() -> Llama4Config:
    # Test-sized: MoE and dense layers, RoPE and NoPE layers, a short chunk so chunking matters.
    return Llama4Config(
        vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=True,
        rope_theta=10000.0, no_rope_layer_interval=2, attention_chunk_size=8, floor_scale=4, attn_scale=0.1,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    )


def _default_small() -> Llama4Config:
    # The architecture of the shipped default model (checkpoints/default): see scripts/train_tiny.py.
    return Llama4Config(
        vocab_size=4096, hidden_size=256, intermediate_size=256, intermediate_size_mlp=768, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=True,
        rope_theta=10000.0, no_rope_layer_interval=3, attention_chunk_size=128, floor_scale=128, attn_scale=0.1,
        bos_token_id=1, eos_token_id=(2, 5), pad_token_id=0,  # <|end_of_text|>, <|eot|>
    )


PRESETS = {"maverick": _maverick, "scout": _scout, "tiny": _tiny, "default-small": _default_small}


def preset(name: str, **overrides) -> Llama4Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
