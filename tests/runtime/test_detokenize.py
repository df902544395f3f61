"""Incremental detokenization (jaxrt/runtime/detokenize.py) on the real tokenizers, and
the O(n) cost of stop strings and streaming through the engine."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxrt.runtime.detokenize import MAX_PENDING, IncrementalDetokenizer
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from tests.runtime.fake_model import FakeRunner, FakeTokenizer

TEXTS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60) | \
    st.sampled_from(["héllo wörld 😀 ✓ 日本語", "  leading spaces", "a\n\nb\tc",
                     "def f(x):\n    return x ** 2", "1234567890", "🙂🙃 emoji pairs"])


def feed(decode, ids: list[int], start: int = 0) -> tuple[IncrementalDetokenizer, str]:
    d = IncrementalDetokenizer(decode, start)
    out = ""
    for n in range(start + 1, len(ids) + 1):
        out += d.update(ids[:n])
        # never more than MAX_PENDING tokens held back, and the decoded window is short:
        # O(1) work per token
        assert n - d.read_offset < MAX_PENDING
        assert n - d.prefix_offset <= 2 * MAX_PENDING
    assert out == d.text
    return d, out


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def tokenizer(request):
    from jaxrt.frontends.gguf_reader import read_gguf
    return read_gguf(request.getfixturevalue(f"{request.param}_path")).tokenizer


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, prompt=TEXTS)
def test_incremental_text_equals_the_full_decode(tokenizer, text, prompt):
    prompt_ids = tokenizer.encode(prompt)
    ids = prompt_ids + tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids[len(prompt_ids):])
    d, out = feed(tokenizer.decode, ids, len(prompt_ids))
    if "\ufffd" not in full:
        # Text the tokenizer represents. (Where bytes form no character, a run of
        # MAX_PENDING tokens is emitted as it decodes so far rather than stall, and may
        # differ from the full decode.)
        assert out == full


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_never_stall(tokenizer, data):
    """Ids a sampler could produce (byte tokens that form no character, special tokens):
    text keeps coming, at most MAX_PENDING tokens late (checked in feed)."""
    n = tokenizer.vocab_size
    ids = data.draw(st.lists(st.integers(0, n - 1) | st.integers(0, 300), min_size=1,
                             max_size=40))
    feed(tokenizer.decode, ids)


class CountingTokenizer(FakeTokenizer):
    def __init__(self):
        self.decoded = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


@pytest.mark.parametrize("how", ["generate", "stream"])
def test_stop_strings_and_streams_decode_linearly(how):
    tok = CountingTokenizer()
    engine = Engine(FakeRunner(num_pages=128, page_size=4), tokenizer=tok, max_num_seqs=2,
                    max_num_batched_tokens=64, max_model_len=400, log=None, warmup=False)
    n = 300
    params = SamplingParams(max_tokens=n, ignore_eos=True, stop=["never appears \x00"])
    if how == "generate":
        out = engine.generate([[3, 4, 5]], params)[0]
    else:
        out = list(engine.stream([3, 4, 5], params))[-1].output
    assert len(out.ids) == n and out.finish_reason == "length"
    # the whole output decoded once per token would be n^2 / 2 = 45,000 ids
    assert tok.decoded <= 12 * n, tok.decoded
