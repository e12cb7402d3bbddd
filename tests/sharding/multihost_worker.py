"""One process of a two-process job on localhost: experts or pipeline stages split across both processes' CPU
devices."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"


def main(model: str, out: str, layout: str = "ep8") -> None:
    from moejax import LLM, SamplingParams
    from moejax.sharding.distributed import is_main_process

    import jax

    # ep8: the experts over both processes; pp2_ep4: a pipeline stage a process (activations cross processes);
    # dpa_ep8: DP attention, each of the 8 expert ranks its own requests (tokens cross processes by all-to-all)
    sizes = {"ep8": dict(expert_parallel_size=8),
             "pp2_ep4": dict(pipeline_parallel_size=2, expert_parallel_size=4, max_num_batched_tokens=32,
                             page_size=4),
             "dpa_ep8": dict(expert_parallel_size=8, enable_dp_attention=True)}[layout]
    llm = LLM(model, **sizes)
    assert len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    prompts = [[5, 9, 11, 40, 3], [7, 7, 8]]
    outs = llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                        sampling_params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    logits = llm.logits(prompts[0])
    if is_main_process():
        with open(out, "w") as f:
            json.dump({"tokens": [o.outputs[0].token_ids for o in outs], "logits": logits.tolist()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
