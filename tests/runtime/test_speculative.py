"""N-gram speculative decoding (jaxrt.runtime.speculative): settings refused exactly,
proposals from the sequence's own history, greedy outputs token-identical to plain greedy
(batched and alone, prefix caching on and off), pages of rejected positions given back."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxrt.errors import SettingError
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from jaxrt.runtime.speculative import SpeculativeConfig, propose_ngram
from tests.runtime.fake_model import reference_greedy

CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=48, log=None,
              warmup=False)


@pytest.mark.parametrize("value, message", [
    ({"method": "ngram"}, "num_tokens is required"),
    ({"method": "ngram", "num_tokens": 0}, "num_tokens"),
    ({"method": "ngram", "num_tokens": True}, "num_tokens"),
    ({"method": "ngram", "num_tokens": 2, "min_ngram": 3, "max_ngram": 2}, "min_ngram"),
    ({"method": "ngram", "num_tokens": 2, "lookahead": 1}, "unknown key 'lookahead'"),
    ({"method": "ngram", "num_tokens": 2, "model": "x"}, "unknown key 'model'"),
    ({"method": "medusa", "num_tokens": 2}, "method"),
    ("ngram", "expected a dict"),
])
def test_bad_settings_refused(value, message):
    with pytest.raises(SettingError, match=message):
        SpeculativeConfig.parse(value)


@given(st.lists(st.integers(0, 4), min_size=1, max_size=30), st.integers(1, 5),
       st.integers(1, 4), st.integers(1, 4))
@settings(max_examples=200, deadline=None)
def test_proposal_continues_the_latest_longest_match(tokens, k, lo, width):
    hi = lo + width - 1
    out = propose_ngram(tokens, k, hi, lo)
    assert len(out) <= k
    if not out:  # then no suffix of length lo..hi occurs earlier
        for n in range(lo, min(hi, len(tokens) - 1) + 1):
            suffix = tokens[-n:]
            assert all(tokens[i:i + n] != suffix for i in range(len(tokens) - n))
        return
    n = max(n for n in range(lo, min(hi, len(tokens) - 1) + 1)
            if any(tokens[i:i + n] == tokens[-n:] for i in range(len(tokens) - n)))
    i = max(i for i in range(len(tokens) - n) if tokens[i:i + n] == tokens[-n:])
    assert out == tokens[i + n:i + n + k]


def _sliding_window_proposal(tokens, k, max_ngram, min_ngram):
    """The proposal by definition: for n from max_ngram down, every window of n tokens
    ending before the last one compared with the suffix; the latest hit wins."""
    size = len(tokens)
    if k <= 0 or size < 2:
        return []
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        hits = [i for i in range(size - n) if tokens[i:i + n] == tokens[size - n:]]
        if hits:
            return tokens[hits[-1] + n:hits[-1] + n + k]
    return []


@given(st.lists(st.integers(0, 3), min_size=0, max_size=80), st.integers(0, 5),
       st.integers(1, 4), st.integers(0, 3), st.sampled_from([0, 1, 2, 32]))
@settings(max_examples=300, deadline=None)
def test_proposal_is_the_same_whichever_search_finds_it(tokens, k, lo, width, scan):
    """`propose_ngram` extends the last token's latest `_SCAN_CANDIDATES` occurrences in
    Python and hands the rest to a vectorized search: every split (0: numpy alone) gives
    the proposal of the plain sliding-window definition, as Python ints, for lists,
    tuples and arrays alike."""
    import numpy as np
    from jaxrt.runtime import speculative
    want = _sliding_window_proposal(tokens, k, lo + width, lo)
    saved = speculative._SCAN_CANDIDATES
    speculative._SCAN_CANDIDATES = scan
    try:
        for form in (tokens, tuple(tokens), np.asarray(tokens, np.int32)):
            got = propose_ngram(form, k, lo + width, lo)
            assert got == want and all(type(t) is int for t in got)
    finally:
        speculative._SCAN_CANDIDATES = saved


PATTERNS = st.lists(st.integers(2, 63), min_size=1, max_size=4)


@st.composite
def prompts(draw):
    """Repeated patterns (proposals to verify) and plain random prompts."""
    if draw(st.booleans()):
        pattern = draw(PATTERNS)
        return (pattern * draw(st.integers(2, 6)))[:draw(st.integers(2, 20))]
    return draw(st.lists(st.integers(2, 63), min_size=1, max_size=20))


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(prompts(), st.integers(1, 16)), min_size=1, max_size=4),
       k=st.integers(1, 8), caching=st.booleans(), pages=st.sampled_from([64, 12]),
       decode_steps=st.sampled_from([1, 4]), abort=st.booleans())
def test_greedy_speculation_equals_plain_greedy(fake_runner, batch, k, caching, pages,
                                                decode_steps, abort):
    """12 pages of 4 tokens for up to 4 requests of up to 36: preemption may happen here
    (it is forced, and counted, in `test_greedy_speculation_under_preemption`).
    With decode_steps > 1 the engine may run decode loops, which must leave speculated
    requests alone (they never run one). `abort`: a copy of the last request is queued
    first and aborted after two steps."""
    engine = Engine(fake_runner, speculative={"method": "ngram", "num_tokens": k},
                    enable_prefix_caching=caching, num_pages=pages,
                    decode_steps=decode_steps, **CONFIG)
    check_greedy_batch(engine, batch, abort)
    assert engine.stats().decode_loops == 0  # counts only up: none before `alone` either
    st_ = engine.stats()
    assert st_.pages_in_use == 0 and st_.free_pages == engine.num_pages
    assert st_.spec_accepted_tokens <= st_.spec_proposed_tokens


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(prompts(), st.integers(0, 2**32)), min_size=1, max_size=4),
       k=st.integers(1, 4), top_k=st.sampled_from([0, 3]),
       temperature=st.sampled_from([0.5, 1.0]))
def test_seeded_sampling_with_speculation_is_token_identical(fake_runner, batch, k, top_k,
                                                             temperature):
    """Sampled requests: the target's draw at each verified position is the draw plain
    decoding makes there (counter-based noise), so the rejection rule for a point-mass
    proposal (accept x iff the draw is x; else the draw, which is p without x) gives
    exactly the plain outputs."""
    params = [SamplingParams(max_tokens=12, temperature=temperature, top_k=top_k, seed=s,
                             logprobs=2 if s % 2 else None) for _, s in batch]
    prompts_ = [p for p, _ in batch]
    plain = Engine(fake_runner, **CONFIG).generate(prompts_, params)
    specd = Engine(fake_runner, speculative={"method": "ngram", "num_tokens": k}, **CONFIG)
    outs = specd.generate(prompts_, params)
    for a, b in zip(plain, outs):
        assert a.ids == b.ids and a.finish_reason == b.finish_reason
        assert a.logprobs == b.logprobs


def test_repeating_prompt_is_accepted():
    """The random tiny Llama of the runtime properties, as the target: on a prompt that
    repeats a pattern its greedy output settles into a loop, which the proposer copies."""
    from tests.runtime.conftest import FACTORIES
    factory = FACTORIES["tiny-llama"]()
    runner = factory.make()
    plain = Engine(runner, **CONFIG)
    specd = Engine(runner, speculative={"method": "ngram", "num_tokens": 4}, **CONFIG)
    prompt = [5, 9, 14, 5, 9, 14, 5, 9, 14, 5, 9]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = plain.generate(prompt, params)[0].ids
    got = specd.generate(prompt, params)[0].ids
    assert got == want
    s = specd.stats()
    assert s.spec_accepted_tokens > 0 and s.spec_acceptance_rate > 0
    assert s.spec_mean_accepted_length > 1
    # fewer target steps than tokens: several tokens per verify step
    assert s.steps < len(want)
    # sampled, seeded: accepted proposals too (the draws at verified positions), and the
    # same tokens as plain decoding
    sampled = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.5, seed=11)
    accepted = specd.stats().spec_accepted_tokens
    assert specd.generate(prompt, sampled)[0].ids == plain.generate(prompt, sampled)[0].ids
    assert specd.stats().spec_accepted_tokens > accepted


@pytest.mark.parametrize("penalties", [
    dict(repetition_penalty=1.3), dict(presence_penalty=0.8),
    dict(frequency_penalty=0.6, presence_penalty=-0.3),
    dict(repetition_penalty=0.8, frequency_penalty=-0.5)])
def test_penalized_requests_speculate_token_identically(penalties):
    """Verify row j is penalized with the output counts once the proposal's first j
    tokens are accepted: greedy and seeded sampled outputs equal plain decoding's, with
    proposals verified. Penalties break the loops n-gram proposals copy, so few are
    accepted here; `test_penalized_draft_speculation_is_token_identical` accepts many."""
    from tests.runtime.conftest import FACTORIES
    runner = FACTORIES["tiny-llama"]().make()
    plain = Engine(runner, **CONFIG)
    specd = Engine(runner, speculative={"method": "ngram", "num_tokens": 4}, **CONFIG)
    prompts_ = [[5, 9, 14, 5, 9, 14, 5, 9, 14, 5, 9], [7, 7, 3, 7, 7, 3, 7, 7]]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, **penalties),
              SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.7, seed=5,
                             logprobs=2, **penalties)]
    want = plain.generate(prompts_, params)
    got = specd.generate(prompts_, params)
    for a, b in zip(want, got):
        assert a.ids == b.ids
        # the same tokens ranked; values to f32 rounding (a verify step's logits come
        # from a (k + 1)-row query, plain decoding's from one row)
        assert (a.logprobs is None) == (b.logprobs is None)
        assert [list(d) for d in a.logprobs or ()] == [list(d) for d in b.logprobs or ()]
        for da, db in zip(a.logprobs or (), b.logprobs or ()):
            np.testing.assert_allclose(list(db.values()), list(da.values()), rtol=1e-5,
                                       atol=1e-5)
    assert specd.stats().spec_proposed_tokens > 0  # (accepted: the draft test's)


def test_beam_search_does_not_speculate():
    from tests.runtime.conftest import FACTORIES
    runner = FACTORIES["tiny-llama"]().make()
    specd = Engine(runner, speculative={"method": "ngram", "num_tokens": 4}, **CONFIG)
    plain = Engine(runner, **CONFIG)
    prompt = [5, 9, 14, 5, 9, 14, 5, 9, 14, 5, 9]
    params = SamplingParams(max_tokens=10, beam_width=2, ignore_eos=True)
    assert specd.generate(prompt, params)[0].ids == plain.generate(prompt, params)[0].ids
    assert specd.stats().spec_proposed_tokens == 0


def test_pages_of_rejected_positions_are_given_back(fake_runner):
    """After every step a sequence holds no page past its known tokens (a rejected
    proposal's pages went back), and its committed pages hold only computed tokens."""
    engine = Engine(fake_runner, speculative={"method": "ngram", "num_tokens": 4},
                    **CONFIG)
    bm = engine.block_manager
    for prompt in ([5, 6, 7, 5, 6, 7, 5, 6], [9, 9, 9, 9, 9, 9, 9], [3, 4, 3, 4, 3, 4, 3]):
        engine.add_request(prompt, SamplingParams(max_tokens=20))
    proposed = 0
    while engine.has_unfinished():
        engine.step()
        for req in engine.scheduler.running:
            seq = req.seqs[0]
            assert len(bm.page_table(seq.seq_id)) <= bm.pages_needed(len(seq.tokens))
            assert len(bm._hashes[seq.seq_id]) * bm.page_size <= seq.num_computed
        proposed = engine.stats().spec_proposed_tokens
    assert proposed > engine.stats().spec_accepted_tokens  # rejections happened


# four requests of 16-token prompts (4 pages each) on 12 pages of 4: three fit, and the
# first page any of them needs next preempts the newest; repeating prompts, so that
# n-gram proposals are made and verified
PREEMPTING = [([5, 6, 7] * 5 + [5], 20), ([9, 3] * 8, 24), ([4, 8, 12, 4] * 4, 22),
              ([11] * 16, 24)]


def check_greedy_under_preemption(engine):
    """PREEMPTING through `engine` (12 pages): every request equals plain greedy decoding
    (EOS ignored, so every request grows to its length), at least one preemption
    happened, proposals were verified, and every page came back."""
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in PREEMPTING]
    outs = engine.generate([p for p, _ in PREEMPTING], params)
    for (prompt, m), out in zip(PREEMPTING, outs):
        assert out.ids == reference_greedy(prompt, m, ignore_eos=True)
    s = engine.stats()
    assert s.preemptions > 0 and any(o.num_preemptions for o in outs)
    assert s.spec_proposed_tokens > 0
    assert s.pages_in_use == 0 and s.free_pages == engine.num_pages


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("caching", [False, True])
def test_greedy_speculation_under_preemption(fake_runner, k, caching):
    engine = Engine(fake_runner, speculative={"method": "ngram", "num_tokens": k},
                    enable_prefix_caching=caching, num_pages=12, **CONFIG)
    check_greedy_under_preemption(engine)


def check_greedy_batch(engine, batch, abort):
    """`batch` ((prompt, max_tokens), ...) through `engine` equals plain greedy decoding,
    and its first request alone the same; `abort`: a copy of the last request is queued
    first and aborted after two steps."""
    params = [SamplingParams(max_tokens=m) for _, m in batch]
    if abort:
        rid = engine.add_request(batch[-1][0], params[-1])
        engine.step(), engine.step()
        assert engine.abort(rid) is not None or not engine.has_unfinished()
    outs = engine.generate([p for p, _ in batch], params)
    for (prompt, m), out in zip(batch, outs):
        assert out.ids == reference_greedy(prompt, m)
    alone = engine.generate(batch[0][0], params[0])[0]
    assert alone.ids == outs[0].ids
