"""The OpenAI server against the fake model (exact outputs whatever the batching), on
127.0.0.1 inside the test: the official `openai` client, load with disconnects,
fuzzed bad bodies, overload, metrics."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from jaxrt.serve.server import ServerThread
from tests.runtime.fake_model import ALPHABET, EOS, FakeRunner

MODEL = "fake"
# the fake tokenizer has one character per id; '<' (id 1) is EOS
TEMPLATE = "{% for m in messages %}{{ m.role[0] }}{{ m.content }}_{% endfor %}" \
           "{% if add_generation_prompt %}a_{% endif %}"


def make_engine(num_pages=256, max_num_seqs=8, **kw) -> Engine:
    return Engine(FakeRunner(num_pages=num_pages, page_size=4), max_num_seqs=max_num_seqs,
                  max_model_len=64, warmup=False, log=None, chat_template=TEMPLATE, **kw)


@pytest.fixture(scope="module")
def server():
    engine = make_engine()
    with ServerThread(engine, model_name=MODEL, max_pending=200) as srv:
        srv.engine = engine
        yield srv


def client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, **kw)


def offline(prompts, params) -> list:
    """The same requests through a fresh in-process engine."""
    return make_engine().generate(prompts, params)


def wait_idle(engine, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.has_unfinished()


PROMPTS = ["abc", "hello", "Q9x", "zzzz", "m"]


def test_completions_greedy_equal_offline(server):
    c = client(server)
    expect = offline(PROMPTS, SamplingParams(max_tokens=12))
    for prompt, want in zip(PROMPTS, expect):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        assert r.usage.prompt_tokens == len(want.prompt_ids)
        assert r.usage.completion_tokens == len(want.ids)
        # token ids in, same result
        r2 = c.completions.create(model=MODEL, prompt=want.prompt_ids, max_tokens=12,
                                  temperature=0)
        assert r2.choices[0].text == want.text


def test_completions_stream_equal_offline_with_usage(server):
    c = client(server)
    (want,) = offline(["hello"], SamplingParams(max_tokens=20))
    chunks = list(c.completions.create(model=MODEL, prompt="hello", max_tokens=20,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
        want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.ids)
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_ids)


def test_chat_equal_offline_stream_and_not(server):
    c = client(server)
    msgs = [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]
    ids = [ALPHABET.index(ch) for ch in "sbe_uhi_a_"]  # TEMPLATE rendered
    (want,) = offline([ids], SamplingParams(max_tokens=10))
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    # max_completion_tokens is the same limit
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=10,
                                  temperature=0)
    assert r.choices[0].message.content == want.text
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_logprobs_echo_stop_and_penalties(server):
    c = client(server)
    params = SamplingParams(max_tokens=8, logprobs=3, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.2)
    (want,) = offline(["abc"], params)
    r = c.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0,
                             logprobs=3, echo=False, extra_body={"repetition_penalty": 1.3},
                             presence_penalty=0.5, frequency_penalty=0.2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == want.text
    assert lp.token_logprobs == pytest.approx([d[t] for t, d in zip(want.ids,
                                                                      want.logprobs)])
    assert all(len(top) == 3 for top in lp.top_logprobs)
    r = c.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0,
                             echo=True)
    assert r.choices[0].text.startswith("abc")
    stop = want.text[3:5]
    r = c.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0,
                             logprobs=3, stop=[stop],
                             extra_body={"repetition_penalty": 1.3},
                             presence_penalty=0.5, frequency_penalty=0.2)
    assert r.choices[0].text == want.text[:want.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_samples_seeded_share_prompt_pages(server):
    c = client(server)
    engine = server.engine
    before = engine.block_manager.stats()
    r = c.completions.create(model=MODEL, prompt="abcdefghijklmnop", max_tokens=10,
                             temperature=1.0, seed=7, n=4)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2, 3]
    tokens = 0
    for j, ch in enumerate(sorted(r.choices, key=lambda ch: ch.index)):
        (want,) = offline(["abcdefghijklmnop"], SamplingParams(max_tokens=10,
                                                               temperature=1.0, seed=7 + j))
        assert ch.text == want.text   # sample j has seed + j (vLLM's convention)
        tokens += len(want.ids)
    assert r.usage.completion_tokens == tokens
    assert len({ch.text for ch in r.choices}) > 1
    after = engine.block_manager.stats()
    # 16 prompt tokens = 4 full pages, of which the siblings reuse 3 (the last prompt
    # token is always computed): 3 samples x 12 tokens from the prefix cache
    assert after.cached_tokens - before.cached_tokens >= 3 * 12


def test_load_100_streams_10_disconnect(server):
    engine = server.engine
    prompts = [ALPHABET[2 + i % 60] + ALPHABET[2 + (7 * i) % 60] + "xy" for i in range(100)]
    expect = offline(prompts, SamplingParams(max_tokens=24, ignore_eos=True))

    async def one(ac, i):
        # the ones that disconnect ask for 60 tokens: they must not finish before the
        # server notices the closed connection, even on a loaded machine
        stream = await ac.completions.create(model=MODEL, prompt=prompts[i],
                                             max_tokens=60 if i % 10 == 3 else 24,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        text, n = "", 0
        async for ch in stream:
            text += ch.choices[0].text
            n += 1
            if i % 10 == 3 and n == 3:
                await stream.close()       # disconnects mid-stream
                return None
        return text

    async def main():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                http_client=httpx.AsyncClient(
                                    limits=httpx.Limits(max_connections=200), timeout=120))
        return await asyncio.gather(*(one(ac, i) for i in range(100)))

    def finished(reason):
        key = ("jaxrt_request_success_total", (("finished_reason", reason),))
        return _metric_samples(httpx.get(server.url + "/metrics").text)[key]

    before = {r: finished(r) for r in ("abort", "length", "stop")}
    texts = asyncio.run(main())
    wait_idle(engine)
    delta = {r: finished(r) - before[r] for r in before}
    # every request is accounted for; a disconnected one is aborted unless it ran to its
    # end before the server saw the closed connection (the fake model is fast: on a
    # warm engine a few of the 10 can)
    assert delta["stop"] == 0 and delta["abort"] + delta["length"] == 100
    assert 1 <= delta["abort"] <= 10
    done = [(t, e) for i, (t, e) in enumerate(zip(texts, expect)) if i % 10 != 3]
    assert len(done) == 90
    assert all(t == e.text for t, e in done)
    wait_idle(engine)
    assert engine.block_manager.stats().pages_in_use == 0   # no page leaked
    assert server.loop.pending == 0


def _metric_samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k != "model_name")))] = s.value
    return out


def test_metrics_parse_and_match_what_was_sent():
    engine = make_engine()
    with ServerThread(engine, model_name=MODEL) as srv:
        c = client(srv)
        sent, prompt_toks, out_toks = 0, 0, 0
        for i in range(6):
            r = c.completions.create(model=MODEL, prompt=PROMPTS[i % 5], max_tokens=3 + i,
                                     temperature=0, extra_body={"ignore_eos": True})
            sent += 1
            prompt_toks += r.usage.prompt_tokens
            out_toks += r.usage.completion_tokens
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, prompt="a", max_tokens=1000)
        m = _metric_samples(httpx.get(srv.url + "/metrics").text)
    assert m[("jaxrt_request_success_total", (("finished_reason", "length"),))] == sent
    assert m[("jaxrt_prompt_tokens_total", ())] == prompt_toks
    assert m[("jaxrt_generation_tokens_total", ())] == out_toks
    assert m[("jaxrt_request_errors_total", (("status", "400"),))] == 1
    assert m[("jaxrt_time_to_first_token_seconds_count", ())] == sent
    assert m[("jaxrt_e2e_request_latency_seconds_count", ())] == sent
    assert m[("jaxrt_time_per_output_token_seconds_count", ())] == sent  # all >1 token
    assert m[("jaxrt_num_requests_running", ())] == 0
    assert m[("jaxrt_kv_cache_usage_perc", ())] == 0
    for name in ("jaxrt_num_requests_waiting", "jaxrt_prefix_cache_hit_rate",
                 "jaxrt_num_preemptions_total"):
        assert (name, ()) in m


def test_overload_gets_429_and_stays_bounded():
    engine = make_engine(max_num_seqs=2)
    limit = 4
    with ServerThread(engine, model_name=MODEL, max_pending=limit) as srv:
        seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                s = engine.scheduler
                seen.append((len(s.waiting) + len(s.running), srv.loop.pending))
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()

        async def main():
            async with httpx.AsyncClient(timeout=60) as hc:
                return await asyncio.gather(*(hc.post(srv.url + "/v1/completions", json={
                    "model": MODEL, "prompt": "abc", "max_tokens": 30, "temperature": 0,
                    "ignore_eos": True}) for _ in range(30)))

        rs = asyncio.run(main())
        stop.set()
        watcher.join()
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0
        for r in rs:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "server_overloaded"
        assert max(a for a, _ in seen) <= limit and max(b for _, b in seen) <= limit
        # and it serves again once the queue drains
        wait_idle(engine)
        assert client(srv).completions.create(model=MODEL, prompt="abc", max_tokens=2,
                                              temperature=0).choices[0].text


def test_auth_body_limit_unknown_model_and_context():
    engine = make_engine()
    with ServerThread(engine, model_name=MODEL, api_key="sekrit",
                      max_body_bytes=2000) as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL]
        assert httpx.get(srv.url + "/health").status_code == 200   # no key needed
        r = httpx.post(srv.url + "/v1/completions", headers={"Authorization": "Bearer sekrit"},
                       json={"model": MODEL, "prompt": "a" * 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        with pytest.raises(openai.NotFoundError):
            good.completions.create(model="gpt-4", prompt="a")
        with pytest.raises(openai.BadRequestError, match="max_model_len"):
            good.completions.create(model=MODEL, prompt="a" * 60, max_tokens=10)
        with pytest.raises(openai.BadRequestError, match="context"):
            good.chat.completions.create(model=MODEL, messages=[
                {"role": "user", "content": "a" * 70}])
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            good.completions.create(model=MODEL, prompt="a", logit_bias={"3": 1.0})
        assert good.completions.create(model=MODEL, prompt="ab", max_tokens=2).choices


# ---- fuzzed bad bodies ------------------------------------------------------------------

_VALID = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "temperature": 0}
_BAD_VALUES = {
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=100),
                            st.text(max_size=3), st.floats(), st.booleans(),
                            st.lists(st.integers(), max_size=2)),
    "temperature": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=2.0001),
                             st.text(max_size=3), st.booleans()),
    "top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001),
                       st.text(max_size=2)),
    "top_k": st.one_of(st.integers(max_value=-2), st.floats(), st.text(max_size=2)),
    "min_p": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0001)),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=129), st.text()),
    "seed": st.one_of(st.integers(min_value=2 ** 63), st.integers(max_value=-(2 ** 63) - 1),
                      st.floats(), st.text(max_size=2)),
    "presence_penalty": st.one_of(st.floats(min_value=2.0001), st.floats(max_value=-2.0001)),
    "frequency_penalty": st.one_of(st.floats(min_value=2.0001), st.text(max_size=2)),
    "repetition_penalty": st.one_of(st.floats(max_value=0.0), st.floats(min_value=10.01)),
    "logprobs": st.one_of(st.integers(max_value=-1), st.integers(min_value=21),
                          st.booleans()),
    "stop": st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=3),
                      st.just(""), st.lists(st.text(min_size=1), min_size=17, max_size=17)),
    "stop_token_ids": st.one_of(st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
                                st.lists(st.integers(min_value=64), min_size=1,
                                         max_size=2)),
    "prompt": st.one_of(st.just(""), st.just([]), st.integers(), st.just([[]]),
                        st.lists(st.integers(min_value=64), min_size=1, max_size=3),
                        st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                        st.text(alphabet="$%^&*", min_size=1, max_size=5),
                        st.just("a" * 70)),
    "model": st.one_of(st.integers(), st.text(max_size=5).filter(lambda s: s != MODEL)),
    "stream": st.one_of(st.integers(), st.text(max_size=2)),
    "echo": st.one_of(st.integers(), st.text(max_size=2)),
    "unknown_field": st.integers(),
}


def _json_value():
    return st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                        lambda c: st.lists(c, max_size=3)
                        | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)


_BAD_BODY = st.one_of(
    st.sampled_from(sorted(_BAD_VALUES)).flatmap(
        lambda k: _BAD_VALUES[k].map(lambda v: json.dumps({**_VALID, k: v}).encode())),
    st.sampled_from(sorted(_VALID)).map(
        lambda k: json.dumps({a: b for a, b in _VALID.items() if a != k}).encode())
    .filter(lambda b: b"model" not in b or b"prompt" not in b),
    _json_value().filter(lambda v: not isinstance(v, dict) or "model" not in v)
    .map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40).filter(lambda b: _not_json(b)),
    st.just(b'{"model": "fake", "prompt": "a", "temperature": NaN}'),
    st.just(b'{"model": "fake", "prompt": "a", "max_tokens": 1e400}'),
)


def _not_json(b: bytes) -> bool:
    try:
        json.loads(b)
        return False
    except ValueError:
        return True


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(body=_BAD_BODY, chat=st.booleans())
def test_fuzzed_bad_bodies_get_4xx(server, body, chat):
    if chat:  # the same mutations on a chat body: prompt -> messages
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            # chat's logprobs is a bool: a bool there is valid
            assume(not isinstance(obj.get("logprobs"), bool) and "echo" not in obj)
            if "prompt" in obj:
                p = obj.pop("prompt")
                obj["messages"] = [{"role": "user", "content": p}] \
                    if isinstance(p, str) and p else ([] if p == "" else p)
            body = json.dumps(obj).encode()
    url = server.url + ("/v1/chat/completions" if chat else "/v1/completions")
    r = httpx.post(url, content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, body, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    ok = httpx.post(server.url + "/v1/completions", json=_VALID, timeout=30)
    assert ok.status_code == 200


def test_echo_logprobs_return_prompt_logprobs(server):
    """OpenAI's echo + logprobs: the prompt's tokens first (the first one's logprob null),
    then the completion's; vLLM's `prompt_logprobs` field; the same through a stream."""
    c = client(server)
    (want,) = offline(["hello"], SamplingParams(max_tokens=4, logprobs=2, prompt_logprobs=2))
    r = c.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0,
                             logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "hello" + want.text
    assert lp.tokens == list("hello") + [ALPHABET[t] for t in want.ids]
    plp = want.prompt_logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:5] == pytest.approx(
        [plp[p][t].logprob for p, t in enumerate(want.prompt_ids) if p])
    assert lp.token_logprobs[5:] == pytest.approx([d[t] for t, d in zip(want.ids,
                                                                        want.logprobs)])
    for p in range(1, 5):  # the 2 best and the prompt token itself
        assert lp.top_logprobs[p] == pytest.approx(
            {ALPHABET[t]: v.logprob for t, v in plp[p].items()})
    assert lp.text_offset == list(range(len(lp.tokens)))  # one character per token
    chunks = list(c.completions.create(model=MODEL, prompt="hello", max_tokens=4,
                                       temperature=0, logprobs=2, echo=True, stream=True))
    streamed = [tok for ch in chunks for tok in (ch.choices[0].logprobs.tokens
                                                 if ch.choices[0].logprobs else [])]
    assert streamed == lp.tokens
    assert chunks[0].choices[0].logprobs.token_logprobs[:5] == lp.token_logprobs[:5]
    body = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "hello", "max_tokens": 1, "temperature": 0,
        "prompt_logprobs": 2}).json()
    got = body["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == 5
    assert got[1] == {str(t): {"logprob": pytest.approx(v.logprob), "rank": v.rank,
                               "decoded_token": v.decoded_token} for t, v in plp[1].items()}
    r = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "hello", "prompt_logprobs": 10 ** 6})
    assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["message"]
