"""Public EAGLE-3 draft checkpoints (the SafeAILab reference layout, and the Llama-4-Maverick release's
`layers.0.` layout) convert to the mavjax draft format, load, and compute what the reference forward computes
(a numpy reimplementation of the reference draft layer is the oracle). Conversion resumes when interrupted."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from checkpoints.convert import ConversionError
from checkpoints.eagle3_layout import convert_eagle3
from mavjax.cli import main as cli_main
from mavjax.eagle3 import DraftWriter, load_draft

D, H, K, DH, F, V, VD, L = 32, 4, 2, 8, 48, 64, 40, 8


def _config(layout):
    c = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": D,
         "num_attention_heads": H, "num_key_value_heads": K, "head_dim": DH, "intermediate_size": F,
         "num_hidden_layers": 1, "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "max_position_embeddings": 256, "hidden_act": "silu", "torch_dtype": "float32"}
    if layout == "layers":  # the Maverick release: taps listed, draft vocabulary = the target's
        c["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [0, 4, 6], "use_aux_hidden_state": True}
        c["draft_vocab_size"] = V
    else:
        c["draft_vocab_size"] = VD
    return c


def _tensors(layout, rng):
    vd = V if layout == "layers" else VD
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    m = "midlayer." if layout == "reference" else "model.layers.0."
    top = "" if layout == "reference" else "model."
    t = {top + "fc.weight": r(D, 3 * D), m + "hidden_norm.weight": 1 + r(D), m + "input_layernorm.weight": 1 + r(D),
         m + "post_attention_layernorm.weight": 1 + r(D), m + "self_attn.q_proj.weight": r(H * DH, 2 * D),
         m + "self_attn.k_proj.weight": r(K * DH, 2 * D), m + "self_attn.v_proj.weight": r(K * DH, 2 * D),
         m + "self_attn.o_proj.weight": r(D, H * DH), m + "mlp.gate_proj.weight": r(F, D),
         m + "mlp.up_proj.weight": r(F, D), m + "mlp.down_proj.weight": r(D, F), top + "norm.weight": 1 + r(D),
         "lm_head.weight": r(vd, D), top + "embed_tokens.weight": r(V, D)}
    if layout == "reference":
        ids = np.sort(rng.choice(V, VD, replace=False))
        t["d2t"] = (ids - np.arange(VD)).astype(np.int64)  # offsets, as the reference stores them
        t2d = np.zeros(V, bool)
        t2d[ids] = True
        t["t2d"] = t2d
    return t


def _rms(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def reference_forward(t, layout, aux, emb, tokens):
    """The reference draft layer (cnets.py's EAGLE-3 Model + LlamaDecoderLayeremb), one sequence, numpy."""
    g = lambda n: t[("midlayer." if layout == "reference" else "model.layers.0.") + n]  # noqa: E731
    top = "" if layout == "reference" else "model."
    T = tokens.shape[0]
    h = aux @ t[top + "fc.weight"].T  # [T, D]
    x = np.concatenate([_rms(emb[tokens], g("input_layernorm.weight")), _rms(h, g("hidden_norm.weight"))], -1)
    q = (x @ g("self_attn.q_proj.weight").T).reshape(T, H, DH)
    k = (x @ g("self_attn.k_proj.weight").T).reshape(T, K, DH)
    v = (x @ g("self_attn.v_proj.weight").T).reshape(T, K, DH)
    inv = 1.0 / 10000.0 ** (np.arange(0, DH, 2) / DH)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = lambda y: np.concatenate([-y[..., DH // 2:], y[..., :DH // 2]], -1)  # noqa: E731 rotate_half
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(DH) + np.where(np.tril(np.ones((T, T))) > 0, 0, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", p, v).reshape(T, H * DH) @ g("self_attn.o_proj.weight").T
    h = h + o
    y = _rms(h, g("post_attention_layernorm.weight"))
    gate, up = y @ g("mlp.gate_proj.weight").T, y @ g("mlp.up_proj.weight").T
    h = h + (gate / (1 + np.exp(-gate)) * up) @ g("mlp.down_proj.weight").T
    return h, _rms(h, t[top + "norm.weight"]) @ t["lm_head.weight"].T


@pytest.mark.parametrize("layout", ["reference", "layers"])
def test_converted_public_draft_computes_the_reference_forward(tmp_path, layout):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    t = _tensors(layout, rng)
    save_file(t, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(_config(layout)))
    dst = tmp_path / "dst"
    argv = ["convert", "--eagle3", str(src), str(dst), "--dtype", "float32", "--quiet"]
    assert cli_main(argv + (["--target-layers", str(L)] if layout == "reference" else [])) == 0
    cfg, draft = load_draft(dst)
    assert cfg.aux_layers == ((0, 4, 6) if layout == "layers" else (1, 3, 4))  # reference: outputs of 1, L/2-1, L-4
    vd = V if layout == "layers" else VD
    d2t = np.asarray(draft.d2t.get_value())
    expect_ids = np.arange(V) if layout == "layers" else np.nonzero(t["t2d"])[0]
    assert cfg.draft_vocab_size == vd and np.array_equal(d2t, expect_ids)
    T = 9
    aux = rng.standard_normal((T, 3 * D)).astype(np.float32)
    emb = rng.standard_normal((V, D)).astype(np.float32)  # the target's embedding (EAGLE-3 shares it)
    tokens = rng.integers(0, V, T)
    h_ref, logits_ref = reference_forward(t, layout, aux, emb, tokens)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    h, logits, _ = draft(jnp.asarray(tokens)[None], draft.project(jnp.asarray(aux)[None]), jnp.asarray(emb), pos,
                         draft.cache(1, 16), jnp.zeros((1,), jnp.int32))
    np.testing.assert_allclose(np.asarray(h[0]), h_ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(logits[0]), logits_ref, rtol=2e-4, atol=2e-4)


def test_conversion_resumes_and_rejects_bad_input(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    t = _tensors("reference", rng)
    save_file(t, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(_config("reference")))
    with pytest.raises(ConversionError, match="--target-layers"):
        convert_eagle3(src, tmp_path / "x", progress=False)
    real, calls = DraftWriter.write, {"n": 0}

    def flaky(self, name, value):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real(self, name, value)

    monkeypatch.setattr(DraftWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_eagle3(src, tmp_path / "d", target_layers=L, progress=False)
    monkeypatch.setattr(DraftWriter, "write", real)
    with pytest.raises(Exception, match="no mavjax_manifest"):
        load_draft(tmp_path / "d")
    assert convert_eagle3(src, tmp_path / "d", target_layers=L, progress=False) == 14 - 3  # the rest only
    load_draft(tmp_path / "d")
    assert convert_eagle3(src, tmp_path / "d", target_layers=L, progress=False) == 0
    bad = dict(t)
    bad["midlayer.mlp.up_proj.weight"] = bad["midlayer.mlp.up_proj.weight"][:, :-1].copy()
    save_file(bad, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="up_proj.weight.*shape"):
        convert_eagle3(src, tmp_path / "e", target_layers=L, progress=False)
    bad = dict(t)
    bad["midlayer.extra.weight"] = np.zeros(3, np.float32)
    save_file(bad, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="unexpected tensor 'midlayer.extra.weight'"):
        convert_eagle3(src, tmp_path / "f", target_layers=L, progress=False)
