"""Tensor, expert and data parallelism on 8 virtual CPU devices reproduce the 1-device model."""

import collections

import jax
import numpy as np
import pytest

from moejax import LLM
from tests.hf_models import FAMILIES
from tests.sharding.conftest import GREEDY, PROMPT

# (tp2 and ep4 alone are covered by tp2_ep4, dp2_ep4 and ep8; CI time is kept under 20 minutes)
MESHES = {"tp2_ep4": (2, 4, 1), "dp2_ep4": (1, 4, 2), "ep8": (1, 8, 1)}


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("family", FAMILIES)
def test_mesh_matches_single_device(hf_model_dir, single, family, mesh):
    tp, ep, dp = MESHES[mesh]
    ref_logits, ref_tokens = single(family)
    llm = LLM(hf_model_dir(family), tensor_parallel_size=tp, expert_parallel_size=ep, data_parallel_size=dp)
    logits = llm.logits(PROMPT)
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < 1e-5
    outs = llm.generate(prompt_token_ids=[PROMPT[:9], PROMPT[4:20]], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref_tokens


def per_device_bytes(tree):
    out = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def test_bytes_per_device(hf_model_dir):
    llm = LLM(hf_model_dir("qwen3_moe"), tensor_parallel_size=2, expert_parallel_size=4)
    from moejax.checkpoints.hf import flat_params

    for path, var in flat_params(llm.runner.state):
        arr = var.get_value()
        shard_shapes = {tuple(s.data.shape) for s in arr.addressable_shards}
        assert len(shard_shapes) == 1
        (shard,) = shard_shapes
        if path[-1] in ("w_gate", "w_up"):  # [E, D, F]: experts over ep, width over tp
            assert shard == (arr.shape[0] // 4, arr.shape[1], arr.shape[2] // 2)
        elif path[-1] == "w_down":
            assert shard == (arr.shape[0] // 4, arr.shape[1] // 2, arr.shape[2])
        elif path[-2] in ("q_proj", "k_proj", "v_proj") and path[-1] == "kernel":
            assert shard == (arr.shape[0], arr.shape[1] // 2)
        elif path[-2] == "o_proj":
            assert shard == (arr.shape[0] // 2, arr.shape[1])
        elif path[0] in ("embed",):
            assert shard == (arr.shape[0] // 2 if arr.shape[0] % 2 == 0 else arr.shape[0], arr.shape[1])
    sizes = per_device_bytes(llm.runner.state)
    total = sum(v.get_value().nbytes for _, v in flat_params(llm.runner.state))
    assert max(sizes.values()) < total / 2  # nothing sharded is held whole anywhere


def test_compiled_hlo_has_expected_collectives_and_no_expert_all_gather(hf_model_dir):
    llm = LLM(hf_model_dir("qwen3_moe"), tensor_parallel_size=2, expert_parallel_size=4)
    runner = llm.runner
    tokens = np.zeros((1, 16), np.int32)
    positions = np.arange(16, dtype=np.int32)[None]
    with runner._context():
        hlo = runner.forward_logits_fn.lower(runner.params, tokens[0], positions[0]).compile().as_text()
    assert "all-reduce" in hlo
    e, d, f = llm.config.num_experts, llm.config.hidden_size, llm.config.moe_intermediate_size
    gathered_expert_shapes = [f"[{e},{d},{f}]", f"[{e},{f},{d}]", f"[{e},{d},{f // 2}]", f"[{e},{f // 2},{d}]"]
    for line in hlo.splitlines():
        if "all-gather" in line:
            assert not any(s in line for s in gathered_expert_shapes), line


@pytest.mark.parametrize("kwargs, match", [
    (dict(tensor_parallel_size=3), "tensor_parallel_size=3"),
    (dict(expert_parallel_size=3), "expert_parallel_size=3"),
    (dict(tensor_parallel_size=4, expert_parallel_size=4), "needs 16 devices"),
    (dict(expert_parallel_size=16), "expert_parallel_size=16"),
    (dict(tensor_parallel_size=2, expert_parallel_size=2, enable_expert_parallel=True), "must then be 1"),
    (dict(enable_expert_parallel="yes"), "enable_expert_parallel must be True or False"),
])
def test_bad_parallel_sizes(hf_model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(hf_model_dir("qwen3_moe"), **kwargs)


def test_expert_shard_reads_only_its_experts():
    from moejax.checkpoints.hf_names import StackedExperts

    touched = []

    class Expert:
        def __init__(self, e):
            self.e, self.T, self.shape, self.dtype = e, self, (3, 2), np.dtype(np.float32)

        def __getitem__(self, index):
            touched.append(self.e)
            return np.full((3, 2), self.e, np.float32)[index]

    stacked = StackedExperts([Expert(e) for e in range(8)], transpose=True)
    shard = stacked[(slice(4, 6), slice(None), slice(0, 1))]
    assert shard.shape == (2, 3, 1) and touched == [4, 5]
    assert (shard[:, 0, 0] == [4, 5]).all()
