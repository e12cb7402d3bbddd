"""What the measured rooflines allow: decode steps bounded by bytes read, prefill by matmul FLOPs, and the offline
throughput workload as the sum of both.

Costs come from the planner's parameter inventory (`moejax.plan.params`), so they need no model, no weights and no
device: the parent process computes them from the config and the rates the moejax worker measured.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moejax.config import ModelConfig
from moejax.plan.params import inventory

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """Per-token and per-step costs of one model in one dtype."""

    dense_bytes: float  # weights every decode step reads besides the routed experts (lm_head included)
    routed_bytes: float  # all routed expert weights, every MoE layer
    num_experts: int
    top_k: int
    body_params: float  # matmul parameters one token uses, lm_head and embeddings excluded (routed: k of E)
    lm_head_params: float
    num_heads: int
    qk_dim: int  # per head, as the attention's matmuls see it (MLA: nope + rope, naively expanded)
    v_dim: int
    windows: tuple[int | None, ...]  # per layer: sliding window or None
    kv_bytes_per_layer_token: float  # one layer's cache for one token

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct experts per MoE layer for `tokens` tokens under uniform routing: each token picks k
        distinct experts of E, so an expert stays unpicked by one token with probability 1 - k/E."""
        e, k = self.num_experts, self.top_k
        if e == 0 or tokens <= 0:
            return 0.0
        return e * (1 - (1 - k / e) ** tokens)

    def weight_bytes(self, tokens: int) -> float:
        """Weights one step over `tokens` tokens reads: dense weights plus the expected distinct experts."""
        touched = self.experts_touched(tokens) / self.num_experts if self.num_experts else 0.0
        return self.dense_bytes + self.routed_bytes * touched

    def kv_read_bytes(self, context) -> np.ndarray | float:
        """Cache bytes one query token reads over all layers with `context` keys (sliding layers read their window)."""
        ctx = np.asarray(context, dtype=np.float64)
        keys = sum(ctx if w is None else np.minimum(ctx, w) for w in self.windows)
        return keys * self.kv_bytes_per_layer_token

    def attention_flops(self, start: int, count: int) -> float:
        """Score and value matmul FLOPs of `count` consecutive causal queries at positions start.., all layers."""
        per_key = 2 * self.num_heads * (self.qk_dim + self.v_dim)
        return per_key * sum(_causal_keys(start, count, w) for w in self.windows)

    def prefill_flops(self, prompt_len: int) -> float:
        """Matmul FLOPs of one prompt's prefill: every token through the body, the last one through the lm_head."""
        return 2 * self.body_params * prompt_len + 2 * self.lm_head_params + self.attention_flops(0, prompt_len)

    def decode_flops(self, context) -> float:
        return 2 * (self.body_params + self.lm_head_params) + self.attention_flops(int(context) - 1, 1)


def _causal_keys(start: int, count: int, window: int | None) -> float:
    """sum over query positions i in [start, start + count) of min(i + 1, window)."""

    def upto(n):  # sum over i in [0, n) of min(i + 1, window)
        if window is None or n <= window:
            return n * (n + 1) / 2
        return window * (window + 1) / 2 + (n - window) * window

    return upto(start + count) - upto(start)


def model_costs(config: ModelConfig, dtype: str = "bfloat16", quantization: str | None = None) -> ModelCosts:
    """quantization: the weights' stored form (int8, int4, fp8): their bytes as the planner counts them."""
    from moejax.kernels.quant import fp8_block
    from moejax.plan.memory import stored_arrays

    c = config
    elem = DTYPE_BYTES[dtype]
    dense = routed = body = 0.0
    routed_params = 0
    for t in inventory(c):
        nbytes = sum(math.prod(shape) * size for shape, size in stored_arrays(t, dtype, quantization, fp8_block(c)))
        if t.kind == "embeddings":
            continue  # a lookup of a few rows, not a read of the table
        if t.kind == "routed_experts":
            routed += nbytes
            routed_params += t.size if len(t.shape) == 3 else 0
            continue
        dense += nbytes
        if t.kind != "lm_head" and len(t.shape) >= 2:
            body += t.size
    lm_head = c.vocab_size * c.hidden_size
    if c.tie_word_embeddings:
        dense += lm_head * elem  # the tied table is read whole as the lm_head
    if c.num_experts:
        body += routed_params * c.num_experts_per_tok / c.num_experts
    if c.is_mla:
        qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        kv = (c.kv_lora_rank + c.qk_rope_head_dim) * elem
    else:
        qk = v = c.head_dim
        kv = 2 * c.num_kv_heads * c.head_dim * elem
    return ModelCosts(dense_bytes=dense, routed_bytes=routed, num_experts=c.num_experts,
                      top_k=c.num_experts_per_tok, body_params=body, lm_head_params=lm_head,
                      num_heads=c.num_heads, qk_dim=qk, v_dim=v,
                      windows=tuple(c.window(i) for i in range(c.num_layers)), kv_bytes_per_layer_token=kv)


def decode_roofline(costs: ModelCosts, rates: dict, batch: int, context: float) -> dict:
    """One decode step of `batch` sequences with `context` keys each: bytes / bandwidth vs FLOPs / matmul rate."""
    nbytes = costs.weight_bytes(batch) + batch * float(costs.kv_read_bytes(context))
    flops = batch * costs.decode_flops(context)
    memory_ms = nbytes / rates["hbm_bytes_per_s"] * 1e3
    compute_ms = flops / rates["matmul_flops_per_s"] * 1e3
    return {"ms": max(memory_ms, compute_ms), "memory_ms": memory_ms, "compute_ms": compute_ms,
            "bytes": nbytes, "flops": flops, "experts_touched": costs.experts_touched(batch), "context": context}


def prefill_roofline(costs: ModelCosts, rates: dict, prompt_len: int) -> dict:
    """One prompt's prefill: its matmul FLOPs at the matmul rate (the compute floor) vs reading the weights once."""
    flops = costs.prefill_flops(prompt_len)
    compute_ms = flops / rates["matmul_flops_per_s"] * 1e3
    memory_ms = costs.weight_bytes(prompt_len) / rates["hbm_bytes_per_s"] * 1e3
    return {"ms": max(compute_ms, memory_ms), "compute_ms": compute_ms, "memory_ms": memory_ms, "flops": flops}


def throughput_bound(costs: ModelCosts, rates: dict, requests: list[tuple[int, int]], concurrency: int) -> dict:
    """Lower bound on the wall time of an offline run: prefill compute plus decode bytes, done one after the other.

    requests: (prompt_len, output_len) in arrival order. Prefill: every prompt's FLOPs at the matmul rate (it also
    yields each request's first token). Decode: a first-come, first-served schedule with `concurrency` slots
    (max_num_seqs); every step reads the dense weights, the experts its batch touches and each sequence's KV, at
    the measured bandwidth (or its FLOPs at the matmul rate, whichever is longer).
    """
    bw, rate = rates["hbm_bytes_per_s"], rates["matmul_flops_per_s"]
    prefill_s = sum(costs.prefill_flops(p) for p, _ in requests) / rate
    per_token_flops = 2 * (costs.body_params + costs.lm_head_params)
    queue = [(p, o - 1) for p, o in requests if o > 1]  # decode tokens after the first
    ctx = np.zeros(0)
    left = np.zeros(0, dtype=np.int64)
    nxt = steps = 0
    decode_s = 0.0
    while nxt < len(queue) or len(left):
        room = concurrency - len(left)
        if room > 0 and nxt < len(queue):
            take = queue[nxt : nxt + room]
            nxt += len(take)
            ctx = np.concatenate([ctx, [p + 1 for p, _ in take]])  # prompt + the first token's key
            left = np.concatenate([left, [d for _, d in take]])
        b = len(left)
        nbytes = costs.weight_bytes(b) + float(np.sum(costs.kv_read_bytes(ctx)))
        flops = b * per_token_flops
        decode_s += max(nbytes / bw, flops / rate)
        steps += 1
        ctx = ctx + 1
        left = left - 1
        keep = left > 0
        ctx, left = ctx[keep], left[keep]
    out = sum(o for _, o in requests)
    total = out + sum(p for p, _ in requests)
    bound = prefill_s + decode_s
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps, "bound_s": bound,
            "concurrency": concurrency, "output_tokens": out, "total_tokens": total,
            "output_tokens_per_s": out / bound if bound else None,
            "total_tokens_per_s": total / bound if bound else None}
