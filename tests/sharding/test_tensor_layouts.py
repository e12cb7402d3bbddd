"""Layouts over the tensor-parallel ranks: routed experts split whole (`enable_expert_parallel`) and KV heads
fewer than the ranks (one head a rank), on 8 virtual CPU devices."""

import collections

import numpy as np
import pytest

from moejax import LLM
from tests.sharding.conftest import GREEDY, PROMPT


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])  # the two expert layouts; more families below
def test_experts_over_tp4_match_single_device(hf_model_dir, single, family):
    ref_logits, ref_tokens = single(family)
    llm = LLM(hf_model_dir(family), tensor_parallel_size=4, enable_expert_parallel=True)
    logits = llm.logits(PROMPT)
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < 1e-5
    outs = llm.generate(prompt_token_ids=[PROMPT[:9], PROMPT[4:20]], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref_tokens


def test_enable_expert_parallel_splits_whole_experts_over_tensor_ranks(hf_model_dir):
    """enable_expert_parallel at tp4: each device holds E/4 whole experts (full width) and a quarter of the
    attention heads; routed-expert bytes per device equal the planner's; the compiled step all-gathers no
    expert weights."""
    from moejax.checkpoints.hf import flat_params
    from moejax.plan.memory import Mesh, plan_memory

    llm = LLM(hf_model_dir("qwen3_moe"), tensor_parallel_size=4, enable_expert_parallel=True)
    routed = collections.Counter()
    for path, var in flat_params(llm.runner.state):
        arr = var.get_value()
        (shard,) = {tuple(s.data.shape) for s in arr.addressable_shards}
        if path[-1] in ("w_gate", "w_up", "w_down"):  # [E, ...]: whole experts, a quarter of them a device
            assert shard == (arr.shape[0] // 4, *arr.shape[1:]), (path, shard)
            for s_ in arr.addressable_shards:
                routed[s_.device] += s_.data.nbytes
        elif path[-2] in ("q_proj",) and path[-1] == "kernel":
            assert shard == (arr.shape[0], arr.shape[1] // 4)
    plan = plan_memory(llm.config, mesh=Mesh(4, expert_over_tp=True), dtype="float32", max_model_len=256)
    assert set(routed.values()) == {plan.weight_bytes_by_kind["routed_experts"]}
    runner = llm.runner
    with runner._context():
        hlo = runner.forward_logits_fn.lower(runner.params, np.zeros(16, np.int32),
                                             np.arange(16, dtype=np.int32)).compile().as_text()
    e, d, f = llm.config.num_experts, llm.config.hidden_size, llm.config.moe_intermediate_size
    for line in hlo.splitlines():
        if "all-gather" in line:
            assert not any(s in line for s in (f"[{e},{d},{f}]", f"[{e},{f},{d}]")), line


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_enable_expert_parallel_with_biases_and_mla(tmp_path, family):
    """GPT-OSS (expert biases, sinks) and DeepSeek-V3 (MLA, grouped routing, shared experts) with their experts
    whole over dp2 x tp4: the 1-device logits."""
    from tests.hf_models import make_deepseek, make_gpt_oss

    path = make_gpt_oss(str(tmp_path)) if family == "gpt_oss" else make_deepseek(str(tmp_path))
    ref = LLM(path).logits(PROMPT)
    got = LLM(path, tensor_parallel_size=4, data_parallel_size=2, enable_expert_parallel=True).logits(PROMPT)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def test_fewer_kv_heads_than_tensor_ranks_store_one_head_a_rank(hf_model_dir):
    """2 KV heads at tp4: the pools hold each head on the two ranks whose query heads use it, one head a rank
    (not both everywhere); greedy tokens are those of one device (test_mesh_matches_single_device, tp4)."""
    from moejax.config import ModelConfig
    from moejax.known_models import path_of
    from moejax.plan.memory import Mesh, kv_bytes_per_token

    llm = LLM(hf_model_dir("qwen3_moe"), tensor_parallel_size=4)
    pool = llm.runner.pool
    assert pool.k.shape[3] == 4
    assert {s.data.shape[3] for s in pool.k.addressable_shards} == {1}
    # Qwen3-235B-A22B (4 KV heads of 128, 94 layers) at tp8: 48,128 bytes a token a device, not 192,512
    config = ModelConfig.from_file(path_of("qwen3-235b-a22b"))
    assert kv_bytes_per_token(config, "bfloat16", Mesh(8)) == 48_128
    assert kv_bytes_per_token(config, "bfloat16", Mesh(4)) == 48_128


def test_planner_enable_expert_parallel_cases():
    from moejax.config import ModelConfig
    from moejax.known_models import path_of
    from moejax.plan.memory import Mesh, plan_memory

    config = ModelConfig.from_file(path_of("qwen3-235b-a22b"))
    width = plan_memory(config, mesh=Mesh(8), max_model_len=4096)
    whole = plan_memory(config, mesh=Mesh(8, expert_over_tp=True), max_model_len=4096)
    # the same bytes a device, split by expert instead of by width
    assert whole.weight_bytes_by_kind["routed_experts"] == width.weight_bytes_by_kind["routed_experts"]
    with pytest.raises(ValueError, match="expert_parallel_size=2 must then be 1"):
        plan_memory(config, mesh=Mesh(4, 2, expert_over_tp=True), max_model_len=4096)
    mixtral = ModelConfig.from_file(path_of("mixtral-8x7b"))  # 32 heads, 8 experts
    with pytest.raises(ValueError, match="tensor_parallel_size=16 does not divide num_experts=8"):
        plan_memory(mixtral, mesh=Mesh(16, expert_over_tp=True), max_model_len=4096)


@pytest.mark.parametrize("tp, ep", [(2, 1), (2, 2)])
def test_fp8_experts_with_a_partial_last_block_keep_their_scales_on_every_rank(tp, ep):
    """An fp8 expert width of 24 in 16-wide blocks ends in a half block: the width is not split (a device's
    values would start mid-block of its scales), only whole blocks are; the expert kernels inside shard_map
    then give the one-device result."""
    import jax
    import jax.numpy as jnp

    from moejax.kernels import Activation, ExpertWeights, experts_reference, grouped_topk
    from moejax.kernels.quant import fp8_sharding_shape, quantize_fp8
    from moejax.sharding.expert_parallel import EXPERT_AXES, moe_experts
    from moejax.sharding.mesh import make_mesh, sharding_for_axes

    assert fp8_sharding_shape((4, 64, 24), (16, 16)) == (4, 4, 1)
    assert fp8_sharding_shape((4, 24, 64), (16, 16)) == (4, 1, 4)
    rng = np.random.default_rng()
    e, d, f = 4, 64, 24
    x = jnp.asarray(rng.standard_normal((6, d)), jnp.float32)
    w, ids = grouped_topk(jnp.asarray(rng.standard_normal((6, e)), jnp.float32), 2)
    fp8 = ExpertWeights(*(quantize_fp8(rng.standard_normal(s).astype(np.float32) * 0.1, (16, 16))
                          for s in ((e, d, f), (e, d, f), (e, f, d))))
    want = np.asarray(experts_reference(x, w, ids, fp8))
    mesh = make_mesh(tp, ep)
    placed = ExpertWeights(*(jax.tree.map(
        lambda a, n=n: jax.device_put(a, sharding_for_axes(mesh, EXPERT_AXES[n], getattr(fp8, n).sharding_shape)),
        getattr(fp8, n)) for n in ("w_gate", "w_up", "w_down")))
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(lambda x, w, i, p: moe_experts(x, w, i, p, Activation()))(x, w, ids, placed))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
