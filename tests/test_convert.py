"""Hugging Face -> mavjax checkpoint conversion (checkpoints/convert.py) and the mavjax checkpoint format
(mavjax/checkpoint.py): round trips for every HF layout, bounded memory, resume, and errors that name the
tensor at fault."""

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from safetensors.torch import save_file as torch_save_file
from transformers import Llama4ForCausalLM, Llama4TextConfig

from checkpoints import convert as conv
from checkpoints.hf_layout import sources
from mavjax.checkpoint import MANIFEST, CheckpointError, CheckpointWriter, load_model, save_model
from mavjax.config import ConfigError, Llama4Config

# 4 layers: dense and MoE (layers 1, 3), RoPE and NoPE layers.
HF_CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=3,
              interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=8)


@pytest.fixture(scope="module")
def hf_model():
    """A random transformers Llama 4 text model: (model, its config.json dict, {name: float32 numpy})."""
    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(**HF_CFG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # norms included, so that no tensor is all ones
    return model, _config_json(model), {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _config_json(model):
    return json.loads(model.config.to_json_string())


def save_hf(path: Path, tensors: dict, config: dict, shards: int = 1, index: bool = False) -> Path:
    """A Hugging Face checkpoint directory: config.json and `shards` safetensors files (with an index or not)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1 and not index:
        save_file({n: np.ascontiguousarray(tensors[n]) for n in names}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: np.ascontiguousarray(tensors[n]) for n in part}, str(path / fname))
        weight_map.update({n: fname for n in part})
    if index:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def expected_params(cfg: Llama4Config, hf: dict) -> dict:
    """The mavjax parameters that hf_layout maps the (canonically named) HF tensors to."""
    return {s.target: s.build(*(hf[n] for n in s.hf_names)) for s in sources(cfg, set(hf))}


def loaded_params(path, **kw) -> dict:
    _, model = load_model(path, **kw)
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_params_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def per_expert(hf: dict) -> dict:
    """The same weights with one Linear per expert, as other exports store them."""
    out = {}
    for name, w in hf.items():
        if name.endswith("experts.gate_up_proj"):
            base, F = name[: -len("gate_up_proj")], w.shape[-1] // 2
            for e in range(w.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = w[e][:, :F].T
                out[f"{base}{e}.up_proj.weight"] = w[e][:, F:].T
        elif name.endswith("experts.down_proj"):
            for e in range(w.shape[0]):
                out[f"{name[: -len('down_proj')]}{e}.down_proj.weight"] = w[e].T
        else:
            out[name] = w
    return out


class Killed(BaseException):
    """A simulated kill: like KeyboardInterrupt, not caught by `except Exception`."""


_real_write = CheckpointWriter.write


def count_writes(monkeypatch, fail_after=None) -> list:
    """Record the targets CheckpointWriter.write is called for; be killed after `fail_after` writes."""
    calls = []

    def write(self, target, value):
        if fail_after is not None and len(calls) == fail_after:
            raise Killed()
        calls.append(target)
        _real_write(self, target, value)

    monkeypatch.setattr(CheckpointWriter, "write", write)
    return calls


# ---- round trips ---------------------------------------------------------------------------------------------

def test_round_trip_fused_experts_sharded(tmp_path, hf_model):
    model, _, hf = hf_model
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="50KB")  # transformers' own layout, sharded with an index
    assert (src / "model.safetensors.index.json").exists() and len(list(src.glob("*.safetensors"))) > 2
    (src / "tokenizer.json").write_text("{}")

    summary = conv.convert(src, tmp_path / "out", dtype="float32", progress=False)
    cfg = Llama4Config.from_json(src)
    assert summary.written == len(sources(cfg, set(hf))) and summary.already_present == 0
    got = loaded_params(tmp_path / "out")
    assert_params_equal(got, expected_params(cfg, hf))
    # Independent of hf_layout: the transpose/head split of attention and the split of the fused experts.
    np.testing.assert_array_equal(got["layers.0.attn.wq"],
                                  hf["model.layers.0.self_attn.q_proj.weight"].T.reshape(32, 4, 8))
    gate_up = hf["model.layers.1.feed_forward.experts.gate_up_proj"]
    np.testing.assert_array_equal(got["layers.1.ffn.w_gate"], gate_up[..., :16])
    np.testing.assert_array_equal(got["layers.1.ffn.w_up"], gate_up[..., 16:])

    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert Llama4Config.from_json(out) == cfg
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dtype"] == "float32"
    assert manifest["params"]["layers.1.ffn.w_down"] == {"shape": [3, 16, 32], "dtype": "float32"}
    _, m = load_model(out)
    np.testing.assert_allclose(np.asarray(m.inv_freq.get_value()), cfg.rope_inv_freq(), rtol=1e-7)
    assert m.layers[1].ffn.w_gate.logical_axes == ("expert", "embed", "expert_mlp")


def test_round_trip_per_expert_layout(tmp_path, hf_model):
    _, config, hf = hf_model
    src = save_hf(tmp_path / "hf", per_expert(hf), config, shards=3)  # several files, no index
    conv.convert(src, tmp_path / "out", dtype="float32", progress=False)
    # Same weights, other layout: the same mavjax parameters as from the fused experts.
    assert_params_equal(loaded_params(tmp_path / "out"), expected_params(Llama4Config.from_dict(config), hf))


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_round_trip_multimodal(tmp_path, hf_model, style):
    _, config, hf = hf_model
    if style == "transformers4":  # language_model.model.layers..., language_model.lm_head.weight
        tensors = {"language_model." + k: v for k, v in hf.items()}
        vision = ["vision_model.patch_embedding.linear.weight", "multi_modal_projector.linear_1.weight"]
    else:  # model.language_model.layers..., lm_head.weight
        tensors = {(k if k.startswith("lm_head") else "model.language_model." + k[len("model."):]): v
                   for k, v in hf.items()}
        vision = ["model.vision_model.patch_embedding.linear.weight", "model.multi_modal_projector.linear_1.weight",
                  "model.vision_model.model.layers.0.mlp.fc1.weight"]
    tensors.update({n: np.ones((4, 4), np.float32) for n in vision})
    mm_config = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
                 "text_config": config, "vision_config": {"hidden_size": 4}, "image_token_index": 200092}
    src = save_hf(tmp_path / "hf", tensors, mm_config)  # a single model.safetensors

    summary = conv.convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert summary.vision_skipped == len(vision)
    assert_params_equal(loaded_params(tmp_path / "out"), expected_params(Llama4Config.from_dict(config), hf))


def test_bfloat16_source(tmp_path, hf_model):
    model, _, _ = hf_model
    bf16 = Llama4ForCausalLM(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    bf16.save_pretrained(tmp_path / "hf")
    hf = {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for k, v in bf16.state_dict().items()}
    cfg = Llama4Config.from_json(tmp_path / "hf")

    conv.convert(tmp_path / "hf", tmp_path / "out", progress=False)  # bfloat16 by default: bit exact
    want = expected_params(cfg, hf)
    got = loaded_params(tmp_path / "out")
    assert all(v.dtype == ml_dtypes.bfloat16 for v in got.values())
    assert_params_equal(got, want)
    # Cast while loading.
    assert_params_equal(loaded_params(tmp_path / "out", dtype=jnp.float32),
                        {k: v.astype(np.float32) for k, v in want.items()})


def test_read_tensor_dtypes(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    tensors = {"f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f8": x.to(torch.float8_e4m3fn),
               "f64": x.double(), "i8": (x * 10).to(torch.int8), "u8": (x * 10).abs().to(torch.uint8),
               "i64": (x * 1e6).long(), "bool": x > 0, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    torch_save_file(tensors, str(tmp_path / "t.safetensors"))
    entries = conv.read_header(tmp_path / "t.safetensors")
    assert entries["bf16"].dtype == "BF16" and entries["f8"].dtype == "F8_E4M3"
    for name, t in tensors.items():
        got = conv.read_tensor(entries[name])
        assert got.shape == tuple(t.shape), name
        want = t.float().numpy() if t.is_floating_point() else t.numpy()
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=name)


# ---- memory --------------------------------------------------------------------------------------------------

def test_peak_memory_stays_near_one_tensor(tmp_path):
    # 44 tensors of 1 MiB (float32 512 x 512) and a few small norms.
    cfg = Llama4Config(vocab_size=512, hidden_size=512, intermediate_size=512, intermediate_size_mlp=512,
                       num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                       moe_layers=(), attention_chunk_size=64)
    rng = np.random.default_rng(0)
    hf = {n: rng.standard_normal(shape, np.float32)
          for s in sources(cfg, set()) for n, shape in zip(s.hf_names, s.hf_shapes)}
    total, largest = sum(a.nbytes for a in hf.values()), max(a.nbytes for a in hf.values())
    assert len(hf) >= 40 and total >= 40 * 2**20
    src = save_hf(tmp_path / "hf", hf, cfg.to_dict(), shards=4)
    del hf

    # Tensors are read into numpy heap arrays (not memory-mapped), which tracemalloc traces; a converter that
    # loaded every tensor first would peak above `total`.
    tracemalloc.start()
    try:
        conv.convert(src, tmp_path / "out", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak {peak / 2**20:.1f} MiB of {total / 2**20:.1f} MiB converted")
    assert largest <= peak < 0.25 * total, (peak, total)


# ---- interruption and resume ---------------------------------------------------------------------------------

def test_interrupted_conversion_resumes(tmp_path, hf_model, monkeypatch):
    model, _, hf = hf_model
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="50KB")
    n_params = len(sources(Llama4Config.from_json(src), set(hf)))

    count_writes(monkeypatch, fail_after=7)
    with pytest.raises(Killed):
        conv.convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint .*re-run `mavjax convert` with the same"):
        load_model(tmp_path / "out")

    calls = count_writes(monkeypatch)
    summary = conv.convert(src, tmp_path / "out", progress=False)
    assert len(calls) == n_params - 7 and summary.already_present == 7 and summary.written == n_params - 7
    monkeypatch.undo()
    conv.convert(src, tmp_path / "clean", progress=False)
    assert_params_equal(loaded_params(tmp_path / "out"), loaded_params(tmp_path / "clean"))


def test_write_cut_short_is_redone(tmp_path, hf_model, monkeypatch):
    # Killed after orbax saved a parameter under params/.partial/ but before it was renamed into place.
    _, config, hf = hf_model
    src = save_hf(tmp_path / "hf", hf, config)
    real_replace = os.replace

    def replace(a, b):
        if Path(a).parent.name == ".partial" and Path(b).parent.name != ".partial":
            raise Killed()
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        conv.convert(src, tmp_path / "out", progress=False)
    monkeypatch.undo()
    assert list((tmp_path / "out" / "params" / ".partial").iterdir())  # the half-done parameter

    calls = count_writes(monkeypatch)
    summary = conv.convert(src, tmp_path / "out", progress=False)
    assert summary.already_present == 0 and len(calls) == summary.written
    assert_params_equal(loaded_params(tmp_path / "out", dtype=jnp.float32),
                        {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
                         for k, v in expected_params(Llama4Config.from_dict(config), hf).items()})


def test_existing_output(tmp_path, hf_model, monkeypatch):
    _, config, hf = hf_model
    src = save_hf(tmp_path / "hf", hf, config)
    out = tmp_path / "out"
    conv.convert(src, out, progress=False)

    calls = count_writes(monkeypatch)
    assert conv.convert(src, out, progress=False).already_done and not calls
    with pytest.raises(CheckpointError, match="differs in dtype"):
        conv.convert(src, out, dtype="float32", progress=False)
    other = dict(config, rope_theta=1234.0)
    with pytest.raises(CheckpointError, match="differs in rope_theta"):
        conv.convert(save_hf(tmp_path / "hf2", hf, other), out, progress=False)

    summary = conv.convert(src, out, dtype="float32", progress=False, overwrite=True)
    assert summary.written == len(calls) > 0 and not summary.already_done
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "float32"

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds no mavjax checkpoint"):
        conv.convert(src, tmp_path / "foreign", progress=False, overwrite=True)
    assert (tmp_path / "foreign" / "notes.txt").exists()


# ---- errors --------------------------------------------------------------------------------------------------

def _fails_fast(tmp_path, src, exc, match):
    with pytest.raises(exc, match=match):
        conv.convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # checked from the headers, before anything was written


def test_missing_tensor(tmp_path, hf_model):
    _, config, hf = hf_model
    tensors = {k: v for k, v in hf.items() if k != "model.layers.3.self_attn.q_proj.weight"}
    _fails_fast(tmp_path, save_hf(tmp_path / "hf", tensors, config), conv.ConversionError,
                r"missing tensor 'model.layers.3.self_attn.q_proj.weight' in .*hf")


def test_missing_expert_of_per_expert_layout(tmp_path, hf_model):
    _, config, hf = hf_model
    tensors = per_expert(hf)
    del tensors["model.layers.3.feed_forward.experts.2.up_proj.weight"]
    _fails_fast(tmp_path, save_hf(tmp_path / "hf", tensors, config), conv.ConversionError,
                r"missing tensor 'model.layers.3.feed_forward.experts.2.up_proj.weight'")


def test_unexpected_tensor(tmp_path, hf_model):
    _, config, hf = hf_model
    tensors = dict(hf, **{"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
    _fails_fast(tmp_path, save_hf(tmp_path / "hf", tensors, config), conv.ConversionError,
                r"unexpected tensor 'model.layers.0.self_attn.q_norm.weight' in .*model.safetensors")


def test_shape_mismatch(tmp_path, hf_model):
    _, config, hf = hf_model
    name = "language_model.model.layers.2.self_attn.k_proj.weight"
    tensors = {"language_model." + k: v for k, v in hf.items()}
    tensors[name] = tensors[name].T
    _fails_fast(tmp_path, save_hf(tmp_path / "hf", tensors, {"model_type": "llama4", "text_config": config}),
                conv.ConversionError, rf"tensor '{name}' has shape \(32, 16\), expected \(16, 32\) from config.json")


@pytest.mark.parametrize("change, match", [
    ({"num_attention_heads": 3}, "num_attention_heads"),
    ({"hidden_sizes": 32}, "hidden_sizes"),
    ({"model_type": "llama"}, "model_type"),
])
def test_bad_config(tmp_path, hf_model, change, match):
    _, config, hf = hf_model
    _fails_fast(tmp_path, save_hf(tmp_path / "hf", hf, dict(config, **change)), ConfigError, match)


def test_config_shape_disagreement_names_tensor(tmp_path, hf_model):
    # A config.json that is valid but does not describe these tensors.
    _, config, hf = hf_model
    _fails_fast(tmp_path, save_hf(tmp_path / "hf", hf, dict(config, vocab_size=100)), conv.ConversionError,
                r"tensor 'model.embed_tokens.weight' has shape \(128, 32\), expected \(100, 32\)")


def test_corrupt_and_missing_files(tmp_path, hf_model):
    _, config, hf = hf_model
    src = save_hf(tmp_path / "hf", hf, config, shards=2, index=True)
    (src / "model-00002-of-00002.safetensors").unlink()
    _fails_fast(tmp_path, src, conv.ConversionError, "lists model-00002-of-00002.safetensors")

    src = save_hf(tmp_path / "hf1", hf, config)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    _fails_fast(tmp_path, src, conv.ConversionError, "past the end of the file")
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    _fails_fast(tmp_path, src, conv.ConversionError, "is not a safetensors file")
    (src / "config.json").unlink()
    _fails_fast(tmp_path, src, FileNotFoundError, "config.json")


def test_cli(tmp_path, hf_model, capsys):
    from mavjax import cli

    _, config, hf = hf_model
    bad = save_hf(tmp_path / "bad", {k: v for k, v in hf.items() if k != "model.norm.weight"}, config)
    assert cli.main(["convert", "--hf", str(bad), "--out", str(tmp_path / "o1"), "--quiet"]) != 0
    assert "missing tensor 'model.norm.weight'" in capsys.readouterr().err

    good = save_hf(tmp_path / "good", hf, config)
    assert cli.main(["convert", "--hf", str(good), "--out", str(tmp_path / "o2"), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "o2" / MANIFEST).read_text())["dtype"] == "float32"
    assert cli.main(["convert", "--hf", str(good), "--out", str(tmp_path / "o2")]) != 0  # another dtype
    assert "differs in dtype" in capsys.readouterr().err


# ---- the mavjax format on its own ----------------------------------------------------------------------------

def test_save_model_load_model(tmp_path, hf_model):
    _, config, hf = hf_model
    conv.convert(save_hf(tmp_path / "hf", hf, config), tmp_path / "conv", dtype="float32", progress=False)
    cfg, model = load_model(tmp_path / "conv")  # an in-memory model with known weights
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"x": 1}')
    save_model(model, tmp_path / "ckpt", tokenizer_src_dir=tmp_path / "tok")
    assert (tmp_path / "ckpt" / "tokenizer_config.json").exists()

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got_cfg, loaded = load_model(tmp_path / "ckpt", shardings={"embed": sharding})
    assert got_cfg == cfg and loaded.embed.get_value().sharding == sharding
    assert_params_equal(loaded_params(tmp_path / "ckpt"), expected_params(cfg, hf))

    save_model(model, tmp_path / "ckpt")  # saving again replaces it
    with pytest.raises(CheckpointError, match="'layers.0.attn.wz' is not a parameter"):
        load_model(tmp_path / "ckpt", shardings={"layers.0.attn.wz": sharding})


def test_load_model_errors(tmp_path, hf_model):
    model, _, _ = hf_model
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="is a Hugging Face checkpoint.*mavjax convert"):
        load_model(tmp_path / "hf")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")

    conv.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    manifest_path = tmp_path / "out" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["params"]["layers.2.attn.wo"]["shape"] = [4, 8, 31]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"'layers.2.attn.wo' has shape \(4, 8, 31\)"):
        load_model(tmp_path / "out")
    del manifest["params"]["layers.2.attn.wo"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'layers.2.attn.wo' is missing"):
        load_model(tmp_path / "out")


def test_convert_quantize_fp8_matches_quantize_on_load(tmp_path):
    """`mavjax convert --quantize fp8` stores FP8 weights with their scales; loading them gives the same model
    as quantizing the bf16/f32 conversion on load."""
    import jax.numpy as jnp
    import torch
    import transformers

    from mavjax.api import LLM
    from mavjax.cli import main

    torch.manual_seed(0)
    hf_cfg = transformers.Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=32,
                                           intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                           interleave_moe_layer_step=2, attention_chunk_size=8)
    transformers.Llama4ForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    assert main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "fp8"), "--quantize", "fp8",
                 "--dtype", "float32", "--quiet"]) == 0
    conv.convert(tmp_path / "hf", tmp_path / "f32", dtype="float32", progress=False)
    _, m8 = load_model(tmp_path / "fp8")
    assert m8.quant == "fp8" and m8.layers[1].ffn.w_up[...].dtype == jnp.float8_e4m3fn
    assert m8.layers[1].ffn.w_up_scale[...].shape == (4, 32) and m8.layers[0].attn.wo_scale[...].shape == (64,)
    assert m8.embed[...].dtype == jnp.float32 and m8.layers[1].ffn.router[...].dtype == jnp.float32
    ids = list(range(3, 30))
    a = LLM(tmp_path / "fp8").logits(ids)
    b = LLM(tmp_path / "f32", quantize="fp8").logits(ids)
    np.testing.assert_array_equal(a, b)


def test_fp8_release_layout_is_read(tmp_path):
    """An FP8 release (Meta's fbgemm_fp8 layout: per-expert Linears, `X.weight` float8_e4m3fn [out, in] beside
    `X.weight_scale` [out, 1]; attention, router and shared expert left in bf16; a `language_model.` prefix)
    converts to the same model as its dequantized float32 weights, and `--quantize fp8` gets the codes back."""
    import json as _json

    import torch
    import transformers
    from safetensors.numpy import save_file

    from mavjax.api import LLM

    torch.manual_seed(1)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
              interleave_moe_layer_step=2, attention_chunk_size=8)
    hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**kw))
    fp8, deq = {}, {}
    F = kw["intermediate_size"]
    for name, t in hf.state_dict().items():
        w = t.float().numpy()
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            base = name.rsplit(".", 1)[0]
            for e in range(w.shape[0]):
                mats = {"gate_proj": w[e][:, :F].T, "up_proj": w[e][:, F:].T} if "gate_up" in name else \
                    {"down_proj": w[e].T}
                for lin, m in mats.items():  # [out, in] per expert
                    m = np.ascontiguousarray(m)  # safetensors writes the buffer as it lies in memory
                    scale = np.maximum(np.abs(m).max(axis=1, keepdims=True), 1e-12) / 448.0
                    q = (m / scale).astype(ml_dtypes.float8_e4m3fn)
                    key = f"language_model.{base}.{e}.{lin}"
                    fp8[key + ".weight"], fp8[key + ".weight_scale"] = q, scale.astype(np.float32)
                    deq[key + ".weight"] = q.astype(np.float32) * scale
        else:
            fp8["language_model." + name] = deq["language_model." + name] = w
    cfg = {"model_type": "llama4", "text_config": {**transformers.Llama4TextConfig(**kw).to_dict()},
           "quantization_config": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}}
    for d, tensors in (("fp8", fp8), ("deq", deq)):
        (tmp_path / d).mkdir()
        save_file(tensors, tmp_path / d / "model.safetensors")
        c = dict(cfg) if d == "fp8" else {k: v for k, v in cfg.items() if k != "quantization_config"}
        (tmp_path / d / "config.json").write_text(_json.dumps(c))
    conv.convert(tmp_path / "fp8", tmp_path / "a", dtype="float32", progress=False)
    conv.convert(tmp_path / "deq", tmp_path / "b", dtype="float32", progress=False)
    ids = list(range(3, 40))
    np.testing.assert_array_equal(LLM(tmp_path / "a").logits(ids), LLM(tmp_path / "b").logits(ids))
    conv.convert(tmp_path / "fp8", tmp_path / "q", dtype="float32", progress=False, quantize="fp8")
    _, m = load_model(tmp_path / "q")
    src = fp8["language_model.model.layers.1.feed_forward.experts.2.up_proj.weight"]  # [F, D]
    np.testing.assert_array_equal(np.asarray(m.layers[1].ffn.w_up[...][2]).view(np.uint8), src.T.view(np.uint8))


def test_fp8_weights_stored_output_first_and_version_1_still_loads(tmp_path):
    """An FP8 checkpoint (format version 2) stores the attention and dense-MLP weights output first ([N, K]:
    wq [H, Dh, D], wo [D, H, Dh], gate [F, D], down [D, F]) and the routed and shared experts as before
    ([E, D, F]); a version-1 FP8 checkpoint, which stored all of them [*in, *out], loads into the same model, its
    weights transposed as they are read (also into a given sharding), and a version-1 unfinished FP8 conversion
    is not resumed in the new layout."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from mavjax.checkpoint import PENDING, save_array
    from mavjax.model import Llama4, stored_layout
    from mavjax.quantize import quantize_model

    cfg = Llama4Config.from_dict(dict(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=8))
    model = quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5)))
    attn, mlp, moe = model.layers[0].attn, model.layers[0].ffn, model.layers[1].ffn
    assert attn.wq.shape == (4, 8, 32) and attn.wo.shape == (32, 4, 8) and attn.wk.shape == (2, 8, 32)
    assert mlp.w_gate.shape == (48, 32) and mlp.w_down.shape == (32, 48)
    assert moe.w_gate.shape == (4, 32, 16) and moe.shared.w_gate.shape == (32, 16)
    assert moe.shared.w_down.shape == (16, 32)
    save_model(model, tmp_path / "v2")
    manifest = json.loads((tmp_path / "v2" / MANIFEST).read_text())
    assert manifest["format_version"] == 2

    # the same model as version 1 wrote it: every FP8 weight [*in, *out]
    shutil.copytree(tmp_path / "v2", tmp_path / "v1")
    moved = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        target, layout = ".".join(map(str, path)), stored_layout(var)
        if layout is None or layout[0] == tuple(range(len(layout[0]))):
            continue
        old = np.transpose(np.asarray(var.get_value()), np.argsort(layout[0]))
        shutil.rmtree(tmp_path / "v1" / "params" / target)
        save_array(tmp_path / "v1", target, old)
        manifest["params"][target]["shape"] = list(old.shape)
        moved += 1
    assert moved == cfg.num_hidden_layers * 4 + 3  # q, k, v, o per layer; the dense layer's gate, up, down
    manifest["format_version"] = 1
    (tmp_path / "v1" / MANIFEST).write_text(json.dumps(manifest))
    mesh = Mesh(np.array(jax.devices()[:1]), ("tensor",))
    wo_sharding = NamedSharding(mesh, P("tensor", None, None))  # [D, H, Dh] as stored now
    _, loaded = load_model(tmp_path / "v1", shardings={"layers.0.attn.wo": wo_sharding})
    assert loaded.layers[0].attn.wo.get_value().sharding == wo_sharding
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        assert a.get_value().shape == b.get_value().shape, path
        np.testing.assert_array_equal(np.asarray(a.get_value(), np.float32), np.asarray(b.get_value(), np.float32))
    manifest["params"]["layers.0.attn.wq"]["shape"] = [4, 8, 32]  # version 1 said [D, H, Dh]
    (tmp_path / "v1" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"'layers.0.attn.wq' has shape \(4, 8, 32\), the model needs "
                                              r"\(32, 4, 8\)"):
        load_model(tmp_path / "v1")

    writer = CheckpointWriter(tmp_path / "part", cfg, jnp.float32, quant="fp8")
    writer.write("embed", np.zeros((64, 32), np.float32))
    pending = json.loads((tmp_path / "part" / PENDING).read_text())
    (tmp_path / "part" / PENDING).write_text(json.dumps(dict(pending, format_version=1)))
    with pytest.raises(CheckpointError, match=r"format version \(1 there, 2 written now\)"):
        CheckpointWriter(tmp_path / "part", cfg, jnp.float32, quant="fp8")
