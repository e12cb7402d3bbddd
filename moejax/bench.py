"""`moejax bench`: end-to-end generation against transformers' generate, and the kernel benchmarks.

`moejax bench generate CONFIG.json --layers 8` builds one random model with transformers (bf16, on the GPU when
there is one), saves it, loads the same weights into moejax, and times decode steps of both at several batch
sizes in one run, beside the weight-bandwidth roofline. `moejax bench kernels` runs moejax.kernels.bench.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

HBM_BYTES_PER_S = 2.6e12  # H100 SXM, measured (REFERENCE.md section 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["generate", "kernels"])
    p.add_argument("config", nargs="?", help="config.json of the model shape (bench generate)")
    p.add_argument("--layers", type=int, default=8, help="keep this many layers of the config")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    kernels = p.add_argument_group("bench kernels")
    kernels.add_argument("--shapes", type=int, nargs="*", default=None, help="indices of the six shapes (default all)")
    kernels.add_argument("--sweep", action="store_true", help="time a grid of tiles per shape and weight type first")
    kernels.add_argument("--no-layer", action="store_true", help="skip the peers and whole-layer timings")
    kernels.add_argument("--json", default=None, help="also write the results here")


def run(args) -> int:
    if args.what == "kernels":
        from moejax.kernels import bench as kernel_bench

        argv = (["--shapes", *map(str, args.shapes)] if args.shapes is not None else []) + \
            (["--sweep"] if args.sweep else []) + (["--no-layer"] if args.no_layer else []) + \
            (["--json", args.json] if args.json else [])
        return int(kernel_bench.main(argv) or 0)
    if not args.config:
        raise ValueError("bench generate needs a config.json")
    return bench_generate(args)


def _decode_ms(generate_fn, steps: int) -> float:
    """ms per decode step: (time for 1 + steps tokens - time for 1 token) / steps, after a warm-up."""
    generate_fn(1)
    generate_fn(steps + 1)
    t0 = time.perf_counter()
    generate_fn(1)
    t1 = time.perf_counter()
    generate_fn(steps + 1)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / steps * 1e3


def active_weight_bytes(config, batch: int, bytes_per_param: int = 2) -> float:
    """Weights one decode step reads: everything but the routed experts, plus the experts the batch touches
    (expected distinct experts under uniform random routing)."""
    from moejax.models import build_abstract

    import jax.numpy as jnp
    from moejax.checkpoints.hf import flat_params

    _, abstract = build_abstract(config, jnp.bfloat16)
    dense = experts = 0
    for path, var in flat_params(abstract):
        n = int(var.get_value().size)
        if path[0] == "embed":
            continue  # a lookup, not a full read
        if "moe" in path and path[-1] in ("w_gate", "w_up", "w_down"):
            experts += n
        else:
            dense += n
    e, k = config.num_experts, config.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    return (dense + experts * touched / e) * bytes_per_param


def bench_generate(args) -> int:
    import jax
    import numpy as np

    from moejax import LLM, SamplingParams
    from moejax.config import ModelConfig

    with open(args.config) as f:
        hf_config = json.load(f)
    hf_config["num_hidden_layers"] = args.layers
    hf_config.pop("quantization_config", None)
    hf_config["torch_dtype"] = hf_config["dtype"] = "bfloat16"
    config = ModelConfig.from_dict(hf_config)

    workdir = tempfile.mkdtemp(prefix="moejax-bench-")
    peer = None
    import torch
    import transformers as tf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tf.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k not in ("architectures",)})
    cfg.architectures = hf_config.get("architectures")
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    print(f"model: {hf_config.get('architectures')} with {args.layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, device {device}, jax {jax.__version__}")
    if not args.no_peer:
        peer = model.eval()
    else:
        del model
        torch.cuda.empty_cache()

    rng = np.random.RandomState(0)
    rows = []
    llm = LLM(workdir, dtype="bfloat16", max_model_len=args.prompt_len + args.steps + 8)
    for batch in args.batch:
        prompts = rng.randint(0, config.vocab_size, (batch, args.prompt_len)).tolist()

        def moejax_generate(n):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)

        ours = _decode_ms(moejax_generate, args.steps)
        theirs = None
        if peer is not None:
            ids = torch.tensor(prompts, device=device)

            def hf_generate(n):
                with torch.no_grad():
                    peer.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                if device == "cuda":
                    torch.cuda.synchronize()

            theirs = _decode_ms(hf_generate, args.steps)
        roof = active_weight_bytes(config, batch) / HBM_BYTES_PER_S * 1e3
        rows.append((batch, ours, theirs, roof))

    print(f"\n{'batch':>5} | {'moejax ms/step':>14} | {'transformers ms/step':>20} | {'roofline ms/step':>16} | "
          f"{'moejax tok/s':>12} | {'speedup vs HF':>13}")
    print("-" * 100)
    for batch, ours, theirs, roof in rows:
        t = f"{theirs:20.2f}" if theirs is not None else f"{'-':>20}"
        s = f"{theirs / ours:12.2f}x" if theirs is not None else f"{'-':>13}"
        print(f"{batch:5d} | {ours:14.2f} | {t} | {roof:16.2f} | {batch / ours * 1e3:12.1f} | {s}")
    del saved
    return 0
