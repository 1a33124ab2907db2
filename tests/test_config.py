"""Config: presets against the published configs, parameter counts, HF config parsing, bad configs."""

import json

import pytest

from mavjax.config import ConfigError, Llama4Config, preset

# text_config of meta-llama/Llama-4-Maverick-17B-128E-Instruct's config.json, as published.
MAVERICK_TEXT_CONFIG = {
    "_attn_implementation_autoset": True, "attention_bias": False, "attention_chunk_size": 8192,
    "attention_dropout": 0.0, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "interleave_moe_layer_step": 2, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 1048576, "model_type": "llama4_text",
    "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
    "torch_dtype": "bfloat16", "use_cache": True, "use_qk_norm": False, "vocab_size": 202048,
}
MAVERICK_CONFIG = {
    "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080, "eoi_token_index": 200081,
    "image_token_index": 200092, "model_type": "llama4", "text_config": MAVERICK_TEXT_CONFIG,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0.dev0",
    "vision_config": {"hidden_size": 1408, "model_type": "llama4_vision_model"},
}


def test_maverick_preset_matches_published_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MAVERICK_CONFIG))
    published = Llama4Config.from_json(tmp_path)
    assert published == preset("maverick")
    cfg = preset("maverick")
    assert cfg.moe_layers == tuple(range(1, 48, 2))  # dense and MoE layers alternate
    assert [i for i in range(48) if not cfg.uses_rope(i)] == list(range(3, 48, 4))  # every 4th layer is NoPE
    assert cfg.layer_types[3] == "full_attention" and cfg.layer_types[0] == "chunked_attention"


def test_maverick_parameter_counts():
    total, active = preset("maverick").param_counts()
    assert 395e9 < total < 405e9, total  # "400B"
    assert 16.5e9 < active < 17.5e9, active  # "17B active"
    assert (total, active) == (400_711_848_960, 17_184_691_200)  # the numbers quoted in the README


def test_scout_preset():
    cfg = preset("scout")
    total, active = cfg.param_counts()
    assert 105e9 < total < 112e9 and 16.5e9 < active < 17.5e9  # "109B total, 17B active"
    assert cfg.moe_layers == tuple(range(48)) and cfg.use_qk_norm
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3"


def test_transformers_config_round_trip():
    from transformers import Llama4TextConfig

    for name in ("maverick", "scout", "tiny"):
        cfg = preset(name)
        hf = Llama4TextConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
        assert Llama4Config.from_dict(hf.to_dict()) == cfg  # also reads transformers 5's rope_parameters
        assert Llama4Config.from_dict(cfg.to_dict()) == cfg


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="unknown Llama 4 config field.*sliding_window"):
        Llama4Config.from_dict({**MAVERICK_TEXT_CONFIG, "sliding_window": 4096})


def test_other_architecture_is_an_error():
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        Llama4Config.from_dict({"model_type": "llama", "hidden_size": 4096})


@pytest.mark.parametrize("override, message", [
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok"),
    ({"moe_layers": [1, 99]}, "moe_layers"),
    ({"no_rope_layers": [1, 0]}, "no_rope_layers has 2 entries"),
    ({"attention_chunk_size": None}, "attention_chunk_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 7}, "head_dim must be even"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
])
def test_inconsistent_fields_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        Llama4Config.from_dict({**MAVERICK_TEXT_CONFIG, **override})


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama4Config.from_json(tmp_path)
