"""The moejax side of `moejax bench generate`, run in a process of its own (JAX takes most of the device memory at
start, so no other engine can share it): `python -m moejax.bench.engine_worker SPEC.json`.

Role "startup": wall time from `LLM(...)` to the first generated token with every bucket compiled (warmup() then a
one-token generate); the parent runs it twice on one compilation cache directory, cold then warm.
Role "measure": the rooflines first, then decode steps, one long prefill, the offline throughput workload and the
host's share of a decode step. After each section the results so far are printed as one marked JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from moejax.bench.measure import decode_ms, emit, error_text, latency_stats, median_s


def _section(results: dict, name: str):
    """Context manager: an exception inside is recorded under results["errors"][name] (traceback on stderr) and
    the results so far are emitted either way."""

    class _Guard:
        def __enter__(self):
            print(name, file=sys.stderr, flush=True)
            return self

        def __exit__(self, kind, e, tb):
            if e is not None and isinstance(e, Exception):
                traceback.print_exception(kind, e, tb, file=sys.stderr)
                results.setdefault("errors", {})[name] = error_text(e)
            emit(results)
            return e is None or isinstance(e, Exception)

    return _Guard()


def _use_compilation_cache(results: dict) -> None:
    """Point JAX's persistent cache at MOEJAX_COMPILATION_CACHE unless the engine already did, so that cold and
    warm start-up differ by the cache even where the engine does not read the variable yet."""
    import jax

    path = os.environ.get("MOEJAX_COMPILATION_CACHE")
    if not path:
        return
    try:
        current = jax.config.read("jax_compilation_cache_dir")
    except Exception:
        current = getattr(jax.config, "jax_compilation_cache_dir", None)
    if not current:
        jax.config.update("jax_compilation_cache_dir", path)
        results["notes"].append("the bench set jax_compilation_cache_dir from MOEJAX_COMPILATION_CACHE")


def _build_llm(spec: dict, results: dict):
    """The engine on random weights. Prefix caching is off unless asked for: the bench repeats prompts, and a
    cached prefix would turn a repeated prefill into a lookup."""
    import inspect

    from moejax import LLM

    kwargs = dict(spec["llm_kwargs"])
    if "enable_prefix_caching" in inspect.signature(LLM).parameters:
        kwargs["enable_prefix_caching"] = bool(spec.get("prefix_caching"))
    elif "prefix caching" not in " ".join(results["notes"]):
        results["notes"].append("LLM takes no enable_prefix_caching: prompts are made distinct per call instead")
    return LLM(spec["model_dir"], load_format="dummy", dtype="bfloat16", **kwargs)


def shifted(prompt: list[int], k: int, vocab_size: int) -> list[int]:
    """The prompt with every token id moved by k steps (the same length, no prefix in common for k != 0), so that
    repeated calls never hit a prefix cache; ids stay at or above 10 like the workload's."""
    low = 10 if vocab_size > 100 else 0
    span = vocab_size - low
    return [low + (t - low + k * 7919) % span for t in prompt]


def _greedy(n: int):
    from moejax import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _engine_facts(llm, results: dict) -> None:
    # The engine's own capacity (kv_cache_tokens or the capped plan), not the planner's estimate of what fits.
    capacity = getattr(llm, "kv_cache_tokens", None)
    if capacity is None:
        capacity = getattr(getattr(llm, "memory_plan", None), "kv_cache_tokens", None)
    if capacity is not None:
        results["kv_cache_tokens"] = int(capacity)
    if getattr(llm, "max_model_len", None) is not None:
        results["max_model_len"] = int(llm.max_model_len)


def _warmup(llm, results: dict) -> float | None:
    if not hasattr(llm, "warmup"):
        results["notes"].append("LLM has no warmup(): buckets compile on first use")
        return None
    t0 = time.perf_counter()
    llm.warmup()
    return time.perf_counter() - t0


def startup(spec: dict, workload: dict, results: dict) -> None:
    with _section(results, "startup"):
        _use_compilation_cache(results)
        prompt = workload["decode"][min(workload["decode"], key=int)][:1]
        t0 = time.perf_counter()
        llm = _build_llm(spec, results)
        t1 = time.perf_counter()
        warm = _warmup(llm, results)
        t2 = time.perf_counter()
        llm.generate(prompt_token_ids=prompt, sampling_params=_greedy(1), use_tqdm=False)
        t3 = time.perf_counter()
        results["startup"] = {"total_s": t3 - t0, "construct_s": t1 - t0, "warmup_s": warm,
                              "first_token_s": t3 - t2, **getattr(llm.runner, "warmup_stats", {})}
        _engine_facts(llm, results)


def run_offline(llm, requests: list[dict], prefix: str) -> dict:
    """All requests added at once through llm_engine, then step() until none is left; per request the wall times of
    its first token and of its finish as the host sees them."""
    engine = llm.llm_engine
    track = {}
    peak_kv = None
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        rid = f"{prefix}{i}"
        engine.add_request(rid, r["prompt"], _greedy(r["max_tokens"]))
        track[rid] = {"prompt_len": len(r["prompt"]), "max_tokens": r["max_tokens"], "output_len": 0,
                      "first": None, "finish": None}
    usage = getattr(engine, "kv_cache_usage", None)
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            t = track.get(o.request_id)
            if t is None:
                continue
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            if n and t["first"] is None:
                t["first"] = now
            if o.finished and t["finish"] is None:
                t["finish"], t["output_len"] = now, n
        if usage is not None:
            peak_kv = max(peak_kv or 0.0, float(usage()))
    end = time.perf_counter()
    stats = latency_stats(t0, end, list(track.values()))
    stats["engine_steps"] = steps
    stats["peak_kv_cache_usage"] = peak_kv
    stats["wrong_length"] = sum(1 for t in track.values()
                                if t["finish"] is not None and t["output_len"] != t["max_tokens"])
    return stats


def host_gap(llm, prompts: list[list[int]], steps: int, wall_ms: float | None, workdir: str) -> dict:
    """Wall vs device time of a decode step: both from generate(1 + steps) minus generate(1), the device time read
    from a profiler trace of each call."""
    import jax

    from moejax.bench.device_time import device_seconds

    if jax.default_backend() == "cpu":
        return {"wall_ms": wall_ms, "device_ms": None, "note": "the CPU backend has no separate device time"}

    def gen(n):
        return lambda: llm.generate(prompt_token_ids=prompts, sampling_params=_greedy(n), use_tqdm=False)

    walls, devices = {}, {}
    for n in (1, steps + 1):
        gen(n)()  # warm
        t0 = time.perf_counter()
        devices[n] = device_seconds(gen(n), workdir)
        walls[n] = time.perf_counter() - t0
    traced_ms = (walls[steps + 1] - walls[1]) / steps * 1e3
    if devices[1] is None or devices[steps + 1] is None:
        return {"wall_ms": wall_ms, "traced_wall_ms": traced_ms, "device_ms": None,
                "note": "no device plane in the profile (CPU backend?)"}
    device_ms = (devices[steps + 1] - devices[1]) / steps * 1e3
    wall = wall_ms if wall_ms is not None else traced_ms
    return {"wall_ms": wall, "traced_wall_ms": traced_ms, "device_ms": device_ms, "gap_ms": wall - device_ms,
            "host_share": (wall - device_ms) / wall if wall > 0 else None}


def measure(spec: dict, workload: dict, results: dict) -> None:
    sections = set(spec["sections"])
    if "rooflines" in sections:
        with _section(results, "rooflines"):
            from moejax.bench import roofline

            results["rooflines"] = roofline.measure(spec["copy_bytes"], spec["matmul_n"], spec["roofline_repeats"])
    if not sections - {"rooflines"}:
        return
    llm = None
    with _section(results, "engine"):
        _use_compilation_cache(results)
        t0 = time.perf_counter()
        llm = _build_llm(spec, results)
        results["construct_s"] = time.perf_counter() - t0
        results["warmup_s"] = _warmup(llm, results)
        _engine_facts(llm, results)
    if llm is None:
        return
    steps, repeats = spec["steps"], spec["repeats"]
    results.setdefault("decode", {})
    if "decode" in sections:
        for batch in spec["batches"]:
            prompts = workload["decode"][str(batch)]
            with _section(results, f"decode b={batch}"):
                def gen(n, prompts=prompts):
                    llm.generate(prompt_token_ids=prompts, sampling_params=_greedy(n), use_tqdm=False)

                results["decode"][str(batch)] = decode_ms(gen, steps, repeats)
    vocab = workload["spec"]["vocab_size"]
    if "prefill" in sections:
        with _section(results, "prefill"):
            calls = iter(range(1, 1 << 30))

            def prefill():  # a fresh prompt of the same length each call
                prompt = [shifted(workload["prefill"], next(calls), vocab)]
                llm.generate(prompt_token_ids=prompt, sampling_params=_greedy(1), use_tqdm=False)

            results["prefill"] = {"ms": median_s(prefill, repeats) * 1e3, "tokens": len(workload["prefill"])}
    requests = workload["requests"]

    def moved(rs, k):
        return [{**r, "prompt": shifted(r["prompt"], k, vocab)} for r in rs]

    if {"throughput", "throughput_subset"} & sections:
        with _section(results, "throughput warm-up"):
            if not hasattr(llm, "llm_engine"):
                raise AttributeError("LLM has no llm_engine: the throughput workload needs add_request/step")
            warm = [{**r, "max_tokens": min(r["max_tokens"], 16)} for r in requests[: min(len(requests), 16)]]
            run_offline(llm, moved(warm, 1), "warm-")
    if "throughput" in sections:
        with _section(results, "throughput"):
            results["throughput"] = run_offline(llm, requests, "all-")
    if "throughput_subset" in sections:
        with _section(results, "throughput_subset"):
            results["throughput_subset"] = run_offline(llm, moved(requests[: spec["peer_requests"]], 2), "sub-")
    if "host_gaps" in sections:
        results.setdefault("host_gaps", {})
        for batch in spec["host_gap_batches"]:
            prompts = workload["decode"][str(batch)]
            with _section(results, f"host gap b={batch}"):
                wall = results["decode"].get(str(batch), {}).get("ms_per_step")
                results["host_gaps"][str(batch)] = host_gap(llm, prompts, steps, wall, spec["workdir"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    from moejax.bench import workload as wl

    workload = wl.load(spec["workload"])
    results = {"role": spec["role"], "errors": {}, "notes": []}
    try:
        (startup if spec["role"] == "startup" else measure)(spec, workload, results)
    finally:
        emit(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
