"""`mavjax batch` on the shipped default model (float32): batch results equal one-by-one generation, a run
killed at random points (injected failures mid-write, and a real SIGKILL) resumes to every prompt exactly
once, malformed lines are reported with their line numbers and skipped, and compiled shapes stay bounded."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mavjax import LLM, SamplingParams
from mavjax import batch as batch_mod
from mavjax.cli import main

ROOT = Path(__file__).resolve().parent.parent
CODE = ["def fib(n):", "import os\n", "class Foo(object):\n    def __init__(self, x):\n        self.x = x\n",
        "for i in range(10):", "x = [", "def main():\n    parser = argparse.ArgumentParser(description=",
        "try:\n    import json\nexcept ImportError:\n    json = None\n\n\ndef load(path):", "return"]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_batch_size=4)


def _write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _run(llm, inp, out, **kw):
    kw.setdefault("defaults", dict(max_new_tokens=6, temperature=0.0))
    kw.setdefault("batch_size", 4)
    return batch_mod.run(llm, inp, out, progress=False, **kw)


def test_batch_file_equals_one_by_one(llm, tmp_path):
    lines = [{"prompt": p} for p in CODE]  # 2..21 tokens: two prompt-length buckets
    lines[2]["id"] = "cls"
    lines[3].update(temperature=0.9, top_p=0.9, seed=7)  # sampled: the seed makes it batch-independent
    lines[4]["max_new_tokens"] = 3
    lines.append({"messages": [{"role": "user", "content": "Write a function"}], "max_new_tokens": 5})
    lines.append({"prompt": [1, 400, 12, 33], "id": 77})
    out = tmp_path / "out.jsonl"
    s = _run(llm, _write(tmp_path / "in.jsonl", lines), out)
    assert s["written"] == len(lines) and s["errors"] == 0
    got = {r["id"]: r for r in _read(out)}
    ids = [ln.get("id", i + 1) for i, ln in enumerate(lines)]
    assert sorted(map(str, got)) == sorted(map(str, ids))
    for i, (rid, ln) in enumerate(zip(ids, lines)):
        sp = SamplingParams(**{"max_new_tokens": 6, "temperature": 0.0,
                               **{k: v for k, v in ln.items() if k in batch_mod.SAMPLING_FIELDS}})
        if "messages" in ln:
            alone = llm.chat(ln["messages"], sp)[0]
        else:
            alone = llm.generate([ln["prompt"]], sp)[0]
        r = got[rid]
        assert r["line"] == i + 1 and r["prompt_tokens"] == len(alone.prompt_token_ids)
        assert (r["token_ids"], r["text"], r["finish_reason"]) == (alone.token_ids, alone.text, alone.finish_reason)
        assert r["metrics"]["num_generated_tokens"] == len(r["token_ids"]) > 0


def _many(n, seed=0):
    """n prompts of n different lengths (token ids), with ids."""
    rng = random.Random(seed)
    return [{"id": f"p{i}", "prompt": [rng.randrange(3, 4000) for _ in range(1 + i)]} for i in range(n)]


@pytest.fixture(scope="module")
def reference(llm, tmp_path_factory):
    """An uninterrupted run over 24 prompts of 24 lengths; also checks the compiled-shape bound."""
    d = tmp_path_factory.mktemp("ref")
    inp = _write(d / "in.jsonl", _many(24))
    before = llm.engine._prefill._cache_size()
    _run(llm, inp, d / "ref.jsonl")
    # 24 lengths in two prompt-length buckets, batches of 4: at most (batch buckets 1, 2, 4) x 2 programs.
    assert llm.engine._prefill._cache_size() - before <= 6
    return inp, {r["id"]: r for r in _read(d / "ref.jsonl")}


def _check_exactly_once(out, ref):
    rows = _read(out)
    assert sorted(r["id"] for r in rows) == sorted(ref)  # every prompt, none twice
    for r in rows:
        assert r["token_ids"] == ref[r["id"]]["token_ids"] and r["text"] == ref[r["id"]]["text"]


class Killed(BaseException):  # not an Exception: nothing in the run may swallow it, like a real kill
    pass


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resume_after_failures_mid_write(llm, reference, tmp_path, monkeypatch, seed):
    inp, ref = reference
    out = tmp_path / "out.jsonl"
    rng = random.Random(seed)
    real = batch_mod.append_batch
    kills = 0
    for attempt in range(3):  # three kills at random batches, each inside the write of that batch
        kill_at = rng.randrange(0, 3)
        calls = {"n": 0}

        def dying(fd, data):
            if calls["n"] == kill_at:
                os.write(fd, data[:rng.randrange(0, len(data))])  # a torn batch: some lines and part of one
                raise Killed
            calls["n"] += 1
            real(fd, data)

        monkeypatch.setattr(batch_mod, "append_batch", dying)
        try:
            _run(llm, inp, out, resume=attempt > 0)
            break  # fewer batches were left than the chosen kill point: finished
        except Killed:
            kills += 1
    monkeypatch.setattr(batch_mod, "append_batch", real)
    assert kills >= 1  # the first run has 6 batches: it is always killed
    _run(llm, inp, out, resume=True)
    _check_exactly_once(out, ref)
    assert out.read_bytes().endswith(b"\n")


def test_resume_after_sigkill(llm, reference, tmp_path):
    inp, ref = reference
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "mavjax.cli", "batch", "--input", str(inp), "--output", str(out), "--dtype",
           "float32", "--batch-size", "2", "--max-new-tokens", "6", "--temperature", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.stat().st_size):
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # somewhere in the following batches
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()  # killed, not finished
    assert 0 < len(out.read_bytes().split(b"\n")) - 1 < len(ref)  # some, not all, lines were written
    _run(llm, inp, out, resume=True)
    _check_exactly_once(out, ref)


def test_resume_cuts_a_torn_last_line(llm, reference, tmp_path):
    inp, ref = reference
    out = tmp_path / "out.jsonl"
    first = json.dumps(ref["p0"]) + "\n"
    out.write_text(first + json.dumps(ref["p1"])[:40])  # one whole line, one torn one
    s = _run(llm, inp, out, resume=True)
    assert s["skipped_done"] == 1 and s["written"] == 23
    _check_exactly_once(out, ref)


def test_malformed_lines_are_reported_and_skipped(llm, tmp_path, capsys):
    lines = ['{"prompt": "def f():"}',  # 1 ok
             'this is not json',  # 2
             '{"id": "x"}',  # 3 no prompt
             '{"prompt": "a", "temperature": -1}',  # 4 bad sampling value
             json.dumps({"prompt": "x = 1\n" * 1000}),  # 5 longer than max_model_len
             '{"prompt": "b", "id": "dup"}',  # 6 ok
             '{"prompt": "c", "id": "dup"}',  # 7 duplicate id
             '{"prompt": "d", "tempreature": 0.5}',  # 8 unknown field (a typo)
             '[1, 2]',  # 9 not an object
             '{"messages": "hi"}',  # 10 messages not a list
             '{"prompt": [1, 99999]}',  # 11 token id outside the vocabulary
             '',  # 12 blank: ignored
             '{"prompt": "e", "top_p": 0}']  # 13 bad sampling value
    inp = _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    s = _run(llm, inp, out)
    bad = {2: "not valid JSON", 3: "exactly one of 'prompt'", 4: "temperature", 5: "longer than the context",
           7: "duplicate id", 8: "tempreature", 9: "JSON object", 10: "messages", 11: "outside the vocabulary",
           13: "top_p"}
    errs = _read(batch_mod.errors_path(out))
    assert [e["line"] for e in errs] == sorted(bad)
    for e in errs:
        assert bad[e["line"]] in e["error"], e
    err = capsys.readouterr().err
    for n in bad:
        assert f"in.jsonl:{n}: skipped" in err
    assert s["errors"] == len(bad) and sorted(str(r["id"]) for r in _read(out)) == ["1", "dup"]


def test_cli_batch_and_its_errors(tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "def f():", "id": "a"}, "oops"])
    out = tmp_path / "out.jsonl"
    args = ["batch", "--input", str(inp), "--output", str(out), "--max-new-tokens", "4", "--no-progress"]
    assert main(args) == 0
    assert [r["id"] for r in _read(out)] == ["a"]
    assert main(args) == 2  # output exists: neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0 and len(_read(out)) == 1
    assert main(args + ["--overwrite", "--draft", str(tmp_path / "no-draft")]) == 2  # no draft support, or no dir
    assert main(["batch", "--input", str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 2
    assert main(args + ["--overwrite", "--temperature", "-2"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_model_options_pass_through_to_llm():
    import argparse
    import inspect

    p = argparse.ArgumentParser()
    batch_mod.add_arguments(p)
    base = ["--input", "i", "--output", "o"]
    a = p.parse_args(base + ["--kernels", "pallas", "--quantize", "fp8", "--mesh", "expert=1,tensor=2",
                             "--dtype", "float32", "--max-model-len", "512", "--allreduce", "oneshot"])
    kw = batch_mod.llm_kwargs(a, 8)
    assert kw == dict(dtype="float32", max_model_len=512, max_batch_size=8, kernels="pallas", quantize="fp8",
                      mesh="expert=1,tensor=2", allreduce="oneshot")  # no draft keywords unless asked for
    assert set(kw) <= set(inspect.signature(LLM.__init__).parameters)
    a = p.parse_args(base + ["--draft", "d", "--num-draft-tokens", "4"])
    if "draft" in inspect.signature(LLM.__init__).parameters:
        kw = batch_mod.llm_kwargs(a, 8)
        assert kw["draft"] == "d" and kw["num_draft_tokens"] == 4
    else:
        with pytest.raises(ValueError, match="no EAGLE-3 draft support"):
            batch_mod.llm_kwargs(a, 8)
    with pytest.raises(ValueError, match="needs --draft"):
        batch_mod.llm_kwargs(p.parse_args(base + ["--num-draft-tokens", "4"]), 8)
    with pytest.raises(ValueError, match="bad mesh entry"):
        batch_mod.llm_kwargs(p.parse_args(base + ["--mesh", "experts=2"]), 8)
