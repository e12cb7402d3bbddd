"""`moejax bench offload`: the bounds follow the planner's expert bytes and the measured rates, and the whole
bench runs on the CPU with the embedded model (its numbers there say nothing about speed)."""

from __future__ import annotations

import json
import math

import pytest

from moejax.bench import offload
from moejax.cli import main
from moejax.config import ModelConfig
from moejax.engine.llm import default_model_path
from moejax.known_models import resolve


def test_expert_bytes_and_bounds_for_deepseek_v3():
    hf = json.load(open(f"{resolve('deepseek-v3')}/config.json"))
    config = ModelConfig.from_dict(dict(hf, num_hidden_layers=5, quantization_config=None))
    costs = offload.expert_costs(config, "int4")
    # one expert: gate and up [7168, 2048] and down [2048, 7168] in int4, plus one bf16 scale per 128 inputs
    packed = 3 * 7168 * 2048 // 2
    assert packed < costs["expert_bytes"] < packed * 1.1
    assert costs["moe_layers"] == 2 and costs["num_experts"] == 256 and costs["top_k"] == 8
    assert offload.touched(1, 256, 8) == pytest.approx(8)
    assert offload.touched(10_000, 256, 8) == pytest.approx(256)

    host_bw, pcie_bw = 80e9, 50e9
    results = {"host": {"best_bytes_per_s": host_bw}, "pcie": {"bulk_bytes_per_s": pcie_bw},
               "decode": {"1": {"ms_per_step": 10.0}}, "prefill": {"tokens": 1024, "ms": 2000.0}, "errors": {}}
    table = offload.build_table(results, costs, [1, 16], 1024, full_moe_layers=58, deepseek=True)
    rows = {r["measurement"]: r for r in table.as_json()}
    bound = 1 / (2 * 8 * costs["expert_bytes"] / host_bw)
    assert rows["decode b=1 (2 MoE layers), tok/s"]["moejax"] == pytest.approx(100.0)
    assert rows["decode b=1 (2 MoE layers), tok/s"]["host-memory bound"] == pytest.approx(bound)
    assert rows["decode b=1 (2 MoE layers), tok/s"]["PCIe bound"] == pytest.approx(bound * 50 / 80)
    assert rows["decode b=1: share of the host-memory bound"]["moejax"] == pytest.approx(100.0 / bound)
    scaled = rows["decode b=1 scaled to 58 MoE layers, tok/s"]
    assert scaled["moejax"] == pytest.approx(100.0 * 2 / 58)
    assert "12.21" in scaled["KTransformers (published)"]
    assert rows["decode b=16 (2 MoE layers), tok/s"]["moejax"] is None  # not measured: a '-' cell
    prefill = rows["prefill 1024 tokens (2 MoE layers), tok/s"]
    assert prefill["moejax"] == pytest.approx(512.0)
    assert prefill["host-memory bound"] == pytest.approx(1024 / (2 * 256 * costs["expert_bytes"] / host_bw), rel=1e-6)


def test_bench_offload_runs_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "offload.json"
    rc = main(["bench", "offload", default_model_path(), "--steps", "2", "--repeats", "1", "--prompt-len", "8",
               "--offload-batch", "1", "2", "--offload-prefill-len", "32", "--host-gib", "0.05",
               "--host-threads", "1", "2", "--offload-cache-experts", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    results = json.load(open(out))["results"]
    engine = results["engine"]
    assert engine["host_param_bytes"] == engine["plan_host_weight_bytes"] > 0
    assert engine["device_param_bytes"] == engine["plan_weight_bytes_per_device"]
    # (timings on a shared CPU say nothing, and a difference of two short runs can even come out negative)
    assert set(results["decode"]) == {"1", "2"} and math.isfinite(results["decode"]["1"]["ms_per_step"])
    assert set(results["host"]["by_threads"]) == {"1", "2"}
    rates = results["host_compute"]
    assert set(rates["by_tokens"]) == {"1", "16"} and all(r > 0 for r in rates["by_tokens"].values())
    assert "host compute, JAX CPU backend" in text
    assert "decode b=2" in text and "prefill 32 tokens" in text and "2 per layer cached" in text
    assert engine["device_param_bytes"] > 0 and results["pinned_pool_bytes"] > 0
    assert engine["cache_experts_per_layer"] == 2 and 0 <= engine["cache_hit_share"] <= 1


def test_bench_offload_refuses_bad_arguments(capsys):
    assert main(["bench", "offload", default_model_path(), "--offload-batch", "0"]) != 0
    assert "--offload-batch must be positive" in capsys.readouterr().err
    assert main(["bench", "offload", default_model_path(), "--layers", "0"]) != 0
    assert "--layers must be positive" in capsys.readouterr().err
