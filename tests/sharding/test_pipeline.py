"""Pipeline stages on 8 virtual CPU devices: the 1-device logits and greedy tokens, each stage's devices holding
only its layers and their KV pools, micro-batches through the stages with collective permutes."""

import collections
import re

import jax
import numpy as np
import pytest

from moejax import LLM
from moejax.models.pipelined import micro_batches
from moejax.sharding.pipeline import split_stages
from tests.hf_models import FAMILIES, make_deepseek, make_gpt_oss
from tests.sharding.conftest import GREEDY, PROMPT

# Small steps and pages: prefill chunks cross micro-batches and pages, decodes split into two micro-batches.
SMALL_STEPS = dict(max_num_batched_tokens=32, page_size=4)
LAYOUTS = {"pp2": (2, 1, 1), "tp4_pp2": (2, 4, 1), "pp2_ep4": (2, 1, 4)}
# Each layout, DeepSeek (MLA, dense and MoE runs) in two of them, the other families in one (CI time is kept
# under 20 minutes; OLMoE's layers are built as Qwen3-MoE's, and DeepSeek at tp4 x pp2 compiles in the test
# after this one).
CASES = [("mixtral", "tp4_pp2"), ("qwen2_moe", "pp2"), ("qwen3_moe", "pp2_ep4"), ("gpt_oss", "pp2"),
         ("deepseek", "pp2"), ("deepseek", "pp2_ep4")]
# For the families built here: a 22-token prompt is one chunk of two prefill blocks, which the step's two
# micro-batches split (the second half attends to the first through the pages).
OWN_PROMPTS = [PROMPT[1:23], PROMPT[:9]]


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


def per_device_bytes(tree):
    out = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


@pytest.fixture(scope="module")
def reference(model_dir, single):
    cache = {}

    def get(family):
        if family in FAMILIES:
            return single(family) + ([PROMPT[:9], PROMPT[4:20]],)
        if family not in cache:
            ref = LLM(model_dir(family))
            outs = ref.generate(prompt_token_ids=OWN_PROMPTS, sampling_params=GREEDY, use_tqdm=False)
            cache[family] = ref.logits(PROMPT), [o.outputs[0].token_ids for o in outs], OWN_PROMPTS
        return cache[family]

    return get


@pytest.mark.parametrize("family, layout", CASES)
def test_pipeline_matches_single_device(model_dir, reference, family, layout):
    ref_logits, ref_tokens, prompts = reference(family)
    pp, tp, ep = LAYOUTS[layout]
    llm = LLM(model_dir(family), pipeline_parallel_size=pp, tensor_parallel_size=tp, expert_parallel_size=ep,
              **SMALL_STEPS)
    logits = llm.logits(PROMPT)
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < 1e-5
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref_tokens
    # every device holds what the planner says: its stage's layer slots, 1 / (pp * tp) of the vocabulary
    sizes = per_device_bytes(llm.runner.params)
    assert set(sizes.values()) == {llm.memory_plan.weight_bytes_per_device}
    assert len(sizes) == pp * tp * ep


def test_stages_hold_only_their_layers_and_pass_micro_batches(model_dir):
    """DeepSeek (1 dense + 2 MoE layers) at pp2: the first stage holds the dense layer and one MoE layer, the
    second one MoE layer and an empty dense slot; each device's pools hold its stage's 2 layer slots. The
    compiled decode step cuts its 4 sequences into 2 micro-batches: 3 iterations of a loop that passes
    activations on with a collective permute."""
    llm = LLM(model_dir("deepseek"), pipeline_parallel_size=2, tensor_parallel_size=4, **SMALL_STEPS)
    runner = llm.runner
    split = runner.stages
    assert split.stages == (range(0, 2), range(2, 3)) and split.slots == (1, 1)
    # unstacked, the stages' slots give back the layers as loaded on one device
    want = jax.tree.leaves(LLM(model_dir("deepseek")).runner.state)
    got = jax.tree.leaves(runner.state)
    assert len(got) == len(want) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))
    # the MoE run's stacked experts: stage 0's devices hold layer 1, stage 1's layer 2, nothing of the other
    experts = runner.params["runs"][1]["moe"]["w_gate"].get_value()
    assert experts.shape[0] == 2 and experts.sharding.spec[0] == "pipeline"
    for shard in experts.addressable_shards:
        assert shard.data.shape[0] == 1
    # the dense run: real on stage 0, zeros on stage 1 (an empty slot)
    dense = runner.params["runs"][0]["mlp"]["gate_proj"]["kernel"].get_value()
    stage_of = {d: s for s in range(2) for d in runner.mesh.devices[s].flat}
    for shard in dense.addressable_shards:
        assert (np.abs(np.asarray(shard.data)).max() > 0) == (stage_of[shard.device] == 0)
    pool = runner.pool.k
    assert pool.shape[0] == 4 and {s.data.shape[0] for s in pool.addressable_shards} == {2}
    assert pool.addressable_shards[0].data.nbytes == llm.memory_plan.kv_bytes_per_token * pool.shape[1] * \
        pool.shape[2]
    from moejax.engine.runner import StepShape

    buf, _ = runner._buffer(StepShape(4, 0))
    with runner._context():
        hlo = runner.step_fn.lower(runner.params, runner.pool, buf, runner._prev, StepShape(4, 0)).compile().as_text()
    assert re.search(r"collective-permute(?:-start)?\(", hlo)
    # the stages' loop: micro-batches + pp - 1 = 3 iterations
    assert re.search(r'known_trip_count":\{"n":"3"', hlo)


def test_micro_batches_and_splits():
    assert micro_batches(4, 0, 2) == 2 and micro_batches(1, 0, 2) == 1 and micro_batches(8, 3, 4) == 1
    assert micro_batches(8, 4, 4) == 4 and micro_batches(6, 0, 4) == 3
    split = split_stages([0] * 3 + [1] * 58, 2, [1] * 3 + [10] * 58)
    assert split.stages == (range(0, 32), range(32, 61)) and split.slots == (3, 29)
    assert split.slot_layers(0) == [[0, 1, 2], [-1, -1, -1]] and split.pool_slot(32) == 3
    assert split_stages([1] * 94, 4).slots == (24,)


def test_bad_pipeline_sizes(model_dir):
    path = model_dir("qwen3_moe")
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="pipeline_parallel_size"):
            LLM(path, pipeline_parallel_size=bad)
    with pytest.raises(ValueError, match="pipeline_parallel_size=64 exceeds num_hidden_layers"):
        LLM(path, pipeline_parallel_size=64)
    with pytest.raises(ValueError, match="offload_experts=True runs on one device"):
        LLM(path, pipeline_parallel_size=2, offload_experts=True)


def test_expert_counts_through_the_stages(model_dir):
    """The server's per-expert counters: each stage counts its own MoE layers (empty slots and idle iterations
    count nothing), and the sum over stages equals one device's counts."""
    from moejax import SamplingParams

    def counts(llm):
        llm.llm_engine.count_experts(True)
        llm.generate(prompt_token_ids=OWN_PROMPTS, use_tqdm=False,
                     sampling_params=SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        return llm.llm_engine.take_expert_counts()

    want, layers = counts(LLM(model_dir("deepseek"), **SMALL_STEPS))
    got, got_layers = counts(LLM(model_dir("deepseek"), pipeline_parallel_size=2, **SMALL_STEPS))
    assert list(got_layers) == list(layers) and want.sum() > 0
    np.testing.assert_array_equal(got, want)


def test_planned_pipeline_bytes_are_what_the_compiled_step_moves(model_dir):
    """The planner's pipeline hand-offs and hidden-state all-reduce (plan/comm.py) against DeepSeek's compiled
    pp2 decode step of 4 sequences (2 micro-batches of 2): a [T, D] collective permute in each of the
    micro-batches + pp - 1 = 3 stage times (the planner's 2 pp - 1), and one all-reduce of both micro-batches'
    hidden states (the planner's one per micro-batch, pp of them a step)."""
    from moejax.engine.runner import StepShape
    from moejax.plan.comm import step_collectives
    from moejax.plan.memory import Mesh
    from tests.sharding.hlo_collectives import collective_bytes

    pp, decodes = 2, 4
    llm = LLM(model_dir("deepseek"), pipeline_parallel_size=pp, dtype="float32", **SMALL_STEPS)
    runner, shape = llm.runner, StepShape(decodes, 0)
    buf, _ = runner._buffer(shape)
    with runner._context():
        hlo = runner.step_fn.lower(runner.params, runner.pool, buf, runner._prev, shape).compile().as_text()
    planned = {c.kind: c for c in step_collectives(llm.config, Mesh(pp=pp), decodes // pp, "float32")}
    assert set(planned) == {"pipeline_send", "pipeline_all_reduce"}  # 97 tokens of vocabulary: not split
    sent, sends = collective_bytes(hlo, "collective-permute")
    send = planned["pipeline_send"]
    assert sends == send.count * (2 * pp - 1) and sent == send.bytes_per_device * sends
    reduced, reduces = collective_bytes(hlo, "all-reduce")
    reduce = planned["pipeline_all_reduce"]
    assert reduces == 1 and reduced * 2 * (pp - 1) / pp == pytest.approx(reduce.bytes_per_device * pp)
    assert collective_bytes(hlo, "all-to-all") == (0, 0) and collective_bytes(hlo, "all-gather") == (0, 0)
