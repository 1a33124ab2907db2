"""Sharding rules on a simulated 8-device CPU mesh (each test runs in a subprocess, so that the flag that
splits the CPU into 8 devices does not reach the rest of the suite)."""


import pytest

from mavjax.sharding import ShardingError, parse_mesh
from helpers import run_on_8_devices


_run = run_on_8_devices


def test_each_parameter_is_sharded_as_the_rules_say():
    _run("""
        import jax, jax.numpy as jnp
        from jax.sharding import PartitionSpec as P
        from flax import nnx
        from mavjax.config import preset
        from mavjax.model import Llama4
        from mavjax.sharding import make_mesh, param_shardings
        assert len(jax.devices()) == 8
        cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=8, num_local_experts=8)
        model = nnx.eval_shape(lambda: Llama4(cfg, dtype=jnp.float32))
        ALL = ("expert", "tensor")
        for E, T in ((8, 1), (1, 8), (2, 4), (4, 2)):
            sh = param_shardings(model, make_mesh(E, T))
            def want(*axes):  # drop mesh axes of size 1, as the rules do
                out = []
                for a in axes:
                    keep = tuple(x for x in ((a,) if isinstance(a, str) else (a or ())) if {"expert": E, "tensor": T}[x] > 1)
                    out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
                return P(*out)
            assert sh["layers.0.attn.wq"].spec == want(None, ALL, None)
            assert sh["layers.0.attn.wk"].spec == want(None, ALL, None)
            assert sh["layers.0.attn.wo"].spec == want(ALL, None, None)
            assert sh["layers.0.ffn.w_gate"].spec == want(None, ALL)  # dense MLP, layer 0
            assert sh["layers.0.ffn.w_down"].spec == want(ALL, None)
            assert sh["layers.1.ffn.w_up"].spec == want("expert", None, "tensor")  # experts, layer 1
            assert sh["layers.1.ffn.w_down"].spec == want("expert", "tensor", None)
            assert sh["layers.1.ffn.router"].spec == P(None, None)
            assert sh["layers.1.ffn.shared.w_gate"].spec == want(None, ALL)
            assert sh["embed"].spec == want(ALL, None) and sh["lm_head"].spec == want(None, ALL)
            assert sh["norm.scale"].spec == P(None)
        print("ok")
    """)


def test_sharded_restore_equals_single_device(tmp_path):
    _run(f"""
        import numpy as np, jax, jax.numpy as jnp
        from flax import nnx
        from mavjax.config import preset
        from mavjax.model import Llama4
        from mavjax.checkpoint import save_model, load_model
        from mavjax.sharding import make_mesh, param_shardings
        cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=8, num_local_experts=8)
        save_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), "{tmp_path}/ckpt")
        _, ref = load_model("{tmp_path}/ckpt")
        abstract = nnx.eval_shape(lambda: Llama4(cfg, dtype=jnp.float32))
        _, m = load_model("{tmp_path}/ckpt", shardings=param_shardings(abstract, make_mesh(2, 4)))
        w = m.layers[1].ffn.w_up[...]
        assert len(w.sharding.device_set) == 8 and w.addressable_shards[0].data.shape == (4, 64, 16)
        np.testing.assert_array_equal(np.asarray(w), np.asarray(ref.layers[1].ffn.w_up[...]))
        print("ok")
    """)


def test_a_mesh_that_does_not_divide_is_a_clear_error():
    out = _run("""
        import jax.numpy as jnp
        from flax import nnx
        from mavjax.config import preset
        from mavjax.model import Llama4
        from mavjax.sharding import ShardingError, make_mesh, param_shardings
        model = nnx.eval_shape(lambda: Llama4(preset("tiny"), dtype=jnp.float32))  # 4 heads, 2 kv heads, 4 experts
        for mesh, word in (((1, 8), "heads"), ((8, 1), "expert")):
            try:
                param_shardings(model, make_mesh(*mesh))
            except ShardingError as e:
                assert word in str(e) and "cannot be split" in str(e), e
                print(e)
            else:
                raise AssertionError(f"mesh {mesh} accepted")
        try:
            make_mesh(4, 4)
        except ShardingError as e:
            assert "needs 16 devices, 8 available" in str(e)
        else:
            raise AssertionError("16-device mesh accepted")
    """)
    assert "cannot be split 8 ways" in out


def test_parse_mesh():
    assert parse_mesh("expert=2,tensor=4") == {"expert": 2, "tensor": 4}
    assert parse_mesh("tensor=8") == {"expert": 1, "tensor": 8}
    for bad in ("experts=2", "tensor=0", "tensor=x"):
        with pytest.raises(ShardingError, match="bad mesh entry"):
            parse_mesh(bad)


def test_sharded_generation_equals_single_device(tmp_path):
    """LLM(path, mesh=...) for meshes (8,1), (1,8), (2,4): logits and greedy generations equal the
    single-device ones (prefill of 4 x 32 tokens through the all_to_all MoE dispatch, logits of 32 tokens and
    decode through the local one), with routing skewed so that nearly every token goes to one expert, and 2 kv heads for 8 devices (kv heads split over a mesh prefix); the
    KV cache comes out sharded as the rules say."""
    _run(f"""
        import numpy as np, jax, jax.numpy as jnp
        from flax import nnx
        from mavjax import LLM, SamplingParams
        import mavjax.parallel as par
        from mavjax.config import preset
        from mavjax.model import Llama4, route
        from mavjax.checkpoint import save_model
        from mavjax.sharding import cache_shardings
        traced = []  # which MoE dispatch each traced program used
        for name in ("moe_local", "moe_exchange"):
            def wrap(*a, _f=getattr(par, name), _n=name):
                traced.append(_n)
                return _f(*a)
            setattr(par, name, wrap)
        cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                     num_hidden_layers=2)  # a dense RoPE and an MoE NoPE layer: each kind once
        model = Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
        # Skew: every token carries a positive component on hidden unit 0, which expert 3's router column reads.
        model.embed.set_value(model.embed[...].at[:, 0].add(0.1))
        for layer in model.layers:
            if layer.is_moe:
                layer.ffn.router.set_value(layer.ffn.router[...].at[0, 3].add(1.0))
        save_model(model, "{tmp_path}/ckpt")
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 500, n).tolist() for n in (5, 17, 30)]
        long = rng.integers(3, 500, 70).tolist()
        _, _, taps = model.hidden_states(jnp.asarray([long]), jnp.arange(70)[None], collect_layers=(0,))
        frac = float(jnp.mean(route(model.layers[1].ffn_norm(taps[0][0]), model.layers[1].ffn.router[...], 1)[0] == 3))
        assert frac > 0.9, frac  # the skew is real: nearly every token to one expert
        sp = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        ref = LLM("{tmp_path}/ckpt")
        want_tokens = [o.token_ids for o in ref.generate(prompts, sp)]
        want_logits = ref.logits(prompts[2])
        for mesh in ("expert=8,tensor=1", "expert=1,tensor=8", "expert=2,tensor=4"):
            traced.clear()
            llm = LLM("{tmp_path}/ckpt", mesh=mesh)
            assert len(llm.engine.state["layers"][1]["ffn"]["w_up"][...].sharding.device_set) == 8
            got = llm.logits(prompts[2])
            rel = np.linalg.norm(got - want_logits) / np.linalg.norm(want_logits)
            assert rel < 1e-5, (mesh, rel)
            caches = []
            prefill = llm.engine.prefill
            llm.engine.prefill = lambda b, S: caches.append(prefill(b, S)) or caches[-1]
            assert [o.token_ids for o in llm.generate(prompts, sp)] == want_tokens, mesh
            k = caches[0][1].k[0]
            assert k.sharding.is_equivalent_to(cache_shardings(cfg, *k.shape[:2], llm.engine.mesh).k[0], 4), \
                (mesh, k.sharding)
            if mesh == "expert=2,tensor=4":  # 2 kv heads over the leading axis, replicated over tensor
                assert tuple(k.sharding.spec)[:3] == (None, None, "expert"), k.sharding.spec
            assert "moe_local" in traced, (mesh, traced)  # decode and short prompts
            assert ("moe_exchange" in traced) == (not mesh.startswith("expert=1")), (mesh, traced)
            print(mesh, "ok", sorted(set(traced)))
    """)


def test_pallas_kernels_under_a_mesh(tmp_path):
    """LLM(path, mesh=..., kernels="pallas", quantize="fp8") equals the single-device Pallas model (logits and
    greedy tokens), with the kernels running on each device's shard: the split-KV attention sees the device's
    own heads (shard_map, not a GSPMD gather of the cache) and decode's routed experts go through the Pallas
    MoE kernel, with experts split over 2 devices (pairs routed elsewhere) and their units over 4; with experts
    whole on every device (expert=1, tensor=8) the shared expert's shard rides in the MoE pair kernels, which
    route the tokens themselves from the router's logits (XLA routes with experts split)."""
    _run(f"""
        import numpy as np, jax, jax.numpy as jnp
        from flax import nnx
        from mavjax import LLM, SamplingParams
        import pallas_kernels.decode_attention as da
        import pallas_kernels.moe_gemm as mg
        from mavjax.config import preset
        from mavjax.model import Llama4
        from mavjax.checkpoint import save_model
        seen = {{"heads": set(), "moe": 0, "pairs": 0, "shared": 0, "routes": 0, "sorted": 0, "exchange": False}}
        att = da.decode_attention
        def spy_att(q, *a, **k):
            seen["heads"].add(q.shape[2])
            return att(q, *a, **k)
        da.decode_attention = spy_att
        moe = mg.moe_fp8
        def spy_moe(*a, **k):
            seen["moe"] += 1
            seen["sorted"] += seen["exchange"]  # the prefill exchange's received rows (expert_rows)
            return moe(*a, **k)
        mg.moe_fp8 = spy_moe
        import mavjax.parallel as par
        rows = par.expert_rows
        def spy_rows(*a, **k):
            seen["exchange"] = True
            try:
                return rows(*a, **k)
            finally:
                seen["exchange"] = False
        par.expert_rows = spy_rows
        pairs = mg.moe_fp8_pairs
        def spy_pairs(*a, **k):  # (moe_fp8's pair path comes here too)
            seen["pairs"] += 1
            seen["shared"] += k.get("shared") is not None
            seen["routes"] += k.get("router_logits") is not None
            return pairs(*a, **k)
        mg.moe_fp8_pairs = spy_pairs
        cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
                     num_hidden_layers=2)  # a dense RoPE and an MoE NoPE layer: each kind once
        save_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), "{tmp_path}/ckpt")
        prompt = np.random.default_rng(0).integers(3, 500, 12).tolist()
        sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        kw = dict(kernels="pallas", quantize="fp8", max_model_len=128)
        ref = LLM("{tmp_path}/ckpt", **kw)
        want_tokens, want_logits = ref.generate([prompt], sp)[0].token_ids, ref.logits(prompt)
        assert seen["heads"] == {{8}}, seen
        # heads over all 8 devices; experts over 2 (pairs routed elsewhere), or whole on every device
        for mesh in ("expert=2,tensor=4", "expert=1,tensor=8"):
            seen["heads"].clear(); seen.update(moe=0, pairs=0, shared=0, routes=0)
            llm = LLM("{tmp_path}/ckpt", mesh=mesh, **kw)
            got = llm.logits(prompt)
            rel = np.linalg.norm(got - want_logits) / np.linalg.norm(want_logits)
            assert rel < 1e-3, (mesh, rel)
            assert llm.generate([prompt], sp)[0].token_ids == want_tokens, mesh
            assert seen["heads"] == {{1}}, (mesh, seen)  # 8 heads over 8 devices: one per device
            whole = mesh == "expert=1,tensor=8"
            assert seen["pairs"] > 0 and (seen["moe"] > 0 or whole), (mesh, seen)
            assert (seen["shared"] > 0) == whole and (seen["routes"] > 0) == whole, (mesh, seen)
            if mesh == "expert=2,tensor=4":  # >= 64 tokens: the routed-expert exchange, on the Pallas kernels
                # (against the same mesh with XLA's exchange: at 70 tokens the dense GEMMs quantize activations
                # to FP8 per device shard, ~4% from one device on this random model, so compare like with like;
                # measured 5.5e-3, the Pallas and XLA MoE paths' usual rounding difference)
                import os
                long = np.random.default_rng(1).integers(3, 500, 70).tolist()
                got = llm.logits(long)
                assert seen["sorted"] > 0, seen
                os.environ["MAVJAX_PALLAS_DISABLE"] = "moe"
                want = LLM("{tmp_path}/ckpt", mesh=mesh, **kw).logits(long)
                del os.environ["MAVJAX_PALLAS_DISABLE"]
                assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2, mesh
            print(mesh, "ok")
    """)


def test_speculative_decoding_over_a_mesh(tmp_path):
    """LLM(path, mesh=..., draft=DIR): the target sharded (shard_map layers, cache by the rules), the draft a
    replica on every device; greedy output token-identical to plain single-device decoding, with the draft
    accepting part of its guesses (a draft that knows the target's successor map), Pallas path included."""
    _run(f"""
        import sys, numpy as np, jax.numpy as jnp
        sys.path.insert(0, "{__import__('os').path.dirname(__file__)}")
        from spec_helpers import configs, good_draft, successor_target
        from mavjax import LLM, SamplingParams
        from mavjax.checkpoint import save_model
        from mavjax.eagle3 import save_draft
        cfg = configs()["moe"].replace(num_attention_heads=8, num_key_value_heads=8, num_local_experts=8)
        net, perm = successor_target(cfg, 3)
        save_model(net, "{tmp_path}/t")
        save_draft(good_draft(cfg, net, perm, 4), "{tmp_path}/d")
        prompts = [np.random.default_rng(1).integers(3, cfg.vocab_size, n).tolist() for n in (6, 11)]
        sp = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
        want = [o.token_ids for o in LLM("{tmp_path}/t").generate(prompts, sp)]
        one = LLM("{tmp_path}/t", draft="{tmp_path}/d", num_draft_tokens=3).generate(prompts, sp)
        want_acc = [o.metrics.mean_acceptance_length for o in one]
        assert [o.token_ids for o in one] == want and max(want_acc) > 1.2, want_acc  # some guesses accepted
        for mesh, kernels in (("expert=2,tensor=4", "pallas"),):  # the Pallas path: shard_map attention too
            llm = LLM("{tmp_path}/t", mesh=mesh, draft="{tmp_path}/d", num_draft_tokens=3, kernels=kernels)
            outs = llm.generate(prompts, sp)
            assert [o.token_ids for o in outs] == want, (mesh, kernels)
            acc = [o.metrics.mean_acceptance_length for o in outs]
            assert acc == want_acc, (mesh, kernels, acc, want_acc)  # the same guesses accepted
            print(mesh, kernels, "ok", acc)
    """)
