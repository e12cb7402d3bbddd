"""Timing and statistics shared by every benchmark worker, and the one-line result protocol.

Standard library only: the transformers worker loads this file by path so that its process never imports moejax
(and with it jax); torch and jax must not share a process.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

RESULT_MARK = "@@moejax-bench-result@@ "  # prefix of the JSON line a worker prints after each finished section


def emit(results: dict) -> None:
    """Print the results so far as one marked JSON line; the parent keeps the last one it reads, so a worker that
    dies half-way still reports what it measured."""
    sys.stdout.write(RESULT_MARK + json.dumps(results) + "\n")
    sys.stdout.flush()


def parse_result_line(line: str) -> dict | None:
    if not line.startswith(RESULT_MARK):
        return None
    return json.loads(line[len(RESULT_MARK):])


def error_text(e: BaseException, limit: int = 400) -> str:
    """One line naming the exception: what a table cell's footnote shows."""
    text = " ".join(str(e).split()) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def timed(fn) -> float:
    """Seconds one call of fn takes (fn must block until its work is done)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_ms(generate, steps: int, repeats: int = 3) -> dict:
    """ms per decode step: (median time of generate(1 + steps) - median time of generate(1)) / steps.

    generate(n) runs the whole batch to n new tokens and blocks. One call of each length warms up first; the
    timed calls alternate so that drift hits both lengths alike. The difference cancels the prefill and the
    fixed per-call costs, leaving `steps` decode steps.
    """
    generate(1)
    generate(steps + 1)
    short, long = [], []
    for _ in range(max(repeats, 1)):
        short.append(timed(lambda: generate(1)))
        long.append(timed(lambda: generate(steps + 1)))
    ms = (statistics.median(long) - statistics.median(short)) / steps * 1e3
    return {"ms_per_step": ms, "first_token_s": statistics.median(short), "steps": steps,
            "repeats": len(short)}


def median_s(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(max(repeats, 1)))


def percentile(values, q: float) -> float | None:
    """q-th percentile with linear interpolation (numpy's default method); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(start: float, end: float, requests: list[dict]) -> dict:
    """Throughput and latency of one offline run.

    requests: per request {"prompt_len", "output_len", "first", "finish"} with wall times of its first token and of
    its finish (None if it never got there); every request arrived at `start`. TTFT = first - start;
    TPOT = (finish - first) / (output_len - 1), over requests with at least two tokens.
    """
    wall = end - start
    done = [r for r in requests if r.get("finish") is not None]
    out_tokens = sum(r["output_len"] for r in done)
    all_tokens = out_tokens + sum(r["prompt_len"] for r in done)
    ttft = [r["first"] - start for r in done if r.get("first") is not None]
    tpot = [(r["finish"] - r["first"]) / (r["output_len"] - 1) for r in done
            if r.get("first") is not None and r["output_len"] > 1]
    return {
        "requests": len(requests),
        "finished": len(done),
        "wall_s": wall,
        "output_tokens": out_tokens,
        "total_tokens": all_tokens,
        "output_tokens_per_s": out_tokens / wall if wall > 0 else None,
        "total_tokens_per_s": all_tokens / wall if wall > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_ms": None if not tpot else percentile(tpot, 50) * 1e3,
        "tpot_p99_ms": None if not tpot else percentile(tpot, 99) * 1e3,
    }
