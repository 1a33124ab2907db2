"""The Python API: `LLM(path).generate(prompts, SamplingParams(...))`, `LLM.chat(...)`, `LLM.logits(ids)`."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mavjax.generate import Batch, Engine, bucket, to_host
from mavjax.sampling import SamplingError, SamplingParams
from mavjax.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "default"


class PromptError(ValueError):
    """A prompt that cannot be run (empty, longer than the context, token ids outside the vocabulary)."""


@dataclasses.dataclass
class GenerationMetrics:
    time_to_first_token_s: float  # prefill of this prompt's batch, including the first sample
    decode_time_s: float  # the on-device decode loop of this prompt's batch
    num_generated_tokens: int
    tokens_per_s: float  # this prompt's generated tokens over prefill + decode time
    mean_acceptance_length: float | None = None  # with a draft: tokens per target forward of the decode


@dataclasses.dataclass
class GenerationOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or string) or "length"
    metrics: GenerationMetrics


class LLM:
    def __init__(self, model: str | Path | None = None, *, dtype: str | None = None,
                 max_model_len: int | None = None, max_batch_size: int = 32, kernels: str = "xla",
                 quantize: str | None = None, mesh=None, allreduce: str = "xla", draft: str | Path | None = None,
                 num_draft_tokens: int = 3, draft_tree: str | Sequence[int] | None = None,
                 kv_cache_dtype: str = "auto"):
        """`kernels`: "xla" (plain jax.numpy) or "pallas" (the kernels of pallas_kernels/ where they apply:
        split-KV decode attention, FP8 GEMMs, the grouped MoE GEMM). `quantize="fp8"`: quantize the projection weights to FP8 on
        load (per-output-channel scales; embedding, LM head, router and norms stay in `dtype`). `mesh`:
        "expert=E,tensor=T", a dict of those, or a jax Mesh: parameters are restored sharded by
        `mavjax.sharding.RULES` straight into place, and the layers run under shard_map over the mesh
        (`mavjax.parallel`: expert-parallel MoE dispatch, one all-reduce per half-layer fused with the residual
        add and the next RMSNorm). `allreduce`: "xla" (psum) or "oneshot" (the NVLink peer-memory kernel;
        GPU only). Under jax.distributed (mavjax.distributed) the mesh spans every process's devices.
        `draft`: an EAGLE-3 draft checkpoint directory (`mavjax.eagle3`): decoding then drafts
        `num_draft_tokens` tokens a round as a chain, or the static tree `draft_tree` (branching per depth,
        e.g. "3,2,1"; temperature-0 batches only, sampling batches use a chain of its depth), and verifies
        them in one target forward (`mavjax.speculative`); outputs follow the same distribution as without.
        `kv_cache_dtype` (vLLM's names): "auto" (the model's dtype) or "fp8" (float8_e4m3fn, static scale 1.0;
        see mavjax.kv_cache)."""
        from mavjax.checkpoint import load_model  # orbax import is slow; only when loading from disk
        from mavjax.distributed import maybe_initialize

        maybe_initialize()  # multi-host: before any device use, so that meshes span every process's devices

        if quantize not in (None, "fp8"):
            raise ValueError(f"quantize must be None or 'fp8', got {quantize!r}")
        from mavjax.kv_cache import kv_dtype_for

        kv_dtype_for(kv_cache_dtype, "bfloat16")  # a bad name fails before loading
        path = Path(model) if model is not None else DEFAULT_MODEL
        shardings = None
        if mesh is not None:
            mesh, shardings = _mesh_shardings(path, mesh, dtype, kernels)
        cfg, net = load_model(path, dtype=dtype, kernels=kernels, shardings=shardings)
        if quantize == "fp8":
            from mavjax.quantize import quantize_model

            net = quantize_model(net)
        if mesh is not None:
            from mavjax.parallel import Parallel

            net.set_parallel(Parallel(mesh, allreduce=allreduce))  # shard_map layers: MoE dispatch, fused all-reduce
        tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        gen_cfg = path / "generation_config.json"
        extra_eos = []
        if gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            extra_eos = [eos] if isinstance(eos, int) else list(eos or [])
        draft_model = None
        if draft is not None:
            from mavjax.eagle3 import load_draft

            draft_model = load_draft(draft, dtype=dtype)[1]
        self._setup(net, tok, max_model_len, max_batch_size, extra_eos, draft_model, num_draft_tokens, draft_tree,
                    kv_cache_dtype)

    @classmethod
    def from_model(cls, net, tokenizer: Tokenizer | None = None, *, max_model_len: int | None = None,
                   max_batch_size: int = 32, draft=None, num_draft_tokens: int = 3, draft_tree=None,
                   kv_cache_dtype: str = "auto") -> "LLM":
        """Wrap an in-memory `mavjax.model.Llama4` (tests, training scripts); `draft`: an in-memory
        `mavjax.eagle3.Eagle3Draft` or None."""
        self = cls.__new__(cls)
        self._setup(net, tokenizer, max_model_len, max_batch_size, [], draft, num_draft_tokens, draft_tree,
                    kv_cache_dtype)
        return self

    def _setup(self, net, tokenizer, max_model_len, max_batch_size, extra_eos, draft=None, num_draft_tokens=3,
               draft_tree=None, kv_cache_dtype="auto"):
        self.cfg = net.cfg
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len or self.cfg.max_position_embeddings)
        if self.max_model_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        self.max_batch_size = max_batch_size
        self.eos_token_ids = sorted({*self.cfg.eos_token_id, *extra_eos})
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        from mavjax.kv_cache import kv_dtype_for

        kv_dtype = kv_dtype_for(kv_cache_dtype, net.dtype)
        self.engine = Engine(net, kv_dtype=kv_dtype, pad_id=pad)
        self.spec_engine = None
        if draft is not None:
            from mavjax.speculative import DraftTree, SpecEngine

            if draft_tree is None:
                tree = DraftTree.chain(num_draft_tokens)
            else:
                tree = DraftTree.parse(draft_tree) if isinstance(draft_tree, str) else DraftTree(tuple(draft_tree))
            self.spec_engine = SpecEngine(net, draft, tree, pad_id=pad, kv_dtype=kv_dtype)

    # ---- inputs --------------------------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError("this model has no tokenizer.json: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids = [int(t) for t in prompt]
            text = None
        if not ids:
            raise PromptError("empty prompt: at least one token is needed")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise PromptError(f"token id(s) {bad[:5]} outside the vocabulary (size {self.cfg.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise PromptError(f"prompt of {len(ids)} tokens is longer than the context: max_model_len is "
                              f"{self.max_model_len}, which must also leave room for at least one new token")
        return text, ids

    @staticmethod
    def _as_list(prompts):
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return prompts

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[GenerationOutput]:
        """Prompts: a string, a list of token ids, or a list of either. One SamplingParams for all, or one
        per prompt. Everything is validated before any device work."""
        prompts = self._as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise SamplingError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise SamplingError(f"expected SamplingParams, got {type(p).__name__}")
            bad = [t for t in p.stop_token_ids if t >= self.cfg.vocab_size]
            if bad:
                raise SamplingError(f"stop_token_ids {bad} outside the vocabulary (size {self.cfg.vocab_size})")
        encoded = [self._encode(p) for p in prompts]
        outputs: list[GenerationOutput | None] = [None] * len(prompts)
        # Group rows with the same stop set, and similar lengths, into batches of at most max_batch_size.
        order = sorted(range(len(prompts)), key=lambda i: (self._stop_ids(params[i]), len(encoded[i][1])))
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start:start + self.max_batch_size]
            groups: dict[tuple, list[int]] = {}
            for i in idx:
                groups.setdefault(self._stop_ids(params[i]), []).append(i)
            for stop_ids, rows in groups.items():
                for i, out in zip(rows, self._run_batch([encoded[i] for i in rows], [params[i] for i in rows],
                                                         stop_ids)):
                    outputs[i] = out
        return outputs

    def chat(self, messages, sampling_params: SamplingParams | None = None) -> list[GenerationOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self.tokenizer is None:
            raise PromptError("this model has no tokenizer: chat needs tokenizer.json and a chat template")
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)
                   for c in convs]
        return self.generate(prompts, sampling_params)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 logits [len(token_ids), vocab] for every position of one sequence."""
        _, ids = self._encode(list(token_ids))
        return self.engine.logits(np.asarray(ids, np.int32))

    def _stop_ids(self, p: SamplingParams) -> tuple[int, ...]:
        return tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))))

    def _run_batch(self, encoded, params, stop_ids) -> list[GenerationOutput]:
        n = len(encoded)
        B = bucket(n, minimum=1)
        lengths = [len(ids) for _, ids in encoded]
        max_new = [min(p.max_new_tokens, self.max_model_len - L) for p, L in zip(params, lengths)]
        T = min(bucket(max(lengths)), self.max_model_len)
        S = min(bucket(max(L + m for L, m in zip(lengths, max_new)), minimum=64), self.max_model_len)
        S = max(S, T)
        engine = self.spec_engine or self.engine
        if self.spec_engine is not None:  # room for the draft tree past the last position (never clamped)
            S = max(T, bucket(max(L + m for L, m in zip(lengths, max_new)) + self.spec_engine.extra_slots, minimum=64))
        tokens = np.full((B, T), self.engine.pad_id, np.int32)
        for r, (_, ids) in enumerate(encoded):
            tokens[r, :len(ids)] = ids
        fill = lambda vals, dflt, dt: np.array(list(vals) + [dflt] * (B - n), dt)  # noqa: E731
        seeds = [p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little") for p in params]
        if any(p.seed is None for p in params):
            seeds = _same_on_every_process(seeds)
        batch = Batch(
            tokens=tokens, lengths=fill(lengths, 1, np.int32), max_new=fill(max_new, 1, np.int32),
            temperature=fill([p.temperature for p in params], 0.0, np.float32),
            top_k=fill([p.top_k for p in params], 0, np.int32), top_p=fill([p.top_p for p in params], 1.0, np.float32),
            seeds=fill([s % (1 << 32) for s in seeds], 0, np.uint32),
            stop_ids=np.array(list(stop_ids) + [-1] * (bucket(len(stop_ids), 8) - len(stop_ids)), np.int32),
            n_real=n)
        t0 = time.perf_counter()
        first, cache = engine.prefill(batch, S)
        first.block_until_ready()
        t1 = time.perf_counter()
        out, counts, stats = engine.decode(batch, first, cache, bucket(max(max_new), minimum=1))
        out, counts = to_host(out), to_host(counts)
        accept = None
        if self.spec_engine is not None:
            rounds, accepted = to_host(stats["rounds"]), to_host(stats["accepted"])
            accept = [float(accepted[r] / rounds[r]) if rounds[r] else None for r in range(n)]
        t2 = time.perf_counter()
        results = []
        for r, ((text, ids), p) in enumerate(zip(encoded, params)):
            gen = out[r, :counts[r]].tolist()
            finish = "stop" if gen and gen[-1] in stop_ids else "length"
            if gen and gen[-1] in stop_ids and gen[-1] not in p.stop_token_ids:
                gen_text_ids = gen[:-1]  # EOS is not part of the text (vLLM)
            else:
                gen_text_ids = gen
            out_text = self.tokenizer.decode(gen_text_ids) if self.tokenizer else ""
            if p.stop and self.tokenizer:
                gen, out_text, hit = _truncate_at_stop(self.tokenizer, gen, out_text, p.stop)
                finish = "stop" if hit else finish
            ttft, dec = t1 - t0, t2 - t1
            results.append(GenerationOutput(
                prompt=text, prompt_token_ids=ids, token_ids=gen, text=out_text, finish_reason=finish,
                metrics=GenerationMetrics(ttft, dec, len(gen), len(gen) / max(ttft + dec, 1e-9),
                                          None if accept is None else accept[r])))
        return results


def _mesh_shardings(path, mesh, dtype, kernels):
    import jax.numpy as jnp
    from flax import nnx

    from mavjax.config import Llama4Config
    from mavjax.model import Llama4
    from mavjax.sharding import make_mesh, param_shardings, parse_mesh

    if isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    if isinstance(mesh, dict):
        mesh = make_mesh(**mesh)
    cfg = Llama4Config.from_json(Path(path))
    abstract = nnx.eval_shape(lambda: Llama4(cfg, dtype=jnp.dtype(dtype or "bfloat16"), kernels=kernels))
    return mesh, param_shardings(abstract, mesh)


def _same_on_every_process(seeds: list[int]) -> list[int]:
    """Under jax.distributed every process must feed the same inputs: process 0's random seeds win."""
    import jax

    if jax.process_count() == 1:
        return seeds
    from jax.experimental import multihost_utils

    mine = np.asarray([s % (1 << 32) for s in seeds], np.uint32)
    return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]


def _truncate_at_stop(tok: Tokenizer, gen: list[int], text: str, stops: list[str]):
    """Cut the text before the earliest stop string, and the token ids to the shortest prefix that reaches it."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut < 0:
        return gen, text, False
    for k in range(1, len(gen) + 1):
        if len(tok.decode(gen[:k])) > cut and any(s in tok.decode(gen[:k]) for s in stops):
            return gen[:k], text[:cut], True
    return gen, text[:cut], True
