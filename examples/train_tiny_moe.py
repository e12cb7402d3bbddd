"""Train the embedded default model: a tiny Qwen3-MoE on the Python standard library's own source.

Uses moejax's own model code (training and inference share one forward), optax AdamW, and the Switch/Mixtral
load-balancing loss so that every expert is used. Deterministic given --seed. Writes a Hugging Face directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json) that `LLM()` loads when no model is named.

    python examples/train_tiny_moe.py --out moejax/data/tiny-moe
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from moejax.checkpoints.hf_writer import save_hf_checkpoint
from moejax.config import ModelConfig
from moejax.kernels import route
from moejax.layers.moe import routing_config
from moejax.models import build_random

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_files() -> tuple[list[str], list[str]]:
    """The standard library's top-level modules, sorted; every 16th file is held out."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    held_out = files[::16]
    return [f for f in files if f not in held_out], held_out


def read(files: list[str]) -> list[str]:
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def hf_config(vocab_size: int, eos_id: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab_size,
        "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "hidden_act": "silu", "bos_token_id": eos_id, "eos_token_id": eos_id,
        "torch_dtype": "bfloat16", "router_aux_loss_coef": 0.01, "initializer_range": 0.02,
    }


def load_balancing_loss(router_logits: list[jax.Array], config: ModelConfig) -> jax.Array:
    """Switch/Mixtral auxiliary loss: E * sum_i (fraction of assignments to i) * (mean router prob of i)."""
    total = 0.0
    for logits_TE in router_logits:
        _, ids_TK = route(logits_TE, routing_config(config))
        counts_E = jax.nn.one_hot(ids_TK, config.num_experts).sum(axis=(0, 1))
        fraction_E = counts_E / ids_TK.size
        prob_E = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1).mean(axis=0)
        total = total + config.num_experts * jnp.sum(fraction_E * prob_E)
    return total / len(router_logits)


def batches(tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(tokens) - seq - 1, batch)
        yield np.stack([tokens[s : s + seq + 1] for s in starts])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moejax/data/tiny-moe")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    train_files, held_files = corpus_files()
    train_texts, held_texts = read(train_files), read(held_files)
    tokenizer = train_tokenizer(train_texts, args.vocab)
    eos_id = tokenizer.token_to_id(EOS)
    encode = lambda texts: np.concatenate(  # noqa: E731
        [np.asarray(e.ids + [eos_id], np.int32) for e in tokenizer.encode_batch(texts)])
    train_tokens, held_tokens = encode(train_texts), encode(held_texts)
    print(f"corpus: {len(train_files)} train files ({len(train_tokens):,} tokens), "
          f"{len(held_files)} held out ({len(held_tokens):,} tokens), vocab {tokenizer.get_vocab_size()}")

    raw_config = hf_config(tokenizer.get_vocab_size(), eos_id)
    config = ModelConfig.from_dict(raw_config)
    model = build_random(config, jnp.float32, seed=args.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    warmup = min(50, args.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1), args.lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = optimizer.init(params)
    positions = jnp.broadcast_to(jnp.arange(args.seq), (args.batch, args.seq))

    def loss_fn(params, batch_BT):
        model = nnx.merge(graphdef, params)
        hidden, _, router_logits = model(batch_BT[:, :-1], positions)
        logits = model.logits(hidden)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch_BT[:, 1:]).mean()
        return ce + args.aux_coef * load_balancing_loss(router_logits, config), ce

    @jax.jit
    def train_step(params, opt_state, batch_BT):
        (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_BT)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce

    @jax.jit
    def eval_ce(params, batch_BT):
        return loss_fn(params, batch_BT)[1]

    rng = np.random.default_rng(args.seed)
    stream = batches(train_tokens, args.batch, args.seq, rng)
    start = time.time()
    for step in range(1, args.steps + 1):
        params, opt_state, ce = train_step(params, opt_state, jnp.asarray(next(stream)))
        if step % 50 == 0 or step == 1:
            print(f"step {step:5d}  train loss {float(ce):.3f}  ({time.time() - start:.0f}s)", flush=True)

    held = held_tokens[: (len(held_tokens) // (args.seq + 1)) * (args.seq + 1)].reshape(-1, args.seq + 1)
    held = held[: (len(held) // args.batch) * args.batch]
    losses = [float(eval_ce(params, jnp.asarray(held[i : i + args.batch]))) for i in range(0, len(held), args.batch)]
    print(f"held-out loss {np.mean(losses):.3f} nats/token (uniform: {np.log(config.vocab_size):.3f})")

    model = nnx.merge(graphdef, params)
    _, state = nnx.split(model)
    save_hf_checkpoint(args.out, raw_config, config, state, dtype=ml_dtypes.bfloat16)
    tokenizer.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": EOS, "bos_token": None, "pad_token": EOS, "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}, f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos_id, "bos_token_id": eos_id}, f, indent=2)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"held_out_files": [os.path.basename(p) for p in held_files], "steps": args.steps,
                   "seed": args.seed, "held_out_loss": float(np.mean(losses)), "seq": args.seq}, f, indent=2)
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
