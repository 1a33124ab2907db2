"""L2 prefetch of the next op's weights (pallas_kernels/prefetch.py) and the model's plan of what to prefetch.

On a CPU the prefetches have nothing to warm (interpret mode ignores the extra operands), so what is checked
here is what can break: that each program's share of the lines covers every line once, that a kernel given
prefetch operands computes exactly what it computes without them (the operands shift the kernel's refs), that
the instruction reaches the Triton module lowered for a GPU, and that the model hands each kernel the weights
of the ops after it. What the prefetches buy is measured on a GPU (docs/benchmarks.md section 13)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mavjax.config import preset
from mavjax.model import Llama4
from mavjax.quantize import quantize_model
from pallas_kernels import prefetch
from pallas_kernels.fp8_gemm import fp8_matmul, fp8_matmul_add_rms_norm, quantize_weight_per_channel
from pallas_kernels.fused_gemm import gate_up_swiglu, qkv_rope
from pallas_kernels.moe_gemm import moe_fp8, quantize_experts
from pallas_kernels.prefetch import Prefetch


@pytest.mark.parametrize("lines", [0, 1, 7, 1000, 1025])
@pytest.mark.parametrize("programs", [1, 3, 132])
def test_program_ranges_cover_every_line_once(lines, programs):
    seen = np.zeros(lines, int)
    for pid in range(programs):
        lo, hi = (int(v) for v in prefetch.program_range(jnp.int32(pid), programs, lines))
        assert 0 <= lo <= hi <= lines
        seen[lo:hi] += 1
    assert (seen == 1).all()


def test_row_lines():
    assert prefetch.row_lines((4, 256, 300), jnp.float8_e4m3fn, indexed=True) == (76800, 600)
    assert prefetch.row_lines((4, 256, 300), jnp.float8_e4m3fn, indexed=False) == (307200, 2400)
    assert prefetch.row_lines((3, 100), jnp.bfloat16, indexed=False) == (300, 5)  # 600 bytes: a partial line


def test_depth_from_environment(monkeypatch):
    monkeypatch.setenv("MAVJAX_PREFETCH", "2")
    assert prefetch.depth() == 2
    monkeypatch.setenv("MAVJAX_PREFETCH", "-1")
    with pytest.raises(ValueError, match="MAVJAX_PREFETCH"):
        prefetch.depth()


def _w(key, K, N):
    return quantize_weight_per_channel(jax.random.normal(key, (K, N), jnp.float32) * 0.05)


def _extras():
    """Prefetch operands of assorted kinds: an indexed stack (a routed expert), a whole bf16 array."""
    stack = jnp.ones((4, 96, 80), jnp.float8_e4m3fn)
    return (Prefetch(stack, jnp.array([3, 0], jnp.int32)), Prefetch(jnp.ones((7, 33), jnp.bfloat16)))


def test_gemm_kernels_compute_the_same_with_prefetch_operands():
    ks = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(ks[0], (3, 200), jnp.bfloat16)
    w, s = _w(ks[1], 200, 144)
    res = jax.random.normal(ks[2], (3, 144), jnp.bfloat16)
    nw = jnp.ones((144,), jnp.bfloat16)
    for split in (1, 3):
        a = fp8_matmul(x, w, s, split_k=split, interpret=True, poison_output=True)
        b = fp8_matmul(x, w, s, split_k=split, interpret=True, poison_output=True, prefetch=_extras())
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        a = fp8_matmul_add_rms_norm(x, w, s, res, nw, eps=1e-5, split_k=split, reduce="kernel", interpret=True,
                                    poison_output=True)
        b = fp8_matmul_add_rms_norm(x, w, s, res, nw, eps=1e-5, split_k=split, reduce="kernel", interpret=True,
                                    poison_output=True, prefetch=_extras())
        for u, v in zip(a, b):
            np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))
    wg, sg = _w(ks[3], 200, 96)
    wu, su = _w(ks[4], 200, 96)
    a = gate_up_swiglu(x, wg, sg, wu, su, split_k=2, interpret=True, poison_output=True)
    b = gate_up_swiglu(x, wg, sg, wu, su, split_k=2, interpret=True, poison_output=True, prefetch=_extras())
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    (wq, sq), (wk, sk), (wv, sv) = _w(ks[5], 200, 64), _w(ks[6], 200, 32), _w(ks[7], 200, 32)
    a = qkv_rope(x, wq, sq, wk, sk, wv, sv, head_dim=32, interpret=True, poison_output=True)
    b = qkv_rope(x, wq, sq, wk, sk, wv, sv, head_dim=32, interpret=True, poison_output=True, prefetch=_extras())
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))


def test_moe_pairs_compute_the_same_with_prefetches():
    E, D, F, N = 4, 64, 96, 2
    ks = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(ks[0], (N, D), jnp.bfloat16)
    ws, scales = quantize_experts(*(0.05 * jax.random.normal(k, sh) for k, sh in
                                     zip(ks[1:4], [(E, D, F), (E, D, F), (E, F, D)])))
    idx = jnp.array([[1], [E]], jnp.int32)  # the second pair is dropped (id E): its prefetch index is clamped
    sc = jax.nn.sigmoid(jax.random.normal(ks[4], (N, 1))).astype(jnp.bfloat16)
    a = moe_fp8(x, idx, sc, *ws, scales, method="pairs", interpret=True, poison_output=True)
    b = moe_fp8(x, idx, sc, *ws, scales, method="pairs", interpret=True, poison_output=True, prefetch=_extras(),
                prefetch_experts=True)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_prefetch_reaches_the_gpu_kernel():
    """Lowered for CUDA (no GPU needed: the Triton module is serialized into the custom call), the kernel
    carries the prefetch instruction exactly when it is given something to prefetch."""
    x = jnp.ones((1, 256), jnp.bfloat16)
    w, s = _w(jax.random.key(2), 256, 128)
    nxt = jnp.ones((2, 128, 256), jnp.float8_e4m3fn)

    def text(pf):
        f = jax.jit(lambda x, w, s, n, i: fp8_matmul(x, w, s, prefetch=((n, i),) if pf else ()))
        return f.trace(x, w, s, nxt, jnp.array([1], jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()

    try:
        with_pf = text(True)
    except Exception as e:  # pragma: no cover - a jaxlib that cannot lower for CUDA on this host
        pytest.skip(f"cannot lower for cuda here: {e}")
    assert "prefetch.global.L2" in with_pf
    assert "prefetch.global.L2" not in text(False)


@pytest.fixture(scope="module")
def fp8_tiny():
    cfg = preset("tiny")
    return quantize_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3), kernels="pallas"))


def test_prefetch_plan_names_the_following_weights(fp8_tiny, monkeypatch):
    net = fp8_tiny
    groups = []
    for layer in net.layers:
        groups += [*layer.attn.weights(), *layer.ffn.weights()]
    assert len(groups) == 4 * len(net.layers)
    assert any(layer.is_moe for layer in net.layers) and any(not layer.is_moe for layer in net.layers)
    for depth in (1, 2):
        monkeypatch.setenv("MAVJAX_PREFETCH", str(depth))
        plan = net.prefetch_plan(1)
        assert len(plan) == len(groups)
        for g, ws in enumerate(plan):
            want = [w for grp in groups[g + 1:g + 1 + depth] for w in grp]
            assert len(ws) == len(want) and all(a is b for a, b in zip(ws, want))
        assert plan[-1] == ()
        assert net.prefetch_plan(64) is not None and net.prefetch_plan(65) is None  # prefill: none
    monkeypatch.setenv("MAVJAX_PREFETCH", "0")
    assert net.prefetch_plan(1) is None
    monkeypatch.setenv("MAVJAX_PREFETCH", "1")
    xla = quantize_model(Llama4(preset("tiny"), dtype=jnp.float32, rngs=nnx.Rngs(3)))
    assert xla.prefetch_plan(1) is None  # the XLA path has no kernels to prefetch in
    bf16 = Llama4(preset("tiny"), dtype=jnp.float32, rngs=nnx.Rngs(3), kernels="pallas")
    assert bf16.prefetch_plan(1) is None  # nor the bf16 path (no FP8 weight-streaming kernels)


def _pallas_operands(net, ids):
    """(logits, the operand count of every pallas_call) of one decode-shaped call (one token after a prompt)."""
    from mavjax.kv_cache import KVCache

    graphdef, state = nnx.split(net)

    def step(st, toks, pos, cache, wi):
        return nnx.merge(graphdef, st)(toks, pos, cache, wi)

    cache = KVCache.create(net.cfg, 1, 16, jnp.float32)
    _, cache = jax.jit(step)(state, jnp.asarray([ids[:-1]], jnp.int32),
                             jnp.arange(len(ids) - 1, dtype=jnp.int32)[None], cache, jnp.zeros((1,), jnp.int32))
    args = (state, jnp.asarray([ids[-1:]], jnp.int32), jnp.asarray([[len(ids) - 1]], jnp.int32), cache,
            jnp.asarray([len(ids) - 1], jnp.int32))
    jaxpr = jax.make_jaxpr(step)(*args).jaxpr

    def count(jx):
        out = []
        for e in jx.eqns:
            if e.primitive.name == "pallas_call":
                out.append((str(e.params.get("name")), len(e.invars)))
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        out += count(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        out += count(sub)
        return out

    return np.asarray(jax.jit(step)(*args)[0]), count(jaxpr)


def test_model_decode_is_unchanged_by_prefetching(fp8_tiny, monkeypatch):
    ids = np.random.default_rng(4).integers(3, 500, 6).tolist()
    monkeypatch.setenv("MAVJAX_PREFETCH", "0")
    off, calls_off = _pallas_operands(fp8_tiny, ids)
    monkeypatch.setenv("MAVJAX_PREFETCH", "2")
    on, calls_on = _pallas_operands(fp8_tiny, ids)
    np.testing.assert_array_equal(off, on)
    assert [n for n, _ in calls_on] == [n for n, _ in calls_off]  # the same kernels...
    more = [n for (n, a), (_, b) in zip(calls_on, calls_off) if a > b]  # ...some with the weights to prefetch
    assert any(re.match("fp8_qkv_rope", n) for n in more), more
    assert any(re.match("moe_gate_up_pairs", n) for n in more), more  # the chosen experts' down weights
    assert any(re.match("moe_down_pairs", n) for n in more), more  # the next layer's QKV
