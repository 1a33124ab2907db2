"""Multi-host: 2 processes x 4 simulated CPU devices on localhost under jax.distributed (gloo collectives),
started by mavjax itself from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; their sharded greedy
generation over an (expert=2, tensor=4) mesh spanning both processes equals the single-process one."""

import json
import socket
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import cpu_env

from mavjax import LLM, SamplingParams
from mavjax.checkpoint import save_model
from mavjax.config import preset
from mavjax.model import Llama4

WORKER = """
    import json, sys
    import jax
    from mavjax import LLM, SamplingParams
    prompts, ckpt = json.loads(sys.argv[1]), sys.argv[2]
    llm = LLM(ckpt, mesh="expert=2,tensor=4")  # starts jax.distributed from the environment first
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    w = llm.engine.state["layers"][1]["ffn"]["w_up"][...]
    assert len(w.sharding.device_set) == 8 and not w.is_fully_addressable  # spans both processes
    sp = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, seed=0)
    print("RESULT", json.dumps({"tokens": [o.token_ids for o in llm.generate(prompts, sp)],
                                "logits": llm.logits(prompts[0])[-1].tolist()}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_as_one(tmp_path):
    cfg = preset("tiny", num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_hidden_layers=2)
    save_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, n).tolist() for n in (7, 40)]  # 2 x 64 padded: the all_to_all prefill too

    port = _free_port()
    procs = []
    for pid in range(2):
        env = cpu_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), json.dumps(prompts),
                                       str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0, out
            outs.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    ref = LLM(tmp_path / "ckpt")
    want = [o.token_ids for o in ref.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0,
                                                                      ignore_eos=True, seed=0))]
    want_logits = ref.logits(prompts[0])[-1]
    for got in outs:  # both processes hold the whole result
        assert got["tokens"] == want
        np.testing.assert_allclose(got["logits"], want_logits, rtol=1e-5, atol=1e-5)
