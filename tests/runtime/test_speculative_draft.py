"""Draft-model speculative decoding (jaxrt.runtime.draft): drafts that cannot share the
target's pages or tokens are refused; greedy outputs equal plain greedy for k = 1..8,
batched and alone, prefix caching on and off, under preemption and aborts; seeded
sampled outputs are token-identical; the target as its own draft accepts every proposal
(which checks the draft cache's validity tracking: one stale K/V and it would not); and
sampled speculation draws from the target's distribution (chi-square)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxrt.errors import SettingError
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from jaxrt.runtime.speculative import SpeculativeConfig
from tests.runtime.test_speculative import check_greedy_batch, check_greedy_under_preemption
from tests.runtime.fake_model import (ALPHABET, VOCAB, W_OUT, FakeRunner, FakeTokenizer,
                                      reference_greedy, reference_logits)

# A 16-token budget: one mixed bucket size, so the verify buckets of k = 1..8 are few
# compiles; proposals also get cut by the budget, and prompts prefill in chunks.
CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=48, log=None,
              warmup=False)


def _partial_w_out(seed: int = 3, keep: float = 0.5) -> np.ndarray:
    """An output matrix equal to the target's on about `keep` of the vocabulary's rows:
    a draft that agrees with the target often, not always."""
    rng = np.random.default_rng(seed)
    w = W_OUT.copy()
    redo = rng.random(VOCAB) >= keep
    w[redo] = rng.integers(0, 2**32, (int(redo.sum()), w.shape[1]), dtype=np.uint64)
    return w


class _NoLoops(FakeRunner):
    """A runner without decode loops: the draft takes k single steps."""
    decode = None


DRAFTS = {"self": lambda: FakeRunner(64, 4),          # the target's weights, own cache
          "self-steps": lambda: _NoLoops(64, 4),
          "partial": lambda: FakeRunner(64, 4, w_out=_partial_w_out())}


def _spec(draft, k: int) -> dict:
    return {"method": "draft", "model": draft, "num_tokens": k}


@pytest.mark.parametrize("value, message", [
    ({"method": "draft", "num_tokens": 2}, "needs a model"),
    ({"method": "draft", "num_tokens": 2, "model": " "}, "empty name"),
    ({"method": "draft", "model": "x"}, "num_tokens is required"),
    ({"method": "draft", "num_tokens": 2, "model": "x", "max_ngram": 2},
     "unknown key 'max_ngram' for method 'draft'"),
    ({"method": "draft", "num_tokens": 17, "model": "x"}, "num_tokens"),
])
def test_bad_draft_settings_refused(value, message):
    with pytest.raises(SettingError, match=message):
        SpeculativeConfig.parse(value)


class _MapTokenizer(FakeTokenizer):
    """The fake tokenizer with a token -> id map (compared between target and draft)."""
    def get_vocab(self):
        return {c: i for i, c in enumerate(ALPHABET)}


class _OtherTokenizer(FakeTokenizer):
    def get_vocab(self):
        return {c: i for i, c in enumerate(reversed(ALPHABET))}


class _Vocab65(FakeRunner):
    def __init__(self):
        super().__init__(64, 4)
        self.vocab_size = VOCAB + 1


def _other_tokenizer():
    r = FakeRunner(64, 4)
    r.tokenizer = _OtherTokenizer()
    return r


@pytest.mark.parametrize("make, message", [
    (lambda t: t, "the target runner itself"),
    (lambda t: 42, "not a model"),
    (lambda t: _Vocab65(), "vocabulary of 65 tokens, the target's has 64"),
    (lambda t: FakeRunner(64, 8), "pages of 8 tokens, the target's are 4"),
    (lambda t: FakeRunner(8, 4), "8 pages, the engine uses 64"),
    (lambda t: FakeRunner(64, 4, max_model_len=32), "max_model_len 32 is below the "
                                                    "engine's 48"),
    (lambda t: _other_tokenizer(), "tokenizer maps tokens to ids differently"),
])
def test_incompatible_draft_refused(fake_runner, make, message):
    with pytest.raises(SettingError, match=message):
        Engine(fake_runner, tokenizer=_MapTokenizer(),
               speculative=_spec(make(fake_runner), 2), **CONFIG)


def test_tokenizers_compared_only_where_both_map_tokens(fake_runner):
    draft = FakeRunner(64, 4)
    draft.tokenizer = _MapTokenizer()
    for target_tokenizer in (_MapTokenizer(), FakeTokenizer()):  # the same map; no map
        Engine(fake_runner, tokenizer=target_tokenizer, speculative=_spec(draft, 2),
               **CONFIG)


def test_draft_needs_only_the_pages_the_engine_uses(fake_runner):
    """The engine uses 12 of the target's 64 pages: a draft of 12 pages is accepted
    (generation through such a draft compiles a cache shape of its own: not run here)."""
    draft = FakeRunner(12, 4)
    engine = Engine(fake_runner, speculative=_spec(draft, 3), num_pages=12, **CONFIG)
    assert engine.drafter.runner is draft and engine.drafter.pad_slot == 12 * 4


PROMPTS = st.lists(st.integers(2, VOCAB - 1), min_size=1, max_size=20)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(PROMPTS, st.integers(1, 16)), min_size=1, max_size=4),
       k=st.integers(1, 8), draft=st.sampled_from(sorted(DRAFTS)), caching=st.booleans(),
       pages=st.sampled_from([64, 12]), abort=st.booleans(),
       decode_steps=st.sampled_from([1, 4]))
def test_greedy_draft_speculation_equals_plain_greedy(fake_runner, batch, k, draft,
                                                      caching, pages, abort, decode_steps):
    """12 pages of 4 tokens for up to 4 requests of up to 36: pages move between
    sequences (the draft's cache must notice), and preemption may happen (forced, and
    counted, in `test_greedy_draft_speculation_under_preemption`). `abort`: a copy of the
    last request is queued first and aborted after two steps. With decode_steps > 1 the
    engine's decode loops must leave speculated requests alone."""
    engine = Engine(fake_runner, speculative=_spec(DRAFTS[draft](), k),
                    enable_prefix_caching=caching, num_pages=pages,
                    decode_steps=decode_steps, **CONFIG)
    check_greedy_batch(engine, batch, abort)
    s = engine.stats()
    assert s.decode_loops == 0
    assert s.pages_in_use == 0 and s.free_pages == engine.num_pages
    assert s.spec_accepted_tokens <= s.spec_proposed_tokens
    if draft.startswith("self"):  # exact fake: the same weights propose the target's tokens
        assert s.spec_accepted_tokens == s.spec_proposed_tokens


@pytest.mark.parametrize("penalties", [
    dict(repetition_penalty=1.3), dict(presence_penalty=0.8),
    dict(frequency_penalty=0.6, presence_penalty=-0.3),
    dict(repetition_penalty=0.8, frequency_penalty=-0.5)])
def test_penalized_draft_speculation_is_token_identical(fake_runner, penalties):
    """The target's own weights propose unpenalized greedy tokens; the target verifies
    with its penalties, row j counting the proposal's first j tokens as output: greedy,
    seeded and EOS-stopping requests equal plain decoding's, with many proposals
    accepted (each accepted token shifts the counts of the rows after it)."""
    prompts = [[5, 9, 14, 5, 9, 14, 5, 9, 14, 5, 9], [7, 7, 3, 7, 7, 3, 7, 7], [2, 3, 4, 5, 6]]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, **penalties),
              SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.7, seed=5,
                             **penalties),
              SamplingParams(max_tokens=20, **penalties)]
    want = Engine(fake_runner, **CONFIG).generate(prompts, params)
    specd = Engine(fake_runner, speculative=_spec(FakeRunner(64, 4), 4), **CONFIG)
    got = specd.generate(prompts, params)
    assert [o.ids for o in got] == [o.ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert specd.stats().spec_accepted_tokens >= 15


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("draft", sorted(DRAFTS))
def test_greedy_draft_speculation_under_preemption(fake_runner, k, draft):
    engine = Engine(fake_runner, speculative=_spec(DRAFTS[draft](), k), num_pages=12,
                    enable_prefix_caching=True, **CONFIG)
    check_greedy_under_preemption(engine)


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(PROMPTS, st.integers(0, 2**32)), min_size=1, max_size=4),
       k=st.sampled_from([3, 8]), draft=st.sampled_from(sorted(DRAFTS)),
       top_k=st.sampled_from([0, 3]), temperature=st.sampled_from([0.5, 1.0]))
def test_seeded_sampling_with_a_draft_is_token_identical(fake_runner, batch, k, draft,
                                                         top_k, temperature):
    """The target's draw at each verified position is the draw plain decoding makes
    there; the greedy draft is a point-mass proposer, so the outputs are the plain ones.
    (k from two values: each k compiles the draft's decode loops again.)"""
    params = [SamplingParams(max_tokens=12, temperature=temperature, top_k=top_k, seed=s,
                             logprobs=2 if s % 2 else None) for _, s in batch]
    prompts = [p for p, _ in batch]
    plain = Engine(fake_runner, **CONFIG).generate(prompts, params)
    specd = Engine(fake_runner, speculative=_spec(DRAFTS[draft](), k), **CONFIG)
    for a, b in zip(plain, specd.generate(prompts, params)):
        assert a.ids == b.ids and a.finish_reason == b.finish_reason
        assert a.logprobs == b.logprobs


def test_statistics_per_request_and_engine(fake_runner):
    """The target as its own draft, greedy: every proposal is accepted, so 1 + 3 x (k + 1)
    tokens take one prefill step and three verify steps of k + 1 tokens each."""
    k = 3
    engine = Engine(fake_runner, speculative=_spec(FakeRunner(64, 4), k), **CONFIG)
    outs = engine.generate([[5, 6, 7], [9, 8]], SamplingParams(max_tokens=1 + 3 * (k + 1),
                                                                ignore_eos=True))
    for out in outs:
        sp = out.speculative
        assert (sp.verifies, sp.proposed, sp.accepted) == (3, 3 * k, 3 * k)
        assert sp.acceptance_rate == 1.0 and sp.mean_accepted_length == k + 1
    s = engine.stats()
    assert s.steps == 4 and s.generated_tokens == 2 * (1 + 3 * (k + 1))
    assert (s.spec_proposed_tokens, s.spec_accepted_tokens) == (6 * k, 6 * k)
    assert s.spec_acceptance_rate == 1.0 and s.spec_mean_accepted_length == k + 1
    # per verify step, both sequences at once: one catch-up step (the prompt; then the
    # last accepted proposal, which the draft fed but never saw the target accept) and
    # one decode loop of k steps
    assert s.spec_draft_steps == 3 * 2
    # a beam-search request does not speculate: no statistics
    out = engine.generate([5, 6, 7], SamplingParams(max_tokens=6, beam_width=2))[0]
    assert out.speculative is None and engine.stats().spec_proposed_tokens == 6 * k


def test_a_shared_prompt_is_not_prefilled_twice_by_the_draft(fake_runner):
    """A second request whose prompt pages come from the prefix cache finds the first
    request's draft K/V there (the first has finished by then): the draft catches up
    only what it does not share. Both in one step share pages too: each page is written
    once (the fake's step check refuses two writes of one slot)."""
    engine = Engine(fake_runner, speculative=_spec(FakeRunner(64, 4), 3), **CONFIG)
    prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]   # 3 full pages + 1
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.add_request(prompt, params)
    engine.step(), engine.step()        # prefill, then the first verify's catch-up
    fed = engine.drafter.catch_up_tokens
    assert fed == len(prompt)           # the prompt, then the first output token
    engine.add_request(prompt[:12] + [30], params)
    engine.step()   # its prefill (3 cached pages + 1 token); the first finishes (1+4+3)
    before = engine.drafter.catch_up_tokens
    engine.step()   # its first verify
    # position 12 only: pages 0-2 are the finished first request's, its draft K/V still
    # in them; without the sharing the draft would feed all 13
    assert engine.drafter.catch_up_tokens - before == 1
    while engine.has_unfinished():
        engine.step()
    s = engine.stats()
    assert s.spec_accepted_tokens == s.spec_proposed_tokens
    engine2 = Engine(fake_runner, speculative=_spec(FakeRunner(64, 4), 3), **CONFIG)
    outs = engine2.generate([prompt, prompt[:12] + [30]], params)
    assert [o.ids for o in outs] == [reference_greedy(p, 8, ignore_eos=True)
                                     for p in (prompt, prompt[:12] + [30])]


def test_partial_draft_accepts_some_and_counts_them(fake_runner):
    k = 3
    engine = Engine(fake_runner, speculative=_spec(FakeRunner(64, 4, w_out=_partial_w_out()),
                                                   k), **CONFIG)
    prompts = [[5, 6, 7], [9, 8], [30, 31, 32, 33], [12]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.ids == reference_greedy(p, 24, ignore_eos=True)
    s = engine.stats()
    assert 0 < s.spec_accepted_tokens < s.spec_proposed_tokens
    assert sum(o.speculative.proposed for o in outs) == s.spec_proposed_tokens
    assert sum(o.speculative.accepted for o in outs) == s.spec_accepted_tokens
    assert 1 < s.spec_mean_accepted_length < k + 1


def test_sampled_draft_speculation_matches_the_target_distribution(fake_runner):
    """Chi-square over 3,000 seeds at temperature 1 of the first three tokens: the first
    from the prefill step, the second and third from one verify step of a one-token
    proposal (a draft that agrees with the target on half the vocabulary): the third
    is the target's draw after the proposal, kept only if the proposal was accepted, so
    a wrong acceptance rule shows in p(t3 | t1, t2). Against the target's exact
    p(t1) p(t2 | t1) p(t3 | t1, t2); cells expected below 5 are pooled. (Accepting 30 %
    of the rejected proposals as well gives p ~ 1e-5 here; the right rule p ~ 0.3.)"""
    from scipy.stats import chisquare
    prompt, n = [17, 4, 40], 3000
    engine = Engine(fake_runner, speculative=_spec(FakeRunner(64, 4, w_out=_partial_w_out()),
                                                   3), **CONFIG)
    outs = engine.generate([prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0,
                                                         ignore_eos=True, seed=s)
                                          for s in range(n)])
    s = engine.stats()
    assert s.spec_proposed_tokens == n and 0 < s.spec_acceptance_rate < 1

    def softmax(tokens):
        x = reference_logits(tokens).astype(np.float64)
        e = np.exp(x - x.max())
        return e / e.sum()
    expected = {}
    p1 = softmax(prompt)
    for t1 in range(VOCAB):
        p2 = softmax(prompt + [t1])
        for t2 in range(VOCAB):
            if n * p1[t1] * p2[t2] >= 5:
                p3 = n * p1[t1] * p2[t2] * softmax(prompt + [t1, t2])
                expected.update({(t1, t2, t3): p3[t3] for t3 in range(VOCAB)
                                 if p3[t3] >= 5})
    counts = dict.fromkeys(expected, 0)
    other = 0
    for out in outs:
        cell = tuple(out.ids)
        if cell in counts:
            counts[cell] += 1
        else:
            other += 1
    cells = sorted(expected)
    assert len(cells) >= 20
    obs = [counts[c] for c in cells] + [other]
    exp = [expected[c] for c in cells] + [n - sum(expected.values())]
    # a fixed set of seeds (deterministic): the right rule fails only with probability
    # 1e-3 over seed sets
    assert chisquare(obs, exp).pvalue > 1e-3


def test_tiny_llama_as_its_own_draft():
    """A real lowered model: a random two-layer Llama as the target and another
    executable of it as the draft (its own cache). It proposes the target's greedy
    tokens, up to float differences between step shapes, so nearly all are accepted,
    and the outputs equal plain decoding. (Drafts that disagree: the fake tests above,
    and bench/bench_spec_draft.py --tiny with a one-layer draft.)"""
    from tests.runtime.conftest import _tiny_llama
    target = _tiny_llama().make()
    prompts = [[5, 9, 14, 5, 9, 14, 5], [100, 3, 77], [42]]
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    want = [o.ids for o in Engine(target, **CONFIG).generate(prompts, params)]
    engine = Engine(target, speculative=_spec(_tiny_llama().make(), 3), **CONFIG)
    assert [o.ids for o in engine.generate(prompts, params)] == want
    s = engine.stats()
    assert s.spec_proposed_tokens > 0 and s.spec_acceptance_rate >= 0.9


def test_a_draft_loaded_by_name_is_counted_in_the_targets_plan(tmp_path):
    # The draft keeps its own cache of the target's page count and its weights on the
    # same device: the target's plan reserves its weights and activations and costs each
    # page both caches' bytes (here the cap on the cache binds: 1 MiB for both).
    from tests.frontends.frontends_synth import tiny_hf_config, write_tiny_hf_dir
    config = tiny_hf_config(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
    target = write_tiny_hf_dir(tmp_path / "target", config)
    draft = write_tiny_hf_dir(tmp_path / "draft", dict(config, num_hidden_layers=1))
    kw = dict(max_model_len=32, max_num_seqs=256, kv_cache_max_gib=1 / 1024, log=None,
              warmup=False)
    alone = Engine(target, **kw)
    paired = Engine(target, speculative={"method": "draft", "model": draft,
                                         "num_tokens": 2}, **kw)
    plan = paired.runner.module.attributes["kv_cache"]
    budget = plan["budget"]
    draft_plan = paired.drafter.runner.module.attributes["kv_cache"]
    assert budget["companion_bytes_per_token"] == draft_plan["bytes_per_token"] > 0
    assert budget["reserve_bytes"] > 0
    assert paired.num_pages == (1 << 20) // (plan["page_size"] * (
        plan["bytes_per_token"] + draft_plan["bytes_per_token"])) < alone.num_pages
    assert "reserve_bytes" not in alone.runner.module.attributes["kv_cache"]["budget"]
    out = paired.generate([[3, 4, 5]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert out[0].ids == alone.generate([[3, 4, 5]],
                                        SamplingParams(max_tokens=4, ignore_eos=True))[0].ids
