"""Generation mechanics on a tiny random model: batching, buckets, stop tokens, seeds, bad prompts."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from mavjax import LLM, PromptError, SamplingParams, preset
from mavjax.model import Llama4

# The tests build the tiny preset with two layers: a dense RoPE (chunked) layer and an
# MoE NoPE (global) layer, every kernel a step launches; the preset's layers 2-3 repeat them and doubled the
# interpreter's compile time.
TWO = dict(num_hidden_layers=2)

@pytest.fixture(scope="module")
def llm():
    import jax.numpy as jnp

    cfg = preset("tiny", max_position_embeddings=128, **TWO)
    return LLM.from_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)), max_batch_size=8)


def _prompts(n, seed=0, lo=2, hi=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=rng.integers(lo, hi)).tolist() for _ in range(n)]


def test_batch_equals_one_by_one(llm):
    prompts = _prompts(5)
    for sp in (SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
               SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=11, ignore_eos=True)):
        together = llm.generate(prompts, sp)
        alone = [llm.generate([p], sp)[0] for p in prompts]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        assert all(len(o.token_ids) == 12 for o in together)


def test_seed_reproducible_and_varies(llm):
    p = _prompts(1)[0]
    a = llm.generate(p, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1, ignore_eos=True))[0]
    b = llm.generate(p, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1, ignore_eos=True))[0]
    c = llm.generate(p, SamplingParams(max_new_tokens=16, temperature=1.0, seed=2, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids != c.token_ids


def test_stop_token_ends_generation(llm):
    p = _prompts(1, seed=4)[0]
    free = llm.generate(p, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))[0].token_ids
    stop = free[6]
    first = free.index(stop)
    out = llm.generate(p, SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=[stop],
                                         ignore_eos=True))[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"


def test_per_prompt_budgets(llm):
    prompts = _prompts(3, seed=5)
    sps = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (1, 7, 3)]
    assert [len(o.token_ids) for o in llm.generate(prompts, sps)] == [1, 7, 3]


def test_new_length_in_bucket_does_not_recompile(llm):
    sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate([list(range(3, 12))], sp)
    before = llm.engine._prefill._cache_size(), llm.engine._decode._cache_size()
    for n in (10, 13, 16):
        llm.generate([list(range(3, 3 + n))], sp)
    assert (llm.engine._prefill._cache_size(), llm.engine._decode._cache_size()) == before


def test_decode_is_one_device_loop_with_donated_cache(llm, monkeypatch):
    calls = []
    real = llm.engine._decode
    monkeypatch.setattr(llm.engine, "_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    llm.generate(_prompts(2), SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))
    assert len(calls) == 1  # one call for all 10 tokens
    jaxpr = str(jax.make_jaxpr(lambda *a: real.__wrapped__(*a, out_len=4, all_greedy=True))(
        *_decode_args(llm)))
    assert "while" in jaxpr


def _decode_args(llm):
    import jax.numpy as jnp
    from mavjax.kv_cache import KVCache

    B = 1
    cache = KVCache.create(llm.cfg, B, 32, jnp.float32)
    i = jnp.zeros((B,), jnp.int32)
    return (llm.engine.state, cache, i, i + 1, i + 4, jnp.ones((B,), bool), jnp.full((8,), -1, jnp.int32),
            jnp.zeros((B,), jnp.float32), i, jnp.ones((B,), jnp.float32), jnp.zeros((B,), jnp.uint32))


def test_cache_is_donated(llm):
    b = _batch()
    first, cache = llm.engine.prefill(b, 64)
    llm.engine.decode(b, first, cache, 4)
    assert cache.k[0].is_deleted() and cache.v[-1].is_deleted() and cache.pos.is_deleted()  # updated in place


def _batch():
    from mavjax.generate import Batch

    return Batch(tokens=np.arange(3, 19, dtype=np.int32)[None], lengths=np.array([16], np.int32),
                 max_new=np.array([3], np.int32), temperature=np.zeros(1, np.float32), top_k=np.zeros(1, np.int32),
                 top_p=np.ones(1, np.float32), seeds=np.zeros(1, np.uint32), stop_ids=np.full(8, -1, np.int32),
                 n_real=1)


def test_bad_prompts_fail_before_device_work(llm, monkeypatch):
    monkeypatch.setattr(llm.engine, "prefill", lambda *a, **k: pytest.fail("device work started"))
    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(PromptError, match="longer than the context.*max_model_len is 128"):
        llm.generate([list(range(3, 3 + 128))], sp)
    with pytest.raises(PromptError, match="empty prompt"):
        llm.generate([[]], sp)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        llm.generate([[5, 512]], sp)
    with pytest.raises(PromptError, match="no tokenizer"):
        llm.generate("text prompt", sp)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([[5, 6]], SamplingParams(stop_token_ids=[9999]))


def test_generation_is_clipped_to_the_context(llm):
    out = llm.generate([list(range(3, 3 + 120))], SamplingParams(max_new_tokens=50, temperature=0.0,
                                                                  ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_logits_of_prefix_are_causal(llm):
    ids = _prompts(1, lo=20, hi=21)[0]
    full, part = llm.logits(ids), llm.logits(ids[:9])
    np.testing.assert_allclose(full[:9], part, rtol=1e-5, atol=1e-5)


def test_pallas_attention_path_matches_xla():
    """kernels="pallas" routes cached attention (decode) through the split-KV Pallas kernel (interpret mode on
    CPU); it must compute the same function as the XLA path: same greedy tokens over chunk boundaries."""
    import jax.numpy as jnp

    cfg = preset("tiny", max_position_embeddings=128, **TWO)
    xla = LLM.from_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5)))
    pal = LLM.from_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5), kernels="pallas"))
    prompts = _prompts(3, seed=7, lo=3, hi=14)
    sp = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)  # crosses chunks of 8
    assert [o.token_ids for o in pal.generate(prompts, sp)] == [o.token_ids for o in xla.generate(prompts, sp)]


def test_fp8_pallas_and_xla_paths_compute_the_same_function():
    """quantize="fp8" with kernels="pallas" (pallas_kernels.fp8_gemm, interpret mode on CPU) against the XLA
    path (upcast then dot) on the same FP8 weights: logits agree to bf16-rounding level."""
    import jax.numpy as jnp

    from mavjax.quantize import quantize_model

    cfg = preset("tiny", **TWO)
    q_xla = quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(8)))
    q_pal = quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(8), kernels="pallas"))
    assert q_pal.layers[1].ffn.w_gate[...].dtype == jnp.float8_e4m3fn  # experts, MLPs, attention in FP8
    assert q_pal.layers[1].ffn.router[...].dtype == jnp.float32 and q_pal.embed[...].dtype == jnp.float32
    ids = np.random.default_rng(0).integers(3, 500, 20).tolist()
    a = LLM.from_model(q_xla).logits(ids)
    b = LLM.from_model(q_pal).logits(ids)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel < 1e-2, rel  # the Pallas kernel rounds activations to bf16 for the MMA (2^-9 relative)


def _decode_logits(net, ids, n_prompt, kv_dtype):
    """Prefill ids[:n_prompt] into a cache of `kv_dtype`, then feed the rest one token per step (the decode
    path: T = 1, cached attention) -> float32 logits [len(ids) - n_prompt, V] of the decode steps."""
    import jax.numpy as jnp

    from mavjax.kv_cache import KVCache

    graphdef, state = nnx.split(net)
    step = jax.jit(lambda st, toks, pos, cache, wi: nnx.merge(graphdef, st)(toks, pos, cache, wi))
    cache = KVCache.create(net.cfg, 1, 32, kv_dtype)
    pos = jnp.arange(n_prompt, dtype=jnp.int32)[None]
    _, cache = step(state, jnp.asarray([ids[:n_prompt]], jnp.int32), pos, cache, jnp.zeros((1,), jnp.int32))
    out = []
    for t in range(n_prompt, len(ids)):
        logits, cache = step(state, jnp.asarray([[ids[t]]], jnp.int32), jnp.asarray([[t]], jnp.int32), cache,
                             jnp.asarray([t], jnp.int32))
        out.append(np.asarray(logits[0, 0]))
    return np.stack(out)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_fused_fp8_decode_pallas_matches_xla(kv_cache_dtype):
    """The decode path with FP8 weights under kernels="pallas" runs every fusion (QKV + RoPE / qk-norm /
    temperature, gate/up + SwiGLU in the dense MLPs and the shared expert, residual add + RMSNorm) plus the
    split-KV attention on a bf16 or FP8 cache; it must compute what kernels="xla" computes on the same
    weights and cache dtype: decode-step logits over a chunk boundary (chunk 8) within the bound of the FP8
    test above (1e-2: the Pallas GEMMs round activations to bf16 for the MMA)."""
    import jax.numpy as jnp

    from mavjax.kv_cache import kv_dtype_for
    from mavjax.quantize import quantize_model

    cfg = preset("tiny", **TWO)
    kv = kv_dtype_for(kv_cache_dtype, jnp.float32)
    nets = [quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(9), kernels=k)) for k in ("xla", "pallas")]
    ids = np.random.default_rng(1).integers(3, 500, 14).tolist()
    a, b = (_decode_logits(n, ids, 6, kv) for n in nets)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel < 1e-2, rel
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75  # same predictions but for near ties


def test_fp8_kv_cache_through_llm_and_cli_names():
    """kv_cache_dtype (vLLM's names) reaches the Engine; the cache is float8_e4m3fn; a bad name is an error."""
    import jax.numpy as jnp

    cfg = preset("tiny", max_position_embeddings=128, **TWO)
    llm = LLM.from_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)), kv_cache_dtype="fp8")
    b = _batch()
    _, cache = llm.engine.prefill(b, 64)
    assert cache.k[0].dtype == jnp.float8_e4m3fn and cache.v[-1].dtype == jnp.float8_e4m3fn
    assert len(llm.generate(_prompts(1)[0], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].token_ids) == 5
    from mavjax.kv_cache import write_slots

    buf = write_slots(jnp.zeros((1, 4, 2), jnp.float8_e4m3fn), jnp.array([[[1000.0, -0.3]]]), jnp.array([1]))
    np.testing.assert_array_equal(np.asarray(buf[0, 1], np.float32), [448.0, -0.3125])  # clipped, not NaN
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM.from_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)), kv_cache_dtype="int8")


@pytest.mark.parametrize("kernels,quant,want,absent", [
    ("pallas", "fp8", ("fp8_qkv_rope", "fp8_gate_up_swiglu", "add_rms_norm", "moe_gate_up"), ()),
    ("pallas", None, ("add_rms_norm",), ("fp8_qkv_rope", "fp8_gate_up_swiglu", "fp8_weight_only")),  # FP8 only
    ("xla", "fp8", (), ("fp8_qkv_rope", "fp8_gate_up_swiglu", "add_rms_norm", "fp8_weight_only")),
])
def test_fusions_are_wired_where_they_apply(kernels, quant, want, absent):
    """The traced forward names the fused Pallas kernels exactly where they apply: kernels="pallas" with FP8
    weights runs all the fusions; with bf16 weights only add + RMSNorm; kernels="xla" none."""
    import jax.numpy as jnp

    from mavjax.quantize import quantize_model

    net = Llama4(preset("tiny"), dtype=jnp.float32, rngs=nnx.Rngs(8), kernels=kernels)
    net = quantize_model(net) if quant else net
    graphdef, state = nnx.split(net)
    text = str(jax.make_jaxpr(lambda st, t: nnx.merge(graphdef, st)(t)[0])(state, jnp.ones((1, 8), jnp.int32)))
    assert all(n in text for n in want) and not any(n in text for n in absent)


@pytest.mark.parametrize("kernels,kv_cache_dtype", [("xla", "auto"), ("xla", "fp8"), ("pallas", "fp8")])
def test_prefill_into_a_new_cache_reads_only_its_own_keys(kernels, kv_cache_dtype):
    """hidden_states(fresh_cache=True), what the engines' prefill passes: where XLA computes the attention (here T *
    G = 80 query rows, above the split-KV kernel's 64) it reads this call's T keys, rounded as the cache stores
    them, instead of all S slots. On a new cache that is the same function (hidden states and the cache written
    equal to float rounding, layer 0's keys bit-equal); slots already holding keys would be attended without it and
    are ignored with it (the keys come from this call only); with an attn_mask over slots it is an error."""
    import jax.numpy as jnp

    from mavjax.kv_cache import KVCache, kv_dtype_for
    from mavjax.quantize import quantize_model

    cfg = preset("tiny", **TWO)
    net = Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(4), kernels=kernels)
    net = quantize_model(net) if kernels == "pallas" else net
    kv = kv_dtype_for(kv_cache_dtype, jnp.float32)
    B, T, S = 2, 40, 64
    toks = jnp.asarray(np.random.default_rng(0).integers(3, 500, (B, T)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    zero = jnp.zeros((B,), jnp.int32)

    def run(cache, fresh):
        return jax.jit(lambda c: net.hidden_states(toks, pos, c, write_index=zero, fresh_cache=fresh)[:2])(cache)

    new = KVCache.create(cfg, B, S, kv)
    (h0, c0), (h1, c1) = run(new, False), run(new, True)
    assert np.linalg.norm(np.asarray(h1 - h0)) / np.linalg.norm(np.asarray(h0)) < 1e-5
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(c1.pos), np.asarray(c0.pos))
    for a, b in zip(c0.k[:1] + c0.v[:1], c1.k[:1] + c1.v[:1]):  # layer 0: the same keys written
        np.testing.assert_array_equal(f32(a), f32(b))
    for a, b in zip(c0.k + c0.v, c1.k + c1.v):  # later layers: from hidden states equal to float rounding
        assert np.linalg.norm(f32(a) - f32(b)) <= 1e-3 * np.linalg.norm(f32(a))
    # stale keys in slots T.. at positions the queries can see: attended over the whole cache, not with fresh_cache
    stale = KVCache(k=[c.at[:, T:].set(3.0) for c in new.k], v=[c.at[:, T:].set(-5.0) for c in new.v],
                    pos=new.pos.at[:, T:].set(jnp.arange(S - T, dtype=jnp.int32)))
    (h2, _), (h3, _) = run(stale, False), run(stale, True)
    assert np.linalg.norm(np.asarray(h2 - h0)) / np.linalg.norm(np.asarray(h0)) > 1e-2
    np.testing.assert_array_equal(np.asarray(h3), np.asarray(h1))
    with pytest.raises(ValueError, match="fresh_cache"):
        net.layers[0].attn(jnp.zeros((B, T, cfg.hidden_size)), pos, None, (new.k[0], new.v[0]), new.pos, zero,
                           jnp.ones((B, T, S), bool), fresh_cache=True)


def test_projections_leave_the_pallas_kernels_above_the_row_limit(monkeypatch):
    """kernels="pallas" runs the FP8 projections (gemm, qkv, gate_up families) on the Pallas kernels up to
    PALLAS_GEMM_MAX_ROWS token rows (B x T); above (prefill), the attention and dense-MLP projections - stored
    [N, K] - as FP8 x FP8 products (fp8_prefill_matmul: x quantized per token, XLA's FP8 dot), the shared
    expert's ([K, N], the routed experts' layout) as on the XLA path, while the add + norm and MoE kernels stay.
    The traced forward at 64 and 65 rows shows it, MAVJAX_PALLAS_GEMM_MAX_ROWS moves the line; the logits above it
    are the XLA path's but for x's rounding to e4m3, and exactly the XLA path's with "fp8_prefill" off."""
    import jax.numpy as jnp

    from mavjax.model import PALLAS_GEMM_MAX_ROWS
    from mavjax.quantize import quantize_model
    from helpers import equations, pallas_call_names

    assert PALLAS_GEMM_MAX_ROWS == 64
    cfg = preset("tiny", max_position_embeddings=256, **TWO)
    n_dense = sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    fp8_dots_per_forward = 4 * cfg.num_hidden_layers + 3 * n_dense  # q, k, v, o; gate, up, down
    nets = {k: quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(8), kernels=k)) for k in ("xla", "pallas")}
    projections = ("fp8_weight_only", "fp8_qkv_rope", "fp8_gate_up_swiglu")

    def forward(net, B, T, run=False):
        graphdef, state = nnx.split(net)
        toks = jnp.asarray(np.random.default_rng(T).integers(3, 500, (B, T)), jnp.int32)
        f = lambda st: nnx.merge(graphdef, st)(toks)[0]  # noqa: E731
        jaxpr = jax.make_jaxpr(f)(state).jaxpr
        fp8_dots = sum(e.primitive.name == "dot_general" and all(v.aval.dtype == jnp.float8_e4m3fn for v in e.invars)
                       for e in equations(jaxpr))
        return pallas_call_names(jaxpr), fp8_dots, (np.asarray(jax.jit(f)(state)) if run else None)

    def uses(names, prefix):
        return any(n.startswith(prefix) for n in names)

    for (B, T), below in (((1, 64), True), ((1, 65), False), ((2, 33), False)):  # traced only: rows = B * T
        names, fp8_dots, _ = forward(nets["pallas"], B, T)
        assert all(uses(names, p) == below for p in projections), (B, T, names)
        assert uses(names, "add_rms_norm") and uses(names, "moe_gate_up"), names
        assert fp8_dots == (0 if below else fp8_dots_per_forward), (B, T, fp8_dots)
    monkeypatch.setenv("MAVJAX_PALLAS_GEMM_MAX_ROWS", "8")
    names, fp8_dots, got = forward(nets["pallas"], 1, 12, run=True)
    assert not any(uses(names, p) for p in projections) and uses(names, "add_rms_norm"), names
    assert fp8_dots == fp8_dots_per_forward
    _, xla_dots, want = forward(nets["xla"], 1, 12, run=True)
    assert xla_dots == 0  # the XLA path upcasts the weight
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-3 < err < 6e-2, err  # x rounded to e4m3 (3 mantissa bits: ~3% per product on random weights)
    monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", "fp8_prefill")
    names, fp8_dots, got = forward(nets["pallas"], 1, 12, run=True)
    assert fp8_dots == 0
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3  # the same projections; norms, MoE in Pallas
    monkeypatch.delenv("MAVJAX_PALLAS_DISABLE")
    assert all(uses(forward(nets["pallas"], 1, 8)[0], p) for p in projections)
    monkeypatch.setenv("MAVJAX_PALLAS_GEMM_MAX_ROWS", "many")
    with pytest.raises(ValueError, match="MAVJAX_PALLAS_GEMM_MAX_ROWS must be an integer"):
        forward(nets["pallas"], 1, 8)


def test_fp8_prefill_matmul_is_the_fp8_x_fp8_reference():
    """fp8_prefill_matmul (the Pallas path's projections above the row limit) computes fp8_gemm's FP8 x FP8
    function - x quantized per token, products of the e4m3 codes, both scales - on a weight stored [N, K], with
    ragged sizes; a bug in either scale or the layout would be off by far more than the float32 rounding."""
    import jax.numpy as jnp

    from mavjax.model import fp8_prefill_matmul
    from pallas_kernels.fp8_gemm import fp8_matmul_ref, quantize_weight_per_channel

    rng = np.random.default_rng(3)
    for M, K, N in ((1, 64, 32), (37, 200, 72), (130, 96, 5)):
        x = jnp.asarray(rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1)), jnp.float32)
        w8, s = quantize_weight_per_channel(jnp.asarray(rng.standard_normal((K, N)) * 0.05, jnp.float32))
        got = fp8_prefill_matmul(x, w8.T, s, jnp.float32)
        want = fp8_matmul_ref(x, w8, s, quantize_x=True, out_dtype=jnp.float32)
        assert got.shape == (M, N)
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
        plain = fp8_matmul_ref(x, w8, s, out_dtype=jnp.float32)  # bf16-style x: x's rounding is visible
        assert float(jnp.linalg.norm(got - plain) / jnp.linalg.norm(plain)) > 1e-3


def test_xla_attention_runs_in_query_blocks_above_the_score_limit(monkeypatch):
    """Where the float32 scores [B, H, T, S] would pass XLA_ATTN_MAX_SCORE_BYTES, the XLA path's attention runs in
    blocks of query rows (T padded to whole blocks): the same outputs (with a chunk, padding queries and an extra
    mask; float32 to 1e-6), no intermediate as large as the whole scores; the model's prefill and the EAGLE-3
    draft's attention over its cache unchanged."""
    import jax.numpy as jnp

    from mavjax import model as M
    from helpers import equations

    rng = np.random.default_rng(0)
    B, T, S, H, K, Dh = 2, 37, 48, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((B, T, H, Dh)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, Dh)), jnp.float32) for _ in range(2))
    q_pos = jnp.asarray(np.where(np.arange(T) < [[T], [20]], np.arange(T), -1), jnp.int32)
    k_pos = jnp.asarray(np.where(np.arange(S) < T, np.arange(S), -1)[None].repeat(B, 0), jnp.int32)
    extra = jnp.asarray(rng.random((B, T, S)) < 0.8)
    for chunk, mask in ((None, None), (16, None), (8, extra)):
        f = lambda q, k, v: M.attend_by_position(q, k, v, q_pos, k_pos, chunk, 0.3, mask)  # noqa: E731
        whole = f(q, k, v)
        monkeypatch.setattr(M, "XLA_ATTN_MAX_SCORE_BYTES", B * H * S * 4 * 10)  # blocks of 8 rows
        blocked = f(q, k, v)
        biggest = max(int(np.prod(o.aval.shape)) for e in equations(jax.make_jaxpr(f)(q, k, v).jaxpr)
                      for o in e.outvars)
        monkeypatch.undo()
        np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-6, atol=1e-6)
        assert biggest < B * H * T * S // 2, biggest
    assert np.all(np.asarray(whole)[1, 20:] == 0)  # padding queries see nothing

    cfg = preset("tiny", **TWO)
    net = Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(2))
    toks = jnp.asarray(rng.integers(3, 500, (1, 40)), jnp.int32)
    pos = jnp.arange(40, dtype=jnp.int32)[None]
    want = np.asarray(net.hidden_states(toks, pos)[0])
    monkeypatch.setattr(M, "XLA_ATTN_MAX_SCORE_BYTES", cfg.num_attention_heads * 40 * 4 * 16)  # 16-row blocks
    np.testing.assert_allclose(np.asarray(net.hidden_states(toks, pos)[0]), want, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()

    # the EAGLE-3 draft's attention over its cache (its prefill) too: in a loop over blocks, the same logits
    from spec_helpers import random_draft

    draft = random_draft(cfg, 3)
    feats = jnp.asarray(rng.standard_normal((1, 40, cfg.hidden_size)), jnp.float32)

    def draft_logits():
        zero = jnp.zeros((1,), jnp.int32)
        f = lambda: draft(toks, feats, net.embed_tokens, pos, draft.cache(1, 64), zero)[1]  # noqa: E731
        loops = [e for e in equations(jax.make_jaxpr(f)().jaxpr) if e.primitive.name == "scan"]
        return np.asarray(f()), len(loops)

    want, loops = draft_logits()
    monkeypatch.setattr(M, "XLA_ATTN_MAX_SCORE_BYTES", draft.cfg.num_attention_heads * 64 * 4 * 16)
    got, blocked_loops = draft_logits()
    assert (loops, blocked_loops) == (0, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_prefill_attention_is_blockwise_on_the_pallas_path(monkeypatch, kv_cache_dtype):
    """kernels="pallas": a prefill into a new cache (the engines' program: T * G = 80 query rows, above the
    split-KV kernel's 64), one into a cache holding keys already, and a forward without a cache run every
    layer's attention as the blockwise kernel (pallas_kernels.prefill_attention: no [.., T, S] scores), on the
    chunked RoPE layer and the global NoPE one, and give the XLA path's hidden states (float32: to 5e-4, as
    the path's other kernels do; a key masked wrongly moves them 1e-2 and more), and with everything else on
    the same kernels, those of XLA's attention to float32 rounding;
    MAVJAX_PALLAS_DISABLE=prefill_attention puts them back on XLA."""
    import jax.numpy as jnp

    from mavjax.kv_cache import KVCache, kv_dtype_for
    from helpers import pallas_call_names

    cfg = preset("tiny", **TWO)
    assert cfg.is_chunked(0) and not cfg.uses_rope(1)
    nets = {k: Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(4), kernels=k) for k in ("xla", "pallas")}
    kv = kv_dtype_for(kv_cache_dtype, jnp.float32)
    B, T, S = 2, 40, 64
    toks = jnp.asarray(np.random.default_rng(0).integers(3, 500, (B, T)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    zero = jnp.zeros((B,), jnp.int32)
    new = KVCache.create(cfg, B, S, kv)
    held = KVCache(k=[c.at[:, T:T + 8].set(0.5) for c in new.k], v=[c.at[:, T:T + 8].set(-1.0) for c in new.v],
                   pos=new.pos.at[:, T:T + 8].set(jnp.arange(8, dtype=jnp.int32)))  # positions 0-7 again: visible
    programs = {"fresh": lambda net, c: net.hidden_states(toks, pos, c, write_index=zero, fresh_cache=True)[0],
                "held": lambda net, c: net.hidden_states(toks, pos, c, write_index=zero)[0],
                "no cache": lambda net, c: net.hidden_states(toks, pos)[0]}

    def run(net, program, cache):
        graphdef, state = nnx.split(net)
        f = lambda st, c: programs[program](nnx.merge(graphdef, st), c)  # noqa: E731
        names = pallas_call_names(jax.make_jaxpr(f)(state, cache).jaxpr)
        return names.count("prefill_flash_attention"), np.asarray(jax.jit(f)(state, cache))

    xla, pallas = {}, {}
    for program, cache in (("fresh", new), ("held", held), ("no cache", new)):
        n_xla, xla[program] = run(nets["xla"], program, cache)
        n, pallas[program] = run(nets["pallas"], program, cache)
        assert (n_xla, n) == (0, cfg.num_hidden_layers), program
        assert np.linalg.norm(pallas[program] - xla[program]) / np.linalg.norm(xla[program]) < 5e-4, program
    fresh = xla["fresh"]
    assert np.linalg.norm(xla["held"] - fresh) / np.linalg.norm(fresh) > 1e-2  # the held keys were attended
    monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", "prefill_attention")
    for program, cache in (("fresh", new), ("held", held)):  # only the attention differs: to float32 rounding
        n, off = run(nets["pallas"], program, cache)
        assert n == 0 and np.linalg.norm(pallas[program] - off) / np.linalg.norm(off) < 1e-5, program


# kernel name patterns (re.match) of each family; "moe_router" is the pair kernels' variant that routes itself,
# "norm_router" the add + norm kernel's that computes the router's logits for them
_FAMILY_KERNELS = {"gemm": "fp8_weight_only", "qkv": "fp8_qkv_rope", "gate_up": "fp8_gate_up_swiglu",
                   "moe": "moe_gate_up", "moe_router": "moe_gate_up_pairs.*_route$",
                   "norm_router": "add_rms_norm.*_router$",
                   "attention": "split_kv_decode_attention", "norm": "add_rms_norm"}


@pytest.mark.parametrize("off", ["moe", "qkv,norm", "attention", "moe_shared", "moe_router", "norm_router",
                                 "gemm,qkv,gate_up,moe,attention,norm"])
def test_pallas_kernel_families_can_be_switched_off(monkeypatch, off):
    """MAVJAX_PALLAS_DISABLE runs the named kernel families as on the XLA path (bisecting a GPU failure): the
    traced decode step of an FP8 model on kernels="pallas" loses exactly those Pallas calls, and the logits stay
    those of the XLA path; an unknown family name is an error that lists the known ones. At decode the shared
    expert rides in the MoE pair kernels (no gate/up launch of its own) unless "moe_shared" is off."""
    import jax.numpy as jnp

    from mavjax.kv_cache import KVCache
    from mavjax.model import PALLAS_OPS
    from mavjax.quantize import quantize_model
    from helpers import pallas_call_names

    # mosaic, mosaic_dense: Hopper only (test_mosaic_gate_up_above_16_tokens); prefill_attention, fp8_prefill: not
    # in a decode step (test_prefill_attention_is_blockwise..., test_projections_leave_the_pallas_kernels_above_...)
    assert set(_FAMILY_KERNELS) | {"moe_shared", "mosaic", "mosaic_dense", "prefill_attention",
                                   "fp8_prefill"} == set(PALLAS_OPS)
    cfg = preset("tiny", **TWO)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    assert n_moe and n_dense
    nets = {k: quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(8), kernels=k)) for k in ("xla", "pallas")}
    tok, pos = jnp.array([[5]], jnp.int32), jnp.array([[3]], jnp.int32)
    cache = KVCache.create(cfg, 1, 8, jnp.float32)

    def step(net):
        graphdef, state = nnx.split(net)
        f = lambda st: nnx.merge(graphdef, st)(tok, pos, cache, write_index=pos[:, 0])[0]  # noqa: E731
        return pallas_call_names(jax.make_jaxpr(f)(state).jaxpr), f(state)

    def count(names, family):
        return sum(bool(re.match(_FAMILY_KERNELS[family], n)) for n in names)

    names, _ = step(nets["pallas"])
    assert all(count(names, fam) for fam in _FAMILY_KERNELS)  # every family in a decode step
    assert count(names, "moe_router") == n_moe  # one token, top-1: each MoE layer's pair kernels route it
    assert count(names, "norm_router") == n_moe  # ... from logits its FFN norm kernel computed
    assert count(names, "gate_up") == n_dense  # the MoE layers' shared experts ride in the pair kernels
    monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", off)
    names, logits = step(nets["pallas"])
    gone = off.split(",")
    for fam in _FAMILY_KERNELS:  # (the norm computes the logits only for pair kernels that route)
        gone_too = (fam in ("moe_router", "norm_router") and "moe" in gone
                    or fam == "norm_router" and ("moe_router" in gone or "norm" in gone))
        assert (count(names, fam) > 0) == (fam not in gone and not gone_too), (fam, off)
    if off == "moe_shared":
        assert count(names, "gate_up") == n_dense + n_moe and count(names, "moe") == n_moe
    np.testing.assert_allclose(np.asarray(logits), np.asarray(step(nets["xla"])[1]), rtol=2e-3, atol=2e-3)
    monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", "moe,flash")
    with pytest.raises(ValueError, match="unknown kernel families.*flash"):
        step(nets["pallas"])


def test_where_the_shared_expert_rides(monkeypatch):
    """On the Mosaic GPU MoE path (up to 16 pairs) the shared expert always rides along (its gate|up on the
    tokens' columns, which the pairs take anyway). On the Triton pair path (MAVJAX_PALLAS_DISABLE=mosaic) it
    rides at one token only, and with moe_shared off nowhere."""
    import jax.numpy as jnp

    from mavjax.model import MoE
    from mavjax.quantize import quantize_model
    from pallas_kernels import mgpu_gemv

    monkeypatch.setattr(mgpu_gemv, "on_hopper", lambda: True)
    cfg = preset("tiny", hidden_size=128, num_attention_heads=8)
    net = quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), kernels="pallas"))
    moe = next(m for _, m in nnx.iter_graph(net) if isinstance(m, MoE))
    tokens = [1, 4, 8, 16, 17]
    for off, mosaic, rides in [("", [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]), ("mosaic", [0] * 5, [1, 0, 0, 0, 0]),
                               ("moe_shared", [1, 1, 1, 1, 0], [0] * 5)]:
        monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", off)
        assert [int(moe.experts_on_mosaic(n)) for n in tokens] == mosaic, off
        assert [int(moe.shared_rides(n)) for n in tokens] == rides, off


@pytest.mark.parametrize("off", ["", "mosaic"])
@pytest.mark.parametrize("T", [1, 4])
def test_mosaic_gate_up_in_the_model(monkeypatch, off, T):
    """On a Hopper GPU the dense MLPs' gate/up at decode and verification run the Mosaic GPU kernel
    (pallas_kernels.mgpu_gemv), its x widened to float16 by the FFN's add + norm kernel (MLP.widen_rows), in
    place of Triton's fused gate/up + SwiGLU, and the MoE layers' experts too (pallas_kernels.moe_mgpu, in place
    of the Triton pair kernels); MAVJAX_PALLAS_DISABLE=mosaic brings Triton's back. Here
    `on_hopper` is patched and the kernel runs in Pallas' GPU interpreter: the traced step names exactly those
    kernels, and the logits are the XLA path's."""
    import jax.numpy as jnp

    from mavjax.kv_cache import KVCache
    from mavjax.quantize import quantize_model
    from pallas_kernels import mgpu_gemv
    from helpers import pallas_call_names

    monkeypatch.setattr(mgpu_gemv, "on_hopper", lambda: True)
    monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", off)
    jax.clear_caches()  # the kernels are chosen at trace time
    cfg = preset("tiny", hidden_size=128, num_attention_heads=8, **TWO)  # K and N multiples of 64
    n_dense = sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    nets = {k: quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(8), kernels=k)) for k in ("xla", "pallas")}
    tok = jnp.asarray(np.random.default_rng(T).integers(3, 500, (1, T)), jnp.int32)
    pos = jnp.arange(3, 3 + T, dtype=jnp.int32)[None]
    cache = KVCache.create(cfg, 1, 16, jnp.float32)

    def step(net):  # jitted: run eagerly, the GPU interpreter's callbacks can deadlock with the next op's dispatch
        graphdef, state = nnx.split(net)
        f = lambda st: nnx.merge(graphdef, st)(tok, pos, cache, write_index=pos[:, 0])[0]  # noqa: E731
        return pallas_call_names(jax.make_jaxpr(f)(state).jaxpr), jax.jit(f)(state)

    names, logits = step(nets["pallas"])
    count = lambda prefix, suffix="": sum(n.startswith(prefix) and n.endswith(suffix) for n in names)  # noqa: E731
    # several tokens on the Triton pair kernels: the shared experts' own gate/up (on the Mosaic GPU MoE path the
    # shared expert rides along: MoE.shared_rides)
    shared = cfg.num_hidden_layers - n_dense if T > 1 else 0
    want = (0, n_dense + shared, 0) if off else (n_dense, 0, n_dense)
    assert (count("mgpu_fp8_gemv"), count("fp8_gate_up_swiglu"), count("add_rms_norm", "_widen")) == want, names
    # the routed experts on it too (MoE.experts_on_mosaic, the shared expert riding along): two launches a
    # layer, XLA routes from the norm kernel's logits
    n_moe = cfg.num_hidden_layers - n_dense
    assert count("mgpu_fp8_moe") == (0 if off else 2 * n_moe), names
    assert count("moe_gate_up_pairs") + count("moe_down_pairs") == (2 * n_moe if off else 0), names
    assert count("add_rms_norm", "_router") == n_moe, names  # the logits still come from the norm kernel
    np.testing.assert_allclose(np.asarray(logits), np.asarray(step(nets["xla"])[1]), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("off", ["", "mosaic", "mosaic_dense"])
def test_mosaic_gate_up_above_16_tokens(monkeypatch, off):
    """bf16 model on a Hopper GPU (patched), a step of 24 tokens: every SwiGLU MLP's gate/up (the dense layers', and
    the MoE layers' shared expert, its own MLP at this many tokens) takes bf16 x as it is on the Mosaic GPU
    kernel's bf16 path (gate_up_swiglu's own choice from 17 to 64 rows, docs/benchmarks.md section
    26; no widening in the norm kernel, whose float16 form stops at 16 rows), and so do every attention output
    projection and every MLP's down projection (model.mosaic_gemm, section 33); MAVJAX_PALLAS_DISABLE=mosaic brings
    Triton's fused gate/up and weight-only kernels back, "mosaic_dense" Triton's for the output and down
    projections. (The kernel's values at these rows: tests/test_mgpu_gemv.py.) The routed experts take the sorted
    Mosaic GPU path (section 31) or Triton's, and the logits stay the XLA path's."""
    import jax.numpy as jnp

    from mavjax.kv_cache import KVCache
    from mavjax.quantize import quantize_model
    from pallas_kernels import mgpu_gemv
    from helpers import pallas_call_names

    monkeypatch.setattr(mgpu_gemv, "on_hopper", lambda: True)
    monkeypatch.setenv("MAVJAX_PALLAS_DISABLE", off)
    jax.clear_caches()
    cfg = preset("tiny", hidden_size=128, num_attention_heads=8, **TWO)
    net = quantize_model(Llama4(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(8), kernels="pallas"))
    T = 24
    tok = jnp.full((1, T), 7, jnp.int32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    cache = KVCache.create(cfg, 1, 32, jnp.bfloat16)
    graphdef, state = nnx.split(net)
    f = lambda st: nnx.merge(graphdef, st)(tok, pos, cache, write_index=pos[:, 0])[0]  # noqa: E731
    names = pallas_call_names(jax.make_jaxpr(f)(state).jaxpr)
    count = lambda prefix, suffix="": sum(n.startswith(prefix) and n.endswith(suffix) for n in names)  # noqa: E731
    L = mlps = cfg.num_hidden_layers  # the dense MLPs and, past the MoE kernels' 16 pairs, each shared expert's own
    gate_up = (0, mlps) if off == "mosaic" else (mlps, 0)
    o_down = (0, L + mlps) if off else (L + mlps, 0)  # on the Mosaic GPU kernel / Triton's weight-only kernels
    assert (count("mgpu_fp8_gemv"), count("fp8_gate_up_swiglu"), count("fp8_weight_only")) == (
        gate_up[0] + o_down[0], gate_up[1], o_down[1]), names
    assert count("add_rms_norm", "_widen") == 0, names
    # the routed experts of 24 pairs: the sorted path, on the Mosaic GPU kernel (moe_mgpu.moe_fp8_mgpu_sorted, two
    # launches) or, switched off, Triton's; the step computes the XLA path's function either way
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert (count("mgpu_fp8_moe"), count("moe_gate_up_m")) == ((0, n_moe) if off == "mosaic" else (2 * n_moe, 0)), names
    xla = quantize_model(Llama4(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(8), kernels="xla"))  # the same weights
    want = xla(tok, pos, cache, write_index=pos[:, 0])[0]
    got = f(state)
    assert float(jnp.linalg.norm((got - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32))) < 2e-2


def test_mosaic_moe_takes_its_x_padded_from_the_norm(monkeypatch):
    """bf16 model, Mosaic GPU MoE path: the FFN's add + norm kernel writes the MoE's x already padded to the
    kernel's rows (MoE.pad_rows, add_rms_norm(pad_rows=...)), so the traced step has one XLA pad fewer per MoE
    layer than with that switched off (the values are the same: tests/test_moe_mgpu.py, test_fused_kernels.py)."""
    import jax.numpy as jnp

    from mavjax.kv_cache import KVCache
    from mavjax.model import MoE
    from mavjax.quantize import quantize_model
    from pallas_kernels import mgpu_gemv
    from helpers import equations

    monkeypatch.setattr(mgpu_gemv, "on_hopper", lambda: True)
    cfg = preset("tiny", hidden_size=128, num_attention_heads=8, **TWO)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    net = quantize_model(Llama4(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(8), kernels="pallas"))
    tok, pos = jnp.full((1, 1), 7, jnp.int32), jnp.full((1, 1), 3, jnp.int32)
    cache = KVCache.create(cfg, 1, 16, jnp.bfloat16)
    graphdef, state = nnx.split(net)

    def pads():  # (pad equations, kernel launches) of a traced decode step
        f = lambda st: nnx.merge(graphdef, st)(tok, pos, cache, write_index=pos[:, 0])[0]  # noqa: E731
        names = [e.primitive.name for e in equations(jax.make_jaxpr(f)(state).jaxpr)]
        return names.count("pad"), names.count("pallas_call") + names.count("mpmd_map")

    moe = next(m for _, m in nnx.iter_graph(net) if isinstance(m, MoE))
    assert moe.pad_rows(1, jnp.bfloat16) == 8 and moe.pad_rows(1, jnp.float32) is None
    with_pad, kernels = pads()
    monkeypatch.setattr(MoE, "pad_rows", lambda self, n, dtype: None)
    jax.clear_caches()
    without, kernels2 = pads()
    assert without - with_pad == n_moe and kernels == kernels2, (with_pad, without)


@pytest.mark.parametrize("B,T", [(2, 1), (1, 4), (1, 17)])
def test_moe_kernels_for_several_tokens(B, T):
    """Each token's shared-expert row re-reads the whole shared expert, so with several tokens (batch 2, a
    4-token verify) the shared expert keeps its own batched launches; up to PAIRS_MAX tokens the pair kernels
    still route the tokens themselves from the logits the norm kernel computed, beyond it (17 tokens: the
    sorted grouped GEMM) XLA routes. The logits equal the XLA path's."""
    import jax.numpy as jnp

    from mavjax.kv_cache import KVCache
    from mavjax.quantize import quantize_model
    from pallas_kernels.moe_gemm import PAIRS_MAX
    from helpers import pallas_call_names

    cfg = preset("tiny", **TWO)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    nets = {k: quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(8), kernels=k)) for k in ("xla", "pallas")}
    tok = jnp.asarray(np.random.default_rng(T).integers(3, 500, (B, T)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(3, 3 + T, dtype=jnp.int32), (B, T))

    def step(net):
        graphdef, state = nnx.split(net)
        f = lambda st: nnx.merge(graphdef, st)(tok, pos, KVCache.create(cfg, B, 32, jnp.float32),  # noqa: E731
                                               write_index=pos[:, 0])[0]
        return pallas_call_names(jax.make_jaxpr(f)(state).jaxpr), f(state)

    names, logits = step(nets["pallas"])
    count = lambda fam: sum(bool(re.match(_FAMILY_KERNELS[fam], n)) for n in names)  # noqa: E731
    assert count("gate_up") == cfg.num_hidden_layers  # dense + shared
    assert count("moe") == n_moe  # routed experts only
    routes = B * T <= PAIRS_MAX
    assert count("moe_router") == count("norm_router") == (n_moe if routes else 0)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(step(nets["xla"])[1]), rtol=2e-3, atol=2e-3)
