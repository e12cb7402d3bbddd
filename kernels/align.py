"""moe_align_block_size: group (token, slot) assignments by expert in blocks of `block_size` rows (vLLM semantics).

Static output sizes (jittable): sorted_token_ids has T*k + E*(block_size - 1) entries, expert_ids one per block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def moe_align_block_size(topk_ids: jax.Array, num_experts: int, block_size: int):
    """-> (sorted_token_ids int32 [T*k + E*(bs-1)], expert_ids int32 [that // bs], num_tokens_post_padded int32).

    Entries are flat indices t*k + j grouped by expert in ascending expert order (stable within an expert); each
    expert's segment is padded with the sentinel T*k to a multiple of block_size; experts with no tokens take no
    block; expert_ids[b] is block b's expert and -1 past num_tokens_post_padded.
    """
    flat = topk_ids.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    max_len = n + num_experts * (block_size - 1)
    num_blocks = max_len // block_size
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    total = padded_end[-1]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    expert_of_sorted = flat[order]
    count_start = jnp.cumsum(counts) - counts
    dest = padded_start[expert_of_sorted] + jnp.arange(n, dtype=jnp.int32) - count_start[expert_of_sorted]
    sorted_token_ids = jnp.full((max_len,), n, jnp.int32).at[dest].set(order)
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
    expert_ids = jnp.searchsorted(padded_end, block_start, side="right").astype(jnp.int32)
    expert_ids = jnp.where(block_start < total, expert_ids, -1)
    return sorted_token_ids, expert_ids, total.astype(jnp.int32)
