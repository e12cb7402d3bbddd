"""The on-device sampler against an exact float64 reference of vLLM's semantics: chi-square fits, greedy rows,
seeds and steps, batch independence, logprobs, and the all-greedy shortcut."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.engine.sampling import SamplingBatch, SamplingParams, sample

VOCAB = 24
DRAWS = 32768  # rows per fit: one jitted call, the same logits in every row, distinct (seed, step) pairs
P_MIN = 1e-3

sample_jit = jax.jit(sample, static_argnames=("num_logprobs",))


def reference_probs(logits_V, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, top_p_first=False):
    """Exact distribution [V] in float64, in vLLM's order: temperature, min_p, top_k, then top_p over what is left.
    top_p_first=True measures top_p over the unfiltered distribution instead (a wrong variant, for the controls)."""
    z_V = np.asarray(logits_V, np.float64) / temperature
    p_V = np.exp(z_V - z_V.max())
    p_V /= p_V.sum()
    keep_V = p_V >= min_p * p_V.max()
    if top_k > 0:
        keep_V &= z_V >= np.sort(z_V)[::-1][min(top_k, len(z_V)) - 1]
    base_V = p_V if top_p_first else np.where(keep_V, p_V, 0.0) / p_V[keep_V].sum()
    order = np.argsort(-base_V, kind="stable")
    before = np.cumsum(base_V[order]) - base_V[order]  # mass ahead of each token in descending order
    keep_V[order[before >= top_p]] = False
    q_V = np.where(keep_V, p_V, 0.0)
    return q_V / q_V.sum()


def chi2_sf(x, df):
    """P(chi-square with df degrees of freedom > x): the regularized upper incomplete gamma Q(df/2, x/2)."""
    a, x = df / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for the lower P(a, x)
        term = total = 1.0 / a
        n = 0
        while abs(term) > 1e-16 * abs(total):
            n += 1
            term *= x / (a + n)
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Continued fraction for Q(a, x) (modified Lentz).
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h * math.exp(log_front)


def fit_pvalue(counts_V, probs_V):
    """Chi-square goodness-of-fit p-value of counts against probs; 0 when a token outside the support was drawn.
    Cells expected below 5 draws are pooled into one."""
    n = counts_V.sum()
    if counts_V[probs_V == 0].any():
        return 0.0
    expected = n * probs_V[probs_V > 0]
    observed = counts_V[probs_V > 0].astype(np.float64)
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    if len(expected) < 2:
        return 1.0
    stat = float(((observed - expected) ** 2 / expected).sum())
    return chi2_sf(stat, len(expected) - 1)


def draw_counts(logits_V, params: SamplingParams, seed_base: int):
    """Token counts [V] from DRAWS rows of the same logits, each with its own (seed, step)."""
    rows = np.arange(DRAWS)
    batch = SamplingBatch.build([params] * DRAWS, list(seed_base + rows // 8), list(rows % 8), DRAWS)
    logits_NV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (DRAWS, len(logits_V)))
    tokens_N = np.asarray(sample_jit(logits_NV, batch)[0])
    return np.bincount(tokens_N, minlength=len(logits_V))


def assert_not_borderline(logits_V, kw):
    """The case's cut-offs sit clearly away from float32 rounding, so float32 and float64 agree on the support."""
    p_V = reference_probs(logits_V, kw.get("temperature", 1.0))
    assert np.all(np.abs(p_V / p_V.max() - kw.get("min_p", 0.0)) > 1e-4)
    if kw.get("top_p", 1.0) < 1:
        kept = reference_probs(logits_V, kw.get("temperature", 1.0), kw.get("top_k", 0), 1.0, kw.get("min_p", 0.0))
        kept = np.sort(kept)[::-1]
        assert np.all(np.abs(np.cumsum(kept) - kept - kw["top_p"]) > 1e-4)


# name: (settings, deliberately wrong references for the same draws). The fit must accept the settings' exact
# distribution and reject every wrong one. min_p and top_k each keep a prefix of the sorted vocabulary, so only the
# stricter of the two binds in a row: the combined cases take one of each.
COMBINED = dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.1)  # min_p binds
COMBINED_K = dict(temperature=1.2, top_k=6, top_p=0.8, min_p=0.02)  # top_k binds
FIT_CASES = {
    "temperature 0.7, top_p 0.8": (dict(temperature=0.7, top_p=0.8), [dict(temperature=0.7)]),
    "top_k 5, temperature 1.3": (dict(temperature=1.3, top_k=5), [dict(temperature=1.0, top_k=5), dict(top_k=6)]),
    "min_p 0.1": (dict(min_p=0.1), [dict(), dict(min_p=0.1, temperature=0.9)]),
    "combined, min_p binds": (COMBINED, [{**COMBINED, "top_p_first": True}, {**COMBINED, "top_p": 1.0},
                                         {**COMBINED, "min_p": 0.0}]),
    "combined, top_k binds": (COMBINED_K, [{**COMBINED_K, "top_p_first": True}, {**COMBINED_K, "top_p": 1.0},
                                           {**COMBINED_K, "top_k": 0}]),
    "temperature 1": (dict(temperature=1.0), [dict(temperature=1.15)]),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_sampled_frequencies_fit_the_exact_distribution(case):
    kw, wrong_kws = FIT_CASES[case]
    index = list(FIT_CASES).index(case)
    logits_V = np.random.RandomState(100 + index).randn(VOCAB) * 1.5
    assert_not_borderline(logits_V, kw)
    counts_V = draw_counts(logits_V, SamplingParams(**kw), seed_base=1_000_000 * index)
    probs_V = reference_probs(logits_V, **kw)
    outside = np.flatnonzero(counts_V * (probs_V == 0))
    assert not outside.size, f"drawn outside the support: {outside}"
    assert fit_pvalue(counts_V, probs_V) > P_MIN
    # The test can fail: the same draws against a wrong distribution are rejected.
    for wrong_kw in wrong_kws:
        wrong_V = reference_probs(logits_V, **wrong_kw)
        assert not np.allclose(wrong_V, probs_V), wrong_kw
        assert fit_pvalue(counts_V, wrong_V) < P_MIN, wrong_kw


def test_chi2_sf_matches_closed_forms():
    for x in (0.1, 0.5, 1.0, 2.5, 6.0, 15.0, 40.0):
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
        assert chi2_sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-9)
    # Table critical values: chi-square(10) at 0.05 and 0.001, chi-square(30) at 0.001.
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, rel=1e-3)
    assert chi2_sf(29.588, 10) == pytest.approx(0.001, rel=1e-3)
    assert chi2_sf(59.703, 30) == pytest.approx(0.001, rel=1e-3)


def test_fit_rejects_a_slightly_wrong_distribution():
    rng = np.random.RandomState(0)
    probs_V = rng.dirichlet(np.ones(VOCAB))
    counts_V = rng.multinomial(DRAWS, probs_V)
    assert fit_pvalue(counts_V, probs_V) > P_MIN
    sharper_V = probs_V ** 1.1  # what temperature 1/1.1 would give
    assert fit_pvalue(counts_V, sharper_V / sharper_V.sum()) < P_MIN
    hole_V = probs_V.copy()
    hole_V[np.argmin(hole_V)] = 0.0
    assert fit_pvalue(counts_V, hole_V / hole_V.sum()) == 0.0


def mixed_rows(rows: int, seed: int):
    """(logits [rows, V], params, seeds, steps): a greedy row every fourth, the others with assorted filters."""
    rng = np.random.RandomState(seed)
    logits = rng.randn(rows, VOCAB).astype(np.float32)
    params = []
    for i in range(rows):
        temperature = 0.0 if i % 4 == 0 else float(rng.choice([0.5, 1.0, 1.5]))
        params.append(SamplingParams(temperature=temperature, top_k=int(rng.choice([0, 3, 10])),
                                     top_p=float(rng.choice([1.0, 0.9, 0.6])), min_p=float(rng.choice([0.0, 0.05]))))
    return logits, params, [int(s) for s in rng.randint(0, 2**31, rows)], [int(s) for s in rng.randint(0, 50, rows)]


def run(logits, params, seeds, steps, batch_size=None, num_logprobs=0):
    batch = SamplingBatch.build(params, seeds, steps, batch_size or len(params))
    pad = (batch_size or len(params)) - len(params)
    logits = np.concatenate([logits, np.zeros((pad, logits.shape[1]), logits.dtype)])
    tokens, logprobs, top = sample_jit(jnp.asarray(logits), batch, num_logprobs)
    top = None if top is None else (np.asarray(top[0]), np.asarray(top[1]))
    return np.asarray(tokens)[: len(params)], np.asarray(logprobs)[: len(params)], top


def test_greedy_rows_give_argmax():
    logits, params, seeds, steps = mixed_rows(16, 1)
    tokens, _, _ = run(logits, params, seeds, steps)
    greedy = np.array([p.temperature == 0 for p in params])
    np.testing.assert_array_equal(tokens[greedy], np.argmax(logits, -1)[greedy])
    assert (tokens[~greedy] != np.argmax(logits, -1)[~greedy]).any(), "sampled rows should not all be argmax"


def test_same_seed_and_step_give_the_same_token_whatever_the_batch():
    logits, params, seeds, steps = mixed_rows(16, 2)
    tokens, _, _ = run(logits, params, seeds, steps)
    perm = np.random.RandomState(3).permutation(16)
    permuted, _, _ = run(logits[perm], [params[i] for i in perm], [seeds[i] for i in perm], [steps[i] for i in perm])
    np.testing.assert_array_equal(permuted, tokens[perm])
    for i in (1, 2, 7):
        alone, _, _ = run(logits[i:i + 1], [params[i]], [seeds[i]], [steps[i]], batch_size=4)  # padded
        assert alone[0] == tokens[i]
    again, _, _ = run(logits, params, seeds, steps)
    np.testing.assert_array_equal(again, tokens)


def test_different_steps_and_seeds_give_different_draws():
    flat = np.zeros((64, 32), np.float32)
    params = [SamplingParams(temperature=1.0)] * 64
    by_step, _, _ = run(flat, params, [7] * 64, list(range(64)))
    by_seed, _, _ = run(flat, params, list(range(64)), [5] * 64)
    # 64 uniform draws over 32 tokens hit about 28 distinct ones; 16 would be far in the tail.
    assert len(set(by_step.tolist())) >= 16 and len(set(by_seed.tolist())) >= 16
    assert (by_step != by_seed).any()


def test_logprobs_are_raw_log_softmax_and_top_logprobs_sorted():
    logits, params, seeds, steps = mixed_rows(12, 4)
    logits = logits * 3
    tokens, token_logprobs, (top_vals, top_ids) = run(logits, params, seeds, steps, num_logprobs=5)
    z = logits.astype(np.float64)
    ref = z - z.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(token_logprobs, ref[np.arange(12), tokens], atol=1e-5)
    assert top_vals.shape == top_ids.shape == (12, 5)
    assert np.all(np.diff(top_vals, axis=-1) <= 0)
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, axis=-1)[:, :5])
    np.testing.assert_allclose(top_vals, np.sort(ref, axis=-1)[:, ::-1][:, :5], atol=1e-5)
    assert run(logits, params, seeds, steps)[2] is None


def test_all_greedy_batch_matches_mixed_batch():
    logits, params, seeds, steps = mixed_rows(16, 5)
    greedy_params = [dataclasses.replace(p, temperature=0.0) for p in params]
    mixed_params = [p if i % 2 else dataclasses.replace(p, temperature=1.0) for i, p in enumerate(greedy_params)]
    all_greedy = run(logits, greedy_params, seeds, steps, num_logprobs=3)
    mixed = run(logits, mixed_params, seeds, steps, num_logprobs=3)
    odd = np.arange(16) % 2 == 1
    np.testing.assert_array_equal(all_greedy[0], np.argmax(logits, -1))
    np.testing.assert_array_equal(all_greedy[0][odd], mixed[0][odd])
    np.testing.assert_array_equal(all_greedy[1][odd], mixed[1][odd])
    np.testing.assert_array_equal(all_greedy[2][1], mixed[2][1])
    # No conditional in the sampler: on the GPU one makes every step's dispatch wait for the device.
    batch = SamplingBatch.build(greedy_params, seeds, steps, 16)
    jaxpr = str(jax.make_jaxpr(sample)(jnp.asarray(logits), batch))
    assert " cond[" not in jaxpr and " while[" not in jaxpr, "a conditional or loop in the sampler"

