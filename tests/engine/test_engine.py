"""The serving engine as users drive it: continuous batching, preemption, prefix caching, chunked prefill,
llm_engine's request API, bounded compilation and step counts."""

import numpy as np
import pytest

from moejax import LLM, SamplingParams

MAX_LEN = 256


@pytest.fixture(scope="module")
def llm():
    # The embedded trained model in float32: peaked distributions, so greedy ties are no worry.
    return LLM(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=16, max_num_batched_tokens=256)


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def tokens(outputs):
    return [[o.token_ids for o in out.outputs] for out in outputs]


def test_hundreds_of_mixed_requests_with_preemption(llm):
    rng = np.random.default_rng()
    n = 200
    prompts = [rng.integers(3, llm.config.vocab_size, rng.integers(1, MAX_LEN // 2)).tolist() for _ in range(n)]
    params = []
    for i in range(n):
        k = int(rng.integers(1, 24))
        if i % 3 == 0:
            params.append(greedy(k))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_tokens=k, ignore_eos=True,
                                         seed=int(rng.integers(1 << 30))))
        else:
            params.append(SamplingParams(temperature=1.2, min_p=0.05, max_tokens=k, n=2, ignore_eos=True,
                                         seed=int(rng.integers(1 << 30))))
    # A small fraction of what they need together: 8 full-length requests' worth.
    small = LLM(dtype="float32", max_model_len=MAX_LEN, kv_cache_tokens=MAX_LEN * 3, max_num_seqs=16,
                max_num_batched_tokens=256)
    outs = small.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert small.llm_engine.kv_cache_usage() == 0.0
    assert not small.llm_engine.has_unfinished_requests()
    for out, p in zip(outs, params):
        assert out.finished and all(len(o.token_ids) == p.max_tokens for o in out.outputs)
    # Every greedy request alone (in the roomy engine) gives the same tokens, and so does every fourth seeded one.
    checked = [i for i in range(n) if i % 3 == 0 or i % 4 == 1]
    for i in checked:
        alone = llm.generate(prompt_token_ids=[prompts[i]], sampling_params=params[i], use_tqdm=False)[0]
        assert tokens([alone]) == tokens([outs[i]]), i


def test_request_joins_running_batch_and_abort_frees_pages(llm):
    engine = llm.llm_engine
    engine.add_request("long", list(range(10, 40)), greedy(60))
    for _ in range(5):
        engine.step()
    assert engine.kv_cache_usage() > 0
    engine.add_request("short", list(range(50, 60)), greedy(4))
    finished = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
        if finished == ["short"]:
            break
    assert finished == ["short"]
    assert engine.has_unfinished_requests()
    before = engine.kv_cache_usage()
    engine.abort_request("long")
    assert 0.0 == engine.kv_cache_usage() < before
    while engine.has_unfinished_requests():  # the step in flight drains, reporting nothing for "long"
        assert all(o.request_id != "long" for o in engine.step())


def test_streamed_outputs_grow_and_carry_text(llm):
    engine = llm.llm_engine
    engine.add_request("s", llm.get_tokenizer().encode("def "), greedy(12))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append((list(out.outputs[0].token_ids), out.outputs[0].text, out.finished))
    assert [len(t) for t, _, _ in seen] == list(range(1, 13))
    assert seen[-1][2] and not any(f for _, _, f in seen[:-1])
    assert seen[-1][1] == llm.get_tokenizer().decode(seen[-1][0])


def test_prefix_cache_hits_and_equals_uncached(llm):
    rng = np.random.default_rng()
    prefix = rng.integers(3, llm.config.vocab_size, 100).tolist()
    prompts = [prefix + rng.integers(3, llm.config.vocab_size, int(rng.integers(1, 20))).tolist() for _ in range(6)]
    first = llm.generate(prompt_token_ids=prompts[:1], sampling_params=greedy(8), use_tqdm=False)
    later = llm.generate(prompt_token_ids=prompts[1:], sampling_params=greedy(8), use_tqdm=False)
    assert all(out.num_cached_tokens >= 96 for out in later)  # the prefix's 6 full pages of 16
    uncached = LLM(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=16, max_num_batched_tokens=256,
                   enable_prefix_caching=False)
    ref = uncached.generate(prompt_token_ids=prompts, sampling_params=greedy(8), use_tqdm=False)
    assert all(out.num_cached_tokens == 0 for out in ref)
    assert tokens(first + later) == tokens(ref)


def test_long_prompt_prefilled_in_chunks(llm):
    rng = np.random.default_rng()
    prompt = rng.integers(3, llm.config.vocab_size, 200).tolist()
    chunked = LLM(dtype="float32", max_model_len=MAX_LEN, max_num_batched_tokens=64, enable_prefix_caching=False)
    out = chunked.generate(prompt_token_ids=[prompt], sampling_params=greedy(10), use_tqdm=False)
    assert chunked.llm_engine.stats["steps"] >= 4 + 9  # 200 tokens in chunks of at most 64, then decodes
    ref = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy(10), use_tqdm=False)
    assert tokens(out) == tokens(ref)
    # And against the cache-free forward.
    ids = list(prompt)
    for _ in range(10):
        ids.append(int(np.argmax(llm.logits(ids)[-1])))
    assert out[0].outputs[0].token_ids == ids[200:]


def test_compiled_variants_are_bounded_and_nothing_compiles_after_warmup():
    llm = LLM(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=8, max_num_batched_tokens=128)
    shapes = llm.runner.buckets.all_shapes()
    assert len(shapes) <= 16
    assert llm.warmup() == len(shapes) and llm.runner.compilations() == len(shapes)
    rng = np.random.default_rng()
    for _ in range(3):  # a long mixed workload: lengths, batch sizes and chunking all vary
        prompts = [rng.integers(3, 2000, rng.integers(1, 200)).tolist() for _ in range(int(rng.integers(1, 20)))]
        params = [greedy(int(rng.integers(1, 30))) for _ in prompts]
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert llm.runner.compilations() == len(shapes)
    assert llm.runner.unexpected_compilations == 0


def test_step_updates_kv_pool_in_place():
    llm = LLM(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=8, max_num_batched_tokens=128,
              kv_cache_tokens=32 * MAX_LEN)
    runner = llm.runner
    for shape in (runner.buckets.shape(8, 0), runner.buckets.shape(3, 100)):
        assert runner.step_temp_bytes(shape) < runner.pool.nbytes / 2, shape


def test_continuous_batching_in_steps():
    """Short requests join and leave beside long ones: a mixed workload takes about the steps of its long
    requests alone (counted, not timed: static batches of four would take four times as many)."""
    llm = LLM(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=4, max_num_batched_tokens=128)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 2000, 8).tolist() for _ in range(16)]
    lengths = [200 if i % 4 == 0 else 5 for i in range(16)]  # each group of four has one long request
    long_only = [p for p, n in zip(prompts, lengths) if n == 200]
    runner = llm.runner
    launch = runner.launch
    launched = []
    runner.launch = lambda *a, **k: launched.append(1) or launch(*a, **k)

    def steps(ps, ns):
        launched.clear()
        llm.generate(prompt_token_ids=ps, sampling_params=[greedy(n) for n in ns], use_tqdm=False)
        return len(launched)

    alone = steps(long_only, [200] * 4)
    mixed = steps(prompts, lengths)
    assert alone >= 200 and mixed <= 1.25 * alone, (mixed, alone)
