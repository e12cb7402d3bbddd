"""Tiny random transformers models per family, saved in HF format; transformers is the numerical oracle."""

from __future__ import annotations

import json
import os

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False)


def hf_config(family: str, **overrides):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                               rope_theta=10000.0)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=32, num_experts=8,
                                num_experts_per_tok=2, shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**COMMON, head_dim=24, intermediate_size=80, moe_intermediate_size=32,
                                num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**COMMON, intermediate_size=40, num_experts=8, num_experts_per_tok=2,
                             eos_token_id=50279, pad_token_id=1)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_hf_model(family: str, path: str, *, fused: bool = False, hub_keys: bool = False, seed: int = 0,
                  dtype: str = "float32", **overrides) -> str:
    """Build a random model, save it to `path`, return `path`.

    fused: transformers-5 fused expert layout instead of the per-expert Hub layout.
    hub_keys: rewrite config.json with Hub-style keys (torch_dtype, rope_theta) instead of transformers-5 ones.
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    # Random init of norms is all ones; perturb every parameter so that layouts and norms are really tested.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, **({"save_original_format": False} if fused else {}))
    if hub_keys:
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            cfg = json.load(f)
        rope = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
        cfg["rope_scaling"] = None
        cfg["torch_dtype"] = cfg.pop("dtype", dtype)
        with open(config_path, "w") as f:
            json.dump(cfg, f, indent=2)
    return path


def hf_greedy_by_forward(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers' full forward at every step (no generation cache involved)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def assert_matches_transformers(path: str, prompt: list[int], greedy_prompt_len: int, n: int = 16):
    """moejax's logits on `prompt` within 1e-4 of transformers' (float32), and n greedy tokens from its first
    `greedy_prompt_len` tokens equal to transformers' full-forward greedy decoding."""
    import numpy as np
    import torch

    from moejax import LLM, SamplingParams

    hf = load_hf(path)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    llm = LLM(path)
    assert np.abs(llm.logits(prompt) - ref).max() / np.abs(ref).max() < 1e-4
    head = prompt[:greedy_prompt_len]
    ours = llm.generate(prompt_token_ids=[head], use_tqdm=False,
                        sampling_params=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert ours[0].outputs[0].token_ids == hf_greedy_by_forward(hf, head, n)


def load_hf(path: str, dtype: str = "float32"):
    import torch
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


CHARS = list("abcdefghijklmnopqrstuvwxyz .,!?'\n")


def save_char_tokenizer(path: str, eos: str = "<eos>") -> dict:
    """A character-level tokenizer.json (ids < 40) with a chat template, for tests that need text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, eos: 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([eos])
    tok.save(os.path.join(path, "tokenizer.json"))
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": eos, "chat_template": template}, f)
    return vocab


def make_gpt_oss(path: str, seed: int = 0, sliding_window: int = 8) -> str:
    """A tiny GPT-OSS (YaRN, sinks, alternating sliding/full layers, biases) saved with save_pretrained."""
    import torch
    import transformers as tf

    cfg = tf.GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                          num_experts_per_tok=2, sliding_window=sliding_window, max_position_embeddings=256,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "original_max_position_embeddings": 64, "truncate": False})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.float().save_pretrained(path)
    return path


def make_deepseek(path: str, seed: int = 0, q_lora_rank: int | None = 24, n_group: int = 4, topk_group: int = 2,
                  num_layers: int = 3, kv_lora_rank: int = 16, qk_rope_head_dim: int = 8) -> str:
    """A tiny DeepSeek-V3 (MLA with YaRN, a dense first layer, grouped sigmoid routing with correction bias,
    a shared expert) saved with save_pretrained; the correction bias is perturbed so that it matters."""
    import torch
    import transformers as tf

    cfg = tf.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=n_group, topk_group=topk_group,
        num_experts_per_tok=2, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=16,
        qk_rope_head_dim=qk_rope_head_dim,
        v_head_dim=16, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=256, tie_word_embeddings=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "bias" in name else 0.05))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.add_(torch.randn_like(b) * 0.3)
    model.float().save_pretrained(path)
    return path
