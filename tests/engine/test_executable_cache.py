"""Warm starts: step executables stored by one engine load in the next without tracing, and give its tokens."""

import os

import numpy as np
import pytest

from moejax import LLM, SamplingParams
from moejax.engine import executable_cache

KW = dict(dtype="float32", max_model_len=128, max_num_seqs=2, max_num_batched_tokens=64,
          enable_prefix_caching=False)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    where = str(tmp_path / "steps")
    monkeypatch.setattr(executable_cache, "directory", lambda: where)
    return where


class NoTracing:
    def _cache_size(self):
        return 0

    def __call__(self, *args, **kwargs):
        raise AssertionError("the step was traced")

    lower = __call__


def run(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in out]


def test_second_engine_loads_every_step_and_matches(cache_dir):
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 1000, int(rng.integers(1, 60))).tolist() for _ in range(5)]
    first = LLM(**KW)
    n = first.warmup()
    assert first.runner.warmup_stats["loaded"] == 0 and first.runner.warmup_stats["lowered"] == n
    assert len(os.listdir(cache_dir)) == n
    expected = run(first, prompts)

    second = LLM(**KW)
    second.runner.step_fn = NoTracing()  # every shape must come from the cache
    assert second.warmup() == n
    assert second.runner.warmup_stats == {**second.runner.warmup_stats, "loaded": n, "lowered": 0}
    assert run(second, prompts) == expected
    assert second.runner.compilations() == n and second.runner.unexpected_compilations == 0


def test_a_different_program_misses_and_a_broken_file_recompiles(cache_dir, monkeypatch):
    LLM(**KW).warmup()
    monkeypatch.setenv("MOEJAX_PREFILL_TILES", "32,32,4,2")  # a kernel setting is part of the key
    tiles = LLM(**KW)
    tiles.warmup()
    assert tiles.runner.warmup_stats["loaded"] == 0
    monkeypatch.delenv("MOEJAX_PREFILL_TILES")
    for name in os.listdir(cache_dir):
        with open(os.path.join(cache_dir, name), "r+b") as f:
            f.truncate(100)
    broken = LLM(**KW)
    n = broken.warmup()
    assert broken.runner.warmup_stats["loaded"] == 0 and broken.runner.warmup_stats["lowered"] == n
    assert run(broken, [[5, 6, 7]])[0]
