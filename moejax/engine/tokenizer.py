"""Tokenizer from tokenizer.json (the `tokenizers` package) plus the chat template from tokenizer_config.json."""

from __future__ import annotations

import json
import os


class Tokenizer:
    def __init__(self, directory: str):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        config_path = os.path.join(directory, "tokenizer_config.json")
        self.config = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                self.config = json.load(f)
        self.chat_template = self.config.get("chat_template")
        template_path = os.path.join(directory, "chat_template.jinja")
        if self.chat_template is None and os.path.isfile(template_path):
            with open(template_path) as f:
                self.chat_template = f.read()
        self.add_bos = bool(self.config.get("add_bos_token", False))
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))

    @staticmethod
    def exists(directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token:
            bos = self._tok.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        vocab = self.vocab_size
        return self._tok.decode([i for i in ids if 0 <= i < vocab], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; use generate() instead")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise ValueError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
