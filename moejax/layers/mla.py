"""Multi-head latent attention (DeepSeek-V2/V3): the cache holds the compressed latent, not per-head K/V.

Per token and layer the cache keeps kv_lora_rank + qk_rope_head_dim values (the normed latent and the shared
rotary key). With a paged cache, kv_b_proj is absorbed: queries move into latent space (q_nope @ W_uk) and attention
output comes back through W_uv, so per-head keys and values are never expanded. Without a cache (training,
`LLM.logits`) the expanded computation runs; a test checks the two agree.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.layers.attention import attend, attention_mask
from moejax.layers.kv_cache import LayerKV
from moejax.layers.linear import Linear
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import apply_rope


class MLAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs | None = None):
        c = config
        self.config = c
        h, d = c.num_heads, c.hidden_size
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            self.q_a_proj = Linear(d, c.q_lora_rank, ("embed", "latent"), dtype=dtype, rngs=rngs)
            self.q_a_norm = RMSNorm(c.q_lora_rank, ("latent",), eps=c.rms_norm_eps, dtype=dtype)
            self.q_b_proj = Linear(c.q_lora_rank, h * qk, ("latent", "q_heads"), dtype=dtype, rngs=rngs)
            self.q_proj = None
        else:
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
            self.q_proj = Linear(d, h * qk, ("embed", "q_heads"), dtype=dtype, rngs=rngs)
        self.kv_a_proj = Linear(d, c.kv_lora_rank + c.qk_rope_head_dim, ("embed", "latent"), dtype=dtype, rngs=rngs)
        self.kv_a_norm = RMSNorm(c.kv_lora_rank, ("latent",), eps=c.rms_norm_eps, dtype=dtype)
        self.kv_b_proj = Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), ("latent", "q_heads"),
                                dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * c.v_head_dim, d, ("q_heads", "embed"), dtype=dtype, rngs=rngs)

    def _queries(self, x_BTD):
        c = self.config
        b, t, _ = x_BTD.shape
        q = self.q_proj(x_BTD) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))
        # [batch, seq, heads, nope + rope]
        q = q.reshape(b, t, c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)
        return q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]

    def _latent(self, x_BTD, positions_BT):
        """(normed latent [B, T, kv_lora], rotated shared key [B, T, rope])."""
        c = self.config
        a = self.kv_a_proj(x_BTD)
        latent = self.kv_a_norm(a[..., : c.kv_lora_rank])
        k_rope = apply_rope(a[..., c.kv_lora_rank :][:, :, None, :], positions_BT, c.rope)[:, :, 0]
        return latent, k_rope

    def _kv_b(self):
        """W_uk [kv_lora, heads, nope] and W_uv [kv_lora, heads, v] from kv_b_proj."""
        c = self.config
        from moejax.kernels.quant import as_array

        w = as_array(self.kv_b_proj.kernel.get_value()).reshape(
            c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        return w[..., : c.qk_nope_head_dim], w[..., c.qk_nope_head_dim :]

    def __call__(self, x_BTD, positions_BT, kv: LayerKV | None = None, window=None):
        c = self.config
        b, t, _ = x_BTD.shape
        q_nope, q_rope = self._queries(x_BTD)
        q_rope = apply_rope(q_rope, positions_BT, c.rope)
        latent, k_rope = self._latent(x_BTD, positions_BT)
        if kv is None:
            out = self.expanded(q_nope, q_rope, latent, k_rope, positions_BT)
            return self.o_proj(out.reshape(b, t, -1)), None
        # [tokens, 1, kv_lora + rope]: what the cache stores
        entry = jnp.concatenate([latent, k_rope], axis=-1)[0][:, None, :]
        kv = kv.write(entry)
        out = self.absorbed(q_nope[0], q_rope[0], kv, positions_BT[0], window)[None]
        return self.o_proj(out.reshape(b, t, -1)), kv

    def expanded(self, q_nope, q_rope, latent, k_rope, positions_BT):
        """Per-head keys and values from the latent, then ordinary attention: [B, T, H, v]."""
        c = self.config
        b, t = latent.shape[:2]
        kv_heads = self.kv_b_proj(latent).reshape(b, t, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv_heads[..., : c.qk_nope_head_dim], kv_heads[..., c.qk_nope_head_dim :]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], c.qk_rope_head_dim))],
                            axis=-1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        mask = attention_mask(positions_BT, positions_BT, None)
        return attend(q, k, v, mask, c.softmax_scale)

    def absorbed(self, q_nope_THN, q_rope_THR, kv: LayerKV, positions_T, window):
        """Attention in latent space over the latent pages: one shared 'kv head' for all query heads."""
        c = self.config
        w_uk, w_uv = self._kv_b()
        # [tokens, heads, kv_lora]
        q_latent = jnp.einsum("thn,lhn->thl", q_nope_THN, w_uk.astype(q_nope_THN.dtype),
                              preferred_element_type=jnp.float32).astype(q_nope_THN.dtype)
        q = jnp.concatenate([q_latent, q_rope_THR], axis=-1)
        out_latent = kv.attend(q, positions_T, scale=c.softmax_scale, window=window, value_dim=c.kv_lora_rank)
        return jnp.einsum("thl,lhv->thv", out_latent, w_uv.astype(out_latent.dtype),
                          preferred_element_type=jnp.float32).astype(q_nope_THN.dtype)
