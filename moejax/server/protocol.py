"""OpenAI request bodies -> engine inputs, with a typed check of every field the server honours.

Every problem is an `APIError` naming the parameter, answered in OpenAI's error shape with a 4xx status.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moejax.engine.sampling import MAX_LOGPROBS, SamplingParams

_MISSING = object()


class APIError(Exception):
    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _field(body: dict, key: str, kinds: tuple, default: Any = None, *, nullable: bool = True):
    value = body.get(key, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    # bool is an int in Python; JSON true is not a number
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(f"'{key}' must be {names}, got {type(value).__name__}", param=key)
    return value


def _int(body, key, default=None, *, low=None, high=None):
    value = _field(body, key, (int,), default)
    if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(f"'{key}' must be {span}, got {value}", param=key)
    return value


def _float(body, key, default):
    value = _field(body, key, (int, float), default)
    return None if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class Request:
    """What a handler needs besides the prompts: sampling, streaming and response options."""

    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token wanted in the response (None: no logprobs)


def _stop(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise APIError("'stop' must be a string or a list of strings", param="stop")


def parse_request(body: dict, *, chat: bool, max_model_len: int) -> Request:
    """Sampling and response options shared by completions and chat completions."""
    max_tokens = _int(body, "max_completion_tokens", None, low=0) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None if chat else 16, low=0)
    if max_tokens is not None:
        max_tokens = min(max_tokens, max_model_len)
    if chat:
        wants = _field(body, "logprobs", (bool,), False)
        top = _int(body, "top_logprobs", 0, low=0, high=MAX_LOGPROBS)
        if top and not wants:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs = top if wants else None
    else:
        logprobs = _int(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    stop_ids = _field(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise APIError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {})
    include_usage = _field(options, "include_usage", (bool,), False)
    echo = False if chat else _field(body, "echo", (bool,), False)
    temperature = _float(body, "temperature", 1.0)
    fields = dict(
        n=_int(body, "n", 1, low=1, high=128), temperature=temperature, top_p=_float(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0, low=-1), min_p=_float(body, "min_p", 0.0), max_tokens=max_tokens,
        stop=_stop(body), stop_token_ids=stop_ids, ignore_eos=_field(body, "ignore_eos", (bool,), False),
        seed=_int(body, "seed", None), logprobs=logprobs)
    for key in ("temperature", "top_p", "min_p"):
        if fields[key] != fields[key]:  # NaN
            raise APIError(f"'{key}' must be a number, got NaN", param=key)
    try:
        params = SamplingParams(**fields)
    except ValueError as e:
        param = next((k for k in fields if str(e).startswith(k)), None)
        raise APIError(str(e), param=param) from None
    return Request(params, stream, include_usage, echo, logprobs)


def completion_prompts(body: dict, tokenizer) -> list[tuple[str | None, list[int]]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise APIError("'prompt' is required", param="prompt")

    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        items = [prompt]
    elif is_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        items = prompt
    else:
        raise APIError("'prompt' must be a string, a list of strings, a list of token ids or a list of such "
                       "lists, and not empty", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise APIError("'prompt' is empty", param="prompt")
            if tokenizer is None:
                raise APIError("this model has no tokenizer: send token ids", param="prompt")
            out.append((item, tokenizer.encode(item)))
        else:
            out.append((None, list(item)))
    return out


def chat_prompt(body: dict, tokenizer) -> tuple[str, list[int]]:
    """The conversation rendered with the tokenizer's chat template and tokenized."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{i}].content parts must be text parts", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        clean.append({**m, "content": content})
    if tokenizer is None:
        raise APIError("this model has no tokenizer, so no chat template", param="messages")
    try:
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except ValueError as e:
        raise APIError(f"chat template: {e}", param="messages") from None
    except Exception as e:  # a template error (jinja2 raises its own types)
        raise APIError(f"chat template failed: {type(e).__name__}: {e}", param="messages") from None
    return text, tokenizer.encode(text, add_special_tokens=False)
