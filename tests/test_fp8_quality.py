"""FP8 (quantize="fp8") against bf16 on the shipped default model, on held-out text.

The default model was trained on the Python standard library minus held-out files (scripts/build_corpus.py);
`statistics.py` is one of those held-out files, so it is text the model has not seen. A trained model is
the right subject: random networks amplify any perturbation and say little about quantization.

Bounds. Per-output-channel e4m3 quantization rounds each weight to 3 mantissa bits (relative error up to
2^-4, RMS about 2.4e-2 of the weight); through 6 layers this moves the logits by a few tenths (their spread
is ~3), which should change the arg-max only where the top two tokens are nearly tied, and the perplexity by a
few percent. So we bound three things: top-1 agreement >= 99% where bf16's top token leads by more than
0.5 (a clear winner must survive), >= 92% overall (near-ties may flip), and perplexity within 3% of bf16.
Measured on the shipped (H100-trained) model over these 1,023 tokens: 99.6%, 95.5% and -0.14% (over 4,095
tokens of the same file: 99.5%, 94.9%). Published FP8 evaluations of large models (Llama 4 Maverick's FP8
release among them) lose well under 1%, but a 10M-parameter model with 256-wide layers averages far fewer
rounding errors per output, so we leave more room.
"""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mavjax import LLM

WINDOW = 512


@pytest.fixture(scope="module")
def heldout_ids():
    text = (Path(sysconfig.get_paths()["stdlib"]) / "statistics.py").read_text()
    return LLM().tokenizer.encode(text)[: 2 * WINDOW]


def _nll_and_top1(llm, ids):
    nll, top1, margin = [], [], []
    for start in range(0, len(ids) - 1, WINDOW):
        w = ids[start:start + WINDOW + 1]
        logits = llm.logits(w[:-1]).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll.extend(-logp[np.arange(len(w) - 1), w[1:]])
        top1.extend(logits.argmax(-1))
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margin.extend(top2[:, 1] - top2[:, 0])
    return np.array(nll), np.array(top1), np.array(margin)


@pytest.mark.parametrize("products", ["bf16", "fp8"])
def test_fp8_close_to_bf16_on_heldout_text(heldout_ids, products, monkeypatch):
    """products="bf16": the FP8 weights upcast, x as it is (the XLA path; the Pallas path up to 64 token rows).
    products="fp8": FP8 x FP8, x also rounded to e4m3 per token (the Pallas path's prefill projections above 64
    rows, mavjax.model.fp8_prefill_matmul; the other Pallas families switched off so that XLA runs the rest on the
    CPU). x's rounding adds a second error of the same size per product, so the same bounds should hold; measured
    here: 99.5%, 94.0% and +1.62% against the weights-only products' 99.6%, 95.5% and -0.21%."""
    from mavjax.model import PALLAS_OPS

    bf16 = LLM()
    if products == "fp8":
        monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", ",".join(f for f in PALLAS_OPS if f != "fp8_prefill"))
    fp8 = LLM(quantize="fp8", kernels="pallas" if products == "fp8" else "xla")
    nll_b, top_b, margin_b = _nll_and_top1(bf16, heldout_ids)
    nll_f, top_f, _ = _nll_and_top1(fp8, heldout_ids)
    ppl_b, ppl_f = np.exp(nll_b.mean()), np.exp(nll_f.mean())
    agree = (top_b == top_f).mean()
    clear = margin_b > 0.5
    agree_clear = (top_b == top_f)[clear].mean()
    print(f"bf16 ppl {ppl_b:.3f}, fp8 ({products} products) ppl {ppl_f:.3f} ({ppl_f / ppl_b - 1:+.2%}), top-1 "
          f"agreement {agree:.3f}, {agree_clear:.3f} on the {clear.mean():.0%} of positions with a margin > 0.5")
    assert agree_clear >= 0.99, agree_clear
    assert ppl_b < 200  # the model is trained: far below the 4096-token vocabulary's uniform perplexity
    assert agree >= 0.92, agree
    assert abs(ppl_f / ppl_b - 1) <= 0.03, (ppl_b, ppl_f)


def _cached_nll_and_top1(llm, ids, kv_dtype):
    """Next-token NLL and arg-max at every position, with every window run through the KV cache (written in
    `kv_dtype`, then attended from it), as prefill does: each position's attention reads the cached keys and
    values of all earlier positions, so an FP8 cache's rounding reaches every prediction."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mavjax.kv_cache import KVCache

    graphdef = llm.engine.graphdef

    @jax.jit
    def window_logits(state, toks):
        model = nnx.merge(graphdef, state)
        T = toks.shape[1]
        cache = KVCache.create(model.cfg, 1, T, kv_dtype)
        pos = jnp.arange(T, dtype=jnp.int32)[None]
        h, _, _ = model.hidden_states(toks, pos, cache, write_index=jnp.zeros((1,), jnp.int32))
        return model.logits(h)[0]  # [T, V] float32

    nll, top1, margin = [], [], []
    for start in range(0, len(ids) - 1, WINDOW):
        w = ids[start:start + WINDOW + 1]
        logits = np.asarray(window_logits(llm.engine.state, jnp.asarray([w[:-1]], jnp.int32)), np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll.extend(-logp[np.arange(len(w) - 1), w[1:]])
        top1.extend(logits.argmax(-1))
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margin.extend(top2[:, 1] - top2[:, 0])
    return np.array(nll), np.array(top1), np.array(margin)


def test_fp8_kv_cache_close_to_bf16_on_heldout_text(heldout_ids):
    """kv_cache_dtype="fp8" (e4m3, static scale 1.0) against the bf16 cache on the same bf16 model.

    Bounds: e4m3 rounds each cached key and value to 3 mantissa bits (relative error <= 2^-4, RMS ~2.4e-2);
    a score q.k sums Dh = 32 such independent errors, so it moves by ~2.4e-2 / sqrt(32) of |q||k| -- less than
    the weight quantization of the test above, which perturbs every activation. Bounds as for FP8 weights (the
    module docstring), with room for a few more flips at the clear-winner threshold: top-1 agreement >= 98%
    where the bf16 cache's top token leads by more than 0.5, >= 92% overall, perplexity within 3%. Measured on
    the shipped model over these 1,023 tokens: 99.2% (on the 73% of positions with a clear winner), 95.0% and
    +0.55%; a broken cache (values read back at twice their size) gives 25%, 22% and +568%. (The earlier bound,
    95% overall from an older shipped model's 98.2%, sat exactly on the current model's 972 of 1,023: two
    near-tied positions flipped by an unrelated change in XLA's rounding failed it.)"""
    import jax.numpy as jnp

    llm = LLM()
    assert llm.engine.kv_dtype == jnp.bfloat16
    nll_b, top_b, margin_b = _cached_nll_and_top1(llm, heldout_ids, jnp.bfloat16)
    nll_f, top_f, _ = _cached_nll_and_top1(llm, heldout_ids, jnp.float8_e4m3fn)
    nll_x, top_x, _ = _nll_and_top1(llm, heldout_ids)  # the cache-free forward: the bf16 cache must equal it
    ppl_b, ppl_f = np.exp(nll_b.mean()), np.exp(nll_f.mean())
    agree = (top_b == top_f).mean()
    clear = margin_b > 0.5
    agree_clear = (top_b == top_f)[clear].mean()
    print(f"bf16-KV ppl {ppl_b:.3f}, fp8-KV ppl {ppl_f:.3f} ({ppl_f / ppl_b - 1:+.2%}), top-1 agreement {agree:.4f}, "
          f"{agree_clear:.4f} on the {clear.mean():.0%} of positions with a margin > 0.5")
    assert (top_b == top_x).mean() >= 0.99 and abs(np.exp(nll_x.mean()) / ppl_b - 1) < 2e-3
    assert agree_clear >= 0.98, agree_clear
    assert agree >= 0.92, agree
    assert abs(ppl_f / ppl_b - 1) <= 0.03, (ppl_b, ppl_f)
    fp8_llm = LLM(kv_cache_dtype="fp8")
    assert fp8_llm.engine.kv_dtype == jnp.float8_e4m3fn
    out = fp8_llm.generate("def mean(data):", __import__("mavjax").SamplingParams(max_new_tokens=8, temperature=0))
    assert len(out[0].token_ids) >= 1
