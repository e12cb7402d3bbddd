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
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: must be a JSON object, got {type(data).__name__}")
        return _parse(dict(data), source)


def read_json_object(path: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, generation_config.json, tokenizer_config.json, a
    checkpoint's index or metadata); anything else raises `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must be a JSON object, got {type(data).__name__}")
    return data


def token_ids(path: str, data: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """An id or a list of ids under `key` (eos_token_id and its kin), checked."""
    return _Fields(data, path).int_list(key)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


class _Fields:
    """Typed reads of config keys: a wrong type or range is a ConfigError naming the file and the key."""

    def __init__(self, d: Mapping[str, Any], source: str, prefix: str = ""):
        self.d, self.source, self.prefix = d, source, prefix

    def _find(self, keys):
        for k in keys:
            if self.d.get(k) is not None:
                return k, self.d[k]
        return keys[0], None

    def fail(self, key: str, what: str, value: Any):
        raise ConfigError(f"{self.source}: {self.prefix}{key} must be {what}, got {value!r}")

    def int(self, *keys: str, default: Any = ..., minimum: int = 0) -> Any:
        key, v = self._find(keys)
        if v is None:
            if default is ...:
                raise ConfigError(f"{self.source}: missing required key {self.prefix}{keys[0]!r}")
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(key, "a positive integer" if minimum == 1 else f"an integer >= {minimum}", v)
        return v

    def float(self, *keys: str, default: Any = ..., positive: bool = False) -> Any:
        key, v = self._find(keys)
        if v is None:
            if default is ...:
                raise ConfigError(f"{self.source}: missing required key {self.prefix}{keys[0]!r}")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            self.fail(key, "a positive number" if positive else "a finite number", v)
        return float(v)

    def bool(self, *keys: str, default: bool = False) -> bool:
        key, v = self._find(keys)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(key, "true or false", v)
        return v

    def str(self, *keys: str, default: Any = None) -> Any:
        key, v = self._find(keys)
        if v is None:
            return default
        if not isinstance(v, str):
            self.fail(key, "a string", v)
        return v

    def int_list(self, *keys: str, default: Any = ()) -> tuple[int, ...]:
        key, v = self._find(keys)
        if v is None:
            return tuple(default)
        items = v if isinstance(v, (list, tuple)) else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            self.fail(key, "an integer or a list of integers >= 0", v)
        return tuple(items)

    def str_list(self, *keys: str) -> list[str] | None:
        key, v = self._find(keys)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
            self.fail(key, "a list of strings", v)
        return v

    def object(self, *keys: str) -> dict:
        key, v = self._find(keys)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            self.fail(key, "an object", v)
        return dict(v)


def _parse(d: dict[str, Any], source: str) -> ModelConfig:
    family = _family(d, source)
    f = _Fields(d, source)

    hidden = f.int("hidden_size", minimum=1)
    num_layers = f.int("num_hidden_layers", minimum=1)
    num_heads = f.int("num_attention_heads", minimum=1)
    num_kv_heads = f.int("num_key_value_heads", default=num_heads, minimum=1)
    head_dim = f.int("head_dim", default=hidden // num_heads, minimum=1)
    num_experts = f.int("num_local_experts", "num_experts", "n_routed_experts", minimum=1)
    top_k = f.int("num_experts_per_tok", "experts_per_token", minimum=1)
    if top_k > num_experts:
        raise ConfigError(f"{source}: num_experts_per_tok={top_k} exceeds the {num_experts} experts")
    intermediate = f.int("intermediate_size", default=0)
    moe_width = f.int("moe_intermediate_size", default=intermediate)
    eos_ids = f.int_list("eos_token_id")
    num_mtp = 0

    kw: dict[str, Any] = {}
    moe_layers = [True] * num_layers
    layer_types: list[str] = []
    sliding_window = None

    if family in ("qwen2_moe", "qwen3_moe"):
        mlp_only = set(f.int_list("mlp_only_layers"))
        step = f.int("decoder_sparse_step", default=1, minimum=1)
        moe_layers = [(i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]
        kw["norm_topk_prob"] = f.bool("norm_topk_prob")
        if f.bool("use_sliding_window") and d.get("sliding_window"):
            sliding_window = f.int("sliding_window", minimum=1)
            if family == "qwen2_moe":
                max_window = f.int("max_window_layers", default=num_layers)
                layer_types = ["sliding" if (i + 1) % 2 and i < max_window else "full" for i in range(num_layers)]
            else:
                layer_types = ["sliding"] * num_layers
        if family == "qwen2_moe":
            kw["attention_bias"] = f.bool("qkv_bias", default=True)
            kw["shared_expert_intermediate_size"] = f.int("shared_expert_intermediate_size", default=0)
            kw["shared_expert_gate"] = kw["shared_expert_intermediate_size"] > 0
        else:
            kw["attention_bias"] = f.bool("attention_bias")
            kw["o_bias"] = kw["attention_bias"]
            kw["qk_norm"] = "head"
    elif family == "mixtral":
        kw["norm_topk_prob"] = True
        if d.get("sliding_window"):
            sliding_window = f.int("sliding_window", minimum=1)
            layer_types = ["sliding"] * num_layers
    elif family == "olmoe":
        kw["norm_topk_prob"] = f.bool("norm_topk_prob")
        kw["attention_bias"] = kw["o_bias"] = f.bool("attention_bias")
        kw["qk_norm"] = "full"
        kw["clip_qkv"] = f.float("clip_qkv", default=None, positive=True)
    elif family == "deepseek_v3":
        first_dense = f.int("first_k_dense_replace", default=0)
        freq = f.int("moe_layer_freq", default=1, minimum=1)
        moe_layers = [i >= first_dense and i % freq == 0 for i in range(num_layers)]
        kw.update(
            q_lora_rank=f.int("q_lora_rank", default=0),
            kv_lora_rank=f.int("kv_lora_rank", minimum=1),
            qk_nope_head_dim=f.int("qk_nope_head_dim", minimum=1),
            qk_rope_head_dim=f.int("qk_rope_head_dim", minimum=1),
            v_head_dim=f.int("v_head_dim", minimum=1),
            # V3 routes with sigmoid scores (transformers 5 saves scoring_func as null); V2 with softmax.
            scoring_func=f.str("scoring_func", default="softmax" if d.get("model_type") == "deepseek_v2" else "sigmoid"),
            norm_topk_prob=f.bool("norm_topk_prob"),
            n_group=f.int("n_group", default=1, minimum=1),
            topk_group=f.int("topk_group", default=1, minimum=1),
            routed_scaling_factor=f.float("routed_scaling_factor", default=1.0, positive=True),
            correction_bias=f.str("topk_method", default="noaux_tc") == "noaux_tc",
            shared_expert_intermediate_size=f.int("n_shared_experts", default=0) * moe_width,
            attention_bias=f.bool("attention_bias"),
        )
        head_dim = kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"]
        num_mtp = f.int("num_nextn_predict_layers", default=0)
    elif family == "gpt_oss":
        sliding_window = f.int("sliding_window", default=128, minimum=1)
        types = f.str_list("layer_types")
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
            swiglu_limit=f.float("swiglu_limit", default=7.0, positive=True),
        )

    if layer_types and len(layer_types) != num_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    if num_heads % num_kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={num_heads} is not a multiple of "
                          f"num_key_value_heads={num_kv_heads}")

    quant = f.object("quantization_config")
    checkpoint_quant, block = None, (128, 128)
    if quant:
        qf = _Fields(quant, source, "quantization_config.")
        method = quant.get("quant_method")
        if method == "fp8":
            checkpoint_quant = "fp8"
            block = qf.int_list("weight_block_size", default=(128, 128))
            if len(block) != 2 or min(block) < 1:
                qf.fail("weight_block_size", "two positive integers", quant.get("weight_block_size"))
        elif method == "mxfp4":
            checkpoint_quant = "mxfp4"
        else:
            raise ConfigError(f"{source}: quantization_config.quant_method={method!r} is not supported "
                              "(supported: fp8, mxfp4)")

    return ModelConfig(
        family=family,
        vocab_size=f.int("vocab_size", minimum=1),
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
        rms_norm_eps=f.float("rms_norm_eps", default=1e-6, positive=True),
        rope=_rope(d, family, source),
        max_position_embeddings=f.int("max_position_embeddings", default=4096, minimum=1),
        tie_word_embeddings=f.bool("tie_word_embeddings"),
        hidden_act=f.str("hidden_act", default="silu"),
        layer_types=tuple(layer_types),
        sliding_window=sliding_window,
        bos_token_id=f.int("bos_token_id", default=None),
        eos_token_ids=eos_ids,
        pad_token_id=f.int("pad_token_id", default=None),
        dtype=f.str("dtype", "torch_dtype", default="bfloat16"),
        checkpoint_quant=checkpoint_quant,
        fp8_block_size=block,
        num_mtp_layers=num_mtp,
        **kw,
    )


def _family(d: dict[str, Any], source: str) -> str:
    archs = _Fields(d, source).str_list("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and d.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[d["model_type"]]
    name = archs[0] if archs else d.get("model_type", "<none>")
    raise ConfigError(
        f"{source}: unsupported architecture {name!r}; supported: {', '.join(supported_architectures())}"
    )


def _rope(d: dict[str, Any], family: str, source: str) -> RopeConfig:
    # transformers 5 folds rope_theta into rope_parameters; Hub files keep rope_theta and rope_scaling.
    top = _Fields(d, source)
    params = {**top.object("rope_scaling"), **top.object("rope_parameters")}
    f = _Fields(params, source, "rope_parameters.")
    kind = f.str("rope_type", "type", default="default") or "default"
    if kind not in ("default", "linear", "yarn"):
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (default, linear, yarn)")
    return RopeConfig(
        theta=f.float("rope_theta", default=None, positive=True) or top.float("rope_theta", default=10000.0,
                                                                             positive=True),
        kind=kind,
        factor=f.float("factor", default=1.0) or 1.0,
        original_max_position=f.int("original_max_position_embeddings", default=None, minimum=1),
        beta_fast=f.float("beta_fast", default=32.0) or 32.0,
        beta_slow=f.float("beta_slow", default=1.0) or 1.0,
        mscale=f.float("mscale", default=1.0) or 1.0,
        mscale_all_dim=f.float("mscale_all_dim", default=0.0) or 0.0,
        truncate=f.bool("truncate", default=True),
        interleaved=family == "deepseek_v3",
    )
