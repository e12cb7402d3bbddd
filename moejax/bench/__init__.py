"""`moejax bench`: `generate` (moejax against transformers end to end, beside rooflines measured in the same run;
see generate.py), `serve` (streaming clients against `moejax serve`, beside offline generate; serve.py),
`kernels` (moejax.kernels.bench: the grouped expert matmuls and routing), `attention`
(moejax.kernels.attention_bench: decode and prefill-chunk attention over KV pages) and `offload` (routed experts
in host memory beside the host-memory and PCIe bounds; offload.py)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moejax.bench import generate, offload, serve

    p.add_argument("what", choices=["generate", "kernels", "serve", "attention", "offload"])
    p.add_argument("config", nargs="?", help="config.json (or its directory) of the model shape, or a known model "
                   "name such as qwen3-30b-a3b (bench generate, bench serve: random weights), or a model "
                   "directory (bench serve)")
    p.add_argument("--json", default=None, help="also write all numbers here")
    generate.add_arguments(p)
    serve.add_arguments(p)
    offload.add_arguments(p)
    kernels = p.add_argument_group("bench kernels")
    kernels.add_argument("--shapes", type=int, nargs="*", default=None, help="indices of the six shapes (default all)")
    kernels.add_argument("--sweep", action="store_true", help="time a grid of tiles per shape and weight type first")
    kernels.add_argument("--attention-quick", action="store_true",
                         help="bench attention: four decode cases and one prefill case per model")
    kernels.add_argument("--attention-part", choices=["decode", "prefill", "all"], default="all",
                         help="bench attention: decode, prefill chunks, or both")
    kernels.add_argument("--no-layer", action="store_true", help="skip the peers and whole-layer timings")


def run(args) -> int:
    if args.config:  # a model name (moejax.known_models) stands for its bundled config.json
        from moejax.known_models import resolve

        args.config = resolve(args.config)
    if args.what == "kernels":
        from moejax.kernels import bench as kernel_bench

        argv = (["--shapes", *map(str, args.shapes)] if args.shapes is not None else []) + \
            (["--sweep"] if args.sweep else []) + (["--no-layer"] if args.no_layer else []) + \
            (["--json", args.json] if args.json else [])
        return int(kernel_bench.main(argv) or 0)
    if args.what == "attention":
        from moejax.kernels import attention_bench

        argv = (["--quick"] if args.attention_quick else []) + ["--part", args.attention_part] + \
            (["--json", args.json] if args.json else [])
        return int(attention_bench.main(argv) or 0)
    if args.what == "serve":
        from moejax.bench import serve

        return serve.run(args)
    if args.what == "offload":
        from moejax.bench import offload

        if not args.config:
            raise ValueError("bench offload needs a config.json or a known model name")
        return offload.run(args)
    if not args.config:
        raise ValueError("bench generate needs a config.json")
    from moejax.bench import generate

    return generate.run(args)
