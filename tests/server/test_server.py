"""`moejax serve` as deployers run it: a real server subprocess on a free localhost port with the embedded model,
driven by the official openai client and raw HTTP."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

# The server's dependencies are the `serve` extra (and the test extra): a machine without them skips this module.
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families

from moejax import LLM, SamplingParams  # noqa: E402

KEY = "sk-test-key"
MAX_LEN = 256
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device is enough
    proc = subprocess.Popen(
        [sys.executable, "-m", "moejax", "serve", "--port", str(port), "--api-key", KEY, "--served-model-name",
         NAME, "--max-model-len", str(MAX_LEN), "--max-num-seqs", "16", "--max-num-batched-tokens", "128",
         "--dtype", "float32", "--max-body-bytes", "65536", "--no-warmup"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            out = proc.stdout.read() if proc.poll() is not None else ""
            proc.kill()
            raise RuntimeError(f"server did not start:\n{out[-3000:]}")
        time.sleep(0.5)
    yield base
    proc.send_signal(signal.SIGTERM)
    try:  # uvicorn shuts down gracefully, then re-raises the signal
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def offline():
    return LLM(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=16, max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n)


def test_completions_chat_and_streams_equal_offline(client, offline):
    assert [m.id for m in client.models.list().data] == [NAME]
    prompt = "def fibonacci("
    want = offline.generate([prompt], greedy(24), use_tqdm=False)[0].outputs[0]
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(offline.get_tokenizer().encode(prompt))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices)
    assert streamed == want.text

    messages = [{"role": "user", "content": "Write a loop in Python."}]
    want = offline.chat(messages, greedy(20))[0].outputs[0]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-2].choices[0].finish_reason == got.choices[0].finish_reason


def test_sampling_options_are_honoured(client, offline):
    tok = offline.get_tokenizer()
    ids = tok.encode("import numpy as np\n")
    # token-id prompts, n, seed and stop
    many = client.completions.create(model=NAME, prompt=[ids, ids], max_tokens=8, temperature=1.0, n=2, seed=7)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    again = client.completions.create(model=NAME, prompt=[ids, ids], max_tokens=8, temperature=1.0, n=2, seed=7)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    full = client.completions.create(model=NAME, prompt="def ", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model=NAME, prompt="def ", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    lp = client.completions.create(model=NAME, prompt="def ", max_tokens=4, temperature=0, logprobs=3)
    assert len(lp.choices[0].logprobs.token_logprobs) == 4
    assert all(len(t) == 3 for t in lp.choices[0].logprobs.top_logprobs)


def test_echo_with_logprobs_scores_the_prompt(client, offline):
    """lm-evaluation-harness's local-completions: echo + logprobs + max_tokens 0 scores a continuation."""
    text = "for i in range(10):"
    got = client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = got.choices[0]
    assert choice.text == text
    ids = offline.get_tokenizer().encode(text)
    logits = offline.logits(ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]
    assert choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], want, rtol=1e-4, atol=1e-4)


def test_many_concurrent_streams_get_offline_results(server, offline):
    rng = np.random.default_rng()
    tok = offline.get_tokenizer()
    words = ["def", "class", "import", "return", "for", "while", "print", "self", "x", "=", "(", ")"]
    prompts = [" ".join(rng.choice(words, int(rng.integers(1, 12)))) for _ in range(64)]
    lengths = [int(rng.integers(1, 20)) for _ in prompts]
    want = offline.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)

    def stream(i):
        body = {"model": NAME, "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "stream": True}
        text, done = "", False
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text, done

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(stream, range(64)))
    for (text, done), w in zip(results, want):
        assert done and text == w.outputs[0].text
    assert len(tok.encode(prompts[0])) > 0


def _metrics(server) -> dict:
    families = list(text_string_to_metric_families(httpx.get(f"{server}/metrics").text))
    return {s.name: s for f in families for s in f.samples if not s.labels} | {
        (s.name, tuple(sorted(s.labels.items()))): s for f in families for s in f.samples if s.labels}


def test_metrics_are_prometheus_text(server, client):
    before = _metrics(server)
    client.completions.create(model=NAME, prompt="x = ", max_tokens=5, temperature=0, extra_body={
        "ignore_eos": True})
    m = _metrics(server)
    for name in ("moejax_prompt_tokens_total", "moejax_generation_tokens_total", "moejax_num_requests_running",
                 "moejax_num_requests_waiting", "moejax_kv_cache_usage_ratio", "moejax_prefix_cache_hit_ratio",
                 "moejax_time_to_first_token_seconds_count", "moejax_time_per_output_token_seconds_count"):
        assert name in m, name
    gen = m["moejax_generation_tokens_total"].value - before.get("moejax_generation_tokens_total").value
    assert gen >= 5
    requests = [v.value for k, v in m.items() if isinstance(k, tuple) and k[0] == "moejax_requests_total"]
    assert sum(requests) >= 1


def test_malformed_requests_get_openai_errors_and_serving_goes_on(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{server}/v1/completions"
    chat = f"{server}/v1/chat/completions"
    good = {"model": NAME, "prompt": "def ", "max_tokens": 3}
    cases = [
        (url, b"{not json", auth, 400),
        (url, b"[1, 2]", auth, 400),
        (url, {**good, "model": "gpt-9"}, auth, 404),
        (url, {**good, "max_tokens": -1}, auth, 400),
        (url, {**good, "max_tokens": "many"}, auth, 400),
        (url, {**good, "temperature": -0.5}, auth, 400),
        (url, {**good, "top_p": 0}, auth, 400),
        (url, {**good, "n": 0}, auth, 400),
        (url, {**good, "logprobs": 99}, auth, 400),
        (url, {**good, "stop": 5}, auth, 400),
        (url, {"model": NAME}, auth, 400),
        (url, {**good, "prompt": ""}, auth, 400),
        (url, {**good, "prompt": [1, "a"]}, auth, 400),
        (url, {**good, "prompt": [[]]}, auth, 400),
        (url, {**good, "prompt": list(range(3, 3 + MAX_LEN))}, auth, 400),
        (url, {**good, "prompt": [10 ** 9]}, auth, 400),
        (url, {**good, "prompt": "a" * 70000}, auth, 413),
        (url, good, {}, 401),
        (url, good, {"Authorization": "Bearer wrong"}, 401),
        (chat, {"model": NAME, "messages": []}, auth, 400),
        (chat, {"model": NAME, "messages": [{"role": "user"}]}, auth, 400),
        (chat, {"model": NAME, "messages": "hi"}, auth, 400),
    ]
    for target, body, headers, status in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(target, content=content, headers={**headers, "Content-Type": "application/json"},
                       timeout=60)
        assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], r.status_code,
                                         r.text[:200])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert "Traceback" not in r.text
    ok = client.completions.create(model=NAME, prompt="def ", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_client_disconnect_frees_pages(server):
    body = {"model": NAME, "prompt": "def ", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert _metrics(server)["moejax_kv_cache_usage_ratio"].value > 0
    deadline = time.time() + 30
    while _metrics(server)["moejax_kv_cache_usage_ratio"].value > 0:
        assert time.time() < deadline, "pages of the disconnected request were not freed"
        time.sleep(0.2)


def test_expert_token_counters_follow_the_router(server, client, offline):
    """Each MoE layer's counters grow by (tokens the model computed) x top_k: the prompt plus every generated
    token but the last (which is never fed back), with no prefix-cache hits for a fresh random prompt."""
    config = offline.config
    layers = [i for i, moe in enumerate(config.moe_layers) if moe]

    def per_layer():
        m = _metrics(server)
        out = dict.fromkeys(layers, 0.0)
        for k, v in m.items():
            if isinstance(k, tuple) and k[0] == "moejax_moe_expert_tokens_total":
                out[int(dict(k[1])["layer"])] += v.value
        return out

    before = per_layer()
    ids = np.random.default_rng().integers(3, config.vocab_size, 37).tolist()
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=9, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 9
    want = (37 + 9 - 1) * config.num_experts_per_tok
    deadline = time.time() + 10
    while True:
        grown = {i: per_layer()[i] - before[i] for i in layers}
        if all(g == want for g in grown.values()) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert all(g == want for g in grown.values()), (grown, want)
    imbalance = [v.value for k, v in _metrics(server).items()
                 if isinstance(k, tuple) and k[0] == "moejax_moe_token_imbalance"]
    assert len(imbalance) == len(layers) and all(v >= 1.0 for v in imbalance)
