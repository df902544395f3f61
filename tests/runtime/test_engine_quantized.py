"""Quantized models through the batching Engine: in every quantize mode (the weight modes
int8-weight, fp8-weight, w8a8, fp8, w8a8-smoothquant, the KV cache modes kv-int8 and
kv-fp8, and one weight + cache combination), a request's greedy output is the same
batched as alone, and with prefix caching on as off (test_engine_properties.py's
near-tie rule), on a random tiny Llama quantized by the real pipeline.

Why these hold: weight codes and scales are fixed at load; w8a8, fp8 and
w8a8-smoothquant quantize activations per token (each row's scale from that row alone),
and the smoothing's factors are weights (data-free calibration: the tiny model's own
samples), so batching cannot change a row's codes; a quantized cache stores each
(token, kv head) row with its own scale, so a shared prefix is written with the same
codes whichever request writes it.

Every comparison builds fresh engines, each on a runner whose KV cache was filled with
garbage (conftest.poison), so nothing one engine left behind can make another pass; the
compared outputs are full length and differ between prompts.
"""
from __future__ import annotations

import pytest

from jaxrt.compiler import quantize_mode
from jaxrt.ir import DType
from jaxrt.runtime.request import SamplingParams
from tests.runtime import test_engine_properties as props
from tests.runtime.conftest import FACTORIES, QUANTIZED_MODES, poisoned

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
KV_CODES = {"kv-int8": DType.int8, "kv-fp8": DType.f8e4m3}


def _factory(mode: str):
    factory = FACTORIES[f"tiny-llama-{mode}"]()
    factory.make = poisoned(factory.make)  # every engine starts from a garbage cache
    return factory


@pytest.mark.parametrize("mode", QUANTIZED_MODES)
def test_quantized_batched_equals_alone_and_caching_changes_nothing(mode):
    f = _factory(mode)
    exe = f.make()
    assert quantize_mode(exe.module) == mode  # the mode was applied, not dropped
    kv_mode = mode.split("+")[-1]
    assert exe.kv_dtype == KV_CODES.get(kv_mode, DType.f32)

    alone = props.one_at_a_time(f, JOBS)
    # non-trivial outputs: full length, not one repeated token, different per prompt
    assert [len(o.ids) for o in alone] == [p.max_tokens for p in PARAMS]
    assert all(len(set(o.ids)) > 1 for o in alone)
    assert len({tuple(o.ids[:5]) for o in alone}) == len(alone)

    uncached = props.batched(f, JOBS, enable_prefix_caching=False, **SMALL)
    props.assert_same(f, uncached, alone, "batched vs alone")

    e = props.engine(f, **SMALL)  # a fresh engine, prefix caching on
    props.assert_same(f, e.generate(PROMPTS, PARAMS), uncached, "caching on vs off (cold)")
    assert e.stats().prefix_cache_hit_rate > 0  # later prompts reused the shared prefix
    hits = e.stats().prefix_cache_hit_rate
    props.assert_same(f, e.generate(PROMPTS, PARAMS), uncached, "caching on vs off (warm)")
    assert e.stats().prefix_cache_hit_rate > hits  # every prefix page cached by now
