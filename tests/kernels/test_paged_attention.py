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
@pytest.mark.parametrize("qb, chunk_pages", [(1, 32), (8, 32), (1, 2), (8, 4)])
def test_paged_attention_matches_dense(window, sinks, mla, qb, chunk_pages):
    rng = np.random.default_rng()
    layers, pages, ps, kvh, h, d = 2, 24, 4, (1 if mla else 2), 4, 16
    dv = 12 if mla else d
    k_pool = rng.standard_normal((layers, pages, ps, kvh, d)).astype(np.float32)
    v_pool = None if mla else rng.standard_normal((layers, pages, ps, kvh, d)).astype(np.float32)
    sinks_h = rng.standard_normal(h).astype(np.float32) if sinks else None
    lengths = [1, 9, 23, 14]  # context length of each block's sequence
    max_pages = 6
    order = rng.permutation(np.arange(1, pages))
    tables = np.zeros((len(lengths), max_pages), np.int32)
    q_pos = np.full((len(lengths), qb), -1, np.int32)
    for b, n in enumerate(lengths):
        tables[b, : -(-n // ps)] = order[b * max_pages: b * max_pages + -(-n // ps)]
        m = min(qb, n) if b != 2 else min(qb - 2, n)  # one block padded at its end
        q_pos[b, :m] = np.arange(n - m, n)
    q = rng.standard_normal((len(lengths), qb, h, d)).astype(np.float32)
    layer = 1
    # The door (one chunk covers these contexts) and the reference walking several chunks.
    fn = kernels.paged_attention if chunk_pages == 32 else functools.partial(
        attention_reference.paged_attention, chunk_pages=chunk_pages)
    out = fn(jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(tables), jnp.asarray(k_pool),
                                  None if v_pool is None else jnp.asarray(v_pool), layer, scale=0.3,
                                  window=attention_reference.NO_WINDOW if window is None and chunk_pages != 32
                                  else window, sinks_H=None if sinks_h is None else jnp.asarray(sinks_h),
                                  value_dim=dv if mla else None)
    out = np.asarray(out, np.float64)
    assert out.shape == (len(lengths), qb, h, dv)
    for b, n in enumerate(lengths):
        keys = k_pool[layer][tables[b]].reshape(-1, kvh, d)[:n].astype(np.float64)
        vals = keys[..., :dv] if mla else v_pool[layer][tables[b]].reshape(-1, kvh, d)[:n].astype(np.float64)
        ref = dense(q[b].astype(np.float64), keys, vals, q_pos[b], 0.3, window or 1 << 30, sinks_h)
        np.testing.assert_allclose(out[b], ref, rtol=2e-5, atol=2e-5)
        assert np.all(out[b][q_pos[b] < 0] == 0)
