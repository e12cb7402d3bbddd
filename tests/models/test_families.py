"""Every GQA family, both expert layouts: moejax logits and greedy tokens equal transformers'."""

import numpy as np
import pytest
import torch

from moejax import LLM, SamplingParams
from tests.hf_models import FAMILIES, load_hf

PROMPT = np.random.RandomState(1).randint(0, 97, 32).tolist()


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def hf_logits(path, ids, dtype="float32"):
    with torch.no_grad():
        return load_hf(path, dtype)(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(path, ids, n):
    model = load_hf(path)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("fused", [False, True], ids=["hub_layout", "fused_layout"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_match_transformers(hf_model_dir, family, fused):
    path = hf_model_dir(family, fused=fused)
    llm = LLM(path)
    assert rel_err(llm.logits(PROMPT), hf_logits(path, PROMPT)) < 1e-4
    out = llm.generate(prompt_token_ids=[PROMPT[:8]], sampling_params=SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(path, PROMPT[:8], 16)
    assert out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_style_config_keys(hf_model_dir, family):
    path = hf_model_dir(family, hub_keys=True, seed=3)
    assert rel_err(LLM(path).logits(PROMPT), hf_logits(path, PROMPT)) < 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_bfloat16_close_to_float32(hf_model_dir, family):
    path = hf_model_dir(family)
    f32 = LLM(path, dtype="float32").logits(PROMPT)
    bf16 = LLM(path, dtype="bfloat16").logits(PROMPT)
    assert rel_err(bf16, f32) < 2e-2


def test_batched_prompts_of_different_lengths_match_single(hf_model_dir):
    path = hf_model_dir("qwen2_moe")
    llm = LLM(path)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [PROMPT[:5], PROMPT[:17], PROMPT[3:9]]
    batched = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for prompt, out in zip(prompts, batched):
        single = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        assert out.outputs[0].token_ids == single[0].outputs[0].token_ids
        assert out.prompt_token_ids == prompt
