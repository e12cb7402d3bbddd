"""Attention pieces against direct float64 computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import attention


def reference(q, k, v, mask, scale, sinks=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, v.shape[-1]))
    for hh in range(h):
        s = np.einsum("btd,bsd->bts", q[:, :, hh], k[:, :, hh // group]) * scale
        s = np.where(mask, s, -np.inf)
        m = s.max(-1, keepdims=True) if sinks is None else np.maximum(s.max(-1, keepdims=True), sinks[hh])
        e = np.exp(s - m)
        denom = e.sum(-1, keepdims=True) + (0 if sinks is None else np.exp(sinks[hh] - m))
        out[:, :, hh] = np.einsum("bts,bsd->btd", e / denom, v[:, :, hh // group])
    return out


@pytest.mark.parametrize("t, window, sinks", [(8, None, False), (1024, None, False), (1024, 100, True)])
def test_attend_matches_reference(monkeypatch, t, window, sinks):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 256)
    rng = np.random.RandomState(0)
    b, h, kvh, d = 2, 4, 2, 8
    q = rng.randn(b, t, h, d).astype(np.float32)
    k = rng.randn(b, t, kvh, d).astype(np.float32)
    v = rng.randn(b, t, kvh, d).astype(np.float32)
    pos = np.tile(np.arange(t), (b, 1))
    pos[1, t - 3:] = -1  # padding
    mask = np.asarray(attention.attention_mask(jnp.asarray(pos), jnp.asarray(pos), window))
    s = rng.randn(h).astype(np.float32) if sinks else None
    got = attention.attend(q, k, v, mask, 0.3, None if s is None else jnp.asarray(s))
    want = reference(q, k, v, mask, 0.3, s)
    valid = pos >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=2e-5, rtol=1e-4)
