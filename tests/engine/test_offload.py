"""offload_experts=True: the routed experts live in host memory and each step brings only its routed experts
to the device; logits and tokens equal the device-resident model's, and the bytes on each side are the
planner's."""

import jax
import numpy as np
import pytest

from moejax import LLM, SamplingParams
from tests.hf_models import make_deepseek

PROMPTS = [[5, 9, 2, 7, 11, 3], [8, 1, 6, 6, 2]]


def _placement(llm) -> tuple[int, int, int]:
    """(device bytes, host bytes, routed-expert leaves not on the host) of the engine's parameters."""
    device = host = misplaced = 0
    for run_params in llm.runner.params["runs"]:
        for path, leaf in jax.tree_util.tree_leaves_with_path(run_params):
            routed = any(getattr(k, "key", None) in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
                         for k in path)
            on_host = leaf.sharding.memory_kind == "pinned_host"
            misplaced += routed and not on_host
            assert routed or not on_host, path
    for leaf in jax.tree.leaves(llm.runner.params):
        if leaf.sharding.memory_kind == "pinned_host":
            host += leaf.nbytes
        else:
            device += leaf.nbytes
    return device, host, misplaced


@pytest.mark.parametrize("family, quantization", [("qwen3_moe", None), ("deepseek", None), ("mixtral", "int4"),
                                                  ("deepseek", "fp8")])
def test_offloaded_experts_give_the_same_logits_and_tokens(hf_model_dir, tmp_path, monkeypatch, family,
                                                          quantization):
    from moejax.kernels import host_experts

    fetched = []  # the capacity of each traced fetch: a few experts for a decode step, all E for a prefill
    real = host_experts.fetch_routed

    def counting(ids_TK, params, num_experts):
        out = real(ids_TK, params, num_experts)
        fetched.append(jax.tree.leaves(out[0].w_gate)[0].shape[0])
        return out

    monkeypatch.setattr(host_experts, "fetch_routed", counting)
    path = make_deepseek(str(tmp_path / "ds")) if family == "deepseek" else hf_model_dir(family)
    kw = dict(dtype="float32", quantization=quantization, max_model_len=64, max_num_seqs=2)
    ref, off = LLM(path, **kw), LLM(path, offload_experts=True, **kw)

    device, host, misplaced = _placement(off)
    assert misplaced == 0 and host > 0
    assert host == off.memory_plan.host_weight_bytes
    assert device == off.memory_plan.weight_bytes_per_device
    assert _placement(ref)[1] == 0

    ids = np.random.default_rng().integers(3, 90, 12).tolist()
    np.testing.assert_allclose(off.logits(ids), ref.logits(ids), rtol=1e-5, atol=1e-5)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = off.generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
    want = ref.generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    # Prefill steps fetch the whole layer; the two-sequence decode steps only their 2 * k experts per layer.
    num_experts = off.config.num_experts
    assert min(fetched) < num_experts and max(fetched) == num_experts


def test_offload_bf16_tokens_and_bad_arguments(hf_model_dir):
    path = hf_model_dir("qwen3_moe")
    kw = dict(dtype="bfloat16", max_model_len=64, max_num_seqs=2)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = LLM(path, offload_experts=True, **kw).generate(prompt_token_ids=PROMPTS, sampling_params=greedy,
                                                         use_tqdm=False)
    want = LLM(path, **kw).generate(prompt_token_ids=PROMPTS, sampling_params=greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    with pytest.raises(ValueError, match="offload_experts"):
        LLM(path, offload_experts="yes")
    with pytest.raises(ValueError, match="offload_experts=True runs on one device"):
        LLM(path, offload_experts=True, tensor_parallel_size=2)


def test_offload_from_a_converted_checkpoint(hf_model_dir, tmp_path):
    """A converted (Orbax) checkpoint restores its routed experts straight into host memory too."""
    from moejax.checkpoints.convert import convert

    out = str(tmp_path / "converted")
    convert(hf_model_dir("qwen3_moe"), out, quantization="int4")
    off, ref = LLM(out, offload_experts=True, max_model_len=64), LLM(out, max_model_len=64)
    device, host, misplaced = _placement(off)
    assert misplaced == 0 and host == off.memory_plan.host_weight_bytes
    ids = [5, 9, 2, 7, 11]
    np.testing.assert_allclose(off.logits(ids), ref.logits(ids), rtol=1e-5, atol=1e-5)
