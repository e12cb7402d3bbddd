"""kernels.paged_attention (the pure-JAX reference and the Pallas kernels, interpreted) against dense attention
in float64 numpy."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels
from moejax.kernels import attention_reference
from moejax.layers.kv_cache import to_cache_dtype


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


def prefill_case(rng, *, qb, window, sinks, mla, kv_heads=2, heads=4, head_dim=16, value_dim=12, page_size=4,
                 dtype=np.float32):
    """Chunks of several sequences (decodes, whole prompts, chunks after a cached prefix), each cut into blocks
    of qb queries: cached keys live in shuffled pages of a pool full of noise, the chunk's own keys in k_new.
    Returns (the paged_attention arguments, the float64 dense result, the query positions)."""
    layers, pages, ps, d = 2, 48, page_size, head_dim
    kvh, h = (1 if mla else kv_heads), heads
    dv = value_dim if mla else d
    chunks = [(0, 1), (8, 1), (0, 13), (9, 7), (22, 1), (5, 20)]  # (cached positions, new tokens) per sequence
    max_pages = -(-27 // ps) + 1
    pages = max(pages, len(chunks) * max_pages + 1)
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
    ref = np.zeros((len(first), qb, h, dv))
    row = 0
    for i, (cached, new) in enumerate(chunks):
        for b in range(-(-new // qb)):
            pos = q_pos[row]
            ref[row] = dense(q_all[i][np.maximum(pos, 0)].astype(np.float64), keys_all[i].astype(np.float64),
                             vals_all[i].astype(np.float64), pos, 0.3, window or 1 << 30, sinks_h)
            row += 1
    arr = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    args = dict(q_NQHD=arr(q), q_pos_NQ=jnp.asarray(q_pos), page_table_NP=jnp.asarray(tables), k_pool=arr(k_pool),
                v_pool=None if v_pool is None else arr(v_pool), layer=layer, k_new_NQKD=arr(k_new),
                v_new_NQKD=None if mla else arr(v_new), first_N=jnp.asarray(first), scale=0.3,
                window=attention_reference.NO_WINDOW if window is None else window,
                sinks_H=None if sinks_h is None else jnp.asarray(sinks_h), value_dim=dv if mla else None)
    return args, ref, q_pos


@pytest.mark.parametrize("window, sinks, mla", [(None, False, False), (5, True, False), (None, False, True),
                                               (7, False, False)])
@pytest.mark.parametrize("qb, chunk_pages, static", [(1, 32, False), (8, 32, False), (1, 2, False), (8, 4, True),
                                                     (1, 2, True)])
def test_paged_attention_matches_dense(window, sinks, mla, qb, chunk_pages, static):
    """The door (one chunk covers these contexts) and the reference walking several chunks of pages (static:
    every chunk and block walked with compile-time trip counts, masked) equal dense attention."""
    args, ref, q_pos = prefill_case(np.random.default_rng(), qb=qb, window=window, sinks=sinks, mla=mla)
    fn = kernels.paged_attention if chunk_pages == 32 else functools.partial(
        attention_reference.paged_attention, chunk_pages=chunk_pages, static_bounds=static)
    out = np.asarray(fn(**args), np.float64)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    assert np.all(out[q_pos < 0] == 0)


@pytest.mark.parametrize("variant", ["gqa", "window_sinks", "mla", "mha", "fp8", "bf16", "tiles", "tiles_window"])
def test_pallas_prefill_matches_dense(variant):
    """The prefill-chunk kernel (interpreted here; compiled in tests/test_gpu.py) on the same chunks: whole
    prompts, chunks after a cached prefix, one-token chunks, a padding block, shuffled pages."""
    from moejax.kernels.pallas_paged_prefill import PrefillTiles, paged_prefill

    rng = np.random.default_rng()
    shape = dict(qb=16, window=None, sinks=False, mla=False)
    tiles = None
    if variant == "window_sinks":
        shape.update(window=int(rng.integers(3, 12)), sinks=True)
    if variant == "mla":  # a latent of 48 (32 + 16 rope) values, the first 32 of which are the values
        shape.update(mla=True, head_dim=48, value_dim=32, heads=8)
    if variant == "mha":
        shape.update(kv_heads=4)
    if variant == "tiles":  # several row blocks per block, cache tiles of one page, own-key tiles of 16
        shape.update(heads=8, page_size=8)
        tiles = PrefillTiles(block_m=16, block_tokens=8)
    if variant == "tiles_window":  # windows of 20-22 over tiles of 8 cached / 16 own keys: each loop of the
        # kernel runs (tiles cut by the window's edge, whole tiles, the causal / cache-end tiles)
        shape.update(window=int(rng.integers(20, 23)), sinks=True)
        tiles = PrefillTiles(block_m=16, block_tokens=8)
    if variant == "bf16":
        shape.update(dtype=jnp.bfloat16)
    args, ref, q_pos = prefill_case(rng, **shape)
    if variant == "fp8":  # e4m3 pages and keys read by float32 queries: the reference reads the same values
        for name in ("k_pool", "v_pool", "k_new_NQKD", "v_new_NQKD"):
            args[name] = to_cache_dtype(args[name], jnp.float8_e4m3fn)
        ref = np.asarray(attention_reference.paged_attention(**args), np.float64)
    out = paged_prefill(**args, tiles=tiles, interpret=True)
    assert out.shape == ref.shape and out.dtype == args["q_NQHD"].dtype
    tol = 3e-2 if variant == "bf16" else 2e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol, atol=tol)
    assert np.all(np.asarray(out)[q_pos < 0] == 0)


def decode_case(rng, *, heads, kv_heads, head_dim, value_dim=None, page_size, max_pages, contexts, layers=2,
                dtype=np.float32, sinks=False, pool_dtype=None):
    """Random decode arguments: shuffled, non-contiguous pages of a pool full of noise; contexts are the cached
    lengths (0: a first token, max_pages * page_size - 1: a full table, -1: a padding row)."""
    n = len(contexts)
    mla = value_dim is not None
    num_pages = n * max_pages + 3
    order = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((n, max_pages), np.int32)
    for i, c in enumerate(contexts):
        used = -(-max(c + 1, 0) // page_size)
        table[i, :used] = order[i * max_pages: i * max_pages + used]

    def arr(*shape, cache=False):  # cache: in the pools' dtype (as LayerKV.write leaves this step's keys too)
        x = jnp.asarray(rng.standard_normal(shape), dtype)
        return to_cache_dtype(x, pool_dtype) if cache and pool_dtype is not None else x

    return dict(
        q_NHD=arr(n, heads, head_dim), pos_N=jnp.asarray(contexts, jnp.int32), page_table_NP=jnp.asarray(table),
        k_pool=arr(layers, num_pages, page_size, kv_heads, head_dim, cache=True),
        v_pool=None if mla else arr(layers, num_pages, page_size, kv_heads, head_dim, cache=True),
        layer=jnp.int32(layers - 1), k_new_NKD=arr(n, kv_heads, head_dim, cache=True),
        v_new_NKD=None if mla else arr(n, kv_heads, head_dim, cache=True),
        sinks_H=arr(heads) if sinks else None, value_dim=value_dim)


def decode_reference(case, scale, window):
    c = case
    return attention_reference.paged_attention(
        c["q_NHD"][:, None], c["pos_N"][:, None], c["page_table_NP"], c["k_pool"], c["v_pool"], c["layer"],
        c["k_new_NKD"][:, None], None if c["v_new_NKD"] is None else c["v_new_NKD"][:, None],
        jnp.arange(len(c["pos_N"])), scale=scale, window=window, sinks_H=c["sinks_H"], value_dim=c["value_dim"],
        max_back=0)[:, 0]


@pytest.mark.parametrize("variant", ["gqa", "window_sinks", "mla", "splits", "bf16", "fp8", "fp8_mla"])
def test_pallas_decode_matches_reference(variant):
    """The flash-decoding kernel (interpreted here; compiled in tests/test_gpu.py) equals the pure-JAX version."""
    from moejax.kernels.pallas_paged_attention import DecodeTiles, paged_decode

    rng = np.random.default_rng()
    shape = dict(heads=8, kv_heads=2, head_dim=32, page_size=4, max_pages=12)
    tiles, window = None, attention_reference.NO_WINDOW
    if variant == "mla":  # one latent of 48 (32 + 16 rope) values, the first 32 of which are the values
        shape.update(kv_heads=1, head_dim=48, value_dim=32)
    if variant == "window_sinks":
        shape.update(sinks=True)
        window = int(rng.integers(3, 12))
    if variant == "splits":  # several splits of a few pages each, a block of two pages
        tiles = DecodeTiles(block_tokens=8, splits=3)
        window = int(rng.integers(5, 30))
    if variant == "fp8_mla":
        shape.update(kv_heads=1, head_dim=48, value_dim=32)
    dtype = np.float32
    if variant == "bf16":
        dtype = jnp.bfloat16
    if variant.startswith("fp8"):  # e4m3 pages read by float32 queries: the same upcast values either way
        shape.update(pool_dtype=jnp.float8_e4m3fn)
    max_len = shape["max_pages"] * shape["page_size"] - 1
    contexts = [0, int(rng.integers(1, 8)), int(rng.integers(8, max_len)), max_len, -1]
    case = decode_case(rng, contexts=contexts, dtype=dtype, **shape)
    args = {k: v for k, v in case.items() if k != "value_dim"}
    out = paged_decode(**args, scale=0.3, window=window, value_dim=case["value_dim"], tiles=tiles, interpret=True)
    ref = decode_reference(case, 0.3, window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 2e-2 if variant == "bf16" else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    assert np.all(np.asarray(out[-1]) == 0)  # the padding row
