"""Tokenizer from tokenizer.json (the `tokenizers` package) plus the chat template from tokenizer_config.json."""

from __future__ import annotations

import os

from moejax.config import ConfigError, read_json_object


class Tokenizer:
    def __init__(self, directory: str):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(directory, "tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # the tokenizers package raises its own untyped Exception
            raise ConfigError(f"{path}: not a valid tokenizer ({e})") from None
        config_path = os.path.join(directory, "tokenizer_config.json")
        self.config = read_json_object(config_path) if os.path.isfile(config_path) else {}
        self.chat_template = self.config.get("chat_template")
        template_path = os.path.join(directory, "chat_template.jinja")
        if self.chat_template is None and os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                self.chat_template = f.read()
        if isinstance(self.chat_template, list):  # named templates: transformers uses the one called "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default", next(iter(named.values()), None))
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ConfigError(f"{config_path}: chat_template must be a string, got "
                              f"{type(self.chat_template).__name__}")
        add_bos = self.config.get("add_bos_token", False)
        if not isinstance(add_bos, bool) and add_bos is not None:
            raise ConfigError(f"{config_path}: add_bos_token must be true or false, got {add_bos!r}")
        self.add_bos = bool(add_bos)
        self.bos_token = _token_str(config_path, self.config, "bos_token")
        self.eos_token = _token_str(config_path, self.config, "eos_token")

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


def _token_str(path: str, config: dict, key: str) -> str | None:
    tok = config.get(key)
    if isinstance(tok, dict):
        tok = tok.get("content")
    if tok is not None and not isinstance(tok, str):
        raise ConfigError(f"{path}: {key} must be a string or an object with a string 'content', got {tok!r}")
    return tok
