"""moe_align_block_size: group (token, slot) assignments by expert in blocks of `block_size` rows (vLLM semantics).

Static output sizes (jittable). `moe_align_block_size` keeps vLLM's worst-case length T*k + E*(block_size - 1);
`align_rows` also returns where each assignment landed (so results are gathered back, not scattered) and by
default uses the tight bound: at most min(E, T*k) experts can be non-empty, so decode steps get a few blocks
instead of one per expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tight_rows(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Rows enough for any routing: each non-empty expert wastes at most block_size - 1 rows."""
    worst = num_assignments + min(num_experts, num_assignments) * (block_size - 1)
    return worst // block_size * block_size


def align_rows(topk_ids: jax.Array, num_experts: int, block_size: int, length: int | None = None):
    """-> (sorted_ids int32 [length], block_expert int32 [length // block_size], total int32,
    row_of_assignment int32 [T*k]).

    sorted_ids and block_expert follow `moe_align_block_size`; assignments whose id is outside [0, E) (another
    expert-parallel rank's) take no row and their row_of_assignment is `length`.
    """
    flat = topk_ids.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    length = tight_rows(n, num_experts, block_size) if length is None else length
    num_blocks = length // block_size
    key = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # skipped ids: one phantom expert
    counts = jnp.bincount(key, length=num_experts + 1).astype(jnp.int32)
    padded = (counts + block_size - 1) // block_size * block_size
    padded = padded.at[num_experts].set(0)
    padded_end = jnp.cumsum(padded)
    padded_start = (padded_end - padded).at[num_experts].set(length)  # the phantom's rows are dropped
    count_start = jnp.cumsum(counts) - counts
    total = padded_end[num_experts - 1]
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    key_sorted = key[order]
    dest_sorted = padded_start[key_sorted] + jnp.arange(n, dtype=jnp.int32) - count_start[key_sorted]
    dest_sorted = jnp.where(key_sorted < num_experts, dest_sorted, length)
    sorted_ids = jnp.full((length,), n, jnp.int32).at[dest_sorted].set(order, mode="drop")
    row_of_assignment = jnp.zeros((n,), jnp.int32).at[order].set(dest_sorted)
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
    # The number of experts whose padded segment ends at or before the block's start (a compare-and-count that
    # fuses into one kernel; searchsorted's loop costs a launch per step on GPUs).
    block_expert = jnp.sum(padded_end[None, :num_experts] <= block_start[:, None], axis=1, dtype=jnp.int32)
    block_expert = jnp.where(block_start < total, block_expert, -1)
    return sorted_ids, block_expert, total.astype(jnp.int32), row_of_assignment


def align_each(topk_ids: jax.Array, num_experts: int, block_size: int):
    """`align_rows` without grouping: assignment a gets block a to itself (row a * block_size). Right for any
    routing, and the choice when assignments are few and mostly on different experts (one token's k are
    always distinct): no count, sort or scatter, so a decode step's MoE layer launches a few kernels fewer."""
    flat = topk_ids.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    length = n * block_size
    mine = (flat >= 0) & (flat < num_experts)
    rows = jnp.arange(length, dtype=jnp.int32)
    sorted_ids = jnp.where(rows % block_size == 0, rows // block_size, n)
    sorted_ids = jnp.where(jnp.repeat(mine, block_size), sorted_ids, n)
    block_expert = jnp.where(mine, flat, -1)
    row_of_assignment = jnp.where(mine, jnp.arange(n, dtype=jnp.int32) * block_size, length)
    total = jnp.sum(mine, dtype=jnp.int32) * block_size
    return sorted_ids, block_expert, total, row_of_assignment


def groups_rows(num_assignments: int, num_experts: int, num_tokens: int) -> bool:
    """Whether the expert kernels group assignments by expert (`align_rows`) or give each its own block
    (`align_each`): a single token's, or when so few that two rarely share an expert (a shared one would be
    streamed twice)."""
    return not (num_tokens == 1 or num_assignments * 4 <= num_experts)


def moe_align_block_size(topk_ids: jax.Array, num_experts: int, block_size: int):
    """-> (sorted_token_ids int32 [T*k + E*(bs-1)], expert_ids int32 [that // bs], num_tokens_post_padded int32).

    Entries are flat indices t*k + j grouped by expert in ascending expert order (stable within an expert); each
    expert's segment is padded with the sentinel T*k to a multiple of block_size; experts with no tokens take no
    block; expert_ids[b] is block b's expert and -1 past num_tokens_post_padded.
    """
    n = topk_ids.size
    sorted_ids, expert_ids, total, _ = align_rows(topk_ids, num_experts, block_size,
                                                  n + num_experts * (block_size - 1))
    return sorted_ids, expert_ids, total
