"""The decoder-only MoE transformer shared by every family (GQA or MLA attention, dense or MoE layers)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.layers.attention import Attention
from moejax.layers.kv_cache import KVPool, LayerKV, PagedBatch
from moejax.layers.linear import Embed, Linear
from moejax.layers.mla import MLAttention
from moejax.layers.mlp import MLP
from moejax.layers.moe import MoEBlock
from moejax.layers.norms import RMSNorm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """What an MoE layer's router decided: logits [T, E] and the chosen experts [T, k]."""

    logits_TE: jax.Array
    ids_TK: jax.Array


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs | None = None):
        self.input_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.attn = (MLAttention if config.is_mla else Attention)(config, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        if config.moe_layers[layer]:
            self.moe, self.mlp = MoEBlock(config, dtype=dtype, rngs=rngs), None
        else:
            self.moe, self.mlp = None, MLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD, positions_BT, kv: LayerKV | None = None, window=None, layer=0):
        """window: this layer's sliding window (config.window(layer)); layer: its index. Both are traced ints
        when layers are scanned."""
        # The scopes name the profile's parts (the benchmark's "where the time goes").
        with jax.named_scope("attention"):
            attn_out, kv = self.attn(self.input_norm(x_BTD), positions_BT, kv, window)
            x_BTD = x_BTD + attn_out
        h = self.post_attn_norm(x_BTD)
        if self.moe is not None:
            mlp_out, router_logits, expert_ids = self.moe(h, layer)
            routing = Routing(router_logits, expert_ids)
        else:
            with jax.named_scope("dense_mlp"):
                mlp_out, routing = self.mlp(h), None
        return x_BTD + mlp_out, kv, routing


class MoETransformer(nnx.Module):
    """tokens [B, T] and positions [B, T] -> hidden states; `logits` applies the final norm and lm_head."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = config
        self.embed = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)

    def __call__(self, tokens_BT, positions_BT, pool: KVPool | None = None, batch: PagedBatch | None = None):
        """Returns (hidden [B, T, D] before the final norm, updated pool or None, router logits per MoE layer).

        Layers run one after the other here (training, tests); the engine runs them scanned (models/stacked.py).
        With a pool, B is 1 and `batch` says where the flat tokens' keys go."""
        x = self.embed(tokens_BT)
        router_logits = []
        for i, layer in enumerate(self.layers):
            kv = None if pool is None else LayerKV(pool, batch, i)
            x, kv, routing = layer(x, positions_BT, kv, self.config.window(i), i)
            if kv is not None:
                pool = kv.commit()
            if routing is not None:
                router_logits.append(routing.logits_TE)
        return x, pool, router_logits

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and lm_head in float32: [..., D] -> [..., vocab]."""
        h = self.norm(hidden)
        if self.lm_head is None:
            return self.embed.attend(h).astype(jnp.float32)
        return jnp.matmul(h, self.lm_head.kernel[...], preferred_element_type=jnp.float32)
