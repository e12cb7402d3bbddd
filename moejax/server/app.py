"""The OpenAI-compatible HTTP app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Handlers parse and check the body (protocol.py), submit one engine request per prompt and choice group to the
engine thread (loop.py) and turn its RequestOutputs into OpenAI responses or server-sent events. A client that
goes away has its requests aborted, which frees their KV pages at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from moejax.server.loop import EngineLoop
from moejax.server.metrics import Metrics
from moejax.server.protocol import APIError, chat_prompt, completion_prompts, parse_request

MAX_BODY_BYTES = 4 << 20


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(llm, *, served_model_name: str, api_key: str | None = None, chat_template: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, warmup: bool = False) -> FastAPI:
    """The app over `llm`'s engine; warmup: compile every step shape (with expert counting) before serving."""
    llm.llm_engine.count_experts(True)
    if warmup:
        llm.warmup()
    metrics = Metrics()
    loop = EngineLoop(llm, metrics)
    tokenizer = llm.get_tokenizer()
    if chat_template is not None and tokenizer is not None:
        tokenizer.chat_template = chat_template
    max_model_len = llm.llm_engine.max_model_len
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:  # after uvicorn's graceful shutdown has let in-flight responses finish
            loop.stop()

    app = FastAPI(title="moejax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine_loop = loop
    app.state.metrics = metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body size limit and API key, before any handler reads the body."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return _error(APIError(f"request body over {max_body_bytes} bytes", status=413))
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(APIError("invalid or missing API key", status=401, type="authentication_error",
                                       code="invalid_api_key"))
        try:
            return await call_next(request)
        except Exception:  # never a stack trace to the client
            return _error(APIError("internal server error", status=500, type="server_error"))

    async def read_body(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():  # a body without Content-Length is cut off at the limit too
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(f"request body over {max_body_bytes} bytes", status=413)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise APIError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served_model_name:
            raise APIError(f"model {model!r} does not exist; this server serves {served_model_name!r}",
                           status=404, param="model", code="model_not_found")
        if not loop.alive:
            raise APIError("the engine has stopped", status=503, type="server_error")
        return body

    def check_length(ids: list[int]) -> None:
        if len(ids) >= max_model_len:
            raise APIError(f"the prompt has {len(ids)} tokens; this model's max_model_len is {max_model_len}",
                           param="prompt", code="context_length_exceeded")

    @app.get("/health")
    async def health():
        if not loop.alive:
            return PlainTextResponse("engine stopped", status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                             "owned_by": "moejax", "max_model_len": max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await read_body(request)
            req = parse_request(body, chat=False, max_model_len=max_model_len)
            prompts = completion_prompts(body, tokenizer)
            for _, ids in prompts:
                check_length(ids)
        except APIError as e:
            return _error(e)
        rid = f"cmpl-{uuid.uuid4().hex}"
        echo_lp = None
        if req.echo and req.logprobs is not None:
            echo_lp = [await loop.call(lambda ids=ids: prompt_logprobs(llm, ids, req.logprobs))
                       for _, ids in prompts]
        return await respond(request, rid, "text_completion", prompts, req, echo_lp=echo_lp)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await read_body(request)
            req = parse_request(body, chat=True, max_model_len=max_model_len)
            text, ids = chat_prompt(body, tokenizer)
            check_length(ids)
        except APIError as e:
            return _error(e)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await respond(request, rid, "chat.completion", [(text, ids)], req)

    def token_str(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False) if tokenizer is not None else str(t)

    def alternatives(entry: dict, token: int, k: int) -> list:
        """The k most likely (token, logprob) of a step: an engine entry holds the sampled token first, then the
        top k (the sampled one among them or not)."""
        items = list(entry.items())
        if len(items) > k:
            items = [(a, v) for a, v in items if a != token] if token in entry else items[1:]
        return sorted(items, key=lambda av: -av[1])[:k]

    def choice_logprobs(kind, completion, start: int, k: int, prefix=None):
        """OpenAI logprobs of completion tokens [start:] with k alternatives each (chat: content entries;
        completions: parallel lists, after the echoed prompt's `prefix` when given)."""
        entries = completion.logprobs[start:] if completion.logprobs is not None else []
        ids = completion.token_ids[start:start + len(entries)]
        if kind == "chat.completion":
            return {"content": [{"token": token_str(t), "logprob": e.get(t, 0.0),
                                 "bytes": list(token_str(t).encode()),
                                 "top_logprobs": [{"token": token_str(a), "logprob": v,
                                                   "bytes": list(token_str(a).encode())}
                                                  for a, v in alternatives(e, t, k)]}
                                for t, e in zip(ids, entries)]}
        tokens, lps, tops = ([], [], []) if prefix is None else (list(prefix[0]), list(prefix[1]), list(prefix[2]))
        for t, e in zip(ids, entries):
            tokens.append(token_str(t))
            lps.append(e.get(t, 0.0))
            tops.append({token_str(a): v for a, v in alternatives(e, t, k)} or None)
        offsets, pos = [], 0
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def respond(request: Request, rid: str, kind: str, prompts, req, echo_lp=None):
        n = req.params.n
        submitted = []
        queues = []
        for i, (text, ids) in enumerate(prompts):
            sub_id = f"{rid}-{i}"
            queues.append(loop.submit(sub_id, ids, req.params, prompt=text))
            submitted.append(sub_id)
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        head = {"id": rid, "object": chunk_kind, "created": int(time.time()), "model": served_model_name}
        prompt_tokens = sum(len(ids) for _, ids in prompts)

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        def echo_text(i: int) -> str:
            text, ids = prompts[i]
            return text if text is not None else (tokenizer.decode(ids) if tokenizer is not None else "")

        async def outputs():
            """(prompt index, RequestOutput) as they arrive, over all prompts' queues."""
            pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
            try:
                while pending:
                    done, _ = await asyncio.wait(pending, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    if not done and await request.is_disconnected():
                        raise asyncio.CancelledError
                    for fut in done:
                        i = pending.pop(fut)
                        out = fut.result()
                        if isinstance(out, BaseException):
                            raise out
                        yield i, out
                        if not out.finished:
                            pending[asyncio.ensure_future(queues[i].get())] = i
            finally:
                for fut in pending:
                    fut.cancel()

        finished: set[int] = set()

        def abort_rest():
            for i, sub_id in enumerate(submitted):
                if i not in finished:
                    loop.abort(sub_id)

        if not req.stream:
            final = {}
            try:
                async for i, out in outputs():
                    if out.finished:
                        finished.add(i)
                        final[i] = out
            except ValueError as e:
                abort_rest()
                return _error(APIError(str(e), param="prompt"))
            except BaseException:
                abort_rest()
                raise
            choices, completion_tokens = [], 0
            for i in range(len(prompts)):
                for c in final[i].outputs:
                    completion_tokens += len(c.token_ids)
                    index = i * n + c.index
                    if kind == "chat.completion":
                        choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                        "logprobs": None if req.logprobs is None
                                        else choice_logprobs(kind, c, 0, req.logprobs),
                                        "finish_reason": c.finish_reason})
                    else:
                        text = (echo_text(i) if req.echo else "") + c.text
                        lp = None
                        if req.logprobs is not None:
                            prefix = echo_lp[i] if echo_lp is not None else None
                            lp = choice_logprobs(kind, c, 0, req.logprobs, prefix)
                        choices.append({"index": index, "text": text, "logprobs": lp,
                                        "finish_reason": c.finish_reason})
            return {**head, "object": kind, "choices": choices, "usage": usage(completion_tokens)}

        async def events():
            sent = {}  # choice index -> (text sent, tokens sent)
            completion_tokens = 0
            try:
                if kind == "chat.completion":
                    for i in range(len(prompts)):
                        for j in range(n):
                            yield _sse({**head, "choices": [{"index": i * n + j, "delta": {"role": "assistant",
                                        "content": ""}, "logprobs": None, "finish_reason": None}]})
                elif req.echo:
                    for i in range(len(prompts)):
                        for j in range(n):
                            lp = None
                            if echo_lp is not None:
                                tokens, lps, tops = echo_lp[i]
                                lp = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                                      "text_offset": []}
                            yield _sse({**head, "choices": [{"index": i * n + j, "text": echo_text(i),
                                                             "logprobs": lp, "finish_reason": None}]})
                async for i, out in outputs():
                    if out.finished:
                        finished.add(i)
                    for c in out.outputs:
                        index = i * n + c.index
                        state = sent.setdefault(index, {"text": "", "tokens": 0, "done": False})
                        if state["done"]:
                            continue
                        delta = c.text[len(state["text"]):] if c.text.startswith(state["text"]) else ""
                        if not delta and c.finish_reason is None and len(c.token_ids) <= state["tokens"]:
                            continue  # nothing new (a chunk per new token, its text empty while held back)
                        lp = None if req.logprobs is None else choice_logprobs(kind, c, state["tokens"], req.logprobs)
                        if kind == "chat.completion":
                            choice = {"index": index, "delta": {"content": delta} if delta else {},
                                      "logprobs": lp, "finish_reason": c.finish_reason}
                        else:
                            choice = {"index": index, "text": delta, "logprobs": lp,
                                      "finish_reason": c.finish_reason}
                        state["text"] += delta
                        state["tokens"] = len(c.token_ids)
                        if c.finish_reason is not None:
                            state["done"] = True
                            completion_tokens += len(c.token_ids)
                        yield _sse({**head, "choices": [choice]})
                if req.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(completion_tokens)})
                yield "data: [DONE]\n\n"
            except ValueError as e:
                yield _sse(APIError(str(e), param="prompt").body())
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects and the response is cancelled
                abort_rest()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def prompt_logprobs(llm, ids: list[int], top: int):
    """(tokens, token_logprobs, top_logprobs) of a prompt's own tokens, each given the ones before it (the first
    has none): what `echo` with `logprobs` returns and lm-evaluation-harness scores with."""
    tokenizer = llm.get_tokenizer()
    logits = llm.logits(ids)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    word = (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer is not None else str
    tokens = [word(t) for t in ids]
    lps: list = [None] + [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]
    tops: list = [None]
    for i in range(1, len(ids)):
        best = np.argsort(-logp[i - 1])[:top] if top else []
        tops.append({word(int(b)): float(logp[i - 1, b]) for b in best} or None)
    return tokens, lps, tops
