"""scripts/train_eagle3.py (train, interrupt, resume, export, report) and scripts/bench_eagle3.py --tiny, on CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mavjax.api import DEFAULT_MODEL, LLM
from mavjax.checkpoint import load_model, save_model
from mavjax.config import preset
from mavjax.eagle3 import load_draft
from mavjax.model import Llama4
from mavjax.sampling import SamplingParams
from mavjax.tokenizer import Tokenizer

from helpers import load_script

REPO = Path(__file__).resolve().parents[1]


def _corpus_and_target(tmp: Path):
    """A corpus in build_corpus.py's format (the shipped tokenizer, this repo's sources as text) and a tiny
    random target over that vocabulary."""
    corpus = tmp / "corpus"
    (corpus / "tokenizer").mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / f, corpus / "tokenizer" / f)
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    text = "".join(p.read_text() for p in sorted((REPO / "mavjax").glob("*.py")))
    ids = np.array(tok.encode(text, add_special_tokens=False), np.uint16)
    np.save(corpus / "train.npy", ids[: len(ids) * 9 // 10])
    np.save(corpus / "heldout.npy", ids[len(ids) * 9 // 10:])
    cfg = preset("tiny").replace(vocab_size=4096, max_position_embeddings=256)
    save_model(Llama4(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), tmp / "target", tokenizer_src_dir=DEFAULT_MODEL)
    return corpus, tmp / "target"


def test_train_eagle3_resumes_and_exports(tmp_path):
    te = load_script("train_eagle3")
    corpus, target = _corpus_and_target(tmp_path)
    args = ["--target", str(target), "--corpus", str(corpus), "--workdir", str(tmp_path / "w"), "--out",
            str(tmp_path / "draft"), "--steps", "3", "--batch", "2", "--seq-len", "32", "--ttt-steps", "3",
            "--draft-vocab", "600", "--eval-windows", "2", "--eval-prompts", "2", "--eval-prompt-len", "16",
            "--eval-new-tokens", "8", "--eval-chains", "3", "--eval-tree", "2,1", "--log-every", "1"]
    assert te.main(args + ["--stop-after", "2"]) == 0  # checkpointed at step 2, nothing exported
    assert not (tmp_path / "draft").exists()
    assert te.main(args) == 0  # resumes at step 2, trains step 3, evaluates, exports
    report = json.loads((tmp_path / "draft" / "train_report.json").read_text())
    assert report["steps"] == 3 and report["draft_vocab"] == 600 and len(report["history"]) >= 1
    assert set(report["acceptance_length"]) == {"K=3", "tree 2,1"}  # --eval-chains 3: one chain compiled
    assert all(1.0 <= v <= 6.0 for v in report["acceptance_length"].values())
    assert len(report["heldout_ttt_top1_agreement_per_step"]) == 3
    dcfg, draft = load_draft(tmp_path / "draft")
    assert dcfg.draft_vocab_size == 600 and draft.dtype == jnp.bfloat16
    d2t = np.asarray(draft.d2t.get_value())
    assert np.all(np.diff(d2t) > 0)  # the most frequent train tokens, sorted
    # the trained draft serves its target: greedy output equals plain decoding
    _, net = load_model(target, dtype="float32")
    prompt = [int(x) for x in np.load(corpus / "heldout.npy")[:10]]
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    plain = LLM.from_model(net).generate([prompt], sp)[0].token_ids
    _, draft32 = load_draft(tmp_path / "draft", dtype="float32")
    assert LLM.from_model(net, draft=draft32, num_draft_tokens=2).generate([prompt], sp)[0].token_ids == plain


def test_bench_eagle3_tiny(tmp_path):
    be = load_script("bench_eagle3")
    report = be.main(["--tiny", "--prompts", "1", "--shapes", "2,1", "--json", str(tmp_path / "b.json")])
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["rows"][0]["shape"] == "none" and saved["rows"][1]["shape"] == "tree 2,1"
    row = report["rows"][1]
    for k in ("decode_tokens_per_s", "speedup_decode", "mean_acceptance_length", "draft_ms", "verify_ms"):
        assert row[k] > 0, k
    assert 0 < row["draft_share"] < 1
