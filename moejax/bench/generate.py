"""`moejax bench generate CONFIG`: moejax against transformers end to end on a full-size config with random
weights, beside the rooflines measured in the same run, in one table.

Each engine runs in a subprocess of its own (JAX preallocates most of the device memory; torch and jax never
share a process), one after the other:
  1. moejax start-up, cold (empty compilation cache) then warm (a second process on the same cache);
  2. moejax measurements (engine_worker.py): HBM bandwidth and bf16 matmul rate first, then decode ms/step per
     batch size, one long prefill, the offline throughput workload, the host's share of a decode step;
  3. transformers `generate` (peers.py): decode ms/step and the prefill, timed the same way;
  4. transformers continuous batching (`generate_batch`'s manager): the first --peer-requests requests.
The bounds are computed here from the config and the measured rates (bounds.py). Everything is written to one
temporary directory (the config, the workload, the compilation cache), removed on every exit path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile

from moejax.bench import bounds as B
from moejax.bench import workload as W
from moejax.bench.process import run_worker
from moejax.bench.table import Missing, Table, lookup

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 1024**3


def add_arguments(p) -> None:
    g = p.add_argument_group("bench generate")
    g.add_argument("--layers", type=int, default=None, help="keep this many layers of the config (default: all)")
    g.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128], help="decode batch sizes")
    g.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the decode batches")
    g.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    g.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the median is kept)")
    g.add_argument("--prefill-len", type=int, default=4096, help="tokens of the single-prompt prefill")
    g.add_argument("--requests", type=int, default=1000, help="requests of the offline throughput workload")
    g.add_argument("--prompt-lens", type=int, nargs=2, default=[128, 2048], metavar=("MIN", "MAX"))
    g.add_argument("--output-lens", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    g.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts and lengths")
    g.add_argument("--peer-requests", type=int, default=200,
                   help="throughput requests given to transformers (the first ones; moejax also runs them)")
    g.add_argument("--quantization", choices=["int8", "int4", "fp8"], default=None,
                   help="moejax's weights (the rooflines count their bytes; the transformers peer stays bf16)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size of the moejax engine")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size of the moejax engine")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages of the moejax engine")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="the routed experts whole over the --tp ranks")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-model-len", type=int, default=None, help="default: the longest sequence the bench makes")
    g.add_argument("--kv-cache-tokens", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--prefix-caching", action="store_true",
                   help="leave moejax's prefix caching on (off by default: the bench repeats prompts)")
    g.add_argument("--xla-mem-fraction", type=float, default=None,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION for the moejax processes (default: JAX's own)")
    g.add_argument("--copy-gib", type=float, default=2.0, help="size of the bandwidth-measuring copy")
    g.add_argument("--matmul-n", type=int, default=8192, help="n of the n^3 matmul-rate measurement")
    g.add_argument("--host-gap-batches", type=int, nargs="*", default=[1, 32])
    g.add_argument("--peer-device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: transformers only where CUDA is (cpu: for small configs and tests)")
    g.add_argument("--no-peer", action="store_true", help="skip transformers")
    g.add_argument("--no-moejax", action="store_true", help="skip the moejax engine (the rooflines still run)")
    g.add_argument("--no-startup", action="store_true", help="skip the cold and warm start-up runs")
    g.add_argument("--no-host-gaps", action="store_true")
    g.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds before a worker is killed")


def layout_kwargs(args) -> dict:
    """The engine's parallel layout from --tp/--ep/--pp/--enable-expert-parallel, defaults left out (the
    rooflines stay those of one device: run the bench without a layout for the baseline)."""
    layout = {"tensor_parallel_size": args.tp, "expert_parallel_size": args.ep, "pipeline_parallel_size": args.pp,
              "enable_expert_parallel": args.enable_expert_parallel}
    return {k: v for k, v in layout.items() if v not in (1, False)}


def _check(args) -> None:
    for name in ("prompt_len", "steps", "repeats", "prefill_len", "requests", "max_num_seqs", "matmul_n", "tp", "ep",
                 "pp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.peer_requests < 0:
        raise ValueError(f"--peer-requests must be >= 0, got {args.peer_requests}")
    for name in ("prompt_lens", "output_lens"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            raise ValueError(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")
    too_big = [b for b in [*args.batch, *args.host_gap_batches] if not 1 <= b <= args.max_num_seqs]
    if too_big:
        raise ValueError(f"--batch/--host-gap-batches {too_big}: each must be in "
                         f"[1, --max-num-seqs={args.max_num_seqs}]")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be positive, got {args.layers}")


def read_config(path: str, layers: int | None) -> dict:
    """The HF config dict to bench: bf16, no quantization, optionally cut to `layers` (per-layer lists cut too)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"config: {path} is not a file")
    with open(path) as f:
        hf = json.load(f)
    if layers is not None:
        n = hf.get("num_hidden_layers")
        for key, value in list(hf.items()):
            if isinstance(value, list) and n and len(value) == n:
                hf[key] = value[:layers]
        hf["num_hidden_layers"] = layers
    hf.pop("quantization_config", None)
    hf["torch_dtype"] = hf["dtype"] = "bfloat16"
    return hf


def _max_model_len(args) -> int:
    longest = max(args.prefill_len + 1, sum(args.prompt_lens[1:]) + args.output_lens[1],
                  args.prompt_len + args.steps + 1)
    return int(math.ceil((longest + 16) / 256) * 256)


def _env(extra: dict | None = None, moejax_root: bool = True) -> dict:
    """The workers' environment: moejax's root on PYTHONPATH for the moejax worker (not for transformers', which
    never imports moejax and whose `kernels` dependency the root's kernels/ folder would shadow)."""
    env = dict(os.environ)
    if moejax_root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def _dir_mib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total / 2**20


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _worker_result(run, extra: dict | None = None) -> dict:
    out = dict(run.result)
    out.setdefault("errors", {})
    out["process_s"] = run.wall_s
    if run.error:
        out["error"] = run.error
    out.update(extra or {})
    return out


class _Terminated(Exception):
    pass


def run(args) -> int:
    """Entry point of `moejax bench generate`: a SIGTERM is turned into an exception so that the cleanup runs."""
    _check(args)
    previous = None

    def on_term(signum, frame):
        raise _Terminated(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        return bench_generate(args)
    except _Terminated:
        print("moejax bench generate: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def bench_generate(args) -> int:
    from moejax.config import ModelConfig
    from moejax.plan.params import count_params

    hf = read_config(args.config, args.layers)
    config = ModelConfig.from_dict(hf, source=args.config)
    counts = count_params(config)
    gap_batches = [] if args.no_host_gaps else list(args.host_gap_batches)
    spec = W.WorkloadSpec(vocab_size=config.vocab_size, batches=tuple(sorted(set(args.batch) | set(gap_batches))),
                          decode_prompt_len=args.prompt_len, prefill_len=args.prefill_len,
                          num_requests=args.requests, prompt_len_range=tuple(args.prompt_lens),
                          output_len_range=tuple(args.output_lens), seed=args.seed)
    peer_requests = min(args.peer_requests, args.requests)
    llm_kwargs = {"max_model_len": args.max_model_len or _max_model_len(args), "max_num_seqs": args.max_num_seqs,
                  "kv_cache_tokens": args.kv_cache_tokens, "max_num_batched_tokens": args.max_num_batched_tokens,
                  "gpu_memory_utilization": args.gpu_memory_utilization, "quantization": args.quantization}
    llm_kwargs.update(layout_kwargs(args))
    results = {
        "model": {"config": os.path.abspath(args.config), "architectures": hf.get("architectures"),
                  "layers": config.num_layers, "params": counts.total, "active_params": counts.active},
        "settings": {**{k: v for k, v in vars(args).items() if not k.startswith("_") and k != "what"},
                     "llm": llm_kwargs, "peer_requests": peer_requests},
    }
    _log(f"{hf.get('architectures')} with {config.num_layers} layers: {counts.total / 1e9:.2f}B parameters, "
         f"{counts.active / 1e9:.2f}B active")
    work = tempfile.mkdtemp(prefix="moejax-bench-")
    try:
        model_dir = os.path.join(work, "model")
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(hf, f, indent=1)
        workload = W.make_workload(spec)
        workload_path = os.path.join(work, "workload.json")
        W.save(workload, workload_path)
        cache = os.path.join(work, "compilation-cache")
        os.makedirs(cache)
        common = {"model_dir": model_dir, "workload": workload_path, "workdir": work, "steps": args.steps,
                  "repeats": args.repeats, "batches": list(args.batch), "peer_requests": peer_requests,
                  "prefix_caching": args.prefix_caching}

        def spec_file(name, payload):
            path = os.path.join(work, f"{name}.json")
            with open(path, "w") as f:
                json.dump({**common, **payload}, f)
            return path

        rooflines, moejax = run_moejax(args, spec_file, cache, llm_kwargs, gap_batches, peer_requests)
        results["rooflines"] = rooflines
        results["moejax"] = moejax
        results.update(run_peers(args, spec_file, peer_requests))
        results["bounds"] = compute_bounds(config, rooflines, args, workload, peer_requests, llm_kwargs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = build_table(results, args, peer_requests)
    results["table"] = table.as_json()
    print(header(results))
    print(table.render())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        _log(f"wrote {args.json}")
    return 0


def run_moejax(args, spec_file, cache: str, llm_kwargs: dict, gap_batches: list[int], peer_requests: int):
    """Start-up cold then warm (one process each, one cache directory), then the measuring process; returns
    (rooflines, moejax results). With --no-moejax only the rooflines are measured."""
    jax_env = {"MOEJAX_COMPILATION_CACHE": cache}
    if args.xla_mem_fraction is not None:
        jax_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.xla_mem_fraction)
    engine = [sys.executable, "-m", "moejax.bench.engine_worker"]
    moejax: dict = {"errors": {}, "notes": []}
    if not args.no_moejax and not args.no_startup:
        startup = {}
        for phase in ("cold", "warm"):
            _log(f"moejax start-up, {phase} compilation cache")
            r = run_worker(engine + [spec_file(f"startup-{phase}", {"role": "startup", "llm_kwargs": llm_kwargs})],
                           f"moejax start-up {phase}", _env(jax_env), args.worker_timeout)
            startup[phase] = _worker_result(r, {"cache_mib": _dir_mib(cache)})
        moejax["startup"] = startup
        if startup["cold"]["cache_mib"] == 0:
            moejax["notes"].append("the compilation cache stayed empty: warm start-up compiled again")
    sections = ["rooflines"]
    if not args.no_moejax:
        sections += ["decode", "prefill", "throughput"]
        if not args.no_peer and 0 < peer_requests < args.requests:
            sections.append("throughput_subset")
        if gap_batches:
            sections.append("host_gaps")
    _log("moejax: " + ", ".join(sections))
    r = run_worker(engine + [spec_file("measure", {
        "role": "measure", "llm_kwargs": llm_kwargs, "sections": sections,
        "copy_bytes": int(args.copy_gib * GIB), "matmul_n": args.matmul_n, "roofline_repeats": 10,
        "host_gap_batches": gap_batches})], "moejax", _env(jax_env), args.worker_timeout)
    measured = _worker_result(r)
    rooflines = measured.pop("rooflines", None) or {}
    for key in ("bandwidth_error", "matmul_error"):
        if key in rooflines:
            measured["errors"][key] = rooflines[key]
    if not rooflines:
        rooflines = {"error": measured["errors"].get("rooflines") or measured.get("error") or "not measured"}
    if args.no_moejax:
        return rooflines, {"skipped": "--no-moejax"}
    return rooflines, {**measured, **moejax, "errors": {**measured["errors"], **moejax["errors"]},
                       "notes": measured.get("notes", []) + moejax["notes"]}


def run_peers(args, spec_file, peer_requests: int) -> dict:
    """transformers generate, then its continuous batching, one process each; a peer without CUDA is skipped."""
    names = ("transformers_generate", "transformers_generate_batch")
    if args.no_peer:
        return {k: {"skipped": "--no-peer"} for k in names}
    common = {"device": args.peer_device, "kv_cache_tokens": args.kv_cache_tokens}

    def peer(role, label):
        _log(label)
        r = run_worker([sys.executable, PEER_SCRIPT, spec_file(f"peer-{role}", {**common, "role": role})],
                       label, _env(moejax_root=False), args.worker_timeout)
        return _worker_result(r)

    out = {"transformers_generate": peer("generate", "transformers generate")}
    if out["transformers_generate"].get("skipped"):
        out["transformers_generate_batch"] = {"skipped": out["transformers_generate"]["skipped"]}
    elif peer_requests == 0:
        out["transformers_generate_batch"] = {"skipped": "--peer-requests 0"}
    else:
        out["transformers_generate_batch"] = peer("generate_batch", f"transformers generate_batch, "
                                                                      f"{peer_requests} requests")
    return out


def compute_bounds(config, rooflines: dict, args, workload: dict, peer_requests: int, llm_kwargs: dict) -> dict:
    """Decode rooflines per batch size, the prefill floor and the throughput bound at the measured rates."""
    rates = {k: rooflines.get(k) for k in ("hbm_bytes_per_s", "matmul_flops_per_s")}
    if not all(rates.values()):
        why = [str(rooflines[k]) for k in ("error", "bandwidth_error", "matmul_error") if rooflines.get(k)]
        return {"error": "no measured rooflines: " + ("; ".join(why) or "unknown")}
    costs = B.model_costs(config, quantization=llm_kwargs.get("quantization"))
    context = args.prompt_len + args.steps / 2  # mean keys per sequence over the timed decode steps
    requests = [(len(r["prompt"]), r["max_tokens"]) for r in workload["requests"]]
    out = {
        "rates": rates,
        "costs": dataclasses.asdict(costs),
        "decode": {str(b): B.decode_roofline(costs, rates, b, context) for b in args.batch},
        "prefill": B.prefill_roofline(costs, rates, args.prefill_len),
        "throughput": B.throughput_bound(costs, rates, requests, llm_kwargs["max_num_seqs"]),
    }
    if 0 < peer_requests < len(requests):
        out["throughput_subset"] = B.throughput_bound(costs, rates, requests[:peer_requests],
                                                      llm_kwargs["max_num_seqs"])
    return out


def header(results: dict) -> str:
    m, r = results["model"], results.get("rooflines") or {}
    lines = [f"model: {m['architectures']} with {m['layers']} layers, {m['params'] / 1e9:.2f}B parameters "
             f"({m['active_params'] / 1e9:.2f}B active), random bf16 weights"
             + (f" (moejax: {q})" if (q := results["settings"]["llm"].get("quantization")) else "")]
    llm = results["settings"]["llm"]
    parts = [f"{name}{llm[key]}" for name, key in (("tp", "tensor_parallel_size"), ("ep", "expert_parallel_size"),
                                                   ("pp", "pipeline_parallel_size")) if llm.get(key, 1) > 1]
    if parts or llm.get("enable_expert_parallel"):
        lines.append(f"moejax layout: {' x '.join(parts) or 'one device'}"
                     + (" (experts over tp)" if llm.get("enable_expert_parallel") else "")
                     + "; the rooflines and the peer are one device's")
    if r.get("hbm_bytes_per_s") or r.get("matmul_flops_per_s"):
        bw = f"{r['hbm_bytes_per_s'] / 1e12:.3g} TB/s ({r['copy_bytes'] / GIB:.3g} GiB copy, read + write)" \
            if r.get("hbm_bytes_per_s") else "HBM bandwidth failed"
        mm = f"{r['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s (bf16 {r['matmul_n']}^3 jnp.dot)" \
            if r.get("matmul_flops_per_s") else "matmul rate failed"
        lines.append(f"rooflines measured in this run on {r.get('device')} (jax {r.get('jax')}): {bw}, {mm}")
    else:
        lines.append(f"rooflines: not measured ({r.get('error')})")
    llm, moe = results["settings"]["llm"], results.get("moejax") or {}
    kv = moe.get("kv_cache_tokens")
    max_len = moe.get("max_model_len") or llm["max_model_len"]
    lines.append(f"moejax: max_num_seqs {llm['max_num_seqs']}, max_model_len {max_len}"
                 + (f", KV cache {kv:,} tokens" if kv else ""))
    for key in ("transformers_generate", "transformers_generate_batch"):
        peer = results.get(key) or {}
        if peer.get("transformers"):
            where = peer.get("device_name") or peer.get("device")
            api = f"; {peer['api']}" if peer.get("api") else ""
            lines.append(f"{key.replace('_', ' ', 1)}: transformers {peer['transformers']}, torch {peer.get('torch')} "
                         f"on {where}{api}")
    return "\n".join(lines)


def build_table(results: dict, args, peer_requests: int) -> Table:
    moe, gen = results.get("moejax"), results.get("transformers_generate")
    cb = results.get("transformers_generate_batch")
    bounds = results.get("bounds") or {}
    bound_missing = Missing(bounds["error"], error=True) if "error" in bounds else Missing()

    def bound(*path):
        value = bounds
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return bound_missing if value is None else value

    t = Table()
    r = results.get("rooflines") or {}
    t.add("HBM bandwidth, TB/s (measured)", Missing(), Missing(), Missing(),
          r["hbm_bytes_per_s"] / 1e12 if r.get("hbm_bytes_per_s") else bound_missing, fmt="{:.3g}")
    t.add("bf16 matmul, TFLOP/s (measured)", Missing(), Missing(), Missing(),
          r["matmul_flops_per_s"] / 1e12 if r.get("matmul_flops_per_s") else bound_missing, fmt="{:.3g}")
    for b in args.batch:
        k = str(b)
        t.add(f"decode batch {b}, ms/step", lookup(moe, ("decode", k, "ms_per_step"), (f"decode b={b}", "engine")),
              lookup(gen, ("decode", k, "ms_per_step"), (f"decode b={b}",)), Missing(), bound("decode", k, "ms"))
    t.add(f"prefill {args.prefill_len} tokens, ms", lookup(moe, ("prefill", "ms"), ("prefill", "engine")),
          lookup(gen, ("prefill", "ms"), ("prefill",)), Missing(), bound("prefill", "ms"))

    def throughput_rows(title, moe_key, cb_engine, bound_key):
        keys = (moe_key, "throughput warm-up", "engine")
        t.add(f"{title}: output tok/s", lookup(moe, (moe_key, "output_tokens_per_s"), keys), Missing(),
              lookup(cb_engine, ("throughput", "output_tokens_per_s"), ("throughput",)),
              bound(bound_key, "output_tokens_per_s"), fmt="{:.1f}")
        t.add(f"{title}: total tok/s", lookup(moe, (moe_key, "total_tokens_per_s"), keys), Missing(),
              lookup(cb_engine, ("throughput", "total_tokens_per_s"), ("throughput",)),
              bound(bound_key, "total_tokens_per_s"), fmt="{:.1f}")
        for stat, unit, fmt in (("ttft", "s", "{:.3f}"), ("tpot", "ms", "{:.2f}")):
            for q in ("p50", "p99"):
                t.add(f"{title}: {stat.upper()} {q}, {unit}", lookup(moe, (moe_key, f"{stat}_{q}_{unit}"), keys),
                      Missing(), lookup(cb_engine, ("throughput", f"{stat}_{q}_{unit}"), ("throughput",)),
                      fmt=fmt)

    lens = f"prompts {args.prompt_lens[0]}-{args.prompt_lens[1]}, outputs {args.output_lens[0]}-{args.output_lens[1]}"
    subset = not args.no_peer and 0 < peer_requests < args.requests
    throughput_rows(f"throughput {args.requests} req ({lens})", "throughput", None if subset else cb, "throughput")
    if subset:
        throughput_rows(f"throughput first {peer_requests} req", "throughput_subset", cb, "throughput_subset")
    if not args.no_startup:
        for phase in ("cold", "warm"):
            st = (moe or {}).get("startup", {}).get(phase)
            cell = lookup(moe, ("startup",)) if st is None else lookup(st, ("startup", "total_s"), ("startup",))
            t.add(f"start-up {phase} cache, s (LLM() to first token, all buckets)", cell)
    for b in ([] if args.no_host_gaps else args.host_gap_batches):
        g = lookup(moe, ("host_gaps", str(b)), (f"host gap b={b}", "engine"))
        if isinstance(g, dict):
            if g.get("device_ms") is None:
                g = Missing(g.get("note", "no device time"))
            else:
                g = f"{g['wall_ms']:.2f} / {g['device_ms']:.2f} ({100 * (g['host_share'] or 0):.0f}% host)"
        t.add(f"decode batch {b}: wall / device ms per step", g)
    return t
