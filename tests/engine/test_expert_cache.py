"""offload_cache_experts: each MoE layer's most used offloaded experts also live on the device; the tokens
stay those of the device-resident model, the slots hold exactly the experts the policy put there, and the device
bytes include the cache as the planner counts it."""

import jax
import numpy as np
import pytest

from moejax import LLM, SamplingParams
from moejax.engine.expert_cache import ExpertCachePolicy
from moejax.kernels import host_experts
from tests.engine.test_offload import PROMPTS, _placement
from tests.hf_models import make_deepseek

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return make_deepseek(str(tmp_path_factory.mktemp("deepseek_cache")))


@pytest.mark.parametrize("family, quantization", [("deepseek", None), ("qwen3_moe", "int4")])
def test_cached_experts_give_the_same_tokens_and_hold_what_the_policy_chose(
        hf_model_dir, deepseek_dir, family, quantization, monkeypatch):
    monkeypatch.setattr(host_experts, "CACHE_MIN_TOKENS", 1)  # the decode steps of two prompts read the cache
    path = deepseek_dir if family == "deepseek" else hf_model_dir(family)
    kw = dict(dtype="float32", quantization=quantization)
    ref = LLM(path, **kw)
    slots = 3
    llm = LLM(path, offload_experts=True, offload_cache_experts=slots, **kw)
    llm.llm_engine.expert_cache.refresh_steps = 4  # refill often: most steps read a cache filled from counts
    want = [o.outputs[0].token_ids for o in ref.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                         use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                        use_tqdm=False)]
    assert got == want
    policy = llm.llm_engine.expert_cache
    assert policy.steps >= policy.refresh_steps  # the cache was filled and read
    assert 0 < policy.hits < policy.routed
    np.testing.assert_allclose(llm.logits(PROMPTS[0]), ref.logits(PROMPTS[0]), rtol=0, atol=1e-5)

    # every slot the table names holds that expert's weights, copied from the host stack
    cached = policy.cached()
    assert all(0 < len(v) <= slots for v in cached.values())
    for r, rows, host in policy.runs:
        cache = llm.runner.params["caches"][r]
        slot_of = np.asarray(cache.slot_of)
        for local in range(rows.stop - rows.start):
            held = policy.expert_in_slot[rows.start + local]
            assert sorted(np.nonzero(slot_of[local] >= 0)[0].tolist()) == cached[rows.start + local]
            for slot, expert in enumerate(held):
                if expert < 0:
                    continue
                assert slot_of[local, expert] == slot
                for h, c in zip(jax.tree.leaves(host), jax.tree.leaves(cache.weights)):
                    np.testing.assert_array_equal(np.asarray(c[local, slot]), np.asarray(h[local, expert]))

    device, host_bytes, misplaced = _placement(llm)
    assert misplaced == 0 and host_bytes == llm.memory_plan.host_weight_bytes
    assert device == llm.memory_plan.weight_bytes_per_device
    plain = LLM(path, offload_experts=True, **kw).memory_plan
    assert device > plain.weight_bytes_per_device


def test_a_refresh_copies_only_the_experts_that_came_in(hf_model_dir, monkeypatch):
    monkeypatch.setattr(host_experts, "CACHE_MIN_TOKENS", 1)
    llm = LLM(hf_model_dir("qwen3_moe"), dtype="float32", offload_experts=True, offload_cache_experts=2)
    policy: ExpertCachePolicy = llm.llm_engine.expert_cache
    e = llm.config.num_experts
    counts = np.zeros((policy.moe_layers, e), np.int64)
    counts[:, [3, 5]] = [7, 9]
    policy.score[:] = counts
    assert policy.refresh() == 2 * policy.moe_layers
    assert all(v == [3, 5] for v in policy.cached().values())

    before = policy.expert_in_slot.copy()
    policy.score[:, 1] = 100.0  # expert 1 overtakes 3; 5 keeps its slot
    assert policy.refresh() == policy.moe_layers
    assert all(v == [1, 5] for v in policy.cached().values())
    assert (policy.expert_in_slot[before == 5] == 5).all()
    seen = np.zeros_like(counts)
    seen[:, [5, 4]] = [2, 6]
    policy.observe(seen, step_tokens=1)  # 2 of the 8 assignments per layer hit (expert 5)
    assert policy.hit_share() == pytest.approx(0.25)
    # a step with as many assignments as experts copied the whole layer from the host: no hits, 8 more routed
    assert not host_experts.reads_cache(e, policy.top_k, e)
    policy.observe(seen, step_tokens=e)
    assert policy.hit_share() == pytest.approx(0.125)


@pytest.mark.parametrize("kwargs, match", [
    (dict(offload_cache_experts=2), "needs offload_experts=True"),
    (dict(offload_experts=True, offload_cache_experts=-1), "non-negative"),
    (dict(offload_experts=True, offload_cache_experts=10_000), "exceeds the model's"),
])
def test_bad_cache_sizes(hf_model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(hf_model_dir("qwen3_moe"), **kwargs)
