"""LLM.generate / chat / logits as a user calls them: stops, sampling, seeds, errors, compile counts."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moejax import LLM, SamplingParams
from tests.hf_models import CHARS, make_hf_model, save_char_tokenizer


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny Qwen3-MoE whose vocabulary is a character tokenizer's."""
    path = str(tmp_path_factory.mktemp("text_model"))
    make_hf_model("qwen3_moe", path, seed=5, eos_token_id=1, vocab_size=len(CHARS) + 2)
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def llm(text_model):
    return LLM(text_model)


def greedy(**kw):
    return SamplingParams(temperature=0, **kw)


def test_text_prompts_round_trip(llm):
    out = llm.generate(["hello world"], greedy(max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert out.prompt == "hello world"
    assert out.prompt_token_ids == tok.encode("hello world")
    completion = out.outputs[0]
    assert len(completion.token_ids) == 8
    assert completion.text == tok.decode(completion.token_ids)
    assert completion.finish_reason == "length" and out.finished


def test_stop_token_ids_and_eos(llm):
    base = llm.generate(["abc"], greedy(max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_at = base.token_ids[4]
    first = base.token_ids.index(stop_at)
    out = llm.generate(["abc"], greedy(max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # The same token declared as eos in generation_config.json stops generation unless ignore_eos.
    llm.eos_token_ids.add(stop_at)
    try:
        eos_out = llm.generate(["abc"], greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
        assert eos_out.token_ids == base.token_ids[: first + 1]
        assert eos_out.finish_reason == "stop" and eos_out.stop_reason is None
        ignored = llm.generate(["abc"], greedy(max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
        assert ignored.token_ids == base.token_ids
    finally:
        llm.eos_token_ids.discard(stop_at)


def test_stop_string_is_cut_from_text(llm):
    base = llm.generate(["xyz"], greedy(max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = base.text[3:5]
    if not stop:
        pytest.skip("model produced too little text")
    out = llm.generate(["xyz"], greedy(max_tokens=12, stop=stop, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.find(stop)]
    assert stop not in out.text


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=10, seed=123, ignore_eos=True)
    alone = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(temperature=0.7, max_tokens=5, seed=9, ignore_eos=True)
    batched = llm.generate(["a longer prompt here", "hello"], [other, params], use_tqdm=False)[1].outputs[0].token_ids
    assert alone == again == batched
    different = llm.generate(["hello"], SamplingParams(temperature=1.0, max_tokens=10, seed=124, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone


def test_top_k_one_is_greedy(llm):
    g = llm.generate(["hello"], greedy(max_tokens=8, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    k1 = llm.generate(["hello"], SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True, seed=3),
                      use_tqdm=False)[0].outputs[0].token_ids
    assert g == k1


def test_n_and_logprobs(llm):
    out = llm.generate(["hi"], SamplingParams(n=3, temperature=1.0, max_tokens=4, logprobs=2, seed=1,
                                              ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.logprobs) == 4
        for token, entry in zip(c.token_ids, c.logprobs):
            assert token in entry and all(v <= 0 for v in entry.values())
        assert c.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(c.token_ids, c.logprobs)), rel=1e-5)
    # Greedy logprobs equal log-softmax of LLM.logits at the same positions.
    g = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=greedy(max_tokens=1, logprobs=0),
                     use_tqdm=False)[0].outputs[0]
    logits = llm.logits([5, 6, 7])[-1].astype(np.float64)
    logsumexp = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    assert g.token_ids[0] == int(np.argmax(logits))
    assert g.cumulative_logprob == pytest.approx(logits.max() - logsumexp, abs=1e-4)


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(max_tokens=3, ignore_eos=True))[0]
    assert out.prompt == "user: hi\nassistant: "
    assert len(out.outputs[0].token_ids) == 3


def test_decode_compiles_once_per_bucket(llm):
    params = greedy(max_tokens=20, ignore_eos=True)
    llm.generate(["warm up"], params, use_tqdm=False)
    before = llm.runner.compilations()
    out = llm.generate(["warm up!"], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 20
    assert llm.runner.compilations() == before  # same buckets: nothing new compiled
    fresh = LLM(llm.model_path)
    fresh.generate(["abc"], params, use_tqdm=False)
    # One prefill variant and one decode variant for this (batch, cache) bucket; 20 tokens do not add more.
    assert fresh.runner.compilations() == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="prompts"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(prompt_token_ids=[[3] * 300], use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate(prompt_token_ids=[[3, 1000]], use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate(use_tqdm=False)


def test_max_tokens_stops_at_max_model_len(text_model):
    small = LLM(text_model, max_model_len=12)
    out = small.generate(prompt_token_ids=[[3] * 8], sampling_params=greedy(max_tokens=50, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float8"), "dtype"),
    (dict(quantization="int3"), "quantization"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
])
def test_bad_llm_arguments(text_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(text_model, **kwargs)


def test_eos_outside_vocabulary(hf_model_dir):
    # OLMoE's config has eos_token_id 50279 with a 97-token vocabulary: it must simply never match.
    llm = LLM(hf_model_dir("olmoe"))
    assert 50279 in llm.eos_token_ids
    out = llm.generate(prompt_token_ids=[[4, 5, 6]], sampling_params=greedy(max_tokens=5), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


def test_sharded_checkpoint_with_index(tmp_path):
    path = make_hf_model("mixtral", str(tmp_path / "m"), seed=2)
    import transformers as tf
    import torch

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    ids = [3, 9, 27, 81, 4]
    np.testing.assert_allclose(LLM(sharded).logits(ids), LLM(path).logits(ids), rtol=0, atol=0)
    # A shard named in the index but missing fails naming it.
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(ValueError, match=victim):
        LLM(sharded)


def test_unsupported_architecture(tmp_path, text_model):
    bad = tmp_path / "bad"
    shutil.copytree(text_model, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["architectures"] = ["LlamaForCausalLM"]
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*supported: .*MixtralForCausalLM"):
        LLM(str(bad))


def test_cli_generate(text_model):
    proc = subprocess.run([sys.executable, "-m", "moejax.cli", "generate", text_model, "--prompt", "hello",
                           "--max-tokens", "5", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hello")
    bad = subprocess.run([sys.executable, "-m", "moejax.cli", "generate", text_model, "--top-p", "2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "top_p" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_kv_pool_that_the_allocator_refuses_is_a_value_error(monkeypatch):
    """The plan can fit while the allocator cannot (fragmentation at the edge of memory): a ValueError naming
    kv_cache_tokens, not the runtime's out-of-memory error."""
    import jax

    from moejax.engine import runner

    def refuse(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 27.47GiB")

    monkeypatch.setattr(runner, "allocate_pool", refuse)
    with pytest.raises(ValueError, match="kv_cache_tokens=4096: the KV cache's .* could not be allocated"):
        LLM(dtype="float32", max_model_len=128, kv_cache_tokens=4096)
