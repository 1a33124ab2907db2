"""The shard_map layer bodies of mavjax.parallel on a simulated 8-device CPU mesh (one subprocess for all
meshes: the device-count flag must not reach the rest of the suite), and the multi-host settings."""

import pytest

from mavjax.distributed import settings
from helpers import run_on_8_devices


_run = run_on_8_devices


def test_moe_dispatch_and_fused_allreduce_equal_single_device():
    """MoE over meshes (8,1), (1,8), (2,4), (4,2) (FP8 weights: (2,4)) with every token routed to one expert
    (router weights set so) and top-2 routing, float32: both dispatches (local at 4 tokens, all_to_all exchange at
    128, and the ragged exchange) equal the single-device layer followed by residual add and RMSNorm; the fused all-reduce + residual +
    RMSNorm equals psum, add and norm done apart; kv heads split over a leading mesh prefix."""
    _run("""
        import numpy as np, jax, jax.numpy as jnp
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P
        import mavjax.parallel as par
        from mavjax.config import preset
        from mavjax.model import Llama4, rms_norm, route
        from mavjax.quantize import quantize_model
        from mavjax.sharding import make_mesh, spec_for
        cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                     num_experts_per_tok=2, intermediate_size=32)
        base = Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
        for layer in base.layers:  # inputs below are positive, so expert 3 outscores every other expert
            if layer.is_moe:
                layer.ffn.router.set_value(layer.ffn.router[...].at[:, 3].add(1.0))
        models = {"f32": base, "fp8": quantize_model(base)}
        rng = np.random.default_rng(0)
        for name, model in models.items():
            ffn, norm = model.layers[1].ffn, model.layers[2].attn_norm
            for B, T in ((4, 1), (4, 32)):  # 4 tokens: local dispatch; 128 tokens: all_to_all exchange
                h = jnp.asarray(np.abs(rng.standard_normal((B, T, cfg.hidden_size))), jnp.float32)
                res = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
                idx, _ = route(h.reshape(B * T, -1), ffn.router[...], 2)
                assert bool(jnp.all(idx[:, 0] == 3)), idx  # every token's first choice is expert 3
                x_want = res + ffn(h)
                h_want = rms_norm(x_want, norm.scale[...], norm.eps)
                meshes = ((8, 1), (1, 8), (2, 4), (4, 2)) if name == "f32" else ((2, 4),)
                # the ragged exchange (ragged_all_to_all offsets; an all_gather emulation of it on CPU) too
                ragged = ((8, 1), (2, 4)) if name == "f32" and B * T > 4 else ()
                for (E, Tn), how in [(m, "all_to_all") for m in meshes] + [(m, "ragged") for m in ragged]:
                    p = par.Parallel(make_mesh(E, Tn), exchange=how)
                    x, hn = jax.jit(lambda h, r: par.moe(p, ffn, h, r, norm))(h, res)
                    for got, want in ((x, x_want), (hn, h_want)):
                        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                        assert err < 1e-5, (name, B * T, E, Tn, how, err)
                print(name, B * T, "ok")

        # Fused all-reduce + residual + RMSNorm == psum, add, norm done as separate programs.
        mesh = make_mesh(2, 4)
        partials = jnp.asarray(rng.standard_normal((8, 3, 64)), jnp.float32)  # one [3, 64] partial per device
        res = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
        scale = jnp.asarray(rng.standard_normal(64), jnp.float32)
        fused = jax.jit(jax.shard_map(
            lambda p, r, s: par.allreduce_residual_rmsnorm(p[0], r, s, 1e-5, ("expert", "tensor")), mesh=mesh,
            in_specs=(P(("expert", "tensor")), P(), P()), out_specs=(P(), P())))
        x, hn = fused(partials, res, scale)
        summed = jax.jit(jax.shard_map(lambda p: jax.lax.psum(p[0], ("expert", "tensor")), mesh=mesh,
                                       in_specs=P(("expert", "tensor")), out_specs=P()))(partials)
        x_ref = res + summed
        np.testing.assert_allclose(x, x_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(hn, rms_norm(x_ref, scale, 1e-5), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x, res + partials.sum(0), rtol=1e-5, atol=1e-5)

        # kv heads: split over the leading mesh axes that divide them, replicated over the rest.
        axes = ("embed", "kv_heads", "head_dim")
        want = {(8, 1): (None, None, None), (1, 8): (None, None, None), (2, 4): (None, "expert", None),
                (4, 2): (None, None, None)}
        for (E, Tn), w in want.items():
            got = tuple(spec_for(axes, (64, 2, 16), make_mesh(E, Tn)))
            assert got + (None,) * (3 - len(got)) == w, (E, Tn, got)
            assert tuple(spec_for(axes, (64, 8, 16), make_mesh(E, Tn)))[1] in (("expert", "tensor"), "expert", "tensor")
        print("ok")
    """)


def test_vocab_sharded_logits_are_whole_on_every_device():
    """parallel.logits: every gather mode gives the single-device logits exactly (f32), over meshes that split
    the vocabulary over one or both axes; parallel.embed looks tokens up exactly; and the greedy decode step's
    program has no all-gather in "psum" mode and moves no table (on 2 H200s GSPMD all-gathered the whole
    embedding table every step, and its argmax over sharded logits made two more NCCL all-gathers)."""
    _run("""
        import re, numpy as np, jax, jax.numpy as jnp
        from flax import nnx
        import mavjax.parallel as par
        from mavjax.config import preset
        from mavjax.model import Llama4
        from mavjax.sharding import make_mesh, spec_for
        from jax.sharding import NamedSharding
        cfg = preset("tiny", num_hidden_layers=1)
        rng = np.random.default_rng(0)
        h = jnp.asarray(rng.standard_normal((2, 3, cfg.hidden_size)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((cfg.hidden_size, cfg.vocab_size)), jnp.float32)
        want = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        for E, Tn in ((1, 8), (2, 4), (8, 1)):
            mesh = make_mesh(E, Tn)
            ws = jax.device_put(w, NamedSharding(mesh, spec_for(("embed", "vocab"), w.shape, mesh)))
            for how in ("psum", "all_gather", "gspmd"):
                p = par.Parallel(mesh, logits_gather=how)
                got = jax.jit(lambda h, w: par.logits(p, h, w))(h, ws)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{E}x{Tn} {how}")
                if how != "gspmd":
                    assert got.sharding.is_fully_replicated, (E, Tn, how, got.sharding)
        # the vocabulary-parallel embedding lookup: exact, replicated, for every token (first and last rows too)
        table = jnp.asarray(rng.standard_normal((cfg.vocab_size, cfg.hidden_size)), jnp.bfloat16)
        tokens = jnp.asarray([[0, 1, cfg.vocab_size - 1], [cfg.vocab_size // 2, 7, cfg.vocab_size // 2 - 1]])
        for E, Tn in ((1, 8), (2, 4), (8, 1), (1, 2)):
            mesh = make_mesh(E, Tn)
            ts = jax.device_put(table, NamedSharding(mesh, spec_for(("vocab", "embed"), table.shape, mesh)))
            got = jax.jit(lambda t, x: par.embed(par.Parallel(mesh), t, x))(ts, tokens)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(table[tokens], np.float32))
            assert got.sharding.is_fully_replicated and got.dtype == table.dtype
        try:
            par.Parallel(make_mesh(1, 8), logits_gather="ring")
            raise AssertionError("bad logits_gather accepted")
        except ValueError as e:
            assert "logits_gather" in str(e)

        # the greedy step: logits whole by psum, the argmax local (no all-gather left in the program)
        from mavjax.bench import random_model
        net = random_model(cfg, quant="fp8", kernels="xla", mesh=make_mesh(1, 2))
        assert net.parallel.logits_gather == "psum"
        graphdef, state = nnx.split(net)
        def step(state, tok):
            return jnp.argmax(nnx.merge(graphdef, state)(tok)[0][:, -1], -1)
        hlo = jax.jit(step).lower(state, jnp.zeros((1, 4), jnp.int32)).compile().as_text()
        assert not re.search(r"all-gather(-start)?\\(", hlo), [l for l in hlo.splitlines() if "all-gather" in l][:3]
        # nothing the size of a parameter travels (the embedding table was all-gathered on GPUs)
        from mavjax.sharding import collective_bytes
        moved = collective_bytes(hlo)
        assert sum(moved.values()) < net.embed[...].nbytes // 4, moved
        print("ok")
    """)


def test_distributed_settings_from_the_environment():
    assert settings({}) is None
    assert settings({"MAVJAX_DISTRIBUTED": "auto"}) == {}
    assert settings({"MAVJAX_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "h:1"}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert settings(env) == dict(coordinator_address="host0:1234", num_processes=2, process_id=1,
                                 local_device_ids=[0, 1])
    with pytest.raises(ValueError, match="missing JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        settings({"JAX_COORDINATOR_ADDRESS": "host0:1234"})
    with pytest.raises(ValueError, match="must lie in 0..JAX_NUM_PROCESSES-1"):
        settings({**env, "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        settings({**env, "JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="MAVJAX_DISTRIBUTED"):
        settings({"MAVJAX_DISTRIBUTED": "maybe"})
