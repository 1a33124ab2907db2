"""Tokenizer (`tokenizer.json` through `tokenizers`) and chat template (`tokenizer_config.json` through jinja2)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, config: dict | None = None, chat_template: str | None = None):
        self._tok = tok
        self.config = config or {}
        self.chat_template = chat_template or self.config.get("chat_template")

        def token_str(v):
            return v.get("content") if isinstance(v, dict) else v

        self.bos_token = token_str(self.config.get("bos_token"))
        self.eos_token = token_str(self.config.get("eos_token"))
        self.pad_token = token_str(self.config.get("pad_token"))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = None
        if (path / "chat_template.jinja").exists():  # transformers >= 4.49 writes the template beside the config
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        return cls(_HFTokenizer.from_file(str(path / "tokenizer.json")), cfg, template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template')")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")
