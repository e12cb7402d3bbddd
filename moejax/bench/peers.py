"""The transformers side of `moejax bench generate`, run as a script in a process of its own:
`python .../moejax/bench/peers.py SPEC.json`. It imports torch and transformers and never moejax (whose package
imports jax): the shared timing helpers are loaded from measure.py by path.

Role "generate": `model.generate` decode steps at each batch size and one long prefill, timed like moejax's.
Role "generate_batch": transformers' continuous batching on the offline throughput workload (the first
`peer_requests` requests, each with its own output length), with per-token timestamps for TTFT and TPOT.
The model is built from the config with random weights directly on the device; nothing touches the disk.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import time
import traceback


def _load_measure():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "measure.py")
    spec = importlib.util.spec_from_file_location("moejax_bench_measure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


M = _load_measure()


def _drop_moejax_source_root() -> None:
    """Leave moejax's source root off sys.path: its top-level kernels/ folder (moejax.kernels) would shadow
    Hugging Face's `kernels` package, which transformers >= 5.25 imports."""
    def is_source_root(p):
        p = os.path.abspath(p or os.curdir)
        return os.path.isfile(os.path.join(p, "moejax", "__init__.py")) and \
            os.path.isfile(os.path.join(p, "kernels", "__init__.py"))

    sys.path[:] = [p for p in sys.path if not is_source_root(p)]


_drop_moejax_source_root()


def _oom_types():
    import torch

    return tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                             getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)


def _guarded(results: dict, name: str, fn) -> None:
    """Run fn; an exception (an out-of-memory above all) is recorded under results["errors"][name] and the
    device cache is emptied so that the next measurement gets a chance."""
    import torch

    print(name, file=sys.stderr, flush=True)
    try:
        fn()
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        results["errors"][name] = ("out of memory: " if isinstance(e, _oom_types()) else "") + M.error_text(e)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    M.emit(results)


def _device(choice: str):
    import torch

    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    return None


def build_model(spec: dict, results: dict):
    import torch
    import transformers as tf

    device = _device(spec["device"])
    results.update({"torch": torch.__version__, "transformers": tf.__version__, "device": device})
    if device is None:
        results["skipped"] = "no CUDA device (torch.cuda.is_available() is False)"
        return None, None
    cfg = tf.AutoConfig.from_pretrained(spec["model_dir"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    if device == "cuda":
        torch.cuda.synchronize()
        results["device_name"] = torch.cuda.get_device_name()
    results["build_s"] = time.perf_counter() - t0
    results["params"] = sum(p.numel() for p in model.parameters())
    return model, device


def run_generate(spec: dict, workload: dict, results: dict) -> None:
    import torch

    model, device = build_model(spec, results)
    if model is None:
        return

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def generator(prompts):
        ids = torch.tensor(prompts, device=device)
        mask = torch.ones_like(ids)

        def generate(n):
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            sync()

        return generate

    results["decode"] = {}
    for batch in spec["batches"]:
        gen = generator(workload["decode"][str(batch)])

        def decode(batch=batch, gen=gen):
            results["decode"][str(batch)] = M.decode_ms(gen, spec["steps"], spec["repeats"])

        _guarded(results, f"decode b={batch}", decode)

    def prefill():
        gen = generator([workload["prefill"]])
        results["prefill"] = {"ms": M.median_s(lambda: gen(1), spec["repeats"]) * 1e3,
                              "tokens": len(workload["prefill"])}

    _guarded(results, "prefill", prefill)


def _accepted(fn, kwargs: dict) -> dict:
    """The keyword arguments fn's signature takes (transformers' continuous-batching API moves between releases)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def run_generate_batch(spec: dict, workload: dict, results: dict) -> None:
    import transformers as tf

    model, device = build_model(spec, results)
    if model is None:
        return
    if not hasattr(model, "generate_batch"):
        results["skipped"] = f"transformers {tf.__version__} has no generate_batch"
        return
    requests = workload["requests"][: spec["peer_requests"]]
    config = tf.GenerationConfig(do_sample=False, max_new_tokens=max(r["max_tokens"] for r in requests),
                                 eos_token_id=-1, pad_token_id=0)  # eos -1: never stop early (ignore_eos)
    kv_tokens = spec.get("kv_cache_tokens")
    if hasattr(model, "continuous_batching_context_manager"):
        _guarded(results, "throughput", lambda: _managed(model, config, requests, kv_tokens, results))
    else:
        _guarded(results, "throughput", lambda: _one_call(model, config, requests, kv_tokens, results))


def _cb_config(model, requests: list[dict], kv_tokens: int | None):
    """transformers' defaults, except the KV cache size: moejax's --kv-cache-tokens when given; on the CPU
    (where sizing it from free memory takes long and finds the whole RAM) just what the workload needs."""
    import transformers as tf

    if not hasattr(tf, "ContinuousBatchingConfig"):
        return None
    config = tf.ContinuousBatchingConfig()
    page = getattr(config, "page_size", None) or getattr(config, "block_size", None) or 256
    if kv_tokens is None and model.device.type == "cpu":
        kv_tokens = sum(len(r["prompt"]) + r["max_tokens"] for r in requests) + page * len(requests)
    if kv_tokens is not None:
        config.num_blocks = -(-kv_tokens // page)
    return config


def _managed(model, config, requests: list[dict], kv_tokens: int | None, results: dict) -> None:
    """The manager under generate_batch, fed request by request so that each keeps its own max_new_tokens."""
    hints = None
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        hints = WorkloadHints(max_prompt_length=max(len(r["prompt"]) for r in requests),
                              max_generated_length=max(r["max_tokens"] for r in requests),
                              num_requests=len(requests))
    except Exception:
        pass
    # warmup sizes the cache and captures the CUDA graphs before the clock starts
    kwargs = _accepted(model.continuous_batching_context_manager,
                       {"generation_config": config, "block": True, "timeout": 5, "warmup": True,
                        "workload_hints": hints,
                        "continuous_batching_config": _cb_config(model, requests, kv_tokens)})
    t_enter = time.perf_counter()
    track = {}
    with model.continuous_batching_context_manager(**kwargs) as manager:
        results["warmup_s"] = time.perf_counter() - t_enter
        t0 = time.perf_counter()
        for i, r in enumerate(requests):
            rid = f"req-{i}"
            manager.add_request(r["prompt"], request_id=rid, max_new_tokens=r["max_tokens"], record_timestamps=True)
            track[rid] = {"prompt_len": len(r["prompt"]), "max_tokens": r["max_tokens"], "output_len": 0,
                          "first": None, "finish": None}
        done = failed = 0
        first_error = None
        while done < len(track):
            out = manager.get_result(timeout=1)
            now = time.perf_counter()
            if out is None:
                if not manager.is_running():
                    raise RuntimeError(f"the generation thread stopped with {done} of {len(track)} requests done")
                continue
            if not out.is_finished() or out.request_id not in track:
                continue
            done += 1
            if getattr(out, "error", None):
                failed += 1
                first_error = first_error or str(out.error)
                continue
            t = track[out.request_id]
            stamps = getattr(out, "timestamps", None) or []
            t["output_len"] = len(out.generated_tokens)
            t["first"] = stamps[0] if stamps else None
            t["finish"] = stamps[-1] if stamps else now
        end = time.perf_counter()
    stats = M.latency_stats(t0, end, list(track.values()))
    stats["failed"] = failed
    stats["wrong_length"] = sum(1 for t in track.values()
                                if t["finish"] is not None and t["output_len"] != t["max_tokens"])
    if first_error:
        results["errors"]["throughput requests"] = f"{failed} failed; first: {first_error}"
    results["throughput"] = stats
    results["api"] = "continuous_batching_context_manager + add_request (per-request max_new_tokens)"


def _one_call(model, config, requests: list[dict], kv_tokens: int | None, results: dict) -> None:
    """Fallback for a generate_batch without the manager API: one max_new_tokens (the mean) for every request."""
    mean = round(sum(r["max_tokens"] for r in requests) / len(requests))
    config.max_new_tokens = mean
    prompts = [r["prompt"] for r in requests]
    extra = _accepted(model.generate_batch, {"continuous_batching_config": _cb_config(model, requests, kv_tokens)})
    t0 = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=config, **extra)
    end = time.perf_counter()
    rows = [{"prompt_len": len(p), "output_len": len(o.generated_tokens), "first": None, "finish": end}
            for p, o in zip(prompts, outs.values())]
    results["throughput"] = M.latency_stats(t0, end, rows)
    results["api"] = f"generate_batch with max_new_tokens={mean} for every request (no manager API)"
    results["notes"].append(f"output lengths all {mean}, the workload's mean, not per request")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    with open(spec["workload"]) as f:
        workload = json.load(f)
    results = {"role": spec["role"], "errors": {}, "notes": []}
    try:
        with_model = run_generate if spec["role"] == "generate" else run_generate_batch
        try:
            with_model(spec, workload, results)
        except Exception as e:  # building the model (an OOM there) ends this peer, not the bench
            traceback.print_exc(file=sys.stderr)
            results["error"] = ("out of memory: " if isinstance(e, _oom_types()) else "") + M.error_text(e)
    finally:
        M.emit(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
