"""`moejax bench offload CONFIG`: routed experts in host memory (`LLM(offload_experts=True)`) on random weights,
beside the bounds that the host's memory and the PCIe link set, both measured in the same run.

In one process, in this order:
  0. XLA's pinned host pool sized for the experts (engine/host_memory.py), before anything starts the backend;
  1. host memory read bandwidth: numpy sums over a large buffer, by thread count (the best is the bound a
     host-side expert compute could reach);
  2. PCIe host-to-device: one bulk pinned-host copy, and the engine's own pattern (top-k dynamic slices of an
     expert-sized pinned stack, each copied inside jit);
  3. host compute (the issue's option (a)): k routed experts for 1 and 16 tokens computed by JAX's CPU backend
     in this process from their stored (quantized) form, as expert bytes per second; the engine copies experts
     over PCIe instead where that rate is the higher;
  4. the engine: `LLM(config, load_format="dummy", quantization=..., offload_experts=True)`, optionally cut to
     `--layers`; device memory in use beside the planner's weights, host bytes beside the planner's; decode ms
     per step at each batch size and one prefill of `--offload-prefill-len` tokens.
The bounds count only the routed expert bytes a step must read (expected distinct experts per MoE layer under
uniform routing, all of them for the prefill) over each rate; everything on the device is left out, so a bound
is an upper limit (without --offload-cache-experts: cached experts cross no link). The full-depth figure scales the measured step by the MoE layers (full / cut), which also
scales the cut's dense layers: an over-estimate of the full model's time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from moejax.bench.table import Missing, Table
from moejax.engine.host_memory import proc_bytes

GIB = 1024**3
COLUMNS = ("moejax", "host-memory bound", "PCIe bound", "KTransformers (published)")

# KTransformers' published DeepSeek-V3/R1 q4_k_m figures (its DeepSeek-R1/V3 tutorial; 500-token prompt unless
# said; V0.2: Xeon Gold 6454S and an RTX 4090D; V0.3: the same with AMX kernels). Tokens per second, 61 layers.
KTRANSFORMERS_DEEPSEEK_V3 = {
    "decode b=1": ("V0.2 dual socket, 8 experts: 12.21 (single socket 8.73)", 12.21),
    "prefill": ("V0.3 AMX, 1K prompt: 185.96 (V0.2 dual socket, 500 tokens: 82.94)", 185.96),
}


def add_arguments(p) -> None:
    g = p.add_argument_group("bench offload")
    g.add_argument("--offload-quantization", choices=["none", "int8", "int4", "fp8"], default="int4",
                   help="quantization of the weights (the routed experts offloaded are stored in it)")
    g.add_argument("--offload-batch", type=int, nargs="+", default=[1, 16], help="decode batch sizes")
    g.add_argument("--offload-prefill-len", type=int, default=1024, help="tokens of the prefill")
    g.add_argument("--host-threads", type=int, nargs="+", default=None,
                   help="thread counts of the host bandwidth measurement (default 1, 4, 8 and all cores)")
    g.add_argument("--host-gib", type=float, default=4.0, help="size of the host bandwidth buffer")
    g.add_argument("--offload-cache-experts", type=int, default=0, metavar="S",
                   help="each MoE layer's S most used experts also on the device (LLM's offload_cache_experts); "
                        "to stand for the full model, give S the share of experts its free device memory holds")
    g.add_argument("--full-layers", type=int, default=None,
                   help="layers of the full model that the measured cut is scaled to (default: the config's)")


# -- rates ------------------------------------------------------------------------------------------------------
def host_read_bandwidth(nbytes: int, threads: list[int], repeats: int = 3) -> dict:
    """Bytes per second that `t` threads read from host memory (numpy sums over disjoint slices; numpy releases
    the GIL inside them)."""
    buf = np.ones(max(nbytes // 8, 1024), np.float64)
    out = {}
    for t in threads:
        parts = np.array_split(buf, t)
        with concurrent.futures.ThreadPoolExecutor(t) as pool:
            list(pool.map(np.sum, parts))  # warm
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(np.sum, parts))
                times.append(time.perf_counter() - t0)
        out[str(t)] = buf.nbytes / statistics.median(times)
    del buf
    return {"bytes": nbytes, "by_threads": out, "best_bytes_per_s": max(out.values())}


def pcie_rates(bulk_bytes: int, expert_bytes: int, top_k: int, repeats: int = 5) -> dict:
    """Host-to-device bytes per second: one bulk copy of a pinned-host array; then rows picked by
    device-computed indices from a pinned stack, each copied inside one jitted call, as
    host_experts.fetch_routed does: 3k rows of a third of an expert (one per weight matrix, today's layout), and
    k rows of a whole expert (what one contiguous row per expert would move)."""
    import jax
    import jax.numpy as jnp

    from moejax.bench.roofline import median_seconds

    device = jax.local_devices()[0]
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    to_device = jax.memory.Space.Device
    out = {"bulk_bytes": bulk_bytes}
    bulk = jax.device_put(np.ones(bulk_bytes // 4, np.float32), host)
    copy = jax.jit(lambda a: jax.device_put(a, to_device))
    out["bulk_bytes_per_s"] = bulk.nbytes / median_seconds(copy, (bulk,), repeats)
    del bulk

    def gather_rate(slices: int, slice_bytes: int) -> float:
        rows = 4 * slices
        stack = jax.device_put(np.ones((rows, max(slice_bytes // 4, 1)), np.float32), host)

        @jax.jit
        def gather(stack, ids):
            picked = [jax.device_put(jax.lax.dynamic_index_in_dim(stack, ids[i], 0, keepdims=True), to_device)
                      for i in range(slices)]
            return jnp.concatenate(picked, axis=0)

        ids = jnp.asarray(np.random.default_rng(0).choice(rows, slices, replace=False).astype(np.int32))
        seconds = median_seconds(gather, (stack, ids), repeats)
        moved = slices * stack.nbytes / rows
        del stack
        return moved / seconds

    out["gather_bytes_per_s"] = gather_rate(3 * top_k, expert_bytes // 3)
    out["gather_whole_expert_bytes_per_s"] = gather_rate(top_k, expert_bytes)
    return out


def host_compute_rates(embed: int, mlp: int, top_k: int, bits, tokens=(1, 16),
                       repeats: int = 5) -> dict:
    """Expert bytes per second that JAX's CPU backend reaches computing `top_k` gated experts (stored form, bits:
    4/8 (int4/int8 with their scales), "fp8" (e4m3 with block scales) or None (bf16)) for each token count: the
    rate option (a) of the host-offload design (experts computed where they live, only activations crossing
    PCIe) would stream expert weights at."""
    import jax
    import jax.numpy as jnp

    from moejax.bench.roofline import median_seconds
    from moejax.kernels.experts import Activation, ExpertWeights, experts_reference
    from moejax.kernels.quant import quantize, quantize_fp8

    cpu = jax.devices("cpu")[0]
    keys = jax.random.split(jax.random.key(0), 3)
    with jax.default_device(cpu):
        def weight(key, shape):
            w = (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
            if bits == "fp8":
                return quantize_fp8(w)
            return w if bits is None else quantize(w, bits)

        params = ExpertWeights(weight(keys[0], (top_k, embed, mlp)), weight(keys[1], (top_k, embed, mlp)),
                               weight(keys[2], (top_k, mlp, embed)))
        nbytes = sum(int(a.nbytes) for a in jax.tree.leaves(params))
        compute = jax.jit(lambda x, w, ids, p: experts_reference(x, w, ids, p, Activation()))
        out = {"expert_bytes": nbytes / top_k, "by_tokens": {}}
        for t in tokens:
            x = jnp.ones((t, embed), jnp.bfloat16)
            ids = jnp.asarray(np.arange(t * top_k).reshape(t, top_k) % top_k, jnp.int32)
            w = jnp.full((t, top_k), 1.0 / top_k, jnp.float32)
            seconds = median_seconds(compute, (x, w, ids, params), repeats)
            out["by_tokens"][str(t)] = nbytes / seconds
    return out


# -- the engine -------------------------------------------------------------------------------------------------
def _placement(llm) -> tuple[int, int]:
    """(device bytes, host bytes) of the engine's parameters."""
    import jax

    device = host = 0
    for leaf in jax.tree.leaves(llm.runner.params):
        if leaf.sharding.memory_kind == "pinned_host":
            host += leaf.nbytes
        else:
            device += leaf.nbytes
    return device, host


def _device_bytes_in_use() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use")


def measure_engine(model_dir: str, args, results: dict) -> None:
    import jax

    from moejax import LLM, SamplingParams
    from moejax.bench.measure import decode_ms, median_s

    quantization = None if args.offload_quantization == "none" else args.offload_quantization
    batches, prefill_len = args.offload_batch, args.offload_prefill_len
    longest = max(prefill_len + 2, args.prompt_len + args.steps + 2)
    max_model_len = args.max_model_len or int(np.ceil((longest + 16) / 256) * 256)
    before = _device_bytes_in_use()
    t0 = time.perf_counter()
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", quantization=quantization, offload_experts=True,
              offload_cache_experts=args.offload_cache_experts,
              max_model_len=max_model_len, max_num_seqs=max(batches), enable_prefix_caching=False,
              max_num_batched_tokens=max(prefill_len, max(batches)), kv_cache_tokens=args.kv_cache_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization)
    plan = llm.memory_plan
    device, host = _placement(llm)
    in_use = _device_bytes_in_use()
    pool = sum(int(a.nbytes) for a in jax.tree.leaves(llm.runner.pool))
    results["engine"] = {
        "construct_s": time.perf_counter() - t0, "quantization": quantization, "max_model_len": max_model_len,
        "device_param_bytes": device, "host_param_bytes": host, "kv_pool_bytes": pool,
        "device_bytes_in_use": in_use, "device_bytes_before": before, "host_rss_bytes": proc_bytes("/proc/self/status", "VmRSS"),
        "host_peak_rss_bytes": proc_bytes("/proc/self/status", "VmHWM"),
        "plan_weight_bytes_per_device": plan.weight_bytes_per_device, "plan_host_weight_bytes":
        plan.host_weight_bytes}
    _log(f"engine built in {results['engine']['construct_s']:.1f} s: {device / GIB:.2f} GiB on the device, "
         f"{host / GIB:.2f} GiB on the host")
    vocab = llm.config.vocab_size
    rng = np.random.default_rng(args.seed)

    def prompts(n, length):
        return [rng.integers(10, vocab, length).tolist() for _ in range(n)]

    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    results["decode"] = {}
    for b in batches:
        batch = prompts(b, args.prompt_len)
        _log(f"decode b={b}")
        results["decode"][str(b)] = decode_ms(
            lambda n, batch=batch: llm.generate(prompt_token_ids=batch, sampling_params=greedy(n), use_tqdm=False),
            args.steps, args.repeats)
    _log(f"prefill {prefill_len}")
    seconds = median_s(lambda: llm.generate(prompt_token_ids=prompts(1, prefill_len), sampling_params=greedy(1),
                                            use_tqdm=False), args.repeats)
    results["prefill"] = {"tokens": prefill_len, "ms": seconds * 1e3}
    policy = llm.llm_engine.expert_cache
    if policy is not None:
        results["engine"]["cache_hit_share"] = policy.hit_share()
        results["engine"]["cache_experts_per_layer"] = policy.slots


# -- bounds and the table ---------------------------------------------------------------------------------------
def expert_costs(config, quantization: str | None) -> dict:
    """Per-expert bytes (one MoE layer's expert, as stored in host memory) from the planner."""
    from moejax.plan.memory import plan_memory

    plan = plan_memory(config, quantization=quantization, offload_experts=True, suggest=False,
                       max_model_len=1024, max_num_seqs=1)
    per_expert = plan.host_weight_bytes / (config.num_experts * config.num_moe_layers)
    return {"expert_bytes": per_expert, "num_experts": config.num_experts, "top_k": config.num_experts_per_tok,
            "moe_layers": config.num_moe_layers, "layers": config.num_layers}


def touched(tokens: int, experts: int, k: int) -> float:
    """Expected distinct experts per layer for `tokens` tokens under uniform routing."""
    from moejax.plan.comm import touched_share

    return experts * touched_share(tokens, experts, k)


def build_table(results: dict, costs: dict, batches: list[int], prefill_len: int, full_moe_layers: int,
                deepseek: bool) -> Table:
    table = Table(COLUMNS)
    host_bw = (results.get("host") or {}).get("best_bytes_per_s")
    pcie_bw = (results.get("pcie") or {}).get("bulk_bytes_per_s")
    eng = results.get("engine") or {}
    errors = results.get("errors") or {}

    def cell(v, key=None):
        if v is not None:
            return v
        return Missing(errors[key], error=True) if key in errors else Missing()

    table.add("routed expert bytes, one expert (MiB)", costs["expert_bytes"] / 2**20, fmt="{:.2f}")
    table.add("host memory read (GB/s, best of threads)", Missing(), cell(host_bw and host_bw / 1e9, "host"))
    table.add("PCIe host->device bulk (GB/s)", Missing(), Missing(), cell(pcie_bw and pcie_bw / 1e9, "pcie"))
    gather = (results.get("pcie") or {}).get("gather_bytes_per_s")
    table.add("PCIe, 3k slices of 1/3 expert inside jit (GB/s)", cell(gather and gather / 1e9, "pcie"))
    whole = (results.get("pcie") or {}).get("gather_whole_expert_bytes_per_s")
    table.add("PCIe, k slices of a whole expert inside jit (GB/s)", cell(whole and whole / 1e9, "pcie"))
    def pair(a, b, what):
        if eng.get(a) is None:
            return cell(None, "engine")
        return f"{eng[a] / GIB:.2f}" + ("" if eng.get(b) is None else f" ({what} {eng[b] / GIB:.2f})")

    hc = (results.get("host_compute") or {}).get("by_tokens") or {}
    for t, rate in hc.items():
        table.add(f"host compute, JAX CPU backend, k experts x {t} token(s) (GB/s of expert bytes)", Missing(),
                  rate / 1e9)
    if "host_compute" in errors:
        table.add("host compute, JAX CPU backend", Missing(), cell(None, "host_compute"))
    table.add("device params, GiB (the plan's)", pair("device_param_bytes", "plan_weight_bytes_per_device", "plan"))
    table.add("host params, GiB (the plan's)", pair("host_param_bytes", "plan_host_weight_bytes", "plan"))
    table.add("device memory in use, GiB (KV pool)", pair("device_bytes_in_use", "kv_pool_bytes", "pool"))
    if eng.get("cache_hit_share") is not None:
        table.add(f"expert cache: {eng['cache_experts_per_layer']} of {costs['num_experts']} per layer, "
                  "share of routed hits", eng["cache_hit_share"], fmt="{:.1%}")
    table.add("host memory resident, GiB (peak while loading)", pair("host_rss_bytes", "host_peak_rss_bytes", "peak"))
    moe, e, k, xb = costs["moe_layers"], costs["num_experts"], costs["top_k"], costs["expert_bytes"]
    scale = full_moe_layers / moe if moe else 1.0

    def bound_tps(tokens, bw):
        """Tokens per second if a step over `tokens` tokens only read its routed experts at rate bw."""
        if not bw:
            return Missing()
        return tokens / (moe * touched(tokens, e, k) * xb / bw)

    def rows(name, tokens, tps, peer_key):
        host_b, pcie_b = bound_tps(tokens, host_bw), bound_tps(tokens, pcie_bw)
        table.add(f"{name} ({moe} MoE layers), tok/s", cell(tps, "engine"), host_b, pcie_b)
        if tps is not None and not isinstance(host_b, Missing):
            table.add(f"{name}: share of the host-memory bound", tps / host_b, fmt="{:.1%}")
        if scale != 1.0:
            peer = KTRANSFORMERS_DEEPSEEK_V3.get(peer_key) if deepseek else None
            scaled = [v / scale if isinstance(v, float) else v for v in (host_b, pcie_b)]
            table.add(f"{name} scaled to {full_moe_layers} MoE layers, tok/s",
                      cell(tps and tps / scale, "engine"), *scaled, peer[0] if peer else Missing())

    decode = results.get("decode") or {}
    for b in batches:
        ms = (decode.get(str(b)) or {}).get("ms_per_step")
        rows(f"decode b={b}", b, None if ms is None else b * 1e3 / ms, f"decode b={b}")
    pre = results.get("prefill")
    rows(f"prefill {prefill_len} tokens", prefill_len, pre and pre["tokens"] / pre["ms"] * 1e3, "prefill")
    return table


def _log(msg: str) -> None:
    print(f"[bench offload] {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    from moejax.bench.generate import read_config
    from moejax.config import ModelConfig

    for name in ("offload_prefill_len", "steps", "repeats", "prompt_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(b < 1 for b in args.offload_batch):
        raise ValueError(f"--offload-batch must be positive, got {args.offload_batch}")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be positive, got {args.layers}")
    hf = read_config(args.config, args.layers)
    quantization = None if args.offload_quantization == "none" else args.offload_quantization
    config = ModelConfig.from_dict(hf)
    full_moe = ModelConfig.from_dict(read_config(args.config, args.full_layers)).num_moe_layers
    costs = expert_costs(config, quantization)
    deepseek = config.family.startswith("deepseek") and config.num_experts == 256
    threads = args.host_threads or sorted({1, 4, 8, os.cpu_count() or 1})
    results: dict = {"config": args.config, "layers": config.num_layers, "costs": costs, "errors": {}}
    # The rates below start the GPU backend, which fixes the pinned pool's size: size it for the engine first.
    from moejax.engine.host_memory import pinned_pool_bytes, size_pinned_pool

    size_pinned_pool(int(costs["expert_bytes"] * config.num_experts * config.num_moe_layers) + 2 * GIB)
    results["pinned_pool_bytes"] = pinned_pool_bytes()
    work = tempfile.mkdtemp(prefix="moejax-bench-offload-")
    try:
        model_dir = os.path.join(work, "model")
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(hf, f)
        for name, fn in (
            ("host", lambda: host_read_bandwidth(int(args.host_gib * GIB), threads)),
            ("pcie", lambda: pcie_rates(int(min(args.host_gib, 1.0) * GIB), int(min(costs["expert_bytes"], 2**28)),
                                        costs["top_k"])),
            ("host_compute", lambda: host_compute_rates(
                config.hidden_size, config.moe_intermediate_size, costs["top_k"],
                {"int4": 4, "int8": 8, "fp8": "fp8"}.get(args.offload_quantization), tokens=(1, 16))),
            ("engine", lambda: measure_engine(model_dir, args, results)),
        ):
            _log(name)
            try:
                value = fn()
                if value is not None:
                    results[name] = value
            except Exception as e:  # a failed part leaves the others' numbers
                import traceback

                from moejax.bench.measure import error_text

                traceback.print_exc()
                results["errors"][name] = error_text(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = build_table(results, costs, args.offload_batch, args.offload_prefill_len, full_moe, deepseek)
    print(f"moejax bench offload: {args.config}, {config.num_layers} layers ({config.num_moe_layers} MoE), "
          f"{args.offload_quantization} experts in host memory"
          + (f", {args.offload_cache_experts} per layer cached on the device" if args.offload_cache_experts else ""))
    print(table.render())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "table": table.as_json()}, f, indent=1)
    return 1 if results["errors"] else 0
