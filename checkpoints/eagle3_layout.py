"""Public EAGLE-3 draft checkpoints -> the mavjax draft format (`mavjax.eagle3`), streaming and resumable.

    mavjax convert --eagle3 SRC DST [--target-layers L | --target DIR] [--aux-layers 1,23,44] [--dtype ...]

Two published layouts are read (config.json + safetensors), told apart by their tensor names:
- "reference": SafeAILab/EAGLE's EAGLE-3 (`eagle/model/cnets.py`): `fc.weight`, `midlayer.{hidden_norm,
  input_layernorm, post_attention_layernorm}.weight`, `midlayer.self_attn.{q,k,v,o}_proj.weight`,
  `midlayer.mlp.{gate,up,down}_proj.weight`, `norm.weight`, `lm_head.weight`, `d2t` (int64 *offsets*:
  target id = i + d2t[i]), `t2d` (bool [vocab]). Its config is a LlamaConfig plus `draft_vocab_size`; the taps
  are not in it (the reference taps the inputs of layers 2, L/2, L-3), so the target's layer count is needed.
- "layers": the Llama-4-Maverick EAGLE-3 release (nvidia/Llama-4-Maverick-17B-128E-Eagle3, TensorRT Model
  Optimizer) and SpecForge-style exports: the same tensors with `layers.0.` for `midlayer.`, optionally under
  `model.`, `config.json` with `eagle_config.eagle_aux_hidden_state_layer_ids` (outputs of those layers) and
  `draft_vocab_size`; `d2t` may be absent when the draft vocabulary is the target's.
An `embed_tokens.weight` is skipped (EAGLE-3 shares the target's embedding). torch Linear [out, in] becomes
[in, out] with heads split out, as in checkpoints.hf_layout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from checkpoints.convert import ConversionError, _safetensors_files, read_header, read_tensor
from mavjax.eagle3 import DraftWriter, Eagle3Config, default_aux_layers

SKIPPED = ("embed_tokens.weight", "t2d")


@dataclasses.dataclass(frozen=True)
class Source:
    target: str  # mavjax draft array name
    hf_name: str | None  # None: built without a tensor (identity d2t)
    hf_shape: tuple[int, ...] | None
    build: Callable[[np.ndarray | None], np.ndarray]


def canonical(name: str) -> str:
    """Strip `model.` and map `layers.0.` to the reference's `midlayer.`."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("layers.0."):
        name = "midlayer." + name[len("layers.0."):]
    return name


def read_config(src: Path, *, target_layers: int | None = None, aux_layers=None,
                target_hidden_size: int | None = None) -> tuple[Eagle3Config, str]:
    """(draft config, layout name) from a public draft's config.json."""
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {src}")
    raw = json.loads(path.read_text())
    eagle = raw.get("eagle_config") or {}
    ids = aux_layers or eagle.get("eagle_aux_hidden_state_layer_ids") or raw.get("eagle_aux_hidden_state_layer_ids")
    layout = "layers" if eagle or "eagle_aux_hidden_state_layer_ids" in raw else "reference"
    if ids is None:
        if target_layers is None:
            raise ConversionError(f"{path} does not list the target layers it taps (the EAGLE-3 reference "
                                  f"layout): pass --target-layers L or --target DIR (or --aux-layers)")
        ids = default_aux_layers(target_layers)
    ids = tuple(int(i) for i in ids)
    if target_layers is None:
        target_layers = max(ids) + 1  # unknown: the smallest target the taps fit
    if raw.get("num_hidden_layers", 1) != 1:
        raise ConversionError(f"{path}: num_hidden_layers is {raw.get('num_hidden_layers')}; an EAGLE-3 draft has 1")
    try:
        D, H = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        V = int(raw["vocab_size"])
        cfg = Eagle3Config(
            hidden_size=D, target_hidden_size=int(target_hidden_size or raw.get("target_hidden_size") or D),
            num_attention_heads=H, num_key_value_heads=int(raw.get("num_key_value_heads") or H),
            head_dim=int(raw.get("head_dim") or D // H), intermediate_size=int(raw["intermediate_size"]),
            vocab_size=V, draft_vocab_size=int(raw.get("draft_vocab_size") or V), aux_layers=ids,
            target_num_layers=int(target_layers), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(raw.get("rope_scaling")),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)))
    except KeyError as e:
        raise ConversionError(f"{path} lacks {e.args[0]!r}") from None
    return cfg, layout


def _rope_scaling(rs):
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return None
    return rs


def sources(cfg: Eagle3Config, present: set[str]) -> list[Source]:
    """The plan: one Source per draft array, from canonical tensor names."""
    D, H, K, Dh, F = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
        cfg.intermediate_size
    Vd, n_in = cfg.draft_vocab_size, len(cfg.aux_layers) * cfg.target_hidden_size

    def linear(target, name, in_shape, out_shape):
        hf = (int(np.prod(out_shape)), int(np.prod(in_shape)))
        return Source(target, name, hf, lambda w: np.ascontiguousarray(w.T).reshape(*in_shape, *out_shape))

    same = lambda t, n, shape: Source(t, n, shape, lambda w: w)  # noqa: E731
    m = "midlayer."
    plan = [linear("fc", "fc.weight", (n_in,), (D,)),
            same("hidden_norm.scale", m + "hidden_norm.weight", (D,)),
            same("input_norm.scale", m + "input_layernorm.weight", (D,)),
            same("post_norm.scale", m + "post_attention_layernorm.weight", (D,)),
            linear("wq", m + "self_attn.q_proj.weight", (2 * D,), (H, Dh)),
            linear("wk", m + "self_attn.k_proj.weight", (2 * D,), (K, Dh)),
            linear("wv", m + "self_attn.v_proj.weight", (2 * D,), (K, Dh)),
            linear("wo", m + "self_attn.o_proj.weight", (H, Dh), (D,)),
            linear("mlp.w_gate", m + "mlp.gate_proj.weight", (D,), (F,)),
            linear("mlp.w_up", m + "mlp.up_proj.weight", (D,), (F,)),
            linear("mlp.w_down", m + "mlp.down_proj.weight", (F,), (D,)),
            same("norm.scale", "norm.weight", (D,)),
            linear("lm_head", "lm_head.weight", (D,), (Vd,))]
    if "d2t" in present:  # offsets -> absolute target ids
        plan.append(Source("d2t", "d2t", (Vd,), lambda o: (np.arange(Vd) + o.astype(np.int64)).astype(np.int32)))
    elif Vd == cfg.vocab_size:
        plan.append(Source("d2t", None, None, lambda _: np.arange(Vd, dtype=np.int32)))
    else:
        raise ConversionError(f"the draft vocabulary ({Vd}) is smaller than the target's ({cfg.vocab_size}) but "
                              f"the checkpoint has no d2t map")
    return plan


def convert_eagle3(src, dst, *, dtype: str = "bfloat16", target_layers: int | None = None, aux_layers=None,
                   target_dir=None, overwrite: bool = False, progress: bool = True) -> int:
    """Convert a public EAGLE-3 draft (see module doc) to a mavjax draft checkpoint; returns the number of
    arrays written by this run (0 when `dst` already holds this conversion). Re-running an interrupted
    conversion resumes it."""
    src, dst = Path(src), Path(dst)
    target_hidden = None
    if target_dir is not None:
        from mavjax.config import Llama4Config

        tcfg = Llama4Config.from_json(Path(target_dir))
        target_layers, target_hidden = tcfg.num_hidden_layers, tcfg.hidden_size
    cfg, layout = read_config(src, target_layers=target_layers, aux_layers=aux_layers,
                              target_hidden_size=target_hidden)
    tensors = {}
    for f in _safetensors_files(src):
        for e in read_header(f).values():
            name = canonical(e.name)
            if name in tensors:
                raise ConversionError(f"tensor {e.name!r} is stored twice in {src}")
            tensors[name] = e
    if layout == "reference" and not any(n.startswith("midlayer.") for n in tensors):
        raise ConversionError(f"{src}: no midlayer./layers.0. tensors: not an EAGLE-3 draft checkpoint")
    plan = sources(cfg, set(tensors))
    expected = {s.hf_name: s.hf_shape for s in plan if s.hf_name is not None}
    for name, shape in expected.items():
        if name not in tensors:
            raise ConversionError(f"missing tensor {name!r} in {src} (an EAGLE-3 draft of this config needs it)")
        if tuple(tensors[name].shape) != shape:
            raise ConversionError(f"tensor {tensors[name].name!r} has shape {tuple(tensors[name].shape)}, expected "
                                  f"{shape} from config.json")
    unexpected = sorted(set(tensors) - set(expected) - set(SKIPPED))
    if unexpected:
        raise ConversionError(f"unexpected tensor {tensors[unexpected[0]].name!r} in {src}: not part of an EAGLE-3 "
                              f"draft")
    if "t2d" in tensors:  # the reference's inverse map must agree with d2t
        t2d = read_tensor(tensors["t2d"]).astype(bool)
        d2t = next(s for s in plan if s.target == "d2t")
        ids = d2t.build(None if d2t.hf_name is None else read_tensor(tensors[d2t.hf_name]))
        if t2d.shape != (cfg.vocab_size,) or set(np.nonzero(t2d)[0].tolist()) != set(ids.tolist()):
            raise ConversionError(f"{src}: t2d does not mark exactly the target ids that d2t maps to")
    writer = DraftWriter(dst, cfg, dtype, overwrite=overwrite)
    if writer.complete:
        if progress:
            print(f"{dst} already holds this conversion; pass --overwrite to convert again")
        return 0
    todo = [s for s in plan if not writer.has(s.target)]
    for s in tqdm(todo, desc="convert eagle3", unit="array", disable=not progress):
        value = s.build(None if s.hf_name is None else read_tensor(tensors[s.hf_name]))
        writer.write(s.target, np.asarray(value, np.float32) if s.target != "d2t" else value)
    writer.finalize({"eagle3_source.json": json.dumps({"source": str(src), "layout": layout}, indent=2)})
    if progress:
        print(f"wrote {len(todo)} arrays to {dst} ({layout} layout; taps {list(cfg.aux_layers)})")
    return len(todo)
