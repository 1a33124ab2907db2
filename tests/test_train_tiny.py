"""scripts/build_corpus.py and scripts/train_tiny.py on tiny inputs (CPU, a few seconds each)."""

from __future__ import annotations

import json
import json.decoder
import json.encoder
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
HELDOUT_PERMILLE = 400


bc = load_script("build_corpus")
tt = load_script("train_tiny")

SOURCE = '''\
"""A module docstring with unicode: héllo wörld, 日本語, emoji 😀."""
import os\r\n
class Thing(object):
\tdef method(self, x: int = 3) -> "Thing":   # trailing spaces   
        return {"a": [1, 2.5e-3, 0xFF], 'b': f"{x!r:>10}"}\n\n\n
def _f(*args, **kw):
    """  indented   """
    lambda: None  \\
        ; pass
'''


def _fake_stdlib(root: Path) -> Path:
    """A small source tree shaped like the stdlib, with the directories the corpus must skip."""
    srcs = {
        "json/decoder.py": Path(json.decoder.__file__).read_text(encoding="utf-8"),
        "json/encoder.py": Path(json.encoder.__file__).read_text(encoding="utf-8"),
        "json/__init__.py": Path(json.__file__).read_text(encoding="utf-8"),
        "mavjax_config.py": (REPO / "mavjax" / "config.py").read_text(encoding="utf-8"),
        "mavjax_model.py": (REPO / "mavjax" / "model.py").read_text(encoding="utf-8"),
        "odd.py": SOURCE,
        "test/test_skipped.py": "SKIPPED_TEST = 1\n",
        "idlelib/skipped.py": "SKIPPED_IDLE = 1\n",
        "lib2to3/tests/skipped.py": "SKIPPED_2TO3 = 1\n",
        "lib2to3/kept.py": "KEPT_2TO3 = 1\n",
        "site-packages/pkg/skipped.py": "SKIPPED_SITE = 1\n",
        "notes.txt": "not python\n",
    }
    for rel, text in srcs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8", newline="")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = _fake_stdlib(tmp_path_factory.mktemp("stdlib"))
    out = tmp_path_factory.mktemp("corpus")
    meta = bc.build(out, vocab_size=400, heldout_permille=HELDOUT_PERMILLE, root=root, verbose=False)
    assert "mavjax_model.py" in meta["heldout_files"]  # a file long enough for a few held-out windows
    return out, meta, root


def test_corpus_files_split_and_arrays(corpus):
    out, meta, root = corpus
    files = bc.collect_files(root)
    assert "lib2to3/kept.py" in files and "odd.py" in files
    assert not [f for f in files if "skipped" in f or f.endswith(".txt")]
    assert files == sorted(files)
    assert meta["files"]["train"] + meta["files"]["heldout"] == len(files)
    assert meta["special_ids"] == {t: i for i, t in enumerate(bc.SPECIAL_TOKENS)}
    train, held = np.load(out / "train.npy"), np.load(out / "heldout.npy")
    assert train.dtype == np.uint16 and held.dtype == np.uint16
    assert len(train) == meta["tokens"]["train"] and len(held) == meta["tokens"]["heldout"]
    bos, eos = meta["special_ids"][bc.BOS], meta["special_ids"][bc.EOS]
    assert train[0] == bos and train[-1] == eos
    assert (train == bos).sum() == (train == eos).sum() == meta["files"]["train"]
    # the split depends on the path alone
    assert bc.is_heldout("a/b.py", 20) == bc.is_heldout("a/b.py", 20)
    assert 5 < sum(bc.is_heldout(f"m{i}.py", 20) for i in range(1000)) < 40


def test_tokenizer_round_trips_python_source(corpus):
    from tokenizers import Tokenizer

    out, meta, root = corpus
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size() == 400
    samples = [SOURCE, Path(json.decoder.__file__).read_text(encoding="utf-8"), "", " ", "\n\n\t \r\n",
               "x=1", "ünïcödé ≠ ascii\u200b\x00\x7f"]
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids) == s
        with_bos = tok.encode(s).ids  # Llama 4 style: add_special_tokens prepends <|begin_of_text|>
        assert with_bos[0] == meta["special_ids"][bc.BOS] and with_bos[1:] == ids
        assert tok.decode(with_bos) == s
    for t, i in meta["special_ids"].items():
        assert tok.encode(t, add_special_tokens=False).ids == [i]

    cfg = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (bc.BOS, bc.EOS, bc.PAD)
    assert cfg["model_max_length"] == bc.MODEL_MAX_LENGTH
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}]
    text = env.from_string(cfg["chat_template"]).render(messages=msgs, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
                    "<|header_start|>user<|header_end|>\n\nHi!<|eot|><|header_start|>assistant<|header_end|>\n\n")
    text = env.from_string(cfg["chat_template"]).render(messages=msgs[:1], add_generation_prompt=False)
    assert text.endswith("Be brief.<|eot|>")


def _spec(cfg, **kw):
    # the spec of the run in test_train_resume_matches_uninterrupted_run (so they share compiled code)
    base = dict(cfg=cfg, batch=2, seq_len=16, compute_dtype="float32", lr=1e-2, steps=3, warmup=1,
                weight_decay=0.1, clip=1.0, min_lr_ratio=0.1, router_aux_coef=0.01)
    return tt.TrainSpec(**{**base, **kw})


def test_routing_capture_and_loss_drops_on_a_repeated_sequence(corpus):
    corpus_dir = corpus[0]
    c = tt.load_corpus(corpus_dir)
    cfg = tt.model_config(c, "tiny")
    assert cfg.vocab_size == 400 and cfg.eos_token_id == (2, 5) and cfg.bos_token_id == 1 and cfg.pad_token_id == 0
    spec = _spec(cfg)
    T = spec.seq_len
    state = tt.init_state(spec, seed=0)
    period = np.random.default_rng(0).integers(6, cfg.vocab_size, size=T).astype(np.uint16)
    data = jnp.asarray(np.resize(period, len(c.train)))  # every window is a rotation of one sequence
    windows = np.stack([np.resize(period, T + 1)] * 3).astype(np.int32)

    usage = tt.expert_usage(cfg, state["params"], windows, spec.batch, "float32")  # 3 windows: one padded
    assert sorted(usage) == list(cfg.moe_layers)
    assert all(abs(sum(u) - 1.0) < 1e-3 and len(u) == cfg.num_local_experts for u in usage.values())
    counts = tt.routing_counts(state["params"], jnp.asarray(windows[:2]), jnp.asarray([1.0, 0.0]), cfg=cfg,
                               dtype="float32")
    assert counts.shape == (len(cfg.moe_layers), cfg.num_local_experts) and float(counts.sum(-1)[0]) == T

    losses = []
    for _ in range(8):
        state, m = tt.train_step(state, data, spec=spec)
        losses.append(float(m["loss"]))
        assert np.isfinite(float(m["balance"])) and float(m["balance"]) >= 1.0 - 1e-4
    assert int(state["step"]) == 8
    assert losses[-1] < losses[0] - 0.3, losses
    nll, n = tt.evaluate(cfg, state["params"], windows, spec.batch, "float32")
    assert n == 3 * T and nll < losses[0]


def _args(corpus_dir, workdir, out, *extra):
    return tt.parse_args(["--corpus", str(corpus_dir), "--workdir", str(workdir), "--out", str(out),
                          "--preset", "tiny", "--steps", "3", "--batch", "2", "--seq-len", "16",
                          "--log-every", "1", "--eval-every", "2", "--eval-windows", "2", "--ckpt-every", "1",
                          "--final-eval-windows", "3", "--warmup", "1", "--lr", "1e-2", "--no-compile-cache",
                          *extra])


def _restore(workdir):
    import orbax.checkpoint as ocp

    mngr = tt.checkpoint_manager(Path(workdir), 5)
    try:
        out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                        meta=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return out["state"], out["meta"]


def test_train_resume_matches_uninterrupted_run(corpus, tmp_path, capsys):
    corpus_dir = corpus[0]
    full = tt.run(_args(corpus_dir, tmp_path / "wa", tmp_path / "out_a"))
    assert full["steps"] == 3 and full["tokens_seen"] == 3 * 2 * 16
    stopped = tt.run(_args(corpus_dir, tmp_path / "wb", tmp_path / "out_b", "--stop-after", "2"))
    assert stopped == {"stopped_at": 2}
    assert not (tmp_path / "out_b").exists()
    tt.skeleton.cache_clear()  # as in a fresh process: the resumed run first builds it under a trace
    resumed = tt.run(_args(corpus_dir, tmp_path / "wb", tmp_path / "out_b"))
    assert "resumed from" in capsys.readouterr().out
    assert resumed["steps"] == 3 and resumed["tokens_seen"] == full["tokens_seen"]

    (sa, ma), (sb, mb) = _restore(tmp_path / "wa"), _restore(tmp_path / "wb")
    assert int(sa["step"]) == int(sb["step"]) == 3 == ma["step"] == mb["step"]
    for name in sa["params"]:
        np.testing.assert_array_equal(np.asarray(sa["params"][name]), np.asarray(sb["params"][name]), name)
    jax.tree.map(np.testing.assert_array_equal, sa["opt"], sb["opt"])
    assert resumed["heldout_loss"] == full["heldout_loss"]
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"])

    # the export: a bf16 mavjax checkpoint, the tokenizer, and the report
    for out in (tmp_path / "out_a", tmp_path / "out_b"):
        report = json.loads((out / "train_report.json").read_text())
        assert report["steps"] == 3 and np.isfinite(report["heldout_perplexity"])
        assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
        config = json.loads((out / "config.json").read_text())
        assert config["vocab_size"] == 400 and config["eos_token_id"] == [2, 5]
    try:
        from mavjax.checkpoint import load_model
    except ImportError:
        return
    cfg, model = load_model(tmp_path / "out_a")
    assert model.embed[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model.embed[...]),
                                  np.asarray(sa["params"]["embed"].astype(jnp.bfloat16)))
