"""The communication model and the layout ranking of `moejax plan --devices N`: per-device collective bytes
against the ring formulas worked by hand, links by node, and the rankings the project's documents describe."""

import json

import pytest

from moejax.cli import main
from moejax.config import ModelConfig
from moejax.known_models import resolve
from moejax.plan.comm import (FEW_SEQUENCES, NOT_IN_MEMORY, Links, candidate_meshes, estimate, rank_layouts,
                               step_collectives)
from moejax.plan.memory import GIB, Mesh


def _config(name):
    return ModelConfig.from_file(resolve(name))


def _by_kind(collectives):
    return {c.kind: c for c in collectives}


def test_tensor_parallel_all_reduces_follow_the_ring_formula():
    c = _config("qwen3-30b-a3b")  # 48 MoE layers, no shared expert, hidden 2048
    tokens = 64
    got = _by_kind(step_collectives(c, Mesh(tp=4), tokens))
    row = tokens * c.hidden_size * 2
    tp = got["tp_all_reduce"]
    assert tp.count == 48 + 1  # after attention in every layer, and the embedding
    assert tp.bytes_per_device == pytest.approx(2 * 3 / 4 * row)
    # the routed experts' width is split over tp: their combine is one more all-reduce per MoE layer
    assert got["moe_all_reduce"].count == 48 and got["moe_all_reduce"].axes == ("tp",)
    assert got["logits_all_gather"].bytes_per_device == pytest.approx(3 / 4 * tokens * c.vocab_size * 4)
    assert "all_to_all" not in got and "pipeline_send" not in got


def test_dp_attention_dispatches_with_all_to_all_and_no_all_reduce():
    c = _config("deepseek-v3")
    tokens, ep = 256, 16
    got = _by_kind(step_collectives(c, Mesh(ep=ep, dp_attention=True), tokens))
    assert set(got) == {"all_to_all"}
    per_rank = tokens / ep
    want = per_rank * c.num_experts_per_tok * c.hidden_size * 2 * (ep - 1)  # dense buffers, as the engine sends
    assert got["all_to_all"].bytes_per_device == pytest.approx(want)
    assert got["all_to_all"].count == 2 * c.num_moe_layers  # dispatch and combine
    # today's EP instead replicates the tokens and all-reduces [T, D] over the expert ranks once per MoE layer
    plain = _by_kind(step_collectives(c, Mesh(ep=ep), tokens))
    assert set(plain) == {"moe_all_reduce"}
    assert plain["moe_all_reduce"].bytes_per_device == pytest.approx(2 * (ep - 1) / ep * tokens * c.hidden_size * 2)


def test_deepseek_tp8_counts_dense_and_shared_expert_all_reduces():
    c = _config("deepseek-v3")  # 61 layers: 3 dense, 58 MoE with a shared expert
    got = _by_kind(step_collectives(c, Mesh(tp=8), 32))
    assert got["tp_all_reduce"].count == 61 + 3 + 58 + 1
    assert got["moe_all_reduce"].count == 58
    # pp2 stages hold layers 0-31 (3 dense, 29 MoE) and 32-60 (29 MoE): 32 + 3 + 29 tp all-reduces and a
    # hand-off against 29 + 29; a device counts the first. The vocabulary is split over all 8 devices on both.
    staged = _by_kind(step_collectives(c, Mesh(tp=4, pp=2), 32))
    assert staged["moe_all_reduce"].count == 29 and staged["tp_all_reduce"].count == 32 + 3 + 29
    assert staged["logits_all_gather"].axes == ("pp", "tp") and "pipeline_send" in staged
    assert staged["vocab_all_reduce"].axes == ("pp", "tp") and "pipeline_all_reduce" in staged


def test_collectives_that_span_nodes_use_the_inter_node_link():
    c = _config("deepseek-v3")
    got = _by_kind(step_collectives(c, Mesh(tp=8, ep=2), 64, links=Links(node_devices=8)))
    assert got["tp_all_reduce"].link == "intra"  # tp is innermost: eight neighbours
    assert got["moe_all_reduce"].link == "inter"  # over ep x tp: all sixteen
    # without tensor parallelism only the first stage communicates: its hand-off to the second, eight devices on
    piped = _by_kind(step_collectives(c, Mesh(dp=8, pp=2), 3))
    assert piped["pipeline_send"].link == "inter" and piped["pipeline_send"].bytes_per_device == 3 * c.hidden_size * 2
    assert _by_kind(step_collectives(c, Mesh(dp=2, pp=2), 3))["pipeline_send"].link == "intra"  # 4 of 8


def test_a_pipeline_step_costs_three_stage_times_of_half_the_weights():
    # 256 sequences touch every expert, a short context: the step reads the weights; pp2 reads half per
    # stage, for 2 pp - 1 = 3 stage times of one micro-batch each
    c = _config("qwen3-30b-a3b")
    kw = dict(batch=256, context=16, max_model_len=4096, device_memory_bytes=141 * GIB)
    one, piped = estimate(c, Mesh(), **kw), estimate(c, Mesh(pp=2), **kw)
    assert one.fits and piped.fits
    assert 1.4 < piped.step_s / one.step_s < 1.6
    assert piped.read_bytes_per_device < 0.55 * one.read_bytes_per_device


def test_a_slower_link_makes_the_same_layout_slower():
    c = _config("qwen3-30b-a3b")
    fast = estimate(c, Mesh(tp=8), batch=64, context=1024, links=Links(intra_gbps=3600))
    slow = estimate(c, Mesh(tp=8), batch=64, context=1024, links=Links(intra_gbps=100))
    assert slow.step_s > fast.step_s and slow.comm_bytes_per_device == fast.comm_bytes_per_device


def test_candidates_respect_the_engine_rules():
    c = _config("qwen3-235b-a22b")  # 64 heads, 128 experts
    meshes = candidate_meshes(c, 8)
    assert all(m.devices == 8 for m in meshes)
    assert Mesh(tp=4, pp=2) in meshes and Mesh(ep=8, dp_attention=True) in meshes
    assert Mesh(tp=8, expert_over_tp=True) in meshes
    assert not any(m.dp_attention and m.tp > 1 for m in meshes)
    assert len(set(meshes)) == len(meshes)


def test_deepseek_on_16_gpus_dp_attention_holds_the_most_tokens_and_pays_its_dense_all_to_all():
    ranked, left_out = rank_layouts(_config("deepseek-v3"), 16, batch=256, context=2048, dtype="fp8",
                                    device_memory_bytes=80 * GIB, max_model_len=8192)
    assert left_out.get(NOT_IN_MEMORY, 0) > 0  # e.g. every layout with a whole replica per 80 GB GPU
    # MLA's one latent is replicated by tensor parallelism: DP attention holds far more tokens than TP8 x EP2
    dpa = next(e for e in ranked if e.mesh == Mesh(ep=16, dp_attention=True))
    tp8 = next(e for e in ranked if e.mesh == Mesh(tp=8, ep=2))
    assert dpa.plan.kv_cache_tokens > 4 * tp8.plan.kv_cache_tokens
    # but the engine's all-to-all sends dense buffers (a slot per assignment towards each of the 15 other
    # ranks), more bytes than TP8 x EP2's all-reduces: ranked below it until a ragged all-to-all replaces them
    assert dpa.comm_bytes_per_device > tp8.comm_bytes_per_device
    assert ranked.index(tp8) < ranked.index(dpa)


def test_ranking_follows_the_node_size_and_the_batch():
    c = _config("qwen3-30b-a3b")
    kw = dict(batch=64, context=1024, max_model_len=4096)
    wide, _ = rank_layouts(c, 8, **kw)
    narrow, _ = rank_layouts(c, 8, links=Links(node_devices=4), **kw)
    assert max(e.mesh.tp for e in wide) == 8 and max(e.mesh.tp for e in narrow) == 4
    # one sequence cannot keep several replicas busy: those layouts are left out, and said why
    single, left_out = rank_layouts(c, 8, batch=1, context=1024, max_model_len=4096)
    assert single and all(e.mesh.dp == 1 for e in single) and left_out[FEW_SEQUENCES] > 0


def test_plan_devices_prints_the_ranking_and_its_json(capsys):
    args = ["plan", "qwen3-235b-a22b", "--devices", "8", "--dtype", "fp8", "--gpu-memory", "48",
            "--max-model-len", "8192"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "tp4 x pp2" in text and "most estimated decode tokens/s first" in text
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    layouts = out["layouts"]
    assert layouts and all(entry["fits"] for entry in layouts)
    names = [entry["layout"] for entry in layouts]
    assert "tp4 x pp2" in names and "dp8" not in names  # a whole FP8 replica per GPU (236 GB) does not fit 48 GB
    assert out["weight_bytes_per_device"] == layouts[0]["weight_bytes_per_device"] and out["fits"]
    assert {"comm_bytes_per_device", "step_ms", "tokens_per_s", "comm_by_kind"} <= set(layouts[0])


def test_a_single_layout_reports_its_communication(capsys):
    assert main(["plan", "qwen3-30b-a3b", "--tp", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    comm = out["communication"]
    assert comm["comm_by_kind"]["tp_all_reduce"] > 0 and "weight_bytes_per_device" in out
    assert main(["plan", "qwen3-30b-a3b", "--tp", "2"]) == 0
    assert "communication per device" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--devices", "0"], "--devices must be a positive integer"),
    (["--tp", "2", "--devices", "8"], "the layout given uses 2 devices"),
    (["--link-gbps", "0"], "--link-gbps must be positive"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--context", "100000", "--max-model-len", "4096"], "--context 100000 exceeds the longest sequence"),
    (["--devices", "4", "--dtype", "bogus"], "dtype must be one of"),
])
def test_bad_layout_arguments_are_refused(extra, message, capsys):
    assert main(["plan", "qwen3-30b-a3b", *extra]) != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("layout", [dict(tp=2), dict(ep=4)])
def test_planned_all_reduces_are_what_the_compiled_step_moves(hf_model_dir, layout):
    """The planner's all-reduces of a decode step (tensor parallelism's per layer, expert parallelism's combine)
    against the engine's compiled step on virtual devices: the same number, the same ring bytes (the tiny
    model's 97-token vocabulary does not split, so the embedding needs none and the logits no gather)."""
    from moejax import LLM
    from moejax.engine.runner import StepShape
    from tests.sharding.hlo_collectives import collective_bytes

    mesh = Mesh(**layout)
    llm = LLM(hf_model_dir("qwen3_moe"), tensor_parallel_size=mesh.tp, expert_parallel_size=mesh.ep,
              dtype="float32", max_num_batched_tokens=32, page_size=4)
    runner, shape = llm.runner, StepShape(4, 0)
    buf, _ = runner._buffer(shape)
    with runner._context():
        hlo = runner.step_fn.lower(runner.params, runner.pool, buf, runner._prev, shape).compile().as_text()
    moved, runs = collective_bytes(hlo, "all-reduce")
    planned = [c for c in step_collectives(llm.config, mesh, 4, "float32") if "all_reduce" in c.kind]
    assert runs == sum(c.count for c in planned) > 0
    group = mesh.tp * mesh.ep
    assert moved * 2 * (group - 1) / group == pytest.approx(sum(c.bytes_per_device * c.count for c in planned))
    assert collective_bytes(hlo, "all-gather") == (0, 0) and not any(c.kind == "logits_all_gather" for c in
                                                                   step_collectives(llm.config, mesh, 4))
