"""`mavjax` command line: generate, convert, batch, bench."""

from __future__ import annotations

import argparse
import sys
import time


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_from_args(a):
    from mavjax.sampling import SamplingParams

    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, seed=a.seed, stop=a.stop)


def cmd_generate(a) -> int:
    from pathlib import Path

    from mavjax.api import DEFAULT_MODEL, LLM, PromptError
    from mavjax.config import Llama4Config
    from mavjax.tokenizer import Tokenizer

    params = _sampling_from_args(a)  # invalid values fail here, before anything is loaded
    from mavjax.distributed import maybe_initialize

    maybe_initialize()  # multi-host (JAX_COORDINATOR_ADDRESS, ...): before any device use
    if a.mesh is not None:
        from mavjax.sharding import parse_mesh

        parse_mesh(a.mesh)
    path = Path(a.model) if a.model else DEFAULT_MODEL
    cfg = Llama4Config.from_json(path)
    tok = Tokenizer.from_dir(path)
    text = a.prompt
    if a.chat:
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}])
    ids = tok.encode(text, add_special_tokens=not a.chat)
    limit = a.max_model_len or cfg.max_position_embeddings
    if len(ids) >= limit:
        raise PromptError(f"prompt of {len(ids)} tokens is longer than the context: max_model_len is {limit}")
    draft = None
    if not a.no_draft:  # --draft DIR, else MODEL/draft when there is one
        from mavjax.eagle3 import is_draft_dir

        draft = Path(a.draft) if a.draft else (path / "draft" if is_draft_dir(path / "draft") else None)
    t0 = time.perf_counter()
    llm = LLM(path, dtype=a.dtype, max_model_len=a.max_model_len, kernels=a.kernels, quantize=a.quantize,
              mesh=a.mesh, allreduce=a.allreduce, kv_cache_dtype=a.kv_cache_dtype, draft=draft,
              num_draft_tokens=a.num_draft_tokens, draft_tree=a.draft_tree)
    load_s = time.perf_counter() - t0
    out = llm.generate([ids], params)[0]
    if a.chat:
        print(out.text)
    else:
        print(a.prompt + out.text)
    m = out.metrics
    spec = "" if draft is None else \
        f", draft {draft} ({a.draft_tree and 'tree ' + a.draft_tree or f'K={a.num_draft_tokens}'}): " \
        f"mean acceptance length {m.mean_acceptance_length or 0:.2f}"
    print(f"[{m.num_generated_tokens} tokens, time to first token {m.time_to_first_token_s * 1e3:.0f} ms, "
          f"{m.tokens_per_s:.1f} tokens/s (first call includes compilation), load {load_s:.1f} s, "
          f"finish: {out.finish_reason}{spec}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mavjax", description="Llama 4 inference in JAX")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate a completion")
    g.add_argument("--model", default=None, help="mavjax checkpoint dir (default: the shipped small model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    g.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kernels", default="xla", choices=["xla", "pallas"])
    g.add_argument("--quantize", default=None, choices=["fp8"], help="quantize projection weights on load")
    g.add_argument("--mesh", default=None, metavar="expert=E,tensor=T", help="shard over a device mesh")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="KV cache storage: the model's dtype, or float8_e4m3fn (static scale 1.0)")
    g.add_argument("--draft", default=None, metavar="DIR",
                   help="EAGLE-3 draft checkpoint for speculative decoding (default: MODEL/draft when present)")
    g.add_argument("--no-draft", action="store_true", help="plain decoding even if the model ships a draft")
    g.add_argument("--num-draft-tokens", type=int, default=3, help="draft tokens per round (a chain)")
    g.add_argument("--draft-tree", default=None, metavar="B1,B2,..",
                   help="static draft tree: children per node at each depth (greedy batches; sampling uses a chain)")
    g.add_argument("--allreduce", default="xla", choices=["xla", "oneshot"],
                   help="with --mesh: psum, or the one-shot NVLink peer-memory kernel (GPU, experimental)")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    from checkpoints import convert

    c = sub.add_parser("convert", help="convert a Hugging Face Llama 4 checkpoint to mavjax (orbax)")
    convert.add_arguments(c)
    c.set_defaults(func=convert.main)

    from mavjax import batch, bench

    b = sub.add_parser("batch", help="generate for every line of a JSONL file (resumable)",
                       description=batch.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_arguments(b)
    b.set_defaults(func=batch.main)
    k = sub.add_parser("bench", help="latency/throughput sweeps; one rank of an 8-GPU deployment",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(k)
    k.set_defaults(func=bench.main)

    a = parser.parse_args(argv)
    try:
        return a.func(a) or 0
    except (ValueError, FileNotFoundError) as e:  # our input errors all derive from these
        print(f"mavjax {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
