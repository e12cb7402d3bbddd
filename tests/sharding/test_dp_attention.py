"""Data-parallel attention with expert parallelism on 8 virtual CPU devices: each expert rank serves its own
requests from its own KV pages, the MoE layers dispatch with all-to-all, and the outputs are one device's."""

import re

import numpy as np
import pytest

from moejax import LLM, SamplingParams
from moejax.engine.pages import PageAllocator
from moejax.engine.runner import StepShape
from moejax.engine.scheduler import RankedScheduler, Sequence
from tests.hf_models import make_deepseek, make_gpt_oss
from tests.sharding.conftest import PROMPT

SMALL_STEPS = dict(max_num_batched_tokens=32, page_size=4)
# Uneven work: 5 requests of 4 to 22 tokens over up to 8 ranks (some idle throughout), different output lengths,
# so ranks go idle at different steps while the others keep stepping.
PROMPTS = [PROMPT[:9], PROMPT[4:20], PROMPT[1:23], PROMPT[1:5], PROMPT[3:7]]
LENGTHS = [8, 3, 6, 1, 5]


@pytest.fixture(scope="module")
def model_dir(hf_model_dir, tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            if family in ("gpt_oss", "deepseek"):
                path = str(tmp_path_factory.mktemp(family))
                made[family] = (make_gpt_oss if family == "gpt_oss" else make_deepseek)(path)
            else:
                made[family] = hf_model_dir(family)
        return made[family]

    return get


def _greedy(llm):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENGTHS]
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params,
                                                         use_tqdm=False)]


@pytest.mark.parametrize("family, ep", [("deepseek", 8), ("gpt_oss", 2)])
def test_dp_attention_matches_single_device(model_dir, family, ep):
    path = model_dir(family)
    ref = LLM(path)
    want = _greedy(ref)
    llm = LLM(path, expert_parallel_size=ep, enable_dp_attention=True, **SMALL_STEPS)
    assert _greedy(llm) == want
    logits = llm.logits(PROMPT)
    ref_logits = ref.logits(PROMPT)
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < 1e-5
    # every rank's pages came back; the pools' pages are split over the expert ranks, one shard a device
    assert all(p.num_available() == p.usable_pages for p in llm.llm_engine.rank_pages)
    pool = llm.runner.pool.k
    assert pool.sharding.spec[1] == "expert"
    assert {s.data.shape[1] for s in pool.addressable_shards} == {llm.runner.num_pages}


def test_dp_attention_step_has_all_to_all_and_no_all_reduce(model_dir):
    """The compiled step of DeepSeek at ep8 with DP attention: the MoE layers exchange tokens with all-to-all,
    and nothing all-reduces [tokens, hidden] (today's EP would, once per MoE layer)."""
    llm = LLM(model_dir("deepseek"), expert_parallel_size=8, enable_dp_attention=True, **SMALL_STEPS)
    runner = llm.runner
    shape = StepShape(4, 0)
    buf, _ = runner._buffer(shape)
    assert buf.shape[0] == 8  # one row of step inputs a rank
    with runner._context():
        hlo = runner.step_fn.lower(runner.params, runner.pool, buf, runner._prev, shape).compile().as_text()
    assert re.search(r"all-to-all(?:-start)?\(", hlo)
    assert not re.search(r"all-reduce(?:-start)?\(", hlo)
    # the routed experts enter the step split, never gathered: no all-gather of a weight-sized array
    experts = runner.params["runs"][1]["moe"]["w_gate"].get_value()
    assert experts.sharding.spec[1] == "expert"
    for m in re.finditer(r"= \w+\[([\d,]+)\]\S* all-gather\(", hlo):
        assert int(np.prod([int(x) for x in m.group(1).split(",")])) < experts.size


def test_ranked_scheduler_spreads_and_keeps_sequences():
    """New sequences go to the least loaded rank and stay there; each rank allocates from its own pages."""
    ranks = RankedScheduler([PageAllocator(16, 4) for _ in range(3)], max_num_seqs=2, max_num_batched_tokens=32,
                            prefill_block=8)
    seqs = [Sequence(i, f"r{i}", 0, [1, 2, 3], SamplingParams(max_tokens=4), 0, 4) for i in range(5)]
    for s in seqs:
        ranks.add(s)
    assert [ranks.rank_of(s) for s in seqs] == [0, 1, 2, 0, 1]
    step = ranks.schedule()
    assert [len(s.prefills) for s in step.ranks] == [2, 2, 1]
    assert all(p.num_available() < p.usable_pages for p in (r.pages for r in ranks.ranks))
    ranks.finish(seqs[2])
    assert ranks.ranks[2].pages.num_available() == ranks.ranks[2].pages.usable_pages
    assert ranks.schedule().ranks[2] is None  # an idle rank: the runner pads its row


def test_bad_dp_attention_layouts(model_dir):
    path = model_dir("qwen3_moe")
    with pytest.raises(ValueError, match="expert_parallel_size >= 2"):
        LLM(path, enable_dp_attention=True)
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        LLM(path, expert_parallel_size=2, tensor_parallel_size=2, enable_dp_attention=True)
    with pytest.raises(ValueError, match="enable_dp_attention must be True or False"):
        LLM(path, expert_parallel_size=2, enable_dp_attention="yes")
    with pytest.raises(ValueError, match="pipeline_parallel_size and data_parallel_size must be 1"):
        LLM(path, expert_parallel_size=2, pipeline_parallel_size=2, enable_dp_attention=True)


def test_planned_all_to_all_bytes_are_what_the_compiled_step_moves(model_dir):
    """The planner's DP-attention dispatch and combine (plan/comm.py) against the compiled decode step of
    DeepSeek at ep8: the float32 all-to-alls' bytes bound for other ranks, summed over the MoE layers' loop."""
    from moejax.plan.comm import step_collectives
    from moejax.plan.memory import Mesh
    from tests.sharding.hlo_collectives import collective_bytes

    ranks, decodes = 8, 4
    llm = LLM(model_dir("deepseek"), expert_parallel_size=ranks, enable_dp_attention=True, dtype="float32",
              **SMALL_STEPS)
    runner = llm.runner
    shape = StepShape(decodes, 0)
    buf, _ = runner._buffer(shape)
    with runner._context():
        hlo = runner.step_fn.lower(runner.params, runner.pool, buf, runner._prev, shape).compile().as_text()
    moved, runs = collective_bytes(hlo, "all-to-all", "f32")
    (planned,) = [c for c in step_collectives(llm.config, Mesh(ep=ranks, dp_attention=True), ranks * decodes,
                                              "float32") if c.kind == "all_to_all"]
    assert runs == planned.count == 2 * llm.config.num_moe_layers
    assert moved * (ranks - 1) / ranks == pytest.approx(planned.bytes_per_device * planned.count)
