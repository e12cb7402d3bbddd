"""Parameter inventory of a model from its ModelConfig alone: every tensor moejax allocates, with its kind,
shape, logical axes and whether weight-only quantization applies to it.

This mirrors the NNX modules exactly (a test checks it against `build_abstract` for every family that has a
model), and also covers what only the planner needs before a model exists (MLA attention).
"""

from __future__ import annotations

import dataclasses

from moejax.config import ModelConfig

KINDS = ("embeddings", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms", "lm_head")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    path: tuple
    kind: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    quantizable: bool = False  # a linear weight that int8/int4 (and fp8 checkpoints) store quantized
    float32: bool = False  # kept in float32 whatever the model dtype (DeepSeek's correction bias)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _linear(path, kind, d_in, d_out, axes, bias=False, quantizable=True):
    out = [TensorSpec((*path, "kernel"), kind, (d_in, d_out), axes, quantizable)]
    if bias:
        out.append(TensorSpec((*path, "bias"), kind, (d_out,), axes[1:]))
    return out


def _norm(path, kind, width, axis):
    return [TensorSpec((*path, "weight"), kind, (width,), (axis,))]


def _mlp(path, kind, d, f):
    return (_linear((*path, "gate_proj"), kind, d, f, ("embed", "mlp"))
            + _linear((*path, "up_proj"), kind, d, f, ("embed", "mlp"))
            + _linear((*path, "down_proj"), kind, f, d, ("mlp", "embed")))


def _gqa_attention(c: ModelConfig, p: tuple) -> list[TensorSpec]:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    a = (*p, "attn")
    out = (_linear((*a, "q_proj"), "attention", c.hidden_size, q, ("embed", "q_heads"), c.attention_bias)
           + _linear((*a, "k_proj"), "attention", c.hidden_size, kv, ("embed", "kv_heads"), c.attention_bias)
           + _linear((*a, "v_proj"), "attention", c.hidden_size, kv, ("embed", "kv_heads"), c.attention_bias)
           + _linear((*a, "o_proj"), "attention", q, c.hidden_size, ("q_heads", "embed"), c.o_bias))
    if c.qk_norm == "head":
        out += _norm((*a, "q_norm"), "norms", c.head_dim, "head_dim") + _norm((*a, "k_norm"), "norms", c.head_dim,
                                                                              "head_dim")
    elif c.qk_norm == "full":
        out += _norm((*a, "q_norm"), "norms", q, "q_heads") + _norm((*a, "k_norm"), "norms", kv, "kv_heads")
    if c.attention_sinks:
        out.append(TensorSpec((*a, "sinks"), "attention", (c.num_heads,), ("heads",)))
    return out


def _mla_attention(c: ModelConfig, p: tuple) -> list[TensorSpec]:
    a = (*p, "attn")
    h, d = c.num_heads, c.hidden_size
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    out = []
    if c.q_lora_rank:
        out += _linear((*a, "q_a_proj"), "attention", d, c.q_lora_rank, ("embed", "latent"))
        out += _norm((*a, "q_a_norm"), "norms", c.q_lora_rank, "latent")
        out += _linear((*a, "q_b_proj"), "attention", c.q_lora_rank, h * qk, ("latent", "q_heads"))
    else:
        out += _linear((*a, "q_proj"), "attention", d, h * qk, ("embed", "q_heads"))
    out += _linear((*a, "kv_a_proj"), "attention", d, c.kv_lora_rank + c.qk_rope_head_dim, ("embed", "latent"))
    out += _norm((*a, "kv_a_norm"), "norms", c.kv_lora_rank, "latent")
    out += _linear((*a, "kv_b_proj"), "attention", c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim),
                   ("latent", "q_heads"))
    out += _linear((*a, "o_proj"), "attention", h * c.v_head_dim, d, ("q_heads", "embed"))
    return out


def _moe(c: ModelConfig, p: tuple) -> list[TensorSpec]:
    m = (*p, "moe")
    e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
    out = _linear((*m, "router"), "router", d, e, ("embed", "router"), c.router_bias, quantizable=False)
    if c.correction_bias:
        out.append(TensorSpec((*m, "correction_bias"), "router", (e,), ("router",), float32=True))
    out += [
        TensorSpec((*m, "w_gate"), "routed_experts", (e, d, f), ("experts", "embed", "expert_mlp"), True),
        TensorSpec((*m, "w_up"), "routed_experts", (e, d, f), ("experts", "embed", "expert_mlp"), True),
        TensorSpec((*m, "w_down"), "routed_experts", (e, f, d), ("experts", "expert_mlp", "embed"), True),
    ]
    if c.expert_bias:
        out += [TensorSpec((*m, "b_gate"), "routed_experts", (e, f), ("experts", "expert_mlp")),
                TensorSpec((*m, "b_up"), "routed_experts", (e, f), ("experts", "expert_mlp")),
                TensorSpec((*m, "b_down"), "routed_experts", (e, d), ("experts", "embed"))]
    if c.shared_expert_intermediate_size:
        out += _mlp((*m, "shared"), "shared_experts", d, c.shared_expert_intermediate_size)
    if c.shared_expert_gate:
        out += _linear((*m, "shared_gate"), "shared_experts", d, 1, ("embed", None), quantizable=False)
    return out


def inventory(config: ModelConfig) -> list[TensorSpec]:
    """Every parameter tensor of the model, in moejax's layout."""
    c = config
    out = [TensorSpec(("embed", "embedding"), "embeddings", (c.vocab_size, c.hidden_size), ("vocab", "embed"))]
    for i in range(c.num_layers):
        p = ("layers", i)
        out += _norm((*p, "input_norm"), "norms", c.hidden_size, "embed")
        out += _mla_attention(c, p) if c.is_mla else _gqa_attention(c, p)
        out += _norm((*p, "post_attn_norm"), "norms", c.hidden_size, "embed")
        out += _moe(c, p) if c.moe_layers[i] else _mlp((*p, "mlp"), "dense_mlp", c.hidden_size, c.intermediate_size)
    out += _norm(("norm",), "norms", c.hidden_size, "embed")
    if not c.tie_word_embeddings:
        out += _linear(("lm_head",), "lm_head", c.hidden_size, c.vocab_size, ("embed", "vocab"), quantizable=False)
    return out


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    by_kind: dict[str, int]
    total: int
    active: int  # parameters used per token, input embedding table included (Qwen, Mixtral, DeepSeek count so)
    active_without_embeddings: int  # the input embedding table excluded, lm_head included (OpenAI counts so)


def count_params(config: ModelConfig) -> ParamCounts:
    by_kind = {k: 0 for k in KINDS}
    for t in inventory(config):
        by_kind[t.kind] += t.size
    total = sum(by_kind.values())
    routed_active = by_kind["routed_experts"] * config.num_experts_per_tok // max(config.num_experts, 1)
    active = total - by_kind["routed_experts"] + routed_active
    return ParamCounts(by_kind, total, active, active - by_kind["embeddings"])
