"""Sampler: greedy, truncation masks, penalties, seeded determinism, logprobs, beams.

The sampler is built as the engine tests build theirs (vocab 64, 20 top logprobs) and
called with 1, 2 or 4 rows, so compiled variants are shared (each costs about a second of
XLA compile on CPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrt.runtime.request import SamplingParams
from jaxrt.runtime.sampler import (Sampler, SamplingBatch, apply_penalties, beam_candidates,
                                   gumbel_noise, truncation_mask)

V = 64


@pytest.fixture(scope="module")
def sampler():
    return Sampler(V, num_top=20)


def rows(*items):
    """items: (params, seed, step[, prompt, output])."""
    return [None if it is None else (it[0], it[1], it[2], *(it[3:] or ([1], [])))
            for it in items]


def logits_of(*rows_):
    return jnp.asarray(np.stack(rows_).astype(np.float32))


def random_logits(rng, n):
    return rng.normal(size=(n, V)).astype(np.float32) * 2


def run(sampler, logits, items, n=None):
    n = n or len(items)
    return sampler(jnp.asarray(logits[:n]), SamplingBatch.build(rows(*items), n, V))


def test_greedy_is_argmax(sampler):
    rng = np.random.default_rng(0)
    logits = random_logits(rng, 4)
    out = run(sampler, logits, [(SamplingParams(), 0, 0)] * 4)
    assert [o.token for o in out] == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy(sampler):
    rng = np.random.default_rng(1)
    logits = random_logits(rng, 4)
    for params in (SamplingParams(temperature=1.5, top_k=1),
                   SamplingParams(temperature=1.5, top_p=1e-6)):
        out = run(sampler, logits, [(params, s, 0) for s in range(4)])
        assert [o.token for o in out] == logits.argmax(-1).tolist()


def np_mask(scaled, top_k, top_p, min_p):
    """Reference: min-p, then top-k, then top-p on the renormalized survivors."""
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    keep = p >= min_p * p.max() if min_p > 0 else np.ones(V, bool)
    if top_k:
        keep &= scaled >= np.sort(scaled)[::-1][top_k - 1]
    if top_p < 1:
        q = np.where(keep, p, 0)
        q /= q.sum()
        order = np.argsort(-q, kind="stable")
        mass = np.cumsum(q[order]) - q[order]
        chosen = order[mass < top_p]
        keep &= scaled >= scaled[chosen].min()
    return keep


def test_truncation_mask_matches_reference():
    rng = np.random.default_rng(2)
    for _ in range(20):
        scaled = random_logits(rng, 8)
        top_k = rng.integers(0, 6, 8).astype(np.int32)
        top_p = np.where(rng.random(8) < 0.5, 1.0, rng.uniform(0.05, 0.95, 8)).astype(np.float32)
        min_p = np.where(rng.random(8) < 0.5, 0.0, rng.uniform(0, 0.5, 8)).astype(np.float32)
        got = np.asarray(jax.jit(truncation_mask)(scaled, top_k, top_p, min_p))
        for r in range(8):
            want = np_mask(scaled[r], top_k[r], top_p[r], min_p[r])
            assert (got[r] == want).all(), (r, top_k[r], top_p[r], min_p[r])


def test_known_distribution_masks():
    probs = np.array([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    scaled = np.log(np.maximum(probs, 1e-12)).astype(np.float32)[None].repeat(8, 0)
    pad = [0] * 5  # 8 rows: the shape test_truncation_mask_matches_reference compiled
    m = np.asarray(jax.jit(truncation_mask)(scaled, np.array([0, 3, 0] + pad, np.int32),
                                            np.array([0.7, 1.0, 1.0] + [1.0] * 5, np.float32),
                                            np.array([0.0, 0.0, 0.2] + pad, np.float32)))
    assert np.nonzero(m[0])[0].tolist() == [0, 1]      # top-p 0.7: 0.5 + 0.3
    assert np.nonzero(m[1])[0].tolist() == [0, 1, 2]   # top-k 3
    assert np.nonzero(m[2])[0].tolist() == [0, 1, 2]   # min-p 0.2: p >= 0.1


def test_samples_stay_inside_the_mask(sampler):
    rng = np.random.default_rng(3)
    logits = random_logits(rng, 1)[0]
    for params in (SamplingParams(temperature=2.0, top_k=3),
                   SamplingParams(temperature=2.0, top_p=0.5),
                   SamplingParams(temperature=2.0, min_p=0.3)):
        allowed = np_mask(logits / 2.0, params.top_k, params.top_p, params.min_p)
        for seed in range(0, 64, 4):
            out = run(sampler, np.repeat(logits[None], 4, 0),
                      [(params, seed + i, 0) for i in range(4)])
            assert all(allowed[o.token] for o in out)


def test_sampling_follows_the_distribution():
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=V) * 1.5).astype(np.float32)
    n = 4096
    draws = jax.jit(lambda lo, step: jnp.argmax(logits[None] + gumbel_noise(
        lo, jnp.zeros_like(lo), step, V), axis=-1))(
        jnp.arange(n, dtype=jnp.uint32) * 7919, jnp.arange(n, dtype=jnp.int32) % 5)
    freq = np.bincount(np.asarray(draws), minlength=V) / n
    p = np.exp(logits - logits.max())
    p /= p.sum()
    # 4096 draws: the std of a frequency is <= sqrt(p (1 - p) / n) <= 0.0078; allow 5 sigma
    assert np.abs(freq - p).max() < 0.04
    assert np.abs(freq - p).sum() < 0.15


def test_seeded_sampling_ignores_batch_composition(sampler):
    rng = np.random.default_rng(5)
    logits = random_logits(rng, 4)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = run(sampler, logits[2:3], [(p, 1234, 7)])[0].token
    # the same row, at another index, next to seeded, greedy and padding rows
    items = [(SamplingParams(temperature=0.7, top_k=5), 99, 3), (SamplingParams(), 0, 0),
             (p, 1234, 7), None]
    out = run(sampler, logits[[0, 1, 2, 3]], items)
    assert out[2].token == alone
    out = run(sampler, logits[[3, 2]], [(SamplingParams(temperature=2.0), 5, 1), (p, 1234, 7)])
    assert out[1].token == alone
    # other steps change the draw (over a few tries)
    draws = {run(sampler, logits[2:3], [(p, 1234, step)])[0].token for step in range(12)}
    assert len(draws) > 1


def test_penalties_match_vllm_formula():
    rng = np.random.default_rng(6)
    logits = random_logits(rng, 2)
    prompt_mask = np.zeros((2, V), bool)
    prompt_mask[0, [1, 2, 3]] = True
    counts = np.zeros((2, V), np.int32)
    counts[0, [3, 4]] = [2, 1]
    counts[1, 5] = 3
    rep = np.array([1.3, 1.0], np.float32)
    pres = np.array([0.5, -0.25], np.float32)
    freq = np.array([0.1, 0.2], np.float32)
    got = np.asarray(apply_penalties(jnp.asarray(logits), prompt_mask, counts, rep, pres, freq))
    want = logits.copy()
    for r in range(2):
        seen = prompt_mask[r] | (counts[r] > 0)
        want[r] = np.where(seen, np.where(want[r] > 0, want[r] / rep[r], want[r] * rep[r]),
                           want[r])
        want[r] -= freq[r] * counts[r] + pres[r] * (counts[r] > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_penalties_change_greedy_choice(sampler):
    logits = np.zeros((2, V), np.float32)
    logits[:, 7], logits[:, 9] = 2.0, 1.9
    plain = SamplingParams()
    rep = SamplingParams(repetition_penalty=1.2)
    out = run(sampler, logits, [(plain, 0, 0, [7], []), (rep, 0, 0, [7], [])])
    assert [o.token for o in out] == [7, 9]
    freq = SamplingParams(frequency_penalty=0.2)
    out = run(sampler, logits, [(freq, 0, 0, [1], [7]), (freq, 0, 0, [1], [9])])
    assert [o.token for o in out] == [9, 7]


def test_logprobs_are_log_softmax_of_processed_logits(sampler):
    rng = np.random.default_rng(7)
    logits = random_logits(rng, 2)
    items = [(SamplingParams(logprobs=3), 0, 0), (SamplingParams(temperature=0.5, seed=1), 1, 0)]
    out = run(sampler, logits, items)
    for r, temp in ((0, 1.0), (1, 0.5)):
        s = logits[r] / temp
        lp = s - s.max() - np.log(np.exp(s - s.max()).sum())
        order = np.argsort(-lp)[:20]
        assert out[r].top_ids.tolist() == order.tolist()
        np.testing.assert_allclose(out[r].top_logprobs, lp[order], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[r].logprob, lp[out[r].token], rtol=1e-5, atol=1e-5)
    top = out[0].top(3)
    assert len(top) == 3 and out[0].token in top


def test_beam_candidates_add_cumulative_logprobs():
    ids = np.array([[4, 2, 9, 1], [3, 8, 6, 5]])
    lps = np.array([[-0.1, -1.0, -2.0, -3.0], [-0.5, -0.6, -0.7, -0.8]])
    toks, cums = beam_candidates(ids, lps, np.array([-1.0, -0.2]), beam_width=2)
    assert toks.tolist() == ids.tolist()
    np.testing.assert_allclose(cums, lps + np.array([[-1.0], [-0.2]]))
    with pytest.raises(ValueError):
        beam_candidates(ids, lps, np.zeros(2), beam_width=3)


def test_untruncated_form_draws_the_same_tokens():
    # The decode loops sample with truncate=False (no lax.cond): for rows that do not
    # truncate (greedy rows and plain temperature rows), tokens and logprobs must equal
    # the branching form's, whatever mix of greedy and random rows shares the batch.
    from jaxrt.runtime.sampler import sample_tokens
    rng = np.random.default_rng(3)
    n = 8
    fn = jax.jit(sample_tokens, static_argnames=("truncate",))
    for trial in range(6):
        logits = jnp.asarray(random_logits(rng, n))
        temperature = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0.3, 2.0, n))
        if trial == 0:
            temperature[:] = 0.0  # all greedy: the branching form skips the draw
        args = (logits, jnp.asarray(temperature, jnp.float32), jnp.zeros(n, jnp.int32),
                jnp.ones(n, jnp.float32), jnp.zeros(n, jnp.float32),
                jnp.asarray(rng.integers(0, 2**32, n), jnp.uint32),
                jnp.asarray(rng.integers(0, 2**32, n), jnp.uint32),
                jnp.asarray(rng.integers(0, 100, n), jnp.int32))
        want = jax.device_get(fn(*args, truncate=True))
        got = jax.device_get(fn(*args, truncate=False))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert (temperature > 0).any() == (trial != 0)


def test_truncating_params_are_flagged():
    assert not SamplingParams().truncates  # greedy
    assert not SamplingParams(temperature=0.0, top_k=5).truncates  # greedy ignores it
    assert not SamplingParams(temperature=0.7).truncates
    for kw in ({"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}):
        assert SamplingParams(temperature=0.7, **kw).truncates
