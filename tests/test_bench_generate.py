"""`moejax bench generate` end to end on the embedded tiny config at tiny sizes (CPU), and the pieces it computes.

The engine test drives the serving-engine API (load_format="dummy", llm_engine, warmup) and is skipped until LLM
has llm_engine; the peer test (rooflines in a JAX process, transformers on the CPU, bounds, table) runs today.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

import pytest

from moejax.bench import bounds as B
from moejax.bench import workload as W
from moejax.bench.measure import RESULT_MARK
from moejax.bench.process import run_worker
from moejax.cli import main
from moejax.config import ModelConfig
from moejax.engine.llm import default_model_path

CONFIG = os.path.join(default_model_path(), "config.json")
TINY = ["--batch", "1", "2", "--prompt-len", "16", "--steps", "3", "--repeats", "1", "--prefill-len", "64",
        "--requests", "8", "--prompt-lens", "16", "64", "--output-lens", "2", "8", "--max-num-seqs", "4",
        "--kv-cache-tokens", "1024", "--max-num-batched-tokens", "64", "--copy-gib", "0.004", "--matmul-n", "128",
        "--host-gap-batches", "1", "--worker-timeout", "300"]
RATES = {"hbm_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14}


def _run(tmp_path, capsys, monkeypatch, *extra):
    """The bench through the CLI, its temporary files under tmp_path/tmp (which must be empty afterwards)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "bench.json"
    assert main(["bench", "generate", CONFIG, *TINY, "--json", str(out), *extra]) == 0
    text = capsys.readouterr().out
    assert not list(scratch.iterdir()), "the bench left temporary files behind"
    return text, json.loads(out.read_text())


def _row(data, label_start):
    rows = [r for r in data["table"] if r["measurement"].startswith(label_start)]
    assert rows, (label_start, [r["measurement"] for r in data["table"]])
    return rows[0]


def test_workload_is_seeded_and_in_range():
    spec = W.WorkloadSpec(vocab_size=2048, batches=(1, 4), decode_prompt_len=16, prefill_len=64, num_requests=50,
                          prompt_len_range=(16, 64), output_len_range=(2, 8), seed=3)
    a, b = W.make_workload(spec), W.make_workload(spec)
    assert a == b
    assert a["decode"]["1"] == a["decode"]["4"][:1] and len(a["decode"]["4"][3]) == 16
    assert len(a["prefill"]) == 64
    assert all(16 <= len(r["prompt"]) <= 64 and 2 <= r["max_tokens"] <= 8 for r in a["requests"])
    assert all(0 <= t < 2048 for r in a["requests"] for t in r["prompt"])
    assert W.make_workload(spec.__class__(**{**spec.__dict__, "seed": 4}))["requests"] != a["requests"]


def test_bounds_follow_the_inventory():
    config = ModelConfig.from_file(CONFIG)
    c = B.model_costs(config)
    e, k = config.num_experts, config.num_experts_per_tok
    assert c.experts_touched(1) == pytest.approx(k) and c.experts_touched(10_000) == pytest.approx(e)
    one = c.weight_bytes(1)
    assert c.dense_bytes < one < c.weight_bytes(4) < c.dense_bytes + c.routed_bytes + 1
    assert one == pytest.approx(c.dense_bytes + c.routed_bytes * k / e)
    # one layer's cache per token: K and V, kv heads x head_dim, bf16
    assert c.kv_bytes_per_layer_token == 2 * config.num_kv_heads * config.head_dim * 2
    assert B._causal_keys(0, 4, None) == 10 and B._causal_keys(0, 4, 2) == 1 + 2 + 2 + 2
    assert B._causal_keys(2, 2, None) == 3 + 4
    d = B.decode_roofline(c, RATES, 2, 100)
    assert d["ms"] == pytest.approx(max(d["memory_ms"], d["compute_ms"]))
    assert d["bytes"] == pytest.approx(c.weight_bytes(2) + 2 * config.num_layers * 100 * c.kv_bytes_per_layer_token)
    p = B.prefill_roofline(c, RATES, 64)
    assert p["compute_ms"] == pytest.approx(c.prefill_flops(64) / RATES["matmul_flops_per_s"] * 1e3)
    # --quantization: the weights' stored bytes, as the planner counts them (fp8: a byte a weight plus
    # float32 block scales); the KV cache keeps the model's dtype
    from moejax.plan.memory import plan_memory

    f = B.model_costs(config, quantization="fp8")
    assert c.routed_bytes / 2 < f.routed_bytes < c.routed_bytes / 2 * 1.01
    assert f.kv_bytes_per_layer_token == c.kv_bytes_per_layer_token
    assert f.routed_bytes == plan_memory(config, quantization="fp8").weight_bytes_by_kind["routed_experts"]
    requests = [(32, 9), (16, 1), (64, 5), (20, 3)]
    t = B.throughput_bound(c, RATES, requests, concurrency=2)
    assert t["output_tokens"] == 18 and t["total_tokens"] == 18 + 132
    assert t["decode_steps"] >= math.ceil(sum(o - 1 for _, o in requests) / 2)
    assert t["bound_s"] == pytest.approx(t["prefill_s"] + t["decode_s"])
    assert B.throughput_bound(c, RATES, requests, concurrency=8)["decode_steps"] == 8  # the longest request


def test_worker_results_errors_and_timeout():
    emit = "".join(f"print({RESULT_MARK + json.dumps({'a': a})!r}, flush=True); " for a in (1, 2))
    ok = run_worker([sys.executable, "-c", emit], "ok")
    assert ok.result == {"a": 2} and ok.error is None
    crash = run_worker([sys.executable, "-c", emit + "raise MemoryError('out of device memory')"], "crash")
    assert crash.result == {"a": 2} and "exit status 1" in crash.error and "MemoryError" in crash.error
    t0 = time.perf_counter()
    hung = run_worker([sys.executable, "-c", emit + "import time; time.sleep(60)"], "hung", timeout_s=4)
    assert hung.result == {"a": 2} and "timed out" in hung.error and time.perf_counter() - t0 < 30


def test_bench_rooflines_and_transformers_on_cpu(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    text, data = _run(tmp_path, capsys, monkeypatch, "--no-moejax", "--peer-device", "cpu", "--peer-requests", "4")
    assert "rooflines measured in this run on cpu" in text and "| measurement" in text
    r = data["rooflines"]
    assert r["hbm_bytes_per_s"] > 0 and r["matmul_flops_per_s"] > 0 and r["matmul_n"] == 128
    gen, cb = data["transformers_generate"], data["transformers_generate_batch"]
    assert not gen.get("error") and not gen["errors"], gen
    assert set(gen["decode"]) == {"1", "2"} and gen["prefill"]["ms"] > 0 and gen["prefill"]["tokens"] == 64
    assert not cb.get("error") and not cb["errors"], cb
    assert cb["throughput"]["finished"] == 4 and cb["throughput"]["wrong_length"] == 0
    assert cb["throughput"]["output_tokens_per_s"] > 0 and cb["throughput"]["tpot_p50_ms"] is not None
    bounds = data["bounds"]
    assert set(bounds["decode"]) == {"1", "2"} and bounds["throughput"]["output_tokens_per_s"] > 0
    assert bounds["throughput_subset"]["output_tokens"] < bounds["throughput"]["output_tokens"]
    assert _row(data, "decode batch 2, ms/step")["transformers generate"] is not None
    assert _row(data, "decode batch 2, ms/step")["moejax skipped"] == "--no-moejax"
    assert _row(data, "throughput first 4 req: output tok/s")["transformers generate_batch"] > 0
    assert _row(data, "HBM bandwidth")["roofline / bound"] > 0


def test_bench_moejax_end_to_end(tmp_path, capsys, monkeypatch):
    text, data = _run(tmp_path, capsys, monkeypatch, "--no-peer")
    m = data["moejax"]
    assert not m.get("error") and not m["errors"], m
    assert set(m["decode"]) == {"1", "2"} and all(v["ms_per_step"] is not None for v in m["decode"].values())
    assert m["prefill"]["tokens"] == 64 and m["prefill"]["ms"] > 0
    t = m["throughput"]
    assert t["requests"] == t["finished"] == 8 and t["wrong_length"] == 0
    for key in ("output_tokens_per_s", "total_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms"):
        assert t[key] is not None and t[key] >= 0, key
    for phase in ("cold", "warm"):
        assert m["startup"][phase]["startup"]["total_s"] > 0, m["startup"][phase]
    assert "1" in m["host_gaps"]  # on the CPU: a note that there is no device plane
    assert _row(data, "decode batch 1, ms/step")["moejax"] is not None
    assert _row(data, "throughput 8 req")["moejax"] > 0
    assert _row(data, "start-up warm cache")["moejax"] > 0
    assert data["rooflines"]["hbm_bytes_per_s"] > 0 and data["bounds"]["throughput"]["output_tokens_per_s"] > 0
    assert "transformers generate" in text and data["transformers_generate"]["skipped"] == "--no-peer"


def test_bench_layout_flags_reach_the_engine_and_the_header(monkeypatch):
    """--tp/--ep/--pp go to the engine's LLM arguments (checked here, not run: the layouts run on the GPU
    machine), the header names the layout and says the rooflines are one device's; bad sizes are refused."""
    import argparse

    from moejax.bench import generate as G

    p = argparse.ArgumentParser()
    G.add_arguments(p)
    args = p.parse_args(["--pp", "2", "--ep", "2"])
    args.config = CONFIG
    with pytest.raises(ValueError, match="--tp must be positive"):
        G._check(p.parse_args(["--tp", "0"]))
    results = {"model": {"architectures": ["X"], "layers": 2, "params": 1e9, "active_params": 1e8},
               "settings": {"llm": {"max_model_len": 64, "max_num_seqs": 4, "pipeline_parallel_size": 2,
                                    "expert_parallel_size": 2}}}
    text = G.header(results)
    assert "moejax layout: ep2 x pp2; the rooflines and the peer are one device's" in text
    assert G.layout_kwargs(args) == {"pipeline_parallel_size": 2, "expert_parallel_size": 2}
    assert G.layout_kwargs(p.parse_args([])) == {}
