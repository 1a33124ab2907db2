"""Batch generation over a JSONL file: `mavjax batch --input prompts.jsonl --output results.jsonl`.

Input: one JSON object per line with `prompt` (a string, or a list of token ids) or `messages` (a chat: a list of
{"role", "content"} dicts, run through the tokenizer's chat template), an optional `id` (string or integer;
default: the 1-based line number), and optional sampling values under SamplingParams' own names
(`max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`, `stop_token_ids`, `ignore_eos`) that
override the command-line defaults for that line.

Output: one JSON object per prompt: id, line, text, token_ids, finish_reason, prompt_tokens and the metrics of
its batch. Output order is processing order (prompts grouped by stop set and length bucket), not input order:
join on `id`. Lines that cannot run (not JSON, no prompt, a bad sampling value, a prompt longer than the
context, a duplicate id, an unknown field) are reported with their line number on stderr and in
`<output>.errors.jsonl`, and skipped.

Batches have fixed, bucketed shapes: prompts are sorted into groups of equal (stop set, prompt-length bucket,
output-length bucket) and cut into batches of `--batch-size`, so the compiled programs number at most
(batch buckets) x (prompt-length buckets) x (cache-length buckets) x (output-length buckets), whatever the
length of the file.

Crash safety: each batch's lines go out in one write, then flush and fsync. A run killed at any point loses at
most the batch in flight; a torn last line (killed inside the write) is cut off by `--resume`, which then skips
every id already written, so each prompt ends up in the output exactly once.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import os
import sys
import time
from pathlib import Path

from mavjax.atomic_write import write_text
from mavjax.sampling import SamplingError, SamplingParams

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
INPUT_FIELDS = ("id", "prompt", "messages")


class LineError(ValueError):
    """One input line that cannot be run; the run goes on without it."""


@dataclasses.dataclass
class Request:
    line: int  # 1-based line number in the input file
    id: object  # the line's `id`, or its line number
    ids: list[int]  # prompt token ids
    params: SamplingParams


def errors_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".errors.jsonl")


# ---- input ---------------------------------------------------------------------------------------------------
def parse_line(llm, lineno: int, raw: str, defaults: dict, allow_unknown: bool = False) -> Request:
    """One input line -> Request, or LineError naming what is wrong with it."""
    import jinja2

    from mavjax.api import PromptError

    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LineError(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(INPUT_FIELDS) - set(SAMPLING_FIELDS))
    if unknown and not allow_unknown:
        raise LineError(f"unknown field(s) {unknown}: expected {list(INPUT_FIELDS)} or sampling values "
                        f"{list(SAMPLING_FIELDS)} (--ignore-unknown-fields to allow)")
    rid = obj.get("id", lineno)
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise LineError(f"id must be a string or an integer, got {rid!r}")
    if ("prompt" in obj) == ("messages" in obj):
        raise LineError("each line needs exactly one of 'prompt' (text or token ids) or 'messages' (a chat)")
    try:
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise LineError("messages must be a non-empty list of {\"role\": str, \"content\": str} objects")
            if llm.tokenizer is None:
                raise LineError("messages need a tokenizer with a chat template; this model has none")
            ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
        else:
            prompt = obj["prompt"]
            if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = prompt
            elif isinstance(prompt, str):
                ids = prompt  # LLM._encode tokenizes it exactly as LLM.generate would
            else:
                raise LineError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        _, ids = llm._encode(ids)  # empty / out-of-vocabulary / longer than the context -> PromptError
    except (PromptError, ValueError, jinja2.TemplateError) as e:  # a template may reject these messages
        raise LineError(str(e)) from None
    values = {**defaults, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj}}
    try:
        params = SamplingParams(**values)
    except SamplingError as e:
        raise LineError(str(e)) from None
    bad = [t for t in params.stop_token_ids if t >= llm.cfg.vocab_size]
    if bad:
        raise LineError(f"stop_token_ids {bad} outside the vocabulary (size {llm.cfg.vocab_size})")
    return Request(lineno, rid, ids, params)


def read_requests(llm, path, defaults, allow_unknown=False):
    """(requests, errors): every line of the file parsed; errors are {"line", "error"} dicts."""
    requests, errors, seen = [], [], {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are not prompts
            try:
                r = parse_line(llm, lineno, raw, defaults, allow_unknown)
                key = _key(r.id)
                if key in seen:
                    raise LineError(f"duplicate id {r.id!r} (first on line {seen[key]})")
                seen[key] = lineno
                requests.append(r)
            except LineError as e:
                errors.append({"line": lineno, "error": str(e)})
    return requests, errors


def _key(rid) -> str:
    return json.dumps(rid)  # 3 and "3" are different ids


# ---- output --------------------------------------------------------------------------------------------------
def done_ids(output: Path) -> set[str]:
    """Ids already in `output`, after cutting off a torn last line (a run killed inside its write)."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(output, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    out = set()
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            out.add(_key(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{output}: line {n} is not a result line of `mavjax batch`; not resuming into it")
    return out


def append_batch(fd: int, data: bytes) -> None:
    """All of one batch's lines, then fsync: once this returns they survive a kill or a power cut."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def result_record(req: Request, out) -> dict:
    return {"id": req.id, "line": req.line, "text": out.text, "token_ids": out.token_ids,
            "finish_reason": out.finish_reason, "prompt_tokens": len(req.ids),
            "metrics": dataclasses.asdict(out.metrics)}


def plan_batches(llm, requests: list[Request], batch_size: int) -> list[list[Request]]:
    """Group by (stop set, prompt-length bucket, output-length bucket), then cut each group into batches."""
    from mavjax.generate import bucket

    def group(r):
        new = min(r.params.max_new_tokens, llm.max_model_len - len(r.ids))
        return llm._stop_ids(r.params), bucket(len(r.ids)), bucket(new, minimum=1)

    ordered = sorted(requests, key=lambda r: (group(r), len(r.ids), r.line))
    batches = []
    for _, rows in itertools.groupby(ordered, key=group):
        rows = list(rows)
        batches += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return batches


def run(llm, input_path, output_path, *, defaults: dict | None = None, batch_size: int = 32,
        resume: bool = False, overwrite: bool = False, allow_unknown: bool = False, progress: bool = True,
        log=None) -> dict:
    """Generate every valid line of `input_path` into `output_path`. Returns a summary dict."""
    from tqdm import tqdm

    log = log or sys.stderr
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"no input file at {input_path}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if output_path.exists() and not (resume or overwrite):
        raise ValueError(f"{output_path} exists: pass --resume to continue it or --overwrite to replace it")
    if overwrite and not resume:
        output_path.unlink(missing_ok=True)
    done = done_ids(output_path) if resume else set()
    requests, errors = read_requests(llm, input_path, defaults or {}, allow_unknown)
    for e in errors:
        print(f"{input_path}:{e['line']}: skipped: {e['error']}", file=log)
    write_text(errors_path(output_path), "".join(json.dumps(e) + "\n" for e in errors))
    todo = [r for r in requests if _key(r.id) not in done]
    batches = plan_batches(llm, todo, batch_size)
    n_tokens, t0 = 0, time.perf_counter()
    fd = os.open(output_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with tqdm(total=len(todo), unit="prompt", disable=not progress, file=log, dynamic_ncols=True) as bar:
            for rows in batches:
                outs = llm.generate([r.ids for r in rows], [r.params for r in rows])
                data = "".join(json.dumps(result_record(r, o)) + "\n" for r, o in zip(rows, outs))
                append_batch(fd, data.encode())
                n_tokens += sum(len(o.token_ids) for o in outs)
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.1f}")
    finally:
        os.close(fd)
    return {"written": len(todo), "skipped_done": len(requests) - len(todo), "errors": len(errors),
            "batches": len(batches), "generated_tokens": n_tokens, "seconds": time.perf_counter() - t0}


# ---- command line ----------------------------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model options shared by `mavjax batch` and `mavjax bench`."""
    p.add_argument("--model", default=None, help="mavjax checkpoint dir (default: the shipped small model)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kernels", default="xla", choices=["xla", "pallas"])
    p.add_argument("--quantize", default=None, choices=["fp8"], help="quantize projection weights on load")
    p.add_argument("--mesh", default=None, metavar="expert=E,tensor=T", help="shard over a device mesh")
    p.add_argument("--allreduce", default="xla", choices=["xla", "oneshot"],
                   help="with --mesh: XLA's psum, or the one-shot NVLink peer-memory kernel (GPU)")
    p.add_argument("--draft", default=None, metavar="DIR", help="EAGLE-3 draft checkpoint (speculative decoding)")
    p.add_argument("--num-draft-tokens", type=int, default=None, metavar="K", help="draft tokens per step")


def llm_kwargs(a, batch_size: int) -> dict:
    """LLM keyword arguments from the parsed options. The draft options are passed only when given, and an
    LLM without draft support is a clear error rather than a TypeError deep in the call."""
    from mavjax.api import LLM

    kw = dict(dtype=a.dtype, max_model_len=a.max_model_len, max_batch_size=batch_size, kernels=a.kernels,
              quantize=a.quantize, mesh=a.mesh, allreduce=a.allreduce)
    if a.num_draft_tokens is not None and a.draft is None:
        raise ValueError("--num-draft-tokens needs --draft DIR")
    if a.draft is not None:
        accepted = inspect.signature(LLM.__init__).parameters
        if "draft" not in accepted:
            raise ValueError("--draft: this mavjax has no EAGLE-3 draft support (LLM does not accept draft=)")
        kw["draft"] = a.draft
        if a.num_draft_tokens is not None:
            kw["num_draft_tokens"] = a.num_draft_tokens
    if a.mesh is not None:
        from mavjax.sharding import parse_mesh

        parse_mesh(a.mesh)  # a bad mesh fails before anything is loaded
    return kw


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL file: one {\"prompt\"|\"messages\", \"id\"?, ...} a line")
    p.add_argument("--output", required=True, help="JSONL results, one line per prompt (order: see --help)")
    p.add_argument("--resume", action="store_true", help="skip ids already in --output; cut a torn last line")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ignore-unknown-fields", action="store_true",
                   help="allow fields other than id/prompt/messages/sampling values (default: an error)")
    p.add_argument("--no-progress", action="store_true")
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="default seed of every line (None: fresh randomness)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def main(a) -> int:
    from mavjax.api import LLM

    defaults = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                    seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)
    SamplingParams(**defaults)  # invalid defaults fail before the model loads
    kw = llm_kwargs(a, a.batch_size)
    if not Path(a.input).is_file():
        raise FileNotFoundError(f"no input file at {a.input}")
    llm = LLM(a.model, **kw)
    s = run(llm, a.input, a.output, defaults=defaults, batch_size=a.batch_size, resume=a.resume,
            overwrite=a.overwrite, allow_unknown=a.ignore_unknown_fields, progress=not a.no_progress)
    print(f"[{s['written']} prompts written in {s['batches']} batches ({s['skipped_done']} already done, "
          f"{s['errors']} bad lines, see {errors_path(a.output)}), {s['generated_tokens']} tokens in "
          f"{s['seconds']:.1f} s]", file=sys.stderr)
    return 0

