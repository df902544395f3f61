"""Structured output (jaxrt.runtime.structured): constraints checked before queueing,
masks applied on the device, outputs that match their regex / choice / schema.

The fake runner (one character per token) gets a real `tokenizers` tokenizer over its
alphabet, so llguidance runs exactly as for a real model; JSON schemas run on the real
SmolLM2 (`test_json_schemas_on_smollm2`)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings, strategies as st
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE

from jaxrt.errors import SettingError
from jaxrt.frontends.tokenizer import Tokenizer
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from jaxrt.runtime import structured
from jaxrt.runtime.structured import apply_token_bitmask, bitmask_words, fill_bitmask
from tests.runtime.fake_model import ALPHABET, EOS, FakeRunner, VOCAB

CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=48, log=None,
              warmup=False)


def alphabet_tokenizer() -> Tokenizer:
    """The fake model's vocabulary (id i is ALPHABET[i]) as a byte-level BPE: printable
    ASCII maps to itself under the byte-level alphabet; '<' (EOS) is special."""
    backend = tokenizers.Tokenizer(BPE(vocab={c: i for i, c in enumerate(ALPHABET)},
                                       merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<"])
    return Tokenizer(backend, eos_ids=(EOS,))


@pytest.fixture(scope="module")
def engine():
    return Engine(FakeRunner(num_pages=64, page_size=4), tokenizer=alphabet_tokenizer(),
                  **CONFIG)


@pytest.mark.parametrize("kw, message", [
    (dict(regex="a(b"), "regex"),
    (dict(regex=""), "regex"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema={"type": "objekt"}), "objekt"),
    (dict(json_schema=[1, 2]), "JSON schema is an object"),
    (dict(choice=[]), "choice"),
    (dict(choice=["a", 3]), "choice"),
    (dict(grammar="start: ("), "grammar"),
    (dict(regex="a", choice=["a"]), "at most one"),
])
def test_invalid_constraints_refused_when_built(kw, message):
    with pytest.raises(SettingError, match=message) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)


def test_beam_search_with_a_constraint_is_refused(engine):
    with pytest.raises(SettingError, match="beam"):
        engine.add_request("abc", SamplingParams(regex="a+", beam_width=2, max_tokens=3))
    assert not engine.has_unfinished()


def test_bitmask_on_device_matches_bits():
    rng = np.random.default_rng(0)
    vocab = 70                                   # not a multiple of 32: a partial word
    mask = rng.integers(-2**31, 2**31, (3, bitmask_words(vocab)), dtype=np.int64)
    mask = mask.astype(np.int32)
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    out = np.asarray(apply_token_bitmask(logits, mask))
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little").reshape(3, -1)[:, :vocab]
    assert np.array_equal(np.isneginf(out), bits == 0)
    assert np.array_equal(out[bits == 1], logits[bits == 1])


REGEXES = ["[a-c]{3}x", "(yes|no)", "[0-9]{2,4}", "a+b?", "[A-Z][a-z]{1,5}", "(ab|ba)*c"]


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regexes=st.lists(st.sampled_from(REGEXES), min_size=1, max_size=3),
       temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**31))
def test_regex_and_choice_outputs_match(engine, regexes, temperature, seed):
    params = [SamplingParams(regex=r, max_tokens=12, temperature=temperature, seed=seed)
              for r in regexes]
    params.append(SamplingParams(choice=["red", "green", "blue"], max_tokens=12,
                                 temperature=temperature, seed=seed))
    outs = engine.generate(["abc"] * len(params), params)
    for p, out in zip(params, outs):
        if out.finish_reason == "length":   # a regex like a+ may run to max_tokens
            assert len(out.ids) == 12 and p.regex is not None
            continue
        assert out.finish_reason == "stop"
        if p.regex is not None:
            assert re.fullmatch(p.regex, out.text), (p.regex, out.text)
        else:
            assert out.text in p.choice


def test_unconstrained_rows_unchanged_by_a_constrained_neighbour(engine):
    prompts = ["hello", "abc", "Q9x"]
    plain = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=10, temperature=1.0,
                                                          seed=5)]
    alone = engine.generate(prompts[:2], plain)
    mixed = engine.generate(prompts, plain + [SamplingParams(regex="[a-z]{4}", max_tokens=10)])
    assert [o.ids for o in mixed[:2]] == [o.ids for o in alone]
    assert re.fullmatch("[a-z]{4}", mixed[2].text) and mixed[2].finish_reason == "stop"


def test_constrained_request_never_uses_the_decode_loop():
    runner = FakeRunner(num_pages=64, page_size=4)
    e = Engine(runner, tokenizer=alphabet_tokenizer(), decode_steps=4, **CONFIG)
    out = e.generate("abc", SamplingParams(regex="[a-z]{6}", max_tokens=8))[0]
    assert re.fullmatch("[a-z]{6}", out.text) and e.stats().decode_loops == 0
    e.generate("abc", SamplingParams(max_tokens=8))
    assert e.stats().decode_loops > 0   # while an unconstrained batch does


def test_split_decode_step_matches_the_masked_sampled_step():
    """Constrained batches decode through the split step (decode forward queued from the
    last tokens on the device, grammars advanced and masks filled meanwhile, then masked
    sampling): the same tokens as the masked sampled step of a runner without a decode
    forward, for constrained rows and their unconstrained neighbours, greedy and seeded,
    with rows finishing at different steps."""
    split = FakeRunner(num_pages=64, page_size=4)
    whole = FakeRunner(num_pages=64, page_size=4)
    whole.decode_forward = None          # this runner has only the masked sampled step
    prompts = ["abc", "hello", "Q9x", "zz"]
    params = [SamplingParams(regex="[a-z]{3,9}", max_tokens=12),
              SamplingParams(max_tokens=9, temperature=1.0, seed=3),
              SamplingParams(regex="(ab|cd)+x", max_tokens=14, temperature=1.0, seed=7),
              SamplingParams(choice=["red", "green", "blue"], max_tokens=12)]
    forwards = []
    forward = split.decode_forward
    split.decode_forward = lambda *a, **k: forwards.append(k["feed"]) or forward(*a, **k)
    got = {}
    for name, runner in (("split", split), ("whole", whole)):
        e = Engine(runner, tokenizer=alphabet_tokenizer(), decode_steps=4, **CONFIG)
        got[name] = [(o.ids, o.finish_reason) for o in e.generate(prompts, params)]
        assert e.stats().decode_loops == 0
    assert got["split"] == got["whole"]
    assert got["split"][3][1] == "stop" and got["split"][1][1] == "length"
    # the decode steps ran split, most forwards queued from the last call's tokens on
    # the device (the pipeline restarts from the host where a request finishes)
    assert len(forwards) >= 8 and forwards[0] is None
    assert sum(f is not None for f in forwards) > len(forwards) // 2


def _split_engine(**kw):
    return Engine(FakeRunner(num_pages=64, page_size=4), tokenizer=alphabet_tokenizer(),
                  decode_steps=4, **{**CONFIG, **kw})


PIPELINE_PROMPTS = ["abc", "hello", "Q9x", "zz"]
PIPELINE_PARAMS = [SamplingParams(regex="[a-z]{3,9}", max_tokens=12, temperature=1.0, seed=1),
                   SamplingParams(max_tokens=9, temperature=1.0, seed=3),
                   SamplingParams(regex="(ab|cd)+x", max_tokens=14, temperature=1.0, seed=7),
                   SamplingParams(choice=["red", "green", "blue"], max_tokens=12)]


def test_queued_forward_changes_no_output():
    """The split step queues step t + 2's forward as soon as step t + 1 is sampled
    (`Engine._advance_masked`): the same tokens and finish reasons as without pipelining
    (`pipeline_decode=False`: every call applied before the next is queued), batched and
    each request alone."""
    got = {}
    for pipelined in (True, False):
        e = _split_engine()
        e.pipeline_decode = pipelined
        batched = [(o.ids, o.finish_reason) for o in e.generate(PIPELINE_PROMPTS,
                                                                PIPELINE_PARAMS)]
        alone = [(o.ids, o.finish_reason) for pr, p in zip(PIPELINE_PROMPTS, PIPELINE_PARAMS)
                 for o in e.generate(pr, p)]
        assert batched == alone
        got[pipelined] = batched
        assert e._inflight is None and e._queued_forward is None
    assert got[True] == got[False]


def test_abort_and_arrival_while_a_forward_is_queued():
    """A request aborted, or one added, between steps while a constrained forward is
    queued behind the last sampled call: the others' tokens are unchanged, the aborted
    request's output stops where it was, and the new one decodes as it would alone."""
    want = _split_engine().generate(PIPELINE_PROMPTS, PIPELINE_PARAMS)
    late = SamplingParams(regex="[0-9]{4}", max_tokens=8, temperature=1.0, seed=11)
    want_late = _split_engine().generate("late", late)[0]
    e = _split_engine(max_num_seqs=5)
    ids = [e.add_request(pr, p) for pr, p in zip(PIPELINE_PROMPTS, PIPELINE_PARAMS)]
    outs = {}
    while e._queued_forward is None:  # until the pipeline runs ahead
        assert e.has_unfinished()
        outs.update((o.request_id, o) for o in e.step())
    aborted = e.abort(ids[2])
    assert aborted.finish_reason == "abort"
    n = len(aborted.ids)
    assert aborted.ids == want[2].ids[:n]
    late_id = e.add_request("late", late)
    while e.has_unfinished():
        outs.update((o.request_id, o) for o in e.step())
    for i in (0, 1, 3):
        assert (outs[ids[i]].ids, outs[ids[i]].finish_reason) == \
            (want[i].ids, want[i].finish_reason)
    assert ids[2] not in outs
    assert outs[late_id].ids == want_late.ids


def test_eos_only_when_the_grammar_accepts(engine):
    grammars = [SamplingParams(regex="[a-z]{3,6}", max_tokens=10, temperature=1.0, seed=s)
                for s in range(6)]
    for out in engine.generate(["xyz"] * 6, grammars):
        assert out.finish_reason == "stop" and 3 <= len(out.text) <= 6
        assert EOS not in out.ids[:3]


def test_full_sampler_path_with_a_constraint(engine):
    """Penalties and top-n logprobs take the host-side sampler: the mask still holds and
    the logprobs are those of the masked distribution (disallowed tokens absent)."""
    p = SamplingParams(regex="[0-9]{5}", max_tokens=8, repetition_penalty=1.3, logprobs=3)
    out = engine.generate("abc", p)[0]
    assert re.fullmatch("[0-9]{5}", out.text)
    for d in out.logprobs:
        assert all(np.isneginf(lp) or ALPHABET[t].isdigit() for t, lp in d.items()
                   if t != EOS)


def test_fill_bitmask_allows_everything_in_free_rows(engine):
    m = engine.grammars.matcher(SamplingParams(regex="b").constraint)
    mask = fill_bitmask([(1, m)], 3, VOCAB)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little").reshape(3, -1)[:, :VOCAB]
    assert bits[0].all() and bits[2].all()
    assert np.flatnonzero(bits[1]).tolist() == [ALPHABET.index("b")]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_with_a_grammar_is_token_identical(method):
    """Constrained requests speculate: proposals cut to what the grammar accepts, each
    verify row masked by the grammar after the proposal's first j tokens. Where the
    grammar forces a token the proposal copies it (n-grams) or the draft, the target's
    own weights unmasked, may propose it; accepted proposals either way."""
    runner = FakeRunner(num_pages=64, page_size=4)
    tok = alphabet_tokenizer()
    plain = Engine(runner, tokenizer=tok, **CONFIG)
    spec = {"method": "ngram", "num_tokens": 3} if method == "ngram" else \
        {"method": "draft", "model": FakeRunner(num_pages=64, page_size=4), "num_tokens": 3}
    specd = Engine(runner, tokenizer=tok, speculative=spec, **CONFIG)
    params = [SamplingParams(regex="(abc){2,8}", max_tokens=30),
              SamplingParams(regex="[a-d]{3}(xy){1,5}z", max_tokens=30, temperature=1.0,
                             seed=9),
              SamplingParams(choice=["abcabcabcx", "abcabcabcy"], max_tokens=30),
              SamplingParams(max_tokens=12)]
    prompts = ["abcabc", "abab", "abcab", "hello"]
    want = plain.generate(prompts, params)
    got = specd.generate(prompts, params)
    assert [o.ids for o in got] == [o.ids for o in want]
    assert re.fullmatch("(abc){2,8}", got[0].text) and got[2].text in params[2].choice
    assert specd.stats().spec_accepted_tokens > 0


def test_matchers_of_one_grammar_are_copies_of_one_template_and_independent(engine):
    grammars = engine.grammars
    grammar = SamplingParams(regex="ab|ac").constraint
    built = grammars.built
    first, second = grammars.matcher(grammar), grammars.matcher(grammar)
    assert grammars.built == built + 1  # built once, copied for the second
    assert first is not second
    a, b, c = (ALPHABET.index(x) for x in "abc")
    assert first.consume_token(a) and first.consume_token(b) and first.is_accepting()
    # the copy is untouched by the first matcher's tokens
    bits = np.unpackbits(fill_bitmask([(0, second)], 1, VOCAB).view(np.uint8),
                         bitorder="little")[:VOCAB]
    assert np.flatnonzero(bits).tolist() == [a]
    assert second.consume_token(a) and second.consume_token(c) and second.is_accepting()
    # bounded: the oldest template goes once TEMPLATES others were built
    for i in range(grammars.TEMPLATES):
        grammars.matcher(SamplingParams(regex=f"a{{{i + 1}}}").constraint)
    assert grammar not in grammars._templates
    assert len(grammars._templates) == grammars.TEMPLATES


def test_masks_filled_during_the_bookkeeping_change_no_output(monkeypatch):
    """The split step consumes a read token into its grammar first and fills the next
    masks on the grammar thread while the scheduler applies the token
    (`structured.OVERLAP_FILL`): the same tokens and finish reasons as filling them
    after, and every token consumed ahead is one the scheduler then applies (none left
    over when a request finishes, none applied twice)."""
    from jaxrt.runtime.scheduler import Scheduler
    finish = Scheduler._finish
    left_over = []

    def checked_finish(self, req, reason):
        left_over.append(list(req.grammar_ahead))
        return finish(self, req, reason)
    monkeypatch.setattr(Scheduler, "_finish", checked_finish)
    ahead = Engine._consume_ahead
    calls = []
    monkeypatch.setattr(Engine, "_consume_ahead",
                        staticmethod(lambda call, tokens: calls.append(1)
                                     or ahead(call, tokens)))
    got = {}
    for overlap in (True, False):
        monkeypatch.setattr(structured, "OVERLAP_FILL", overlap)
        e = _split_engine()
        got[overlap] = [(o.ids, o.finish_reason)
                        for o in e.generate(PIPELINE_PROMPTS, PIPELINE_PARAMS)]
        assert e.stats().decode_loops == 0
    assert got[True] == got[False]
    assert len(calls) >= 8             # the overlapped fill ran (only with OVERLAP_FILL)
    assert got[True][3][1] == "stop"   # the choice completes its grammar
    assert left_over and all(a == [] for a in left_over)
