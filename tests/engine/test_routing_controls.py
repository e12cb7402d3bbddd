"""Routing controls: moe_top_k overrides the experts per token; a registered routing function reshapes every
MoE layer's router logits before top-k inside the jitted step."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import LLM, SamplingParams

IDS = list(range(3, 40))


def _copy_with_top_k(src, dst, k):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["num_experts_per_tok"] = k
    with open(path, "w") as f:
        json.dump(cfg, f)
    return dst


@pytest.mark.parametrize("family, k", [("qwen3_moe", 1), ("mixtral", 3)])
def test_moe_top_k_equals_the_model_built_with_that_k(hf_model_dir, tmp_path, family, k):
    path = hf_model_dir(family)
    default = LLM(path, dtype="float32").logits(IDS)
    got = LLM(path, dtype="float32", moe_top_k=k).logits(IDS)
    ref = LLM(_copy_with_top_k(path, str(tmp_path / "k"), k), dtype="float32").logits(IDS)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert np.abs(got - default).max() > 1e-3  # k really changed


def test_moe_top_k_is_checked_against_the_model(hf_model_dir, tmp_path):
    from tests.hf_models import make_deepseek

    path = hf_model_dir("qwen3_moe")
    for bad in (0, -1, 2.0, 1000):
        with pytest.raises(ValueError, match="moe_top_k"):
            LLM(path, moe_top_k=bad)
    deepseek = make_deepseek(str(tmp_path / "ds"))  # 8 experts in 4 groups, 2 groups kept: 4 reachable
    with pytest.raises(ValueError, match="moe_top_k=5 .*topk_group"):
        LLM(deepseek, moe_top_k=5)
    assert LLM(deepseek, moe_top_k=4).config.num_experts_per_tok == 4


def _counts(llm, prompts):
    llm.llm_engine.count_experts(True)
    llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                 sampling_params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    counts, layers = llm.llm_engine.take_expert_counts()
    return counts, layers


def test_routing_function_steers_the_real_choices(hf_model_dir):
    """A function that masks half the experts, a different half on odd and even layers: the step's router
    choices (counted on the device) avoid exactly those; removing it brings them back."""
    llm = LLM(hf_model_dir("qwen3_moe"), dtype="float32", max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=32)
    e = llm.config.num_experts
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 90, int(n)).tolist() for n in (4, 17, 30)]

    def mask_half(logits_TE, layer):
        parity = jnp.arange(logits_TE.shape[-1]) % 2
        return jnp.where(parity[None, :] == layer % 2, logits_TE, -1e9)

    before, layers = _counts(llm, prompts)
    odd = np.arange(e) % 2 == 1
    assert before[:, odd].sum() > 0 and before[:, ~odd].sum() > 0
    llm.register_moe_routing_func(mask_half)
    counts, layers = _counts(llm, prompts)
    for row, layer in zip(counts, layers):
        banned = odd if layer % 2 == 0 else ~odd
        assert row[banned].sum() == 0 and row[~banned].sum() > 0, (layer, row)
    compiled = llm.runner.compilations()
    again, _ = _counts(llm, prompts)  # the same shapes again: compiled once, not per call
    assert llm.runner.compilations() == compiled and (again == counts).all()
    # the full forward sees it too: masked experts change the logits
    masked = llm.logits(IDS)
    llm.register_moe_routing_func(None)
    assert np.abs(masked - llm.logits(IDS)).max() > 1e-3
    after, _ = _counts(llm, prompts)
    assert after[:, odd].sum() > 0


def test_bad_routing_functions_are_refused_at_registration(hf_model_dir):
    llm = LLM(hf_model_dir("qwen3_moe"), dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match=r"register_moe_routing_func.*shape"):
        llm.register_moe_routing_func(lambda logits, layer: logits[:, :2])
    with pytest.raises(ValueError, match=r"register_moe_routing_func.*failed"):
        llm.register_moe_routing_func(lambda logits, layer: logits @ jnp.ones((3, 3)))
    with pytest.raises(TypeError, match="callable"):
        llm.register_moe_routing_func("softmax")
    assert llm.runner.routing_fn is None  # nothing half-registered
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
