"""The planner against published model sizes, against the model code, and against the engine's allocations."""

import collections
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from moejax import LLM, known_models
from moejax.checkpoints.hf import flat_params
from moejax.config import ModelConfig
from moejax.models import build_abstract
from moejax.plan.memory import GIB, Mesh, plan_memory
from moejax.plan.params import count_params, inventory
from moejax.sharding.mesh import sharding_for_axes
from tests.hf_models import FAMILIES

CONFIGS = Path(known_models.CONFIG_DIR)  # the real config.json files bundled with moejax

# (model, published total, published active, whether the published active count includes the embedding table)
PUBLISHED = [
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, True),
    ("qwen3-235b-a22b", 235e9, 22e9, True),
    ("deepseek-v3", 671e9, 37e9, True),
    ("deepseek-r1", 671e9, 37e9, True),
    ("mixtral-8x7b-v0.1", 46.7e9, 12.9e9, True),
    ("mixtral-8x22b-v0.1", 141e9, 39e9, True),
    ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9, True),
    ("olmoe-1b-7b-0924", 6.9e9, 1.3e9, True),
    ("gpt-oss-20b", 21e9, 3.6e9, False),
    ("gpt-oss-120b", 117e9, 5.1e9, False),
]


@pytest.mark.parametrize("name, total, active, with_embeddings", PUBLISHED)
def test_counts_match_published_sizes(name, total, active, with_embeddings):
    counts = count_params(ModelConfig.from_file(CONFIGS / name))
    assert abs(counts.total - total) / total < 0.01
    ours = counts.active if with_embeddings else counts.active_without_embeddings
    # Published active counts are rounded to two significant digits.
    assert abs(ours - active) / active < 0.02


def test_seed_figure_qwen3_235b_tp8():
    plan = plan_memory(ModelConfig.from_file(CONFIGS / "qwen3-235b-a22b"), mesh=Mesh(tp=8), max_model_len=4096)
    assert 58e9 < plan.weight_bytes_per_device < 60e9 and plan.fits


@pytest.mark.parametrize("family", FAMILIES)
def test_inventory_is_the_model(hf_model_dir, family):
    config = ModelConfig.from_file(hf_model_dir(family))
    _, abstract = build_abstract(config, np.float32)
    model = {path: (tuple(var.get_value().shape), tuple(var.get_metadata()["logical_axes"]))
             for path, var in flat_params(abstract)}
    planned = {t.path: (t.shape, t.axes) for t in inventory(config)}
    assert planned == model


def allocated_bytes_per_device(state) -> int:
    per_device = collections.Counter()
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return max(per_device.values())


@pytest.mark.parametrize("tp, ep, dp", [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 4, 1), (2, 4, 1), (1, 2, 2),
                                        (1, 8, 1)])
@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_predicted_bytes_equal_engine_allocation(hf_model_dir, family, tp, ep, dp):
    llm = LLM(hf_model_dir(family), tensor_parallel_size=tp, expert_parallel_size=ep, data_parallel_size=dp)
    assert llm.memory_plan.weight_bytes_per_device == allocated_bytes_per_device(llm.runner.state)
    # KV cache: per device, a token of the engine's page pool costs exactly the planned bytes.
    pool = llm.runner.pool
    assert allocated_bytes_per_device(pool) == llm.memory_plan.kv_bytes_per_token * pool.num_pages * pool.page_size


@pytest.mark.parametrize("quantization", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("tp, ep", [(1, 1), (2, 4)])
def test_predicted_quantized_bytes_equal_engine_allocation(hf_model_dir, quantization, tp, ep):
    llm = LLM(hf_model_dir("qwen2_moe"), quantization=quantization, tensor_parallel_size=tp,
              expert_parallel_size=ep)
    assert llm.memory_plan.weight_bytes_per_device == allocated_bytes_per_device(llm.runner.state)


def test_plan_json_and_verdict(tmp_path):
    config = tmp_path / "config.json"
    config.write_text((CONFIGS / "qwen3-30b-a3b" / "config.json").read_text())
    run = lambda *a: subprocess.run([sys.executable, "-m", "moejax.cli", "plan", str(config), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    out = json.loads(run("--json").stdout)
    for key in ("weight_bytes_per_device", "host_weight_bytes", "kv_bytes_per_token", "kv_cache_tokens",
                "max_concurrency", "fits"):
        assert key in out
    assert out["fits"]
    assert out["max_concurrency"] == pytest.approx(out["kv_cache_tokens"] / out["max_model_len"])
    small = json.loads(run("--json", "--gpu-memory", "24").stdout)
    assert not small["fits"] and small["suggestion"]
    text = run("--gpu-memory", "24").stdout
    assert "does NOT fit" in text and small["suggestion"] in text
    offload = json.loads(run("--json", "--offload-experts").stdout)
    assert offload["host_weight_bytes"] > 50e9 and offload["weight_bytes_per_device"] < 4e9
    bad = run("--tp", "3")
    assert bad.returncode != 0 and "tensor_parallel_size=3" in bad.stderr


def test_kv_capacity_arithmetic():
    config = ModelConfig.from_dict({
        "architectures": ["MixtralForCausalLM"], "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512, "num_local_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 1024})
    plan = plan_memory(config, device_memory_bytes=1 * GIB, gpu_memory_utilization=0.5, max_model_len=1024)
    assert plan.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2
    expected = (GIB // 2 - plan.weight_bytes_per_device - plan.workspace_bytes) // plan.kv_bytes_per_token
    assert plan.kv_cache_tokens == expected
    assert plan.max_concurrency == pytest.approx(expected / 1024)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_inventory_and_bytes_for_mla_and_gpt_oss(tmp_path, family):
    from tests.hf_models import make_deepseek, make_gpt_oss

    path = (make_deepseek if family == "deepseek_v3" else make_gpt_oss)(str(tmp_path / family))
    config = ModelConfig.from_file(path)
    _, abstract = build_abstract(config, np.float32)
    model = {p: (tuple(v.get_value().shape), tuple(v.get_metadata()["logical_axes"])) for p, v in flat_params(abstract)}
    assert {t.path: (t.shape, t.axes) for t in inventory(config)} == model
    for tp, ep in [(1, 1), (2, 4)]:
        llm = LLM(path, tensor_parallel_size=tp, expert_parallel_size=ep)
        assert llm.memory_plan.weight_bytes_per_device == allocated_bytes_per_device(llm.runner.state)
        ref = LLM(path).logits(list(range(3, 20)))
        assert np.abs(llm.logits(list(range(3, 20))) - ref).max() / np.abs(ref).max() < 1e-5


def test_expert_cache_is_counted_on_the_device():
    """DeepSeek-V3 int4 with 64 of its 256 experts per layer cached: a quarter of the host's expert bytes and
    one int32 slot table per MoE layer join the device's weights; the host keeps every expert."""
    config = ModelConfig.from_file(known_models.resolve("deepseek-v3"))
    kw = dict(quantization="int4", offload_experts=True, max_model_len=4096, max_num_seqs=16,
              device_memory_bytes=141 * GIB)
    plain = plan_memory(config, **kw)
    cached = plan_memory(config, offload_cache_experts=64, **kw)
    assert cached.host_weight_bytes == plain.host_weight_bytes
    assert cached.weight_bytes_per_device - plain.weight_bytes_per_device == \
        plain.host_weight_bytes // 4 + 4 * 58 * 256
    assert cached.kv_cache_tokens < plain.kv_cache_tokens and cached.offload_cache_experts == 64
    assert plan_memory(config, offload_cache_experts=64, **dict(kw, offload_experts=False)).offload_cache_experts == 0


def test_pipeline_stages_hold_their_layers():
    """TP4 x PP2 for Qwen3-235B-A22B (FP8) on 8 x 48 GB: each stage holds half the layers and half the KV per
    token, and the vocabulary of the embeddings and lm_head split over all 8 devices; it fits, where bf16 does
    not."""
    from moejax.plan.memory import kv_bytes_per_token, stage_layers

    config = ModelConfig.from_file(known_models.resolve("Qwen/Qwen3-235B-A22B"))
    assert [len(r) for r in stage_layers(config, 4)] == [24, 24, 23, 23]
    kw = dict(device_memory_bytes=48 * GIB, max_model_len=4096)
    tp4 = plan_memory(config, mesh=Mesh(4), dtype="fp8", **kw)
    pp2 = plan_memory(config, mesh=Mesh(4, pp=2), dtype="fp8", **kw)
    assert pp2.fits and pp2.mesh.devices == 8
    top = ("embeddings", "lm_head")
    layers = tp4.weight_bytes_per_device - sum(tp4.weight_bytes_by_kind[k] for k in top)
    stage = pp2.weight_bytes_per_device - sum(pp2.weight_bytes_by_kind[k] for k in top)
    assert abs(stage - layers / 2) <= 2 * config.hidden_size  # the final norm is on every stage
    for kind in top:
        assert pp2.weight_bytes_by_kind[kind] * 2 == tp4.weight_bytes_by_kind[kind]
    assert kv_bytes_per_token(config, "fp8", Mesh(4, pp=2)) * 2 == kv_bytes_per_token(config, "fp8", Mesh(4))
    assert not plan_memory(config, mesh=Mesh(4, pp=2), dtype="bfloat16", suggest=False, **kw).fits
    assert plan_memory(config, mesh=Mesh(1, 8), dtype="fp8", **kw).fits


def test_pipeline_split_wastes_the_fewest_bytes():
    """DeepSeek-V3's 3 dense and 58 MoE layers at pp2: every stage has 3 dense and 29 MoE slots (one SPMD
    program: the same shapes on every stage), so the split puts 3 + 29 layers on the first stage and 29 on the
    second, not the even 31 / 30 (which would need 30 MoE slots); the KV cache has 32 layers per stage."""
    from moejax.plan.memory import kv_bytes_per_token, stage_split

    config = ModelConfig.from_file(known_models.resolve("deepseek-v3"))
    split = stage_split(config, 2)
    assert split.stages == (range(0, 32), range(32, 61)) and split.slots == (3, 29)
    one = kv_bytes_per_token(config, "fp8")
    assert kv_bytes_per_token(config, "fp8", Mesh(pp=2)) == one // 61 * 32


def test_dp_attention_caches_each_ranks_own_requests():
    """DeepSeek-V3 (FP8) on 16 x 80 GB with DP attention and EP16 fits; each rank caches only its own requests'
    latents, so a byte of KV cache holds 16 times the tokens it holds at TP16, which stores every latent on
    every rank."""
    config = ModelConfig.from_file(known_models.resolve("deepseek-v3"))
    kw = dict(dtype="fp8", device_memory_bytes=80 * GIB, max_model_len=4096)
    dpa = plan_memory(config, mesh=Mesh(1, 16, dp_attention=True), **kw)
    tp16 = plan_memory(config, mesh=Mesh(16), **kw)
    ep16 = plan_memory(config, mesh=Mesh(1, 16), **kw)
    assert dpa.fits and dpa.weight_bytes_per_device == ep16.weight_bytes_per_device
    assert dpa.kv_cache_tokens == 16 * ep16.kv_cache_tokens
    per_byte = dpa.kv_cache_tokens / dpa.kv_cache_bytes, tp16.kv_cache_tokens / tp16.kv_cache_bytes
    assert abs(per_byte[0] / per_byte[1] - 16) < 1e-3


@pytest.mark.parametrize("mesh, match", [(Mesh(pp=100), "exceeds num_hidden_layers"),
                                         (Mesh(dp_attention=True), "expert_parallel_size >= 2"),
                                         (Mesh(2, 2, dp_attention=True), "tensor_parallel_size 1")])
def test_bad_planned_layouts(mesh, match):
    config = ModelConfig.from_file(known_models.resolve("deepseek-v3"))
    with pytest.raises(ValueError, match=match):
        plan_memory(config, mesh=mesh)


def test_deepseek_r1_fits_8_h200_as_its_fp8_checkpoint_and_the_engine_allocates_the_plan(tmp_path):
    """The checkpoint's own dtype (dtype="auto": FP8 stays FP8) fits 8 x 141 GB; bf16 weights would not. The
    engine, on 8 virtual devices with the real config cut to its first (dense) layer, holds what the plan says."""
    config = ModelConfig.from_file(CONFIGS / "deepseek-r1")
    assert config.checkpoint_quant == "fp8"
    h200 = dict(mesh=Mesh(tp=8), device_memory_bytes=int(141e9), max_model_len=4096)
    assert plan_memory(config, quantization="fp8", **h200).fits
    assert not plan_memory(config, **h200).fits
    proc = subprocess.run([sys.executable, "-m", "moejax.cli", "plan", "deepseek-r1", "--tp", "8", "--gpu-memory",
                           str(141e9 / GIB), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)
    assert cli["fits"] and cli["weight_bytes_per_device"] == plan_memory(config, quantization="fp8",
                                                                          **h200).weight_bytes_per_device

    raw = json.loads((CONFIGS / "deepseek-r1" / "config.json").read_text())
    # the first (dense) layer; then one MoE layer with 16 of the 256 experts (their full size: 0.7 GB of e4m3);
    # a 1,024-token vocabulary (the bf16 embeddings and lm_head are not what is checked here)
    raw["vocab_size"] = 1024
    for cut in (dict(num_hidden_layers=1), dict(num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=16)):
        (tmp_path / "config.json").write_text(json.dumps(dict(raw, **cut)))
        llm = LLM(str(tmp_path), load_format="dummy", tensor_parallel_size=8, max_model_len=64, max_num_seqs=2)
        assert llm.quantization == "fp8"
        assert llm.memory_plan.weight_bytes_per_device == allocated_bytes_per_device(llm.runner.state)
        del llm
