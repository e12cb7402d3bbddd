"""The prompts every engine is timed on, drawn once in the parent from a fixed seed and handed to each worker, so
that moejax and its peers see the same tokens.

NumPy only (no jax): the parent draws it, the workers read it back from JSON.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    vocab_size: int
    batches: tuple[int, ...] = (1, 8, 32, 128)
    decode_prompt_len: int = 128
    prefill_len: int = 4096
    num_requests: int = 1000
    prompt_len_range: tuple[int, int] = (128, 2048)  # inclusive, uniform
    output_len_range: tuple[int, int] = (32, 512)  # inclusive, uniform
    seed: int = 0


def make_workload(spec: WorkloadSpec) -> dict:
    """{"decode": {batch: prompts}, "prefill": prompt, "requests": [{"prompt", "max_tokens"}]}.

    Decode prompts of one batch size are a prefix of the next larger one's, so the smaller batches time the same
    first sequences. Token ids avoid 0..9 (often special tokens) when the vocabulary is large enough.
    """
    rng = np.random.default_rng(spec.seed)
    low = 10 if spec.vocab_size > 100 else 0

    def tokens(n):
        return rng.integers(low, spec.vocab_size, n).tolist()

    widest = max(spec.batches) if spec.batches else 0
    decode_rows = [tokens(spec.decode_prompt_len) for _ in range(widest)]
    prefill = tokens(spec.prefill_len)
    (p_lo, p_hi), (o_lo, o_hi) = spec.prompt_len_range, spec.output_len_range
    prompt_lens = rng.integers(p_lo, p_hi + 1, spec.num_requests)
    output_lens = rng.integers(o_lo, o_hi + 1, spec.num_requests)
    requests = [{"prompt": tokens(int(p)), "max_tokens": int(o)} for p, o in zip(prompt_lens, output_lens)]
    return {
        "spec": dataclasses.asdict(spec),
        "decode": {str(b): decode_rows[:b] for b in spec.batches},
        "prefill": prefill,
        "requests": requests,
    }


def save(workload: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(workload, f, separators=(",", ":"))


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
