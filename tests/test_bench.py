"""`mavjax bench` on tiny random models: the rank-slice config transform (each tensor-parallel dimension 1/n,
as the sharding rules split it), random weights filled on the device (FP8 directly, chunked), the sweep and
the rank-slice benchmark end to end, the Maverick slice's size, and bad options."""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import cpu_env

from mavjax.bench import FP8_SPREAD, TENSOR_AXES, rank_slice_config, random_model, with_kernels
from mavjax.cli import main
from mavjax.config import ConfigError, preset
from mavjax.model import Llama4
from mavjax.sharding import spec_for


def _params(cfg, quant):
    m = nnx.eval_shape(lambda: Llama4(cfg, dtype=jnp.bfloat16, quant=quant))
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


@pytest.mark.parametrize("quant", [None, "fp8"])
@pytest.mark.parametrize("n", [2, 4])
def test_rank_slice_is_the_tensor_parallel_shard(quant, n):
    cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=4)
    full, part = _params(cfg, quant), _params(rank_slice_config(cfg, n), quant)
    assert full.keys() == part.keys()
    mesh = types.SimpleNamespace(shape={"expert": 1, "tensor": n})  # the (expert=1, tensor=n) layout
    n_split = 0
    for name, v in full.items():
        shape, axes = v.get_value().shape, v.get_metadata()["logical_axes"]
        spec = spec_for(axes, shape, mesh, name)
        shard = tuple(d // (n if s is not None else 1) for d, s in zip(shape, spec))
        assert part[name].get_value().shape == shard, name  # exactly what sharding.RULES puts on one device
        split = any(a in TENSOR_AXES for a in axes)
        assert part[name].get_value().size * (n if split else 1) == v.get_value().size, name
        n_split += split
    assert n_split > len(full) // 2  # most tensors are split: heads, MLP units, expert units, vocabulary
    s = rank_slice_config(cfg, n)
    assert (s.num_attention_heads, s.num_key_value_heads, s.intermediate_size, s.intermediate_size_mlp,
            s.vocab_size, s.num_local_experts) == (8 // n, 4 // n, 64 // n, 128 // n, 512 // n, 4)


def test_rank_slice_of_maverick_by_8(capsys):
    s = rank_slice_config(preset("maverick"), 8)
    assert (s.num_attention_heads, s.num_key_value_heads, s.intermediate_size, s.intermediate_size_mlp,
            s.vocab_size, s.num_local_experts, s.num_hidden_layers) == (5, 1, 1024, 2048, 25256, 128, 48)
    nbytes = sum(v.get_value().size * v.get_value().dtype.itemsize for v in _params(s, "fp8").values())
    assert 45e9 < nbytes < 55e9  # "about 50 GB": fits an 80 GB H100
    with pytest.raises(ConfigError, match="num_attention_heads = 40 is not divisible by 3"):
        rank_slice_config(preset("maverick"), 3)
    capsys.readouterr()
    assert main(["bench", "--random-weights", "--preset", "maverick", "--rank-slice", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 q heads, 1 kv heads, dense MLP 2048, 128 experts of 1024 units, vocab 25256" in out
    assert f"{nbytes / 1e9:.2f} GB" in out


def test_random_weights_fp8_chunked():
    cfg = preset("tiny", num_hidden_layers=2)
    m = random_model(cfg, quant="fp8", chunk_elems=1000, seed=1)  # expert weights [4, 64, 64]: chunked
    layer = m.layers[1]
    assert layer.is_moe
    w, s = layer.ffn.w_gate[...], layer.ffn.w_gate_scale[...]
    assert w.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32 and w.shape == (4, 64, 64)
    deq = np.asarray(w.astype(jnp.float32)) * np.asarray(s)[:, None, :]
    assert abs(deq.std() - cfg.initializer_range) < 0.1 * cfg.initializer_range
    assert not np.array_equal(np.asarray(w[0].astype(jnp.float32)), np.asarray(w[1].astype(jnp.float32)))
    assert np.all(np.asarray(layer.attn_norm.scale[...]) == 1)
    assert m.embed[...].dtype == jnp.bfloat16 and layer.ffn.router[...].dtype == jnp.bfloat16  # not quantized
    np.testing.assert_allclose(np.asarray(m.inv_freq[...]), cfg.rope_inv_freq(), rtol=1e-6)
    assert abs(float(np.asarray(m.embed[...], np.float32).std()) - cfg.initializer_range) < 2e-3
    assert float(np.asarray(s).max()) == pytest.approx(cfg.initializer_range / FP8_SPREAD)
    p = with_kernels(m, "pallas")  # the other kernel path over the same arrays: no copy of the weights
    assert (p.kernels, p.layers[1].ffn.kernels, m.layers[1].ffn.kernels) == ("pallas", "pallas", "xla")
    assert p.layers[1].ffn.w_gate[...] is w and p.embed[...] is m.embed[...]


def test_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["bench", "--random-weights", "--preset", "tiny", "--layers", "2", "--batch-sizes", "1", "2",
                 "--input-len", "8", "--output-len", "4", "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in rows] == [(1, 8, 4), (2, 8, 4)]
    for r in rows:
        for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "tokens_per_s_per_user", "output_throughput",
                  "total_token_throughput"):
            assert r[k] > 0, k
        assert r["output_throughput"] == pytest.approx(r["batch_size"] * 4 / (r["e2el_ms"] / 1e3))
        assert r["mean_acceptance_length"] is None  # no draft
    text = capsys.readouterr().out
    assert "ttft_ms" in text and "tpot_ms" in text and "output_tok/s" in text


def test_sweep_profile(tmp_path, capsys):
    """--profile traces one more generate call of the first row (on the CPU: no GPU kernels, so no rows, but
    the per-output-token summary is there and printed)."""
    out = tmp_path / "sweep.json"
    assert main(["bench", "--random-weights", "--preset", "tiny", "--layers", "1", "--input-len", "8",
                 "--output-len", "4", "--iters", "1", "--profile", "--json", str(out)]) == 0
    prof = json.loads(out.read_text())["rows"][0]["profile"]
    assert prof["steps"] == 4 and prof["rows"] == []
    assert "profile, batch 1, input 8, output 4, GPU 0, per output token" in capsys.readouterr().out


def test_largest_fitting_batch_halves_on_out_of_memory_only():
    """--batch-sizes max: the largest power of two <= the ceiling that runs; allocation failures halve the batch,
    any other error (or an allocation failure at batch 1) propagates."""
    from mavjax.bench import is_out_of_memory, largest_fitting_batch

    tried = []

    def run(b, fits=6, error="RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.5GiB."):
        tried.append(b)
        if b > fits:
            raise RuntimeError(error)

    assert largest_fitting_batch(run, 100, log=lambda *_: None) == 4 and tried == [64, 32, 16, 8, 4]
    assert largest_fitting_batch(run, 6, log=lambda *_: None) == 4  # a ceiling that is no power of two
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        largest_fitting_batch(lambda b: run(b, fits=0), 8, log=lambda *_: None)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        largest_fitting_batch(lambda b: run(b, error="shape mismatch"), 8, log=lambda *_: None)
    assert is_out_of_memory(RuntimeError("INTERNAL: ... out of memory")) and not is_out_of_memory(ValueError("x"))


def test_sweep_max_batch_end_to_end(tmp_path):
    out = tmp_path / "sweep.json"
    assert main(["bench", "--random-weights", "--preset", "tiny", "--layers", "2", "--batch-sizes", "1", "max",
                 "--max-num-seqs", "6", "--input-len", "8", "--output-len", "4", "--iters", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]  # nothing runs out of memory here: max = the ceiling's power of 2
    assert [(r["batch_size"], r["largest_fitting"]) for r in rows] == [(1, False), (4, True)]
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(["bench", "--random-weights", "--preset", "tiny", "--batch-sizes", "most"])
    assert e.value.code == 2


def test_rank_slice_end_to_end(tmp_path, capsys):
    """Decode at --rank-batch-sizes, verify + draft at --verify-batch-sizes (default 1) with their decode step
    too (the projection needs it), the collectives added, the projection's arithmetic."""
    out = tmp_path / "rank.json"
    assert main(["bench", "--random-weights", "--preset", "tiny", "--rank-slice", "2", "--layers", "2",
                 "--context", "16", "--rank-batch-sizes", "8",
                 "--step-iters", "2", "--iters", "1", "--draft-intermediate-size", "64", "--draft-vocab-size", "64",
                 "--copy-bytes", "1000000", "--num-draft-tokens", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    steps = {(s["step"], s["batch"]): s for s in r["steps"]}
    assert set(steps) == {("decode", 1), ("decode", 8), ("verify", 1), ("draft", 1)}
    assert steps[("verify", 1)]["tokens"] == 4 and all(s["ms"] > 0 and s["floor_ms"] > 0 for s in r["steps"])
    assert [s["finite"] for s in r["steps"]] == [True, True, True, None]  # the target's steps checked
    L = 2
    assert r["collectives_per_step"] == 2 * L + 2
    c = r["collectives_per_step"] * 19e-6
    assert r["collectives_per_draft_round"] == 3 * (2 + 2) + 1  # K passes x (layer's 2 + embed + gather) + fc
    cd = r["collectives_per_draft_round"] * 19e-6
    proj = {p["acceptance_length"]: p for p in r["projection"]}
    assert proj[1]["tokens_per_s_per_user"] == pytest.approx(1 / (steps[("decode", 1)]["ms"] / 1e3 + c))
    t = steps[("draft", 1)]["ms"] / 1e3 + cd + steps[("verify", 1)]["ms"] / 1e3 + c
    for a in (2, 3, 4):
        assert proj[a]["tokens_per_s_per_user"] == pytest.approx(a / t)
    text = capsys.readouterr().out
    assert "PROJECTION" in text and "NOT run" in text and "19 us" in text and "finite" in text


def test_step_timer_flags_non_finite_logits():
    """A step computing NaN can be faster than a correct one (section 19: MoE kernels route NaN nowhere), so the
    step timer carries whether every step's logits were finite, and the projection leaves such a step out."""
    from mavjax.bench import StepTimer, project

    cfg = preset("tiny", num_hidden_layers=2)
    good = random_model(cfg, quant="fp8")
    bad = random_model(cfg, quant="fp8")
    bad.norm.scale.set_value(jnp.full_like(bad.norm.scale[...], jnp.nan))  # the final norm: every logit NaN
    flags = []
    for m in (good, bad):
        t = StepTimer(m, 1, 2, 8, iters=2).compile()
        t.time(1)
        flags.append(t.all_finite())
    assert flags == [True, False]
    steps = [dict(step="decode", batch=1, ms=1.0, floor_ms=0.5, finite=True),
             dict(step="verify", batch=1, ms=1.0, floor_ms=0.5, finite=False),
             dict(step="draft", batch=1, ms=0.2, floor_ms=0.1, finite=None)]
    assert project(steps, 0.0, 0.0, [1]) == []  # no verify time to project from
    steps[1]["finite"] = True
    assert len(project(steps, 0.0, 0.0, [1])) == 4


@pytest.mark.parametrize("args, message", [
    (["--random-weights", "--preset", "maverick", "--rank-slice", "3", "--dry-run"], "not divisible by 3"),
    (["--rank-slice", "8"], "needs --random-weights"),
    (["--random-weights"], "needs --preset"),
    (["--random-weights", "--preset", "nope"], "unknown preset"),
    (["--random-weights", "--preset", "tiny", "--batch-sizes", "0"], "--batch-sizes"),
])
def test_bad_options_are_clear_errors(args, message, capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_random_weights_sharded_over_a_mesh():
    code = """
        import jax
        from mavjax.bench import random_model
        from mavjax.config import preset
        from mavjax.sharding import make_mesh, param_shardings
        from flax import nnx
        cfg = preset("tiny", num_key_value_heads=4, num_hidden_layers=2)
        mesh = make_mesh(2, 2)
        m = random_model(cfg, quant="fp8", mesh=mesh)
        want = param_shardings(m, mesh)
        for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            name = ".".join(map(str, p))
            assert v.get_value().sharding.is_equivalent_to(want[name], v.get_value().ndim), name
        # it runs over the mesh: a decode step's collectives move activations, not weights (sharded weights
        # without the shard_map layers leave each Pallas call to gather its weights to every device)
        import jax.numpy as jnp
        from mavjax.kv_cache import KVCache
        from mavjax.sharding import collective_bytes
        p = random_model(cfg, quant="fp8", kernels="pallas", mesh=make_mesh(1, 2))
        graphdef, state = nnx.split(p)
        def step(state, tok, pos, cache):
            return nnx.merge(graphdef, state)(tok, pos, cache, write_index=pos[:, 0])[0]
        tok = pos = jnp.zeros((1, 1), jnp.int32)
        hlo = jax.jit(step).lower(state, tok, pos, KVCache.create(cfg, 1, 16, jnp.bfloat16)).compile().as_text()
        moved = collective_bytes(hlo)
        weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(p, nnx.Param)))
        assert moved.get("all-reduce", 0) > 0 and sum(moved.values()) < 0.05 * weights, (moved, weights)
        from mavjax.cli import main  # the sweep on random weights sharded over a mesh
        assert main(["bench", "--random-weights", "--preset", "tiny", "--layers", "2", "--mesh", "tensor=2",
                     "--input-len", "8", "--output-len", "4", "--iters", "1"]) == 0
        print("ok")
    """
    env = cpu_env(4)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_forced_acceptance_schedule():
    """forced_accepts: R rounds of a mean M emit floor(R M) tokens, each round 1..K+1 of them."""
    import jax.numpy as jnp

    from mavjax.speculative import forced_accepts

    r = jnp.arange(40)
    for m, K in ((3.25, 3), (1.0, 3), (4.0, 3), (2.74, 5)):
        n = forced_accepts(r, m, K)
        assert int(jnp.min(n)) >= 0 and int(jnp.max(n)) <= K
        assert int(jnp.sum(n + 1)) == int(np.floor(40 * m)), (m, K)


def test_random_draft_with_forced_acceptance(tmp_path, capsys):
    """`mavjax bench --random-weights --random-draft --forced-acceptance M`: speculative decoding on random
    weights whose reported mean acceptance length is the forced one (random weights alone accept ~nothing)."""
    for m, tol in ((2.5, 0.2), (4.0, 1e-9)):
        out = tmp_path / f"forced{m}.json"
        assert main(["bench", "--random-weights", "--preset", "tiny", "--random-draft", "--num-draft-tokens", "3",
                     "--forced-acceptance", str(m), "--draft-vocab-size", "64", "--draft-intermediate-size", "64",
                     "--batch-sizes", "1", "--input-len", "8", "--output-len", "33", "--iters", "1",
                     "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["forced_acceptance"] == m
        assert abs(r["rows"][0]["mean_acceptance_length"] - m) <= tol, r["rows"][0]
    assert "FORCED" in capsys.readouterr().err
    assert main(["bench", "--random-weights", "--preset", "tiny", "--forced-acceptance", "2"]) == 2
    assert "--forced-acceptance needs --random-draft" in capsys.readouterr().err
    assert main(["bench", "--random-weights", "--preset", "tiny", "--random-draft", "--forced-acceptance", "5"]) == 2
    assert "must lie in [1, 4]" in capsys.readouterr().err
