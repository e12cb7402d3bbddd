"""`moejax plan MODEL_OR_CONFIG`: will it fit, and if not, what is the smallest change that makes it fit."""

from __future__ import annotations

import argparse
import json
import os
import sys

from moejax.config import ModelConfig
from moejax.plan.comm import (HBM_TBPS, INFINIBAND_GBPS, MATMUL_TFLOPS, NODE_DEVICES, NOT_IN_MEMORY, NVLINK_GBPS,
                               LayoutEstimate, Links, describe, estimate, rank_layouts)
from moejax.plan.memory import GIB, KINDS, Mesh, MemoryPlan, plan_memory, resolve_weights


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help="model directory, a config.json file, or a known model name (e.g. Qwen/Qwen3-235B-A22B)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size")
    p.add_argument("--dp", type=int, default=1, help="data parallel size")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages (planned only: the engine does not run pipeline parallelism yet)")
    p.add_argument("--enable-dp-attention", action="store_true",
                   help="attention's requests and KV cache split over the --ep ranks (SGLang's name; planned only)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="routed experts split whole over the --tp ranks (vLLM's name), not their width")
    p.add_argument("--dtype", default="auto",
                   help="auto (the checkpoint's, as LLM loads it: FP8 checkpoints stay FP8) | bfloat16 | float16 | "
                        "float32 | fp8 (bfloat16 with --quantization fp8)")
    p.add_argument("--quantization", default=None,
                   help="int8 | int4 (weight-only) | fp8 (e4m3, 128x128 block scales)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="auto: the model's dtype; fp8: e4m3 pages, twice the tokens")
    p.add_argument("--offload-experts", action="store_true", help="keep routed experts in host memory")
    p.add_argument("--offload-cache-experts", type=int, default=0, metavar="S",
                   help="with --offload-experts: each MoE layer's S most used experts also on the device")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of memory per device (default 80)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    g = p.add_argument_group("layouts and communication")
    g.add_argument("--devices", type=int, default=None,
                   help="with no layout flags: list the layouts of N devices that fit, by estimated decode step")
    g.add_argument("--link-gbps", type=float, default=None,
                   help=f"link rate inside a node, Gbit/s per GPU (default NVLink {NVLINK_GBPS:.0f})")
    g.add_argument("--inter-node-gbps", type=float, default=INFINIBAND_GBPS,
                   help=f"link rate between nodes, Gbit/s per GPU (default InfiniBand {INFINIBAND_GBPS:.0f})")
    g.add_argument("--node-devices", type=int, default=NODE_DEVICES, help="GPUs per node (default 8)")
    g.add_argument("--batch", type=int, default=None,
                   help="sequences of the decode step the estimate times (default --max-num-seqs)")
    g.add_argument("--context", type=int, default=2048, help="cached tokens per sequence of that step")
    g.add_argument("--hbm-tbps", type=float, default=HBM_TBPS, help="HBM read rate, TB/s (default an H100's)")
    g.add_argument("--tflops", type=float, default=MATMUL_TFLOPS, help="bf16 matmul rate, TFLOP/s")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    for name in ("tp", "ep", "dp", "pp", "max_num_seqs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.offload_cache_experts < 0 or (args.offload_cache_experts and not args.offload_experts):
        raise ValueError(f"--offload-cache-experts {args.offload_cache_experts}: a non-negative count, and only with "
                         "--offload-experts")
    if args.gpu_memory <= 0:
        raise ValueError(f"--gpu-memory must be positive, got {args.gpu_memory}")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError(f"--max-model-len must be positive, got {args.max_model_len}")
    from moejax.known_models import resolve

    try:
        path = resolve(args.model)
    except ValueError as e:
        raise ValueError(f"MODEL_OR_CONFIG: {e}") from None
    config = ModelConfig.from_file(path)
    for name in ("node_devices", "context"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("link_gbps", "inter_node_gbps", "hbm_tbps", "tflops"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {args.batch}")
    mesh = Mesh(args.tp, args.ep, args.dp, expert_over_tp=args.enable_expert_parallel, pp=args.pp,
                dp_attention=args.enable_dp_attention)
    name = args.model if path != args.model else os.path.basename(os.path.normpath(path))
    from moejax.checkpoints import orbax_store

    if os.path.isdir(path) and orbax_store.is_converted(path):  # a converted checkpoint fixes both, as in LLM
        meta = orbax_store.read_metadata(path, config)
        dtype = meta["dtype"] if args.dtype == "auto" else args.dtype
        quantization = args.quantization or meta.get("quantization")
    else:
        dtype, quantization = resolve_weights(config, args.dtype, args.quantization)
    plan_kw = dict(dtype=dtype, quantization=quantization, offload_experts=args.offload_experts,
                   offload_cache_experts=args.offload_cache_experts, device_memory_bytes=int(args.gpu_memory * GIB),
                   gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                   max_num_seqs=args.max_num_seqs, model=name, kv_cache_dtype=args.kv_cache_dtype)
    links = Links(intra_gbps=args.link_gbps or NVLINK_GBPS, inter_gbps=args.inter_node_gbps,
                  node_devices=args.node_devices)
    workload = dict(batch=args.batch or args.max_num_seqs, context=args.context, links=links,
                    hbm_tbps=args.hbm_tbps, matmul_tflops=args.tflops)
    longest = args.max_model_len or config.max_position_embeddings
    if args.context > longest:
        raise ValueError(f"--context {args.context} exceeds the longest sequence, {longest} tokens "
                         f"({'--max-model-len' if args.max_model_len else 'the config max_position_embeddings'})")
    if args.devices is not None:
        if args.devices < 1:
            raise ValueError(f"--devices must be a positive integer, got {args.devices}")
        if mesh != Mesh():
            if mesh.devices != args.devices:
                raise ValueError(f"--devices {args.devices}: the layout given uses {mesh.devices} devices; leave "
                                 "out the layout flags to rank every layout of N devices")
        else:
            ranked, left_out = rank_layouts(config, args.devices, **workload, **plan_kw)
            if args.json:
                # the top level is the best layout's plan (the keys every plan --json has), then the ranking
                top = ranked[0].plan.to_json() if ranked else {"model": name, "fits": False}
                print(json.dumps(dict(top, devices=args.devices, workload=_workload_json(workload),
                                      layouts=[e.to_json() for e in ranked], left_out=left_out)))
            else:
                print(format_ranking(name, args.devices, ranked, left_out, workload))
            return 0
    plan = plan_memory(config, mesh=mesh, **plan_kw)
    comm = estimate(config, mesh, **workload, **plan_kw)
    if args.json:
        print(json.dumps(dict(plan.to_json(), communication=dict(comm.to_json(), workload=_workload_json(workload)))))
    else:
        print(format_plan(plan))
        print(format_communication(comm, workload))
    return 0


def _workload_json(workload: dict) -> dict:
    links = workload["links"]
    return {"batch": workload["batch"], "context": workload["context"], "intra_node_gbps": links.intra_gbps,
            "inter_node_gbps": links.inter_gbps, "node_devices": links.node_devices,
            "hbm_tbps": workload["hbm_tbps"], "tflops": workload["matmul_tflops"]}


def _workload_line(workload: dict) -> str:
    links = workload["links"]
    return (f"a decode step of {workload['batch']} sequences x {workload['context']:,} cached tokens; links "
            f"{links.intra_gbps:.0f} Gbit/s in a node of {links.node_devices}, {links.inter_gbps:.0f} between "
            f"nodes; HBM {workload['hbm_tbps']} TB/s, {workload['matmul_tflops']:.0f} TFLOP/s")


def format_communication(est: LayoutEstimate, workload: dict) -> str:
    lines = ["", f"communication per device, {_workload_line(workload)}:"]
    if not est.collectives:
        lines.append("  none")
    for c in est.collectives:
        lines.append(f"  {c.kind:<18} over {'x'.join(c.axes):<6} {c.count:>4} x {c.bytes_per_device / 1e6:10.3f} MB"
                     f"  ({c.link}-node)")
    if est.sequences < 1:
        lines.append(f"  total {est.comm_bytes_per_device / 1e6:.2f} MB; the KV cache holds no sequence of "
                     f"{workload['context']:,} tokens (or --batch is below the replicas): no step estimate")
    else:
        lines.append(f"  total {est.comm_bytes_per_device / 1e6:.2f} MB; estimated step {est.step_s * 1e3:.2f} ms "
                     f"for {est.sequences:,} sequences ({est.tokens_per_s:,.0f} tokens/s)")
    return "\n".join(lines)


def format_ranking(name: str, devices: int, ranked: list[LayoutEstimate], left_out: dict[str, int],
                   workload: dict) -> str:
    others = "; ".join(f"{n} other layouts {reason}" for reason, n in left_out.items())
    lines = [f"model {name}: layouts of {devices} devices that fit, most estimated decode tokens/s first",
             f"({_workload_line(workload)}{'; ' + others if others else ''})",
             "weights per device, the replica's KV cache, the sequences it runs, communication per device per step:",
             "",
             f"{'layout':<34}{'weights/dev':>12}{'KV tokens':>13}{'sequences':>10}{'comm/dev':>11}{'step':>10}"
             f"{'tokens/s':>11}"]
    for e in ranked:
        lines.append(f"{describe(e.mesh):<34}{e.plan.weight_bytes_per_device / 1e9:>9.2f} GB"
                     f"{e.plan.kv_cache_tokens:>13,}{e.sequences:>10,}{e.comm_bytes_per_device / 1e6:>8.1f} MB"
                     f"{e.step_s * 1e3:>7.2f} ms{e.tokens_per_s:>11,.0f}")
    if not ranked and left_out.get(NOT_IN_MEMORY) and len(left_out) == 1:
        lines.append("none fits: more devices, --quantization, --dtype fp8 or --offload-experts")
    elif not ranked:
        lines.append("none runs this workload: see why above (--batch, --context)")
    return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:8.2f} GB"


def format_plan(plan: MemoryPlan) -> str:
    m, p = plan.mesh, plan.params
    lines = [
        f"model {plan.model}: {p.total / 1e9:.2f}B parameters, {p.active / 1e9:.2f}B active per token "
        f"({p.active_without_embeddings / 1e9:.2f}B without the embedding table)",
        f"mesh tp={m.tp} ep={m.ep} dp={m.dp}" + (f" pp={m.pp}" if m.pp > 1 else "")
        + (" (experts over tp)" if m.expert_over_tp else "") + (" (DP attention)" if m.dp_attention else "") + " "
        f"({m.devices} devices), weights {plan.dtype}"
        + (f", quantization {plan.quantization}" if plan.quantization else "")
        + (", routed experts offloaded to host" if plan.offload_experts else "")
        + (f" ({plan.offload_cache_experts} per layer cached on the device)" if plan.offload_cache_experts else ""),
        "",
        f"{'kind':<16}{'parameters':>16}{'bytes per device':>20}",
    ]
    for kind in KINDS:
        if p.by_kind[kind]:
            lines.append(f"{kind:<16}{p.by_kind[kind] / 1e9:>15.3f}B{_gb(plan.weight_bytes_by_kind[kind]):>20}")
    budget = plan.device_memory_bytes * plan.gpu_memory_utilization
    lines += [
        "",
        f"weights per device       {_gb(plan.weight_bytes_per_device)}",
        f"weights in host memory   {_gb(plan.host_weight_bytes)}",
        f"workspace reserve        {_gb(plan.workspace_bytes)}",
        f"device budget            {_gb(int(budget))}  ({plan.gpu_memory_utilization:.0%} of "
        f"{plan.device_memory_bytes / GIB:.0f} GiB)",
        f"KV cache per device      {_gb(plan.kv_cache_bytes)}  ({plan.kv_bytes_per_token:,} bytes per token)",
        f"KV cache size: {plan.kv_cache_tokens:,} tokens",
        f"Maximum concurrency for {plan.max_model_len:,} tokens per request: {plan.max_concurrency:.2f}x",
        "",
        "verdict: fits" if plan.fits else "verdict: does NOT fit"
        + (f"; smallest change that fits: {plan.suggestion}" if plan.suggestion else "; no single change fits"),
    ]
    if m.pp > 1 or m.dp_attention:
        lines.append("note: a planned layout; the engine does not run pipeline stages or DP attention yet")
    return "\n".join(lines)


if __name__ == "__main__":
    from moejax.cli import main

    sys.exit(main(["plan", *sys.argv[1:]]))
