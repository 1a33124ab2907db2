"""The model against transformers' Llama4ForCausalLM (CPU, float32), through `mavjax convert`.

Each config is saved with `save_pretrained` (sharded safetensors), converted, loaded with `LLM`, and checked:
logits of every position of a sequence longer than the attention chunk within 1e-4 relative, and 32 greedy
tokens identical to transformers' greedy generation, for a batch of prompts of different lengths.
"""

import numpy as np
import pytest
import torch

from mavjax import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, head_dim=16,
            max_position_embeddings=512, rope_theta=10000.0, attn_temperature_tuning=True, floor_scale=4,
            attn_scale=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    # MoE every 2nd layer, NoPE every 2nd layer, qk norm on, GQA 4/2, chunk 8.
    "qknorm-moe2-nope2": dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              num_local_experts=4, interleave_moe_layer_step=2, no_rope_layer_interval=2,
                              attention_chunk_size=8, use_qk_norm=True),
    # Maverick-like: qk norm off, every layer MoE, 8 experts, MHA 8/8, NoPE every 4th, chunk 16.
    "noqknorm-allmoe-mha": dict(num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=8,
                                head_dim=8, num_local_experts=8, interleave_moe_layer_step=1,
                                no_rope_layer_interval=4, attention_chunk_size=16, use_qk_norm=False),
    # Explicit layer patterns, top-2 routing, 3 query heads per kv head, llama3 rope scaling, tied embeddings.
    "explicit-top2-tied-llama3": dict(num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                                      num_local_experts=3, num_experts_per_tok=2, moe_layers=[0, 3, 4],
                                      no_rope_layers=[1, 0, 0, 1, 1, 0], attention_chunk_size=8,
                                      use_qk_norm=True, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                       "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16}),
}


def _perturb_norms(model):
    # transformers initialises RMSNorm weights to 1; make them matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    from checkpoints.convert import convert

    torch.manual_seed(0)
    kw = {**BASE, **CONFIGS[request.param]}
    hf_cfg = transformers.Llama4TextConfig(**kw)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Llama4ForCausalLM(hf_cfg).eval()
    _perturb_norms(hf)
    hf_dir = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(hf_dir, max_shard_size="100KB")  # several shards plus an index
    out = tmp_path_factory.mktemp("mavjax")
    convert(hf_dir, out, dtype="float32", progress=False)
    return hf, LLM(out)


def test_logits_match_transformers(pair):
    hf, llm = pair
    ids = np.random.default_rng(1).integers(3, hf.config.vocab_size, size=45).tolist()  # > several chunks
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    out = llm.logits(ids)
    assert out.dtype == np.float32 and out.shape == ref.shape
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, rel


def test_greedy_generation_matches_transformers(pair):
    hf, llm = pair
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, hf.config.vocab_size, size=n).tolist() for n in (3, 11, 26)]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
        assert o.finish_reason == "length" and o.metrics.num_generated_tokens == 32
