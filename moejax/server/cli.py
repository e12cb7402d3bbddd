"""`moejax serve`: build the LLM (every LLM argument is a flag), then serve it over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="HF model directory or moejax checkpoint "
                   "(default: the embedded tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MOEJAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MOEJAX_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file replacing the model's")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body accepted")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, choices=["int8", "int4", "fp8"])
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--ep", "--expert-parallel-size", dest="ep", type=int, default=1)
    p.add_argument("--dp", "--data-parallel-size", dest="dp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--offload-experts", action="store_true")
    p.add_argument("--offload-cache-experts", type=int, default=0, metavar="S",
                   help="with --offload-experts: also keep each MoE layer's S most used experts on the device")
    p.add_argument("--moe-top-k", type=int, default=None, help="experts per token instead of the model's")
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--enable-dp-attention", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile step shapes on first use instead of before listening")


def run(args) -> int:
    try:
        import uvicorn

        from moejax.server.app import build_app
    except ModuleNotFoundError as e:
        raise ValueError(f"moejax serve needs the serve extra (pip install 'moejax[serve]'): {e}") from None
    from moejax import LLM

    template = None
    if args.chat_template is not None:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, tensor_parallel_size=args.tp,
              expert_parallel_size=args.ep, data_parallel_size=args.dp, pipeline_parallel_size=args.pp,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_tokens=args.kv_cache_tokens,
              page_size=args.page_size, kv_cache_dtype=args.kv_cache_dtype,
              enable_prefix_caching=args.prefix_caching, load_format=args.load_format,
              offload_experts=args.offload_experts, offload_cache_experts=args.offload_cache_experts,
              enable_expert_parallel=args.enable_expert_parallel,
              enable_dp_attention=args.enable_dp_attention, moe_top_k=args.moe_top_k, seed=args.seed)
    name = args.served_model_name or (args.model.rstrip("/") if args.model else "moejax-default")
    app = build_app(llm, served_model_name=name, api_key=args.api_key, chat_template=template,
                    max_body_bytes=args.max_body_bytes, warmup=args.warmup)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=30)
    print(f"moejax serve: {name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.Server(config).run()
    return 0
