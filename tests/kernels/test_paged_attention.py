"""kernels.paged_attention (the pure-JAX reference) against dense attention in float64 numpy."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels
from moejax.kernels import attention_reference


def dense(q, k, v, q_pos, scale, window, sinks):
    """One sequence: q [Q, H, D] at positions q_pos over keys/values [S, K, D] at positions 0..S-1."""
    h, kvh = q.shape[1], k.shape[1]
    out = np.zeros((q.shape[0], h, v.shape[-1]))
    for i, p in enumerate(q_pos):
        if p < 0:
            continue
        for head in range(h):
            kh = head // (h // kvh)
            s = k[:, kh] @ q[i, head] * scale
            seen = (np.arange(len(k)) <= p) & (np.arange(len(k)) > p - window)
            s = np.where(seen, s, -np.inf)
            logits = np.concatenate([s, [sinks[head]]]) if sinks is not None else s
            e = np.exp(logits - logits.max())
            w = (e / e.sum())[: len(k)]
            out[i, head] = w @ v[:, kh]
    return out


@pytest.mark.parametrize("window, sinks, mla", [(None, False, False), (5, True, False), (None, False, True),
                                               (7, False, False)])
@pytest.mark.parametrize("qb, chunk_pages, static", [(1, 32, False), (8, 32, False), (1, 2, False), (8, 4, True),
                                                     (1, 2, True)])
def test_paged_attention_matches_dense(window, sinks, mla, qb, chunk_pages, static):
    """Chunks of several sequences (decodes, whole prompts, chunks after a cached prefix), each cut into blocks
    of qb queries: cached keys come from the pool, the chunk's own keys from k_new."""
    rng = np.random.default_rng()
    layers, pages, ps, kvh, h, d = 2, 48, 4, (1 if mla else 2), 4, 16
    dv = 12 if mla else d
    chunks = [(0, 1), (8, 1), (0, 13), (9, 7), (22, 1), (5, 20)]  # (cached positions, new tokens) per sequence
    max_pages = 7
    order = rng.permutation(np.arange(1, pages))
    keys_all, vals_all, q_all = [], [], []
    k_pool = rng.standard_normal((layers, pages, ps, kvh, d)).astype(np.float32)
    v_pool = None if mla else rng.standard_normal((layers, pages, ps, kvh, d)).astype(np.float32)
    sinks_h = rng.standard_normal(h).astype(np.float32) if sinks else None
    layer = 1
    tables, q_pos, first, q, k_new, v_new = [], [], [], [], [], []
    for i, (cached, new) in enumerate(chunks):
        n = cached + new
        table = np.zeros(max_pages, np.int32)
        table[: -(-n // ps)] = order[i * max_pages: i * max_pages + -(-n // ps)]
        keys = rng.standard_normal((n, kvh, d)).astype(np.float32)
        vals = keys[..., :dv] if mla else rng.standard_normal((n, kvh, d)).astype(np.float32)
        for p in range(cached):  # the cached part lives in the pool; the pool elsewhere keeps its noise
            k_pool[layer, table[p // ps], p % ps] = keys[p]
            if not mla:
                v_pool[layer, table[p // ps], p % ps] = vals[p]
        queries = rng.standard_normal((n, h, d)).astype(np.float32)
        nblocks = -(-new // qb)
        f = len(first)
        for b in range(nblocks):
            pos = np.full(qb, -1, np.int32)
            lo, hi = cached + b * qb, min(cached + (b + 1) * qb, n)
            pos[: hi - lo] = np.arange(lo, hi)
            kb = np.zeros((qb, kvh, d), np.float32)
            vb = np.zeros((qb, kvh, dv if mla else d), np.float32)
            qq = np.zeros((qb, h, d), np.float32)
            kb[: hi - lo], vb[: hi - lo], qq[: hi - lo] = keys[lo:hi], vals[lo:hi], queries[lo:hi]
            tables.append(table), q_pos.append(pos), first.append(f), q.append(qq), k_new.append(kb)
            v_new.append(vb)
        keys_all.append(keys), vals_all.append(vals), q_all.append(queries)
    tables, q_pos, first = np.stack(tables), np.stack(q_pos), np.asarray(first, np.int32)
    # a padding block at the end: positions -1, a chunk of its own
    tables = np.concatenate([tables, np.zeros((1, max_pages), np.int32)])
    q_pos = np.concatenate([q_pos, np.full((1, qb), -1, np.int32)])
    first = np.concatenate([first, [len(first)]]).astype(np.int32)
    q = np.concatenate([np.stack(q), np.ones((1, qb, h, d), np.float32)])
    k_new = np.concatenate([np.stack(k_new), np.ones((1, qb, kvh, d), np.float32)])
    v_new = np.concatenate([np.stack(v_new), np.ones((1, qb, kvh, v_new[0].shape[-1]), np.float32)])
    # The door (one chunk covers these contexts) and the reference walking several chunks.
    # (static: every chunk and block walked with compile-time trip counts, masked)
    fn = kernels.paged_attention if chunk_pages == 32 else functools.partial(
        attention_reference.paged_attention, chunk_pages=chunk_pages, static_bounds=static)
    out = fn(jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(tables), jnp.asarray(k_pool),
             None if v_pool is None else jnp.asarray(v_pool), layer, jnp.asarray(k_new),
             None if mla else jnp.asarray(v_new), jnp.asarray(first), scale=0.3,
             window=attention_reference.NO_WINDOW if window is None and chunk_pages != 32 else window,
             sinks_H=None if sinks_h is None else jnp.asarray(sinks_h), value_dim=dv if mla else None)
    out = np.asarray(out, np.float64)
    assert out.shape == (len(first), qb, h, dv)
    ref = np.zeros_like(out)
    row = 0
    for i, (cached, new) in enumerate(chunks):
        for b in range(-(-new // qb)):
            pos = q_pos[row]
            got = dense(q_all[i][np.maximum(pos, 0)].astype(np.float64), keys_all[i].astype(np.float64),
                        vals_all[i].astype(np.float64), pos, 0.3, window or 1 << 30, sinks_h)
            ref[row] = got
            row += 1
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    assert np.all(out[q_pos < 0] == 0)
