"""Where each mavjax parameter comes from in a Hugging Face Llama 4 checkpoint, and how it is reshaped.

One `Source` per mavjax parameter: the HF tensor names it reads and a function from those tensors (numpy,
in HF layout) to the mavjax layout. Quirks of the checkpoint formats are handled here, at load time:
- torch `nn.Linear` weights are [out, in]; mavjax keeps [in, out] (heads split out for attention);
- the bf16 release fuses routed experts as `experts.gate_up_proj` [E, D, 2F] (gate first) and
  `experts.down_proj` [E, F, D]; other exports (and the FP8 release) store one Linear per expert
  (`experts.{e}.gate_proj.weight` [F, D], ...). Both are accepted;
- the multimodal `Llama4ForConditionalGeneration` wraps the decoder in `language_model.`; vision tensors
  (`vision_model.`, `multi_modal_projector.`) are not part of the text model and are skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from mavjax.config import Llama4Config

TEXT_PREFIXES = ("language_model.", "model.language_model.")  # transformers <5 / >=5 multimodal wrappers
SKIPPED_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")


@dataclasses.dataclass(frozen=True)
class Source:
    target: str  # mavjax parameter path, dot-separated ("layers.3.attn.wq")
    hf_names: tuple[str, ...]  # HF tensors read, in the order `build` takes them
    hf_shapes: tuple[tuple[int, ...], ...]  # the shape each of them must have
    shape: tuple[int, ...]  # mavjax shape
    build: Callable[..., np.ndarray]  # (*hf arrays) -> mavjax array


def _same(target, name, shape):
    return Source(target, (name,), (shape,), shape, lambda w: w)


def _linear(target, name, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    """torch Linear weight [out, in] -> [*in_shape, *out_shape]."""
    hf = (int(np.prod(out_shape)), int(np.prod(in_shape)))
    return Source(target, (name,), (hf,), (*in_shape, *out_shape),
                  lambda w: np.ascontiguousarray(w.T).reshape(*in_shape, *out_shape))


def redundant_names(cfg: Llama4Config) -> set[str]:
    """Tensors a checkpoint may carry that the model does not read: with tied embeddings some exports still
    save the LM head, which is then a copy of the embedding."""
    return {"lm_head.weight"} if cfg.tie_word_embeddings else set()


def canonical_name(hf_name: str) -> str | None:
    """Strip the multimodal wrapper's prefix; None for tensors that are not part of the text decoder."""
    if hf_name.startswith(SKIPPED_PREFIXES):
        return None
    for p in TEXT_PREFIXES:
        if hf_name.startswith(p):
            rest = hf_name[len(p):]
            # transformers >=5 multimodal: model.language_model.layers... (no inner "model.")
            return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    return hf_name


def sources(cfg: Llama4Config, hf_names: set[str]) -> list[Source]:
    """The plan for this config. `hf_names` (canonical names present in the checkpoint) decides between the
    fused and per-expert expert layouts."""
    D, V, H, K, Dh = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, \
        cfg.head_dim
    E, F, Fm = cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
    out = [_same("embed", "model.embed_tokens.weight", (V, D)), _same("norm.scale", "model.norm.weight", (D,))]
    if not cfg.tie_word_embeddings:
        out.append(_linear("lm_head", "lm_head.weight", (D,), (V,)))
    for i in range(cfg.num_hidden_layers):
        p, t = f"model.layers.{i}.", f"layers.{i}."
        out += [
            _same(t + "attn_norm.scale", p + "input_layernorm.weight", (D,)),
            _same(t + "ffn_norm.scale", p + "post_attention_layernorm.weight", (D,)),
            _linear(t + "attn.wq", p + "self_attn.q_proj.weight", (D,), (H, Dh)),
            _linear(t + "attn.wk", p + "self_attn.k_proj.weight", (D,), (K, Dh)),
            _linear(t + "attn.wv", p + "self_attn.v_proj.weight", (D,), (K, Dh)),
            _linear(t + "attn.wo", p + "self_attn.o_proj.weight", (H, Dh), (D,)),
        ]
        f = p + "feed_forward."
        if not cfg.is_moe_layer(i):
            out += [_linear(t + "ffn.w_gate", f + "gate_proj.weight", (D,), (Fm,)),
                    _linear(t + "ffn.w_up", f + "up_proj.weight", (D,), (Fm,)),
                    _linear(t + "ffn.w_down", f + "down_proj.weight", (Fm,), (D,))]
            continue
        out += [_linear(t + "ffn.router", f + "router.weight", (D,), (E,)),
                _linear(t + "ffn.shared.w_gate", f + "shared_expert.gate_proj.weight", (D,), (F,)),
                _linear(t + "ffn.shared.w_up", f + "shared_expert.up_proj.weight", (D,), (F,)),
                _linear(t + "ffn.shared.w_down", f + "shared_expert.down_proj.weight", (F,), (D,))]
        if f + "experts.gate_up_proj" in hf_names or f + "experts.down_proj" in hf_names:
            gu, dn = f + "experts.gate_up_proj", f + "experts.down_proj"
            out += [Source(t + "ffn.w_gate", (gu,), ((E, D, 2 * F),), (E, D, F), lambda w: w[..., :F]),
                    Source(t + "ffn.w_up", (gu,), ((E, D, 2 * F),), (E, D, F), lambda w: w[..., F:]),
                    Source(t + "ffn.w_down", (dn,), ((E, F, D),), (E, F, D), lambda w: w)]
        else:  # one Linear per expert
            stack = lambda *ws: np.stack([np.ascontiguousarray(w.T) for w in ws])  # noqa: E731
            for ours, theirs, shape, hf in (("w_gate", "gate_proj", (E, D, F), (F, D)),
                                            ("w_up", "up_proj", (E, D, F), (F, D)),
                                            ("w_down", "down_proj", (E, F, D), (D, F))):
                names = tuple(f"{f}experts.{e}.{theirs}.weight" for e in range(E))
                out.append(Source(t + "ffn." + ours, names, (hf,) * E, shape, stack))
    return out
