"""`moejax bench serve`: concurrent streaming clients against `moejax serve` (vLLM's benchmark_serving measures:
request throughput, output tokens/s, time to first token and inter-token latency), beside offline `generate` on
the same requests in a process of its own.

Without --url the bench starts the server itself (random weights for a bare config.json) and stops it on every
exit path; the offline run starts only after the server is gone, so the two never share the device.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from moejax.bench.measure import emit
from moejax.bench.workload import WorkloadSpec, make_workload


def add_arguments(p) -> None:
    g = p.add_argument_group("bench serve")
    g.add_argument("--url", default=None, help="a running server (default: start one for MODEL_OR_CONFIG)")
    g.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="concurrent clients")
    g.add_argument("--serve-requests", type=int, default=128, help="requests per concurrency level")
    g.add_argument("--no-offline", action="store_true", help="skip offline generate on the same requests")
    g.add_argument("--server-timeout", type=float, default=1800.0, help="seconds to wait for the server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(path: str, workdir: str) -> tuple[str, bool, int]:
    """(model directory, random weights?, vocab size): a bare config.json is served with load_format=dummy."""
    config = path if os.path.isfile(path) else os.path.join(path, "config.json")
    with open(config) as f:
        vocab = int(json.load(f)["vocab_size"])
    if os.path.isdir(path) and any(n.endswith(".safetensors") or n == "moejax_checkpoint.json"
                                   for n in os.listdir(path)):
        return path, False, vocab
    shutil.copy(config, os.path.join(workdir, "config.json"))
    return workdir, True, vocab


def _llm_flags(args, dummy: bool, max_model_len: int) -> list[str]:
    flags = ["--max-model-len", str(max_model_len), "--max-num-seqs", str(args.max_num_seqs)]
    if dummy:
        flags += ["--load-format", "dummy", "--dtype", "bfloat16"]
    if args.kv_cache_tokens:
        flags += ["--kv-cache-tokens", str(args.kv_cache_tokens)]
    if args.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    return flags


def _env(args) -> dict:
    env = dict(os.environ)
    if args.xla_mem_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.xla_mem_fraction)
    return env


async def _one(client, url: str, request: dict, record: list) -> None:
    body = {"model": "bench", "prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunks, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                chunks.append(time.perf_counter())
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    record.append({"start": t0, "chunks": chunks, "tokens": tokens, "max_tokens": request["max_tokens"],
                   "end": time.perf_counter()})


async def _clients(url: str, requests: list[dict], concurrency: int) -> dict:
    import httpx

    record: list = []
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def worker():
            while queue:
                await _one(client, url, queue.pop(), record)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = [r["chunks"][0] - r["start"] for r in record if r["chunks"]]
    itl = [b - a for r in record for a, b in zip(r["chunks"], r["chunks"][1:])]
    out_tokens = sum(r["tokens"] for r in record)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    return {"concurrency": concurrency, "requests": len(record), "wall_s": wall,
            "request_throughput": len(record) / wall, "output_tokens_per_s": out_tokens / wall,
            "wrong_length": sum(1 for r in record if r["tokens"] != r["max_tokens"]),
            "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
            "itl_p50_ms": _ms(pct(itl, 50)), "itl_p99_ms": _ms(pct(itl, 99))}


def _ms(x):
    return None if x is None else x * 1e3


def _start_server(args, model_dir: str, flags: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moejax", "serve", model_dir, "--port", str(port),
                             "--served-model-name", "bench", *flags], env=_env(args), start_new_session=True,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.server_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the server was not ready after {args.server_timeout:.0f} s")
        time.sleep(1.0)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def offline_main(argv=None) -> int:
    """Worker: offline generate on the bench's requests (the same LLM flags as the server); one result line."""
    import argparse

    from moejax.bench.engine_worker import run_offline
    from moejax.server.cli import add_arguments as serve_arguments

    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    p = argparse.ArgumentParser()
    serve_arguments(p)
    a = p.parse_args([spec["model"], *spec["flags"]])
    from moejax import LLM

    llm = LLM(a.model, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
              kv_cache_tokens=a.kv_cache_tokens, max_num_batched_tokens=a.max_num_batched_tokens,
              load_format=a.load_format)
    llm.warmup()  # every step shape, as the server has them: neither side times a compile
    run_offline(llm, spec["requests"][: min(8, len(spec["requests"]))], "warm-")
    emit({"offline": run_offline(llm, spec["requests"], "all-")})
    return 0


def run(args) -> int:
    if not args.config and not args.url:
        raise ValueError("bench serve needs MODEL_OR_CONFIG (or --url of a running server)")
    workdir = tempfile.mkdtemp(prefix="moejax-bench-serve-")
    proc = None
    results: dict = {"levels": []}
    try:
        model_dir, dummy, vocab = _model_dir(args.config, workdir) if args.config else (None, False, 1000)
        spec = WorkloadSpec(vocab, batches=(), num_requests=args.serve_requests,
                            prompt_len_range=tuple(args.prompt_lens), output_len_range=tuple(args.output_lens),
                            seed=args.seed)
        requests = make_workload(spec)["requests"]
        max_model_len = args.max_model_len or int(np.ceil((args.prompt_lens[1] + args.output_lens[1] + 16) / 256)
                                                  * 256)
        flags = _llm_flags(args, dummy, max_model_len)
        url = args.url
        if url is None:
            proc, url = _start_server(args, model_dir, flags)
        asyncio.run(_clients(url, requests[: min(4, len(requests))], 2))  # warm the step shapes
        for c in args.concurrency:
            level = asyncio.run(_clients(url, requests, c))
            results["levels"].append(level)
            print(f"[bench serve] {c} clients: {level['output_tokens_per_s']:.1f} output tok/s", file=sys.stderr,
                  flush=True)
        _stop(proc)
        proc = None
        if not args.no_offline and model_dir is not None:
            from moejax.bench.process import run_worker

            path = os.path.join(workdir, "offline.json")
            with open(path, "w") as f:
                json.dump({"model": model_dir, "flags": flags, "requests": requests}, f)
            run = run_worker([sys.executable, "-c", "import sys; from moejax.bench.serve import offline_main; "
                              "sys.exit(offline_main())", path], "offline", env=_env(args),
                             timeout_s=args.server_timeout)
            results["offline"] = run.result.get("offline") or {"error": run.error}
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _print(results: dict) -> None:
    offline = (results.get("offline") or {}).get("output_tokens_per_s")
    print("| clients | requests/s | output tok/s | vs offline | TTFT p50 / p99, ms | ITL p50 / p99, ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for lv in results["levels"]:
        share = f"{lv['output_tokens_per_s'] / offline:.0%}" if offline else "-"
        print(f"| {lv['concurrency']} | {lv['request_throughput']:.2f} | {lv['output_tokens_per_s']:.1f} | {share} | "
              f"{fmt(lv['ttft_p50_ms'])} / {fmt(lv['ttft_p99_ms'])} | {fmt(lv['itl_p50_ms'])} / "
              f"{fmt(lv['itl_p99_ms'])} |")
    if offline:
        print(f"offline generate on the same requests: {offline:.1f} output tok/s")
    elif results.get("offline"):
        print(f"offline generate: {results['offline']}")
