#!/usr/bin/env python3
"""Build the training corpus and tokenizer of the shipped default model from the Python standard library.

    python scripts/build_corpus.py [--out .data/corpus] [--vocab-size 4096] [--heldout-permille 20]

What it writes into --out:
    tokenizer/tokenizer.json            byte-level BPE (tokenizers library), Llama 4-style special tokens
    tokenizer/tokenizer_config.json     bos/eos/pad tokens, model_max_length, a Llama 4-style chat_template
    tokenizer/special_tokens_map.json
    train.npy, heldout.npy              flat uint16 token arrays: <|begin_of_text|> doc <|end_of_text|> ...
    corpus_meta.json                    file/char/token counts, special ids, Python version, sha256 of outputs

The source is every `*.py` of `sysconfig.get_paths()["stdlib"]` except `test/`, `idlelib/`, `lib2to3/tests`
and `site-packages`, read as UTF-8 (files that are not valid UTF-8 are skipped and counted), in sorted order.
A file goes to the held-out split when a stable hash (sha256) of its relative path falls below
--heldout-permille / 1000, so the split does not depend on the order or number of files.

The stdlib differs between Python versions, so the corpus (and the tokenizer trained on it) is only
reproducible for one Python version: build it once and carry `--out` to where the model is trained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

# Llama 4's special tokens that this small model uses. Their ids are their position here (0..5): pad 0,
# bos 1 and eos 2 match the `default-small` / `tiny` presets of mavjax.config.
PAD, BOS, EOS = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
HEADER_START, HEADER_END, EOT = "<|header_start|>", "<|header_end|>", "<|eot|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, HEADER_START, HEADER_END, EOT)

DEFAULT_EXCLUDES = ("test/", "idlelib/", "lib2to3/tests/", "site-packages/")
MODEL_MAX_LENGTH = 2048  # = default-small's max_position_embeddings

# Llama 4's chat format: <|begin_of_text|>, then per message <|header_start|>ROLE<|header_end|>\n\nCONTENT<|eot|>;
# add_generation_prompt opens an assistant turn. Content may be a string or a list of {"type": "text"} parts
# (the Llama 4 / OpenAI multi-part form). The BOS is written literally so that the template renders the same
# with plain jinja2 as with transformers (which passes bos_token).
CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{%- endif %}"
)


# ---- sources ---------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_files(root: Path, excludes=DEFAULT_EXCLUDES) -> list[str]:
    """Relative POSIX paths of the *.py files under root, sorted, minus those under an excluded prefix."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # prune excluded directories early (site-packages is large)
        dirnames[:] = [d for d in dirnames if not any((rel_dir + d + "/").startswith(e) for e in excludes)]
        for f in filenames:
            rel = rel_dir + f
            if f.endswith(".py") and not any(rel.startswith(e) for e in excludes):
                out.append(rel)
    return sorted(out)


def is_heldout(rel_path: str, permille: int) -> bool:
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")
    return h % 1000 < permille


def read_texts(root: Path, rel_paths: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(paths kept, their texts, paths skipped as not UTF-8). Text is kept byte-exact (no newline
    translation), so the corpus is the files as they are."""
    kept, texts, skipped = [], [], []
    for rel in rel_paths:
        data = (root / rel).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        if text.strip():
            kept.append(rel)
            texts.append(text)
    return kept, texts, skipped


# ---- tokenizer -------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style pre-tokenization, no normalizer, so decode(encode(s)) == s for any
    string without special-token text in it). Special tokens take ids 0..5 in SPECIAL_TOKENS order.
    Encoding with add_special_tokens=True prepends <|begin_of_text|>, as Llama 4's tokenizer does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size > 65536:
        raise ValueError(f"vocab_size {vocab_size} does not fit the uint16 token arrays")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return tok


def special_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def write_tokenizer_files(tok, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = special_ids(tok)
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in ids.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    smap = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": [HEADER_START, HEADER_END, EOT]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")


def encode_documents(tok, texts: list[str], batch: int = 256) -> np.ndarray:
    """<|begin_of_text|> doc <|end_of_text|> for each text, concatenated, as uint16."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    parts = []
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[i:i + batch], add_special_tokens=False):
            parts.append(np.asarray([bos, *enc.ids, eos], dtype=np.uint16))
    if not parts:
        return np.zeros((0,), np.uint16)
    return np.concatenate(parts)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- main ------------------------------------------------------------------------------------------------
def build(out: Path, vocab_size: int = 4096, heldout_permille: int = 20, root: Path | None = None,
          excludes=DEFAULT_EXCLUDES, min_frequency: int = 2, verbose: bool = True) -> dict:
    t0 = time.perf_counter()
    log = print if verbose else (lambda *a, **k: None)
    root = Path(root) if root is not None else stdlib_dir()
    rel = collect_files(root, excludes)
    kept, texts, skipped = read_texts(root, rel)
    held = [is_heldout(p, heldout_permille) for p in kept]
    train_texts = [t for t, h in zip(texts, held) if not h]
    held_texts = [t for t, h in zip(texts, held) if h]
    log(f"[corpus] {root}: {len(kept)} files ({len(train_texts)} train / {len(held_texts)} held out), "
        f"{sum(map(len, texts)) / 1e6:.2f} M chars, {len(skipped)} skipped as not UTF-8")
    t1 = time.perf_counter()
    tok = train_tokenizer(train_texts, vocab_size, min_frequency)
    log(f"[corpus] BPE vocab {tok.get_vocab_size()} trained in {time.perf_counter() - t1:.1f}s")
    tok_dir = out / "tokenizer"
    write_tokenizer_files(tok, tok_dir)
    t2 = time.perf_counter()
    train_ids = encode_documents(tok, train_texts)
    held_ids = encode_documents(tok, held_texts)
    log(f"[corpus] encoded {len(train_ids):,} train / {len(held_ids):,} held-out tokens in "
        f"{time.perf_counter() - t2:.1f}s")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", train_ids)
    np.save(out / "heldout.npy", held_ids)
    n_chars_train = sum(map(len, train_texts))
    meta = {
        "source": str(root),
        "python_version": platform.python_version(),
        "excludes": list(excludes),
        "heldout_permille": heldout_permille,
        "files": {"train": len(train_texts), "heldout": len(held_texts), "skipped_not_utf8": skipped},
        "heldout_files": [p for p, h in zip(kept, held) if h],
        "chars": {"train": n_chars_train, "heldout": sum(map(len, held_texts))},
        "tokens": {"train": int(len(train_ids)), "heldout": int(len(held_ids))},
        "chars_per_token_train": round(n_chars_train / max(1, len(train_ids) - 2 * len(train_texts)), 3),
        "vocab_size": tok.get_vocab_size(),
        "special_ids": special_ids(tok),
        "sha256": {name: _sha256(out / name) for name in
                   ("train.npy", "heldout.npy", "tokenizer/tokenizer.json")},
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "corpus_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"[corpus] special ids {meta['special_ids']}; wrote {out} in {meta['build_seconds']}s")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".data/corpus"))
    ap.add_argument("--vocab-size", type=int, default=4096,
                    help="BPE vocabulary incl. the 6 special tokens (4096 keeps default-small <= ~20 MB in bf16)")
    ap.add_argument("--heldout-permille", type=int, default=20, help="held-out share of files, per mille")
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--stdlib", type=Path, default=None, help="source root (default: this Python's stdlib)")
    args = ap.parse_args(argv)
    build(args.out, args.vocab_size, args.heldout_permille, args.stdlib, min_frequency=args.min_frequency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
