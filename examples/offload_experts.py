"""Run a MoE model whose routed experts live in host memory: DeepSeek-V3 on one GPU, as KTransformers does it.

The routed experts (int4 here) stay in pinned host memory and each step copies in only the experts its tokens
route to; a device cache keeps each layer's most used experts on the GPU as well, so only the misses cross
PCIe. Attention, the dense layers, the shared experts and the KV cache stay on the device.

    # the real checkpoint (a directory with config.json and *.safetensors)
    python examples/offload_experts.py --model /models/DeepSeek-V3 --cache-experts 64
    # its shape with random weights, cut to 10 layers (what the bench runs on a 125 GiB host)
    python examples/offload_experts.py --model deepseek-v3 --dummy --layers 10
    # the embedded tiny model (any machine)
    python examples/offload_experts.py --cache-experts 2

`moejax plan MODEL --quantization int4 --offload-experts --offload-cache-experts S` says beforehand what each
side holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from moejax import LLM, SamplingParams


def cut_model(model: str, layers: int) -> str:
    """A directory holding model's config.json cut to its first `layers` layers (random weights only)."""
    from moejax.bench.generate import read_config
    from moejax.known_models import resolve

    out = tempfile.mkdtemp(prefix="moejax-offload-example-")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(read_config(resolve(model), layers), f)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory or known name (default: the embedded model)")
    p.add_argument("--dummy", action="store_true", help="random weights of the model's shape")
    p.add_argument("--layers", type=int, default=None, help="with --dummy: keep this many layers")
    p.add_argument("--quantization", default="int4", choices=["int4", "int8", "none"])
    p.add_argument("--cache-experts", type=int, default=0, help="experts per MoE layer also kept on the device")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)
    model, cut = args.model, None
    if args.layers is not None:
        if not (args.dummy and model):
            p.error("--layers needs --dummy and --model")
        model = cut = cut_model(model, args.layers)
    try:
        llm = LLM(model, load_format="dummy" if args.dummy else "auto", offload_experts=True,
                  quantization=None if args.quantization == "none" else args.quantization,
                  offload_cache_experts=args.cache_experts, max_model_len=4096, max_num_seqs=16)
        plan = llm.memory_plan
        print(f"weights on the device {plan.weight_bytes_per_device / 1e9:.2f} GB, "
              f"experts in host memory {plan.host_weight_bytes / 1e9:.2f} GB")
        greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        prompt = [[11, 22, 33, 44, 55, 66, 77, 88]]
        llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=2), use_tqdm=False)
        t0 = time.perf_counter()
        out = llm.generate(prompt_token_ids=prompt, sampling_params=greedy, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = len(out[0].outputs[0].token_ids)
        result = {"tokens": tokens, "tokens_per_s": tokens / seconds}
        cache = llm.llm_engine.expert_cache
        if cache is not None:
            result["cache_hit_share"] = cache.hit_share()
        print(json.dumps(result))
        return result
    finally:
        if cut:
            shutil.rmtree(cut, ignore_errors=True)


if __name__ == "__main__":
    main()
