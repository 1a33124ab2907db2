"""The `mavjax` CLI and the Python API on the shipped default model (checkpoints/default)."""

import pytest

from mavjax import LLM, SamplingParams
from mavjax.api import DEFAULT_MODEL
from mavjax.cli import main


@pytest.fixture(scope="module")
def llm():
    return LLM()  # the shipped default


def test_default_model_is_a_complete_checkpoint():
    from mavjax.config import Llama4Config

    assert (DEFAULT_MODEL / "mavjax_manifest.json").exists() and (DEFAULT_MODEL / "tokenizer.json").exists()
    cfg = Llama4Config.from_json(DEFAULT_MODEL)
    L = cfg.num_hidden_layers
    assert {cfg.is_moe_layer(i) for i in range(L)} == {True, False}  # MoE and dense layers
    assert {cfg.uses_rope(i) for i in range(L)} == {True, False}  # RoPE and NoPE layers
    assert any(cfg.is_chunked(i) for i in range(L))
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size < 40e6, size  # "a few tens of MB at most"


def test_generate_text_through_the_api(llm):
    out = llm.generate(["def fib(n):", "import os\n"], SamplingParams(max_new_tokens=24, temperature=0.0))
    for o, p in zip(out, ["def fib(n):", "import os\n"]):
        assert o.prompt == p and o.token_ids and o.text == llm.tokenizer.decode(
            [t for t in o.token_ids if t not in llm.eos_token_ids])
        assert o.metrics.time_to_first_token_s > 0 and o.metrics.tokens_per_s > 0


def test_stop_string_truncates(llm):
    free = llm.generate("class Foo:", SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True))[0]
    stop = free.text.strip()[:3]
    assert stop
    out = llm.generate("class Foo:", SamplingParams(max_new_tokens=30, temperature=0.0, stop=[stop],
                                                    ignore_eos=True))[0]
    assert out.finish_reason == "stop" and stop not in out.text and free.text.startswith(out.text)


def test_chat_template_through_jinja(llm):
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in text and text.startswith(llm.tokenizer.bos_token or "")
    assert text.rstrip().endswith("<|header_end|>")  # generation prompt for the assistant
    assert llm.chat([{"role": "user", "content": "Write a function"}],
                    SamplingParams(max_new_tokens=8, temperature=0.0))[0].token_ids


def test_cli_generate(capsys):
    assert main(["generate", "--prompt", "def fib(n):", "--max-new-tokens", "16", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def fib(n):") and len(out.out) > len("def fib(n):") + 5
    assert "tokens/s" in out.err


def test_cli_chat(capsys):
    assert main(["generate", "--prompt", "hello", "--chat", "--max-new-tokens", "8", "--seed", "3"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-5"], "top_k"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-model-len", "8", "--prompt", "x = 1\n" * 20], "longer than the context"),
    (["--model", "/nonexistent/model"], "config.json"),
    (["--mesh", "experts=2"], "bad mesh entry"),
])
def test_cli_bad_input_is_a_clear_error(args, message, capsys):
    base = ["generate", "--prompt", "def f():"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_generate_fp8_kv_cache(capsys, monkeypatch):
    """--kv-cache-dtype fp8 (vLLM's name) reaches LLM: the engine's cache is float8_e4m3fn."""
    import jax.numpy as jnp

    import mavjax.api

    seen = []
    real = mavjax.api.LLM._setup

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append(self.engine.kv_dtype)
    monkeypatch.setattr(mavjax.api.LLM, "_setup", spy)
    assert main(["generate", "--prompt", "def fib(n):", "--max-new-tokens", "8", "--temperature", "0",
                 "--kv-cache-dtype", "fp8"]) == 0
    assert seen == [jnp.float8_e4m3fn]
    assert capsys.readouterr().out.startswith("def fib(n):")
