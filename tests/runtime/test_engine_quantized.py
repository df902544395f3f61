"""Quantized models through the batching Engine: a request's greedy output is the same
batched as alone, and with prefix caching on as off (test_engine_properties.py's
near-tie rule, on a random tiny Llama quantized by the quantize pass in w8a8 mode).

w8a8-smoothquant is w8a8 after smoothing (data-free calibration: the tiny model's own
samples), whose factors are weights: the same property holds.

w8a8 quantizes activations per token (each row's scale from that row alone), so batching
cannot change a row's codes; its int8 weights go through the same definitions as the
weight-only modes (tests/passes/test_quantize_pass.py runs every mode's lowering).
"""
from __future__ import annotations

import pytest

from jaxrt.runtime.request import SamplingParams
from tests.runtime import test_engine_properties as props
from tests.runtime.conftest import FACTORIES, poisoned

# One fixed mix rather than hypothesis draws: every new mix shape compiles new buckets
# (~1.5 s each on the shared 2-core host); the float runners carry the random mixes.
# Prompts share two full pages (page size 4) so the prefix cache is hit; lengths straddle
# page boundaries; greedy with logprobs for the near-tie rule.
PREFIX = [5, 9, 13, 17, 21, 25, 29, 33]
PROMPTS = [PREFIX + [40, 41, 42], [7, 8, 9], PREFIX + [50], PREFIX + [60, 61, 62, 63, 64, 65]]
PARAMS = [SamplingParams(max_tokens=n, logprobs=2, ignore_eos=True) for n in (8, 12, 5, 9)]
JOBS = [props.Job(tuple(p), q) for p, q in zip(PROMPTS, PARAMS)]
# Two sequences a step (still batched: four requests), two decode buckets instead of three.
SMALL = dict(max_num_seqs=2)


def _factory(mode: str):
    factory = FACTORIES[f"tiny-llama-{mode}"]()
    factory.make = poisoned(factory.make)
    return factory


@pytest.fixture(scope="module")
def w8a8_factory():
    return _factory("w8a8")


def test_quantized_batched_equals_alone_and_caching_changes_nothing(w8a8_factory):
    f = w8a8_factory
    alone = props.one_at_a_time(f, JOBS)
    props.assert_same(f, props.batched(f, JOBS, enable_prefix_caching=False, **SMALL), alone,
                      "batched vs alone")
    e = props.engine(f, **SMALL)
    props.assert_same(f, e.generate(PROMPTS, PARAMS), alone, "caching (cold)")
    props.assert_same(f, e.generate(PROMPTS, PARAMS), alone, "caching (warm)")
    assert e.stats().prefix_cache_hit_rate > 0
    assert all(len(o.ids) == p.max_tokens for o, p in zip(alone, PARAMS))


def test_smoothquant_batched_equals_alone():
    """The smoothing adds weights (folded norms, scale vectors) and per-channel scale ops,
    nothing that depends on the batch: batched == alone (caching is w8a8's test above)."""
    f = _factory("w8a8-smoothquant")
    props.assert_same(f, props.batched(f, JOBS, enable_prefix_caching=False, **SMALL),
                      props.one_at_a_time(f, JOBS), "batched vs alone")
