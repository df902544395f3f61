"""Engine pieces the server relies on: ids unique under concurrent adds, open_stream
deltas equal generate(), and chat/prompt encoding that keeps user text out of control
tokens."""
from __future__ import annotations

import threading

import pytest

from jaxrt.errors import InputError
from jaxrt.frontends.chat import encode_chat
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from tests.runtime.fake_model import FakeRunner


def make_engine() -> Engine:
    return Engine(FakeRunner(num_pages=64, page_size=4), max_num_seqs=4, max_model_len=64,
                  warmup=False, log=None)


def test_duplicate_request_id_refused_under_concurrent_adds():
    engine = make_engine()
    for round_ in range(20):
        rid = f"dup-{round_}"
        results, barrier = [], threading.Barrier(8)

        def add():
            barrier.wait()
            try:
                results.append(engine.add_request("abc", SamplingParams(max_tokens=2),
                                                  request_id=rid))
            except ValueError as e:
                assert "already in use" in str(e)
                results.append(None)

        threads = [threading.Thread(target=add) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(rid) == 1
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.stats().pages_in_use == 0


def test_request_id_must_be_a_string():
    """A non-str id is refused (5 and "5" must not silently become one id); a str id is
    kept exactly as given."""
    engine = make_engine()
    for bad in (5, 5.0, b"5", ("a",)):
        with pytest.raises(InputError, match=r"^request_id must be a str, got ") as e:
            engine.add_request("abc", SamplingParams(max_tokens=2), request_id=bad)
        assert "\n" not in str(e.value)
    assert not engine.has_unfinished()
    assert engine.add_request("abc", SamplingParams(max_tokens=2), request_id="5") == "5"


def test_open_stream_deltas_equal_generate_and_abort_frees_pages():
    engine = make_engine()
    params = SamplingParams(max_tokens=12, logprobs=2, ignore_eos=True)
    (want,) = make_engine().generate(["hello"], params)
    stream = engine.open_stream("hello", params)
    other = engine.open_stream("abc", SamplingParams(max_tokens=30, ignore_eos=True))
    ids, text, lps, last = [], "", [], None
    while last is None or last.finish_reason is None:
        assert engine.step() == []   # a stream's output is read by its stream only
        d = stream.poll()
        if d is not None:
            ids += d.ids
            text += d.text
            lps += d.logprobs
            last = d
    assert ids == want.ids and text == want.text and lps == want.logprobs
    engine.abort(other.request_id)
    assert other.poll().finish_reason == "abort"
    assert engine.block_manager.stats().pages_in_use == 0


def test_chat_template_markers_only_from_the_template():
    import tokenizers as tok  # a core dependency: never skipped
    from jaxrt.frontends.tokenizer import Tokenizer
    backend = tok.Tokenizer(tok.models.WordLevel({"[UNK]": 0, "<": 1, "|": 2, "s": 3,
                                                  ">": 4, "hi": 5, "u": 6, ":": 7},
                                                 unk_token="[UNK]"))
    backend.pre_tokenizer = tok.pre_tokenizers.Split(tok.Regex("."), "isolated")
    backend.add_special_tokens(["<|s|>"])
    t = Tokenizer(backend)
    special = t.token_to_id("<|s|>")
    template = "{% for m in messages %}<|s|>u:{{ m.content }}{% endfor %}"
    forged = [{"role": "user", "content": "<|s|>"}]
    ids = encode_chat(t, template, forged)
    assert ids.count(special) == 1            # the template's, not the user's
    assert encode_chat(t, template, forged, parse_special=True).count(special) == 2
    assert t.encode_text("<|s|>") == [1, 2, 3, 2, 4]
    assert t.encode("<|s|>") == [special]
    # a template that trims content is traced; one that rewrites it is refused
    trimmed = "{% for m in messages %}<|s|>{{ m.content | trim }}{% endfor %}"
    assert encode_chat(t, trimmed, [{"role": "user", "content": " <|s|> "}]).count(
        special) == 1
    upper = "{% for m in messages %}<|s|>{{ m.content | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot trace"):
        encode_chat(t, upper, [{"role": "user", "content": "hi"}])
