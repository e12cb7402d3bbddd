"""`moejax generate` and `moejax chat`."""

from __future__ import annotations

import argparse
import sys


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="HF model directory or moejax checkpoint "
                   "(default: the embedded tiny model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, choices=["int8", "int4", "fp8"])
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size")
    p.add_argument("--dp", type=int, default=1, help="data parallel size")
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1,
                   help="pipeline stages (each holds its layers and their KV cache)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="split the routed experts whole over the --tp ranks (attention stays tensor-parallel)")
    p.add_argument("--enable-dp-attention", action="store_true",
                   help="each --ep rank serves its own requests and KV pages; MoE tokens go by all-to-all")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 (e4m3 pages, twice the tokens)")
    p.add_argument("--moe-top-k", type=int, default=None, help="experts per token instead of the model's")
    p.add_argument("--offload-experts", action="store_true",
                   help="keep the routed experts in host memory; each step copies in the ones it routes to")
    p.add_argument("--offload-cache-experts", type=int, default=0, metavar="S",
                   help="with --offload-experts: also keep each MoE layer's S most used experts on the device")
    p.add_argument("--seed", type=int, default=0)


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    add_sampling_arguments(p, 64)


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system message")
    add_sampling_arguments(p, 256)


def load_llm(args):
    from moejax import LLM

    return LLM(args.model, dtype=args.dtype, quantization=args.quantization, tensor_parallel_size=args.tp,
               expert_parallel_size=args.ep, data_parallel_size=args.dp, pipeline_parallel_size=args.pp,
               max_model_len=args.max_model_len,
               enable_expert_parallel=args.enable_expert_parallel, enable_dp_attention=args.enable_dp_attention,
               kv_cache_dtype=args.kv_cache_dtype, moe_top_k=args.moe_top_k, seed=args.seed,
               offload_experts=args.offload_experts, offload_cache_experts=args.offload_cache_experts)


def sampling(args):
    from moejax import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def run_generate(args) -> int:
    params = sampling(args)  # validate before the model loads
    prompts = args.prompt or ["def "]
    llm = load_llm(args)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    from moejax.sharding.distributed import is_main_process

    if not is_main_process():  # every process computes; only process 0 prints
        return 0
    for out in outputs:
        sys.stdout.write(out.prompt + out.outputs[0].text + "\n")
        if len(outputs) > 1:
            sys.stdout.write("-" * 40 + "\n")
    sys.stdout.flush()
    return 0


def run_chat(args) -> int:
    params = sampling(args)
    llm = load_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = llm.chat(messages, params)[0].outputs[0].text
        print(reply, flush=True)
        messages.append({"role": "assistant", "content": reply})
