"""The shipped default pair: checkpoints/default/draft is an EAGLE-3 draft trained for checkpoints/default by
scripts/train_eagle3.py, small, and `mavjax generate` uses it by default (same greedy text as without it)."""

import json

from mavjax.api import DEFAULT_MODEL
from mavjax.cli import main
from mavjax.config import Llama4Config
from mavjax.eagle3 import is_draft_dir, load_draft

DRAFT = DEFAULT_MODEL / "draft"


def test_shipped_draft_fits_the_default_model():
    assert is_draft_dir(DRAFT)
    dcfg, draft = load_draft(DRAFT)
    dcfg.check_target(Llama4Config.from_json(DEFAULT_MODEL))
    size = sum(f.stat().st_size for f in DRAFT.rglob("*") if f.is_file())
    assert size < 8e6, size  # "a few MB"
    report = json.loads((DRAFT / "train_report.json").read_text())
    assert {"K=3", "K=5"} <= set(report["acceptance_length"])
    assert report["acceptance_length"]["K=3"] >= 2.5  # the target, as measured by train_eagle3.py


def test_shipped_pair_acceptance_on_unseen_stdlib_text():
    """Measured here: greedy K=3 on statistics.py (a held-out file of the training corpus, present in every
    CPython): mean acceptance length 2.27 on this CPU at the time of writing; a random draft gives ~1.0."""
    import statistics
    from pathlib import Path

    from mavjax.api import LLM
    from mavjax.sampling import SamplingParams

    llm = LLM(draft=DRAFT, num_draft_tokens=3)
    ids = llm.tokenizer.encode(Path(statistics.__file__).read_text(), add_special_tokens=False)
    prompts = [ids[i:i + 48] for i in range(0, 6000, 1000)]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True))
    mean = sum(o.metrics.mean_acceptance_length for o in outs) / len(outs)
    assert mean >= 2.0, mean


def test_generate_uses_the_shipped_draft_by_default(capsys):
    argv = ["generate", "--prompt", "def fib(n):", "--max-new-tokens", "24", "--temperature", "0"]
    assert main(argv) == 0
    with_draft = capsys.readouterr()
    assert "mean acceptance length" in with_draft.err and "tokens/s" in with_draft.err
    assert main(argv + ["--no-draft"]) == 0
    plain = capsys.readouterr()
    assert "acceptance" not in plain.err
    assert with_draft.out == plain.out  # greedy: token-identical with and without the draft
