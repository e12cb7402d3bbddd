"""One normalized, frozen model configuration parsed from a Hugging Face config.json.

Every family's spelling of the same fact (Hub-style keys, transformers-5 keys, per-family names for the expert
count or width) is resolved here once; the rest of moejax reads only `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

# HF `architectures[0]` -> moejax family name.
ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v3",
    "GptOssForCausalLM": "gpt_oss",
}
MODEL_TYPES = {
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "olmoe": "olmoe",
    "deepseek_v3": "deepseek_v3",
    "deepseek_v2": "deepseek_v3",
    "gpt_oss": "gpt_oss",
}


class ConfigError(ValueError):
    """A config.json that moejax cannot run: names the file and the key."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency and optional YaRN / linear scaling."""

    theta: float = 10000.0
    kind: str = "default"  # "default" | "linear" | "yarn"
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    interleaved: bool = False  # DeepSeek rotates adjacent pairs; everyone else rotates halves.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model, loader, planner and engine need to know about one MoE model."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # width of dense MLP layers
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int  # width of one routed expert
    moe_layers: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Attention.
    attention_bias: bool = False  # q/k/v projections carry a bias
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    layer_types: tuple[str, ...] = ()  # per layer: "full" | "sliding"
    sliding_window: int | None = None
    attention_sinks: bool = False
    # MLA (DeepSeek); kv_lora_rank 0 means ordinary GQA attention.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Routing.
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # GPT-OSS: router logits carry a bias
    correction_bias: bool = False  # DeepSeek noaux_tc: e_score_correction_bias for selection
    # Shared experts: total width (0 if none) and whether a sigmoid gate scales them (Qwen2-MoE).
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    expert_bias: bool = False  # GPT-OSS experts carry biases
    swiglu_limit: float | None = None  # GPT-OSS clamped activation
    # Tokens.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Checkpoint.
    dtype: str = "bfloat16"
    checkpoint_quant: str | None = None  # None | "fp8" | "mxfp4"
    fp8_block_size: tuple[int, int] = (128, 128)
    num_mtp_layers: int = 0

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def q_head_dim(self) -> int:
        """Width of one query/key head as seen by the attention scores."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def softmax_scale(self) -> float:
        scale = self.q_head_dim**-0.5
        if self.is_mla and self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    def window(self, layer: int) -> int | None:
        """Sliding-window size of `layer`, or None for full attention."""
        if self.layer_types and self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

    # -- parsing -------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Parse a config.json file (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        return _parse(dict(data), source)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def _parse(d: dict[str, Any], source: str) -> ModelConfig:
    family = _family(d, source)

    def req(*keys: str) -> Any:
        for k in keys:
            if d.get(k) is not None:
                return d[k]
        raise ConfigError(f"{source}: missing required key {keys[0]!r} for {family}")

    def opt(default: Any, *keys: str) -> Any:
        for k in keys:
            if d.get(k) is not None:
                return d[k]
        return default

    hidden = int(req("hidden_size"))
    num_layers = int(req("num_hidden_layers"))
    num_heads = int(req("num_attention_heads"))
    num_kv_heads = int(opt(num_heads, "num_key_value_heads"))
    head_dim = int(opt(hidden // num_heads, "head_dim"))
    num_experts = int(req("num_local_experts", "num_experts", "n_routed_experts"))
    top_k = int(req("num_experts_per_tok", "experts_per_token"))
    if top_k > num_experts:
        raise ConfigError(f"{source}: num_experts_per_tok={top_k} exceeds the {num_experts} experts")
    intermediate = int(opt(0, "intermediate_size"))
    moe_width = int(opt(intermediate, "moe_intermediate_size"))
    eos = opt((), "eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    num_mtp = 0

    kw: dict[str, Any] = {}
    moe_layers = [True] * num_layers
    layer_types: list[str] = []
    sliding_window = None

    if family in ("qwen2_moe", "qwen3_moe"):
        mlp_only = set(opt([], "mlp_only_layers"))
        step = int(opt(1, "decoder_sparse_step"))
        moe_layers = [(i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]
        kw["norm_topk_prob"] = bool(opt(False, "norm_topk_prob"))
        if opt(False, "use_sliding_window") and d.get("sliding_window"):
            sliding_window = int(d["sliding_window"])
            if family == "qwen2_moe":
                max_window = int(opt(num_layers, "max_window_layers"))
                layer_types = ["sliding" if (i + 1) % 2 and i < max_window else "full" for i in range(num_layers)]
            else:
                layer_types = ["sliding"] * num_layers
        if family == "qwen2_moe":
            kw["attention_bias"] = bool(opt(True, "qkv_bias"))
            kw["shared_expert_intermediate_size"] = int(opt(0, "shared_expert_intermediate_size"))
            kw["shared_expert_gate"] = kw["shared_expert_intermediate_size"] > 0
        else:
            kw["attention_bias"] = bool(opt(False, "attention_bias"))
            kw["o_bias"] = kw["attention_bias"]
            kw["qk_norm"] = "head"
    elif family == "mixtral":
        kw["norm_topk_prob"] = True
        if d.get("sliding_window"):
            sliding_window = int(d["sliding_window"])
            layer_types = ["sliding"] * num_layers
    elif family == "olmoe":
        kw["norm_topk_prob"] = bool(opt(False, "norm_topk_prob"))
        kw["attention_bias"] = kw["o_bias"] = bool(opt(False, "attention_bias"))
        kw["qk_norm"] = "full"
        kw["clip_qkv"] = opt(None, "clip_qkv")
    elif family == "deepseek_v3":
        first_dense = int(opt(0, "first_k_dense_replace"))
        freq = int(opt(1, "moe_layer_freq"))
        moe_layers = [i >= first_dense and i % freq == 0 for i in range(num_layers)]
        kw.update(
            q_lora_rank=int(opt(0, "q_lora_rank")),
            kv_lora_rank=int(req("kv_lora_rank")),
            qk_nope_head_dim=int(req("qk_nope_head_dim")),
            qk_rope_head_dim=int(req("qk_rope_head_dim")),
            v_head_dim=int(req("v_head_dim")),
            # V3 routes with sigmoid scores (transformers 5 saves scoring_func as null); V2 with softmax.
            scoring_func=str(opt("softmax" if d.get("model_type") == "deepseek_v2" else "sigmoid", "scoring_func")),
            norm_topk_prob=bool(opt(False, "norm_topk_prob")),
            n_group=int(opt(1, "n_group")),
            topk_group=int(opt(1, "topk_group")),
            routed_scaling_factor=float(opt(1.0, "routed_scaling_factor")),
            correction_bias=opt("noaux_tc", "topk_method") == "noaux_tc",
            shared_expert_intermediate_size=int(opt(0, "n_shared_experts")) * moe_width,
            attention_bias=bool(opt(False, "attention_bias")),
        )
        head_dim = kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"]
        num_mtp = int(opt(0, "num_nextn_predict_layers"))
    elif family == "gpt_oss":
        sliding_window = int(opt(128, "sliding_window"))
        types = opt(None, "layer_types")
        layer_types = (
            ["sliding" if t == "sliding_attention" else "full" for t in types]
            if types
            else ["sliding" if i % 2 == 0 else "full" for i in range(num_layers)]
        )
        kw.update(
            attention_bias=True,
            o_bias=True,
            attention_sinks=True,
            router_bias=True,
            expert_bias=True,
            norm_topk_prob=True,
            swiglu_limit=float(opt(7.0, "swiglu_limit")),
        )

    if layer_types and len(layer_types) != num_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    if num_heads % num_kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={num_heads} is not a multiple of "
                          f"num_key_value_heads={num_kv_heads}")

    quant = opt(None, "quantization_config")
    checkpoint_quant, block = None, (128, 128)
    if quant:
        method = quant.get("quant_method")
        if method == "fp8":
            checkpoint_quant = "fp8"
            block = tuple(int(b) for b in quant.get("weight_block_size", (128, 128)))
        elif method == "mxfp4":
            checkpoint_quant = "mxfp4"
        else:
            raise ConfigError(f"{source}: quantization_config.quant_method={method!r} is not supported "
                              "(supported: fp8, mxfp4)")

    return ModelConfig(
        family=family,
        vocab_size=int(req("vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_width,
        moe_layers=tuple(moe_layers),
        rms_norm_eps=float(opt(1e-6, "rms_norm_eps")),
        rope=_rope(d, family),
        max_position_embeddings=int(opt(4096, "max_position_embeddings")),
        tie_word_embeddings=bool(opt(False, "tie_word_embeddings")),
        hidden_act=str(opt("silu", "hidden_act")),
        layer_types=tuple(layer_types),
        sliding_window=sliding_window,
        bos_token_id=opt(None, "bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=opt(None, "pad_token_id"),
        dtype=str(opt("bfloat16", "dtype", "torch_dtype")),
        checkpoint_quant=checkpoint_quant,
        fp8_block_size=block,
        num_mtp_layers=num_mtp,
        **kw,
    )


def _family(d: dict[str, Any], source: str) -> str:
    archs = d.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and d.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[d["model_type"]]
    name = archs[0] if archs else d.get("model_type", "<none>")
    raise ConfigError(
        f"{source}: unsupported architecture {name!r}; supported: {', '.join(supported_architectures())}"
    )


def _rope(d: dict[str, Any], family: str) -> RopeConfig:
    # transformers 5 folds rope_theta into rope_parameters; Hub files keep rope_theta and rope_scaling.
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "yarn"):
        raise ConfigError(f"config.json: rope type {kind!r} is not supported (default, linear, yarn)")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0) or 1.0),
        original_max_position=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast", 32.0) or 32.0),
        beta_slow=float(params.get("beta_slow", 1.0) or 1.0),
        mscale=float(params.get("mscale", 1.0) or 1.0),
        mscale_all_dim=float(params.get("mscale_all_dim", 0.0) or 0.0),
        truncate=bool(params.get("truncate", True)),
        interleaved=family == "deepseek_v3",
    )
