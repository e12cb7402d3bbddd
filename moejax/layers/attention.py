"""Grouped-query attention for the GQA families (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.layers.kv_cache import LayerKV
from moejax.layers.linear import Linear, param
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import apply_rope

MASKED = -1e30


def attention_mask(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None) -> jax.Array:
    """[batch, T, S]: causal by position, padding (-1) excluded, optionally a sliding window."""
    q = q_pos_BT[:, :, None]
    k = k_pos_BS[:, None, :]
    mask = (k <= q) & (k >= 0) & (q >= 0)
    if window is not None:
        mask = mask & (k > q - window)
    return mask


QUERY_CHUNK = 512  # long prefills attend in query blocks so scores stay [chunk, S], not [T, S]


def attend(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale: float, sinks_H: jax.Array | None = None) -> jax.Array:
    """Softmax attention in float32 with kv heads shared by groups of query heads; returns [B, T, H, Dv]."""
    b, t, h, d = q_BTHD.shape
    if t > QUERY_CHUNK and t % QUERY_CHUNK == 0:
        n = t // QUERY_CHUNK
        # [chunks, batch, chunk, ...]
        q_chunks = q_BTHD.reshape(b, n, QUERY_CHUNK, h, d).swapaxes(0, 1)
        mask_chunks = mask_BTS.reshape(b, n, QUERY_CHUNK, -1).swapaxes(0, 1)
        out = jax.lax.map(lambda qm: _attend_block(qm[0], k_BSKD, v_BSKD, qm[1], scale, sinks_H),
                          (q_chunks, mask_chunks))
        return out.swapaxes(0, 1).reshape(b, t, h, v_BSKD.shape[-1])
    return _attend_block(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale, sinks_H)


def _attend_block(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale, sinks_H):
    b, t, h, d = q_BTHD.shape
    kvh = k_BSKD.shape[2]
    q_BTKGD = q_BTHD.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_BTS[:, None, None], scores, MASKED)
    if sinks_H is not None:
        # One learned extra logit per head joins the softmax and is dropped after it.
        sink = jnp.broadcast_to(sinks_H.astype(jnp.float32).reshape(1, kvh, h // kvh, 1, 1), (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BSKD.dtype), v_BSKD, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, v_BSKD.shape[-1]).astype(q_BTHD.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs | None = None):
        c = config
        self.config = c
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, q_width, ("embed", "q_heads"), bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, kv_width, ("embed", "kv_heads"), bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, kv_width, ("embed", "kv_heads"), bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(q_width, c.hidden_size, ("q_heads", "embed"), bias=c.o_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c.head_dim, ("head_dim",), eps=c.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(c.head_dim, ("head_dim",), eps=c.rms_norm_eps, dtype=dtype)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(q_width, ("q_heads",), eps=c.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(kv_width, ("kv_heads",), eps=c.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.sinks = param((c.num_heads,), dtype, ("heads",), init="zeros") if c.attention_sinks else None

    def __call__(self, x_BTD, positions_BT, kv: LayerKV | None = None, window=None):
        """Returns (output [B, T, D], kv with this step's keys written, or None).

        Without `kv`, the tokens attend causally among themselves (a cache-free forward). With it, B is 1: the
        step's flat tokens are written to their pages and attend over their sequences' pages."""
        c = self.config
        b, t, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
        # [batch, seq, heads, head_dim]
        q_BTHD = q.reshape(b, t, c.num_heads, c.head_dim)
        k_BTKD = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v_BTKD = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q_BTHD, k_BTKD = self.q_norm(q_BTHD), self.k_norm(k_BTKD)
        q_BTHD = apply_rope(q_BTHD, positions_BT, c.rope)
        k_BTKD = apply_rope(k_BTKD, positions_BT, c.rope)
        sinks = self.sinks[...] if self.sinks is not None else None

        if kv is None:
            mask = attention_mask(positions_BT, positions_BT, window)
            out_BTHD = attend(q_BTHD, k_BTKD, v_BTKD, mask, c.softmax_scale, sinks)
        else:
            stored = kv.pool.k.shape[3]
            if stored != c.num_kv_heads:  # heads replicated per tensor rank (kv_cache.cached_kv_heads)
                k_BTKD = jnp.repeat(k_BTKD, stored // c.num_kv_heads, axis=2)
                v_BTKD = jnp.repeat(v_BTKD, stored // c.num_kv_heads, axis=2)
            kv = kv.write(k_BTKD[0], v_BTKD[0])
            out_BTHD = kv.attend(q_BTHD[0], positions_BT[0], scale=c.softmax_scale, window=window,
                                 sinks_H=sinks)[None]
        return self.o_proj(out_BTHD.reshape(b, t, -1)), kv
