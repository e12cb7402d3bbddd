"""Shared by the mesh tests: the 1-device logits and greedy tokens of each family, computed once."""

import numpy as np
import pytest

from moejax import LLM, SamplingParams

PROMPT = np.random.RandomState(7).randint(0, 97, 24).tolist()
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="session")
def single(hf_model_dir):
    cache = {}

    def get(family):
        if family not in cache:
            llm = LLM(hf_model_dir(family))
            prompts = [PROMPT[:9], PROMPT[4:20]]
            cache[family] = (llm.logits(PROMPT), [o.outputs[0].token_ids for o in llm.generate(
                prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)])
        return cache[family]

    return get
