"""Request fields over HTTP against the fake model, each shown to have its effect:
sampling truncation, stop token ids, chat logprobs, usage chunks (final and continuous),
null token limits; 503 + Retry-After while draining and after an engine failure; the
prefix-cache and preemption metrics' values; `jaxrt serve` refusing a bad --host before
it loads the model."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from jaxrt.runtime.engine import Engine
from jaxrt.serve.server import ServerThread
from tests.runtime.fake_model import ALPHABET, FakeRunner
from tests.serve.test_server import (MODEL, TEMPLATE, _metric_samples, client, make_engine,
                                     wait_idle)
from tests.serve.test_server import server  # noqa: F401  (a fixture: this module's server)

CHAT = [{"role": "user", "content": "hi"}]
CHAT_IDS = [ALPHABET.index(ch) for ch in "uhi_a_"]  # TEMPLATE rendered


def _wait_for(cond, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _first_new(text: str) -> int:
    """The first position (>= 2) whose character (= token) did not occur before it."""
    return next(i for i in range(2, len(text)) if text[i] not in text[:i])


# ---- sampling fields ------------------------------------------------------------------

def test_stop_token_ids_end_output_at_that_id(server):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) == 12            # no EOS in it: one character per token
    k = _first_new(full)
    stop = {"ignore_eos": True, "stop_token_ids": [ALPHABET.index(full[k])]}
    r = c.completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=0,
                             extra_body=stop)
    assert r.choices[0].text == full[:k] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k + 1   # the stop token is generated, not shown

    chat = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = chat.choices[0].message.content
    assert len(text) == 12
    k = _first_new(text)
    stop = {"ignore_eos": True, "stop_token_ids": [ALPHABET.index(text[k])]}
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                  extra_body=stop)
    assert r.choices[0].message.content == text[:k]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == k + 1
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                            temperature=0, stream=True, extra_body=stop))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_truncation_that_leaves_one_token_samples_greedily(server):
    """top_k=1, min_p=1 and a tiny top_p each keep only the best token: temperature 1
    with a seed then gives the greedy output, which the same seed alone does not. (The
    fake model's logits are multiples of 1/4096, so two can tie for the best and both
    stay: these prompts' first tokens have no tie; 'uhi_a_' ties at its 12th.)"""
    c = client(server)

    def text(**kw):
        vllm_only = {k: kw.pop(k) for k in ("top_k", "min_p") if k in kw}
        extra = {"ignore_eos": True, **vllm_only}
        return c.completions.create(model=MODEL, prompt="Q9x", max_tokens=12, seed=3,
                                    extra_body=extra, **kw).choices[0].text

    greedy = text(temperature=0)
    assert text(temperature=1.0) != greedy
    for kw in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):
        assert text(temperature=1.0, **kw) == greedy, kw
    chat = dict(model=MODEL, messages=CHAT, max_tokens=10, seed=3)
    want = c.chat.completions.create(temperature=0, **chat).choices[0].message.content
    got = c.chat.completions.create(temperature=1.0, extra_body={"top_k": 1}, **chat)
    assert got.choices[0].message.content == want


def test_chat_logprobs_have_openai_shape_and_values(server):
    c = client(server)
    ref = c.completions.create(model=MODEL, prompt=CHAT_IDS, max_tokens=6, temperature=0,
                               logprobs=3).choices[0].logprobs
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [x.token for x in content] == ref.tokens and len(content) >= 1
    assert [x.logprob for x in content] == pytest.approx(ref.token_logprobs)
    for x, top in zip(content, ref.top_logprobs):
        assert len(x.top_logprobs) == 3 and x.bytes == list(x.token.encode())
        assert {t.token: t.logprob for t in x.top_logprobs} == pytest.approx(top)
        values = [t.logprob for t in x.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert x.top_logprobs[0].token == x.token   # greedy: the sampled one is the best
    none = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                     temperature=0, logprobs=True)
    assert [x.top_logprobs for x in none.choices[0].logprobs.content] == [[]] * len(content)
    off = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    assert off.choices[0].logprobs is None
    chunks = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       stream=True)
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in streamed] == \
        [(x.token, x.logprob) for x in content]


def test_chat_stream_ends_with_usage_chunk(server):
    c = client(server)
    want = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=9,
                                     temperature=0).usage
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=9,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.usage is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == len(CHAT_IDS) == \
        want.prompt_tokens
    assert last.usage.completion_tokens == want.completion_tokens >= 1
    assert last.usage.total_tokens == len(CHAT_IDS) + want.completion_tokens


def test_continuous_usage_stats_on_every_chunk(server):
    """vLLM's: each chunk's usage is its choice's prompt and the tokens generated so far
    (counted here from the chunks' logprobs, one entry per token)."""
    c = client(server)
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(c.completions.create(model=MODEL, prompt="hello", max_tokens=8,
                                       temperature=0, logprobs=1, stream=True,
                                       stream_options=opts,
                                       extra_body={"ignore_eos": True}))
    so_far = 0
    for ch in chunks[:-1]:
        so_far += len(ch.choices[0].logprobs.tokens)
        assert (ch.usage.prompt_tokens, ch.usage.completion_tokens,
                ch.usage.total_tokens) == (5, so_far, 5 + so_far)
    assert so_far == 8 and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8

    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=7, n=2,
                                            temperature=1.0, seed=5, logprobs=True,
                                            stream=True, stream_options=opts,
                                            extra_body={"ignore_eos": True}))
    so_far = [0, 0]
    for ch in chunks[:-1]:
        (choice,) = ch.choices
        if choice.logprobs is not None:
            so_far[choice.index] += len(choice.logprobs.content)
        else:   # the role chunk
            assert choice.delta.role == "assistant"
        assert (ch.usage.prompt_tokens, ch.usage.completion_tokens) == \
            (len(CHAT_IDS), so_far[choice.index])
    assert so_far == [7, 7]
    assert chunks[-1].usage.completion_tokens == 14
    assert chunks[-1].usage.prompt_tokens == len(CHAT_IDS)
    # without include_usage it would be dropped (as vLLM does): refused instead
    r = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "a", "stream": True,
        "stream_options": {"continuous_usage_stats": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_null_max_tokens_is_openai_default(server):
    """null = omitted: 16 tokens on /v1/completions; no limit but the context on chat."""
    url = server.url + "/v1"
    body = {"model": MODEL, "prompt": "abc", "temperature": 0, "ignore_eos": True}
    omitted = httpx.post(url + "/completions", json=body, timeout=30).json()
    null = httpx.post(url + "/completions", json={**body, "max_tokens": None}, timeout=30)
    assert null.status_code == 200, null.text
    assert null.json()["usage"]["completion_tokens"] == 16
    assert null.json()["choices"][0]["text"] == omitted["choices"][0]["text"]
    assert null.json()["choices"][0]["finish_reason"] == "length"
    chat = {"model": MODEL, "messages": CHAT, "temperature": 0, "ignore_eos": True}
    for nulls in ({"max_tokens": None}, {"max_completion_tokens": None},
                  {"max_tokens": None, "max_completion_tokens": None}):
        r = httpx.post(url + "/chat/completions", json={**chat, **nulls}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 64 - len(CHAT_IDS)  # the context
        assert r.json()["choices"][0]["finish_reason"] == "length"


# ---- 503 while shutting down ----------------------------------------------------------

def _assert_503(r: httpx.Response, says: str) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["type"] == "server_error" and says in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_draining_server_answers_503_with_retry_after():
    """After shutdown starts, accepted requests finish; new ones get 503. The engine's
    step is held so the accepted request is still running when the new one comes."""
    engine = make_engine()
    release = threading.Event()
    real_step = engine.step

    def held_step():
        release.wait(30)
        return real_step()

    engine.step = held_step
    srv = ServerThread(engine, model_name=MODEL, shutdown_timeout=30).start()
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "temperature": 0}
    try:
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(httpx.post, srv.url + "/v1/completions", json=body,
                                   timeout=60)
            _wait_for(lambda: srv.loop.pending == 1)
            srv.server.should_exit = True     # what SIGTERM does: uvicorn starts shutdown
            _wait_for(lambda: srv.loop._draining)
            _assert_503(httpx.post(srv.url + "/v1/completions", json=body, timeout=30),
                        "shutting down")
            chat = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
            _assert_503(httpx.post(srv.url + "/v1/chat/completions", json=chat,
                                   timeout=30), "shutting down")
            release.set()
            done = inflight.result(timeout=60)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
    finally:
        release.set()
        srv.stop()


def test_failed_engine_answers_503_with_retry_after():
    engine = make_engine()

    def broken_step():
        raise RuntimeError("injected fault")

    engine.step = broken_step
    with ServerThread(engine, model_name=MODEL) as srv:
        body = {"model": MODEL, "prompt": "abc", "max_tokens": 4}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        _assert_503(httpx.post(srv.url + "/v1/completions", json=body, timeout=30),
                    "the engine failed: injected fault")
        assert httpx.get(srv.url + "/health").status_code == 503


# ---- metric values --------------------------------------------------------------------

def test_metrics_prefix_cache_hit_rate_and_preemptions_match_the_engine():
    # the runner's cache shape is the other tests' (compiled once); the engine uses 16 of
    # its pages = 64 tokens, one max_model_len
    engine = Engine(FakeRunner(num_pages=256, page_size=4), num_pages=16, max_num_seqs=4,
                    max_model_len=64, warmup=False, log=None, chat_template=TEMPLATE)
    hit = ("jaxrt_prefix_cache_hit_rate", ())
    preempted = ("jaxrt_num_preemptions_total", ())
    with ServerThread(engine, model_name=MODEL) as srv:
        c = client(srv)

        def scrape():
            return _metric_samples(httpx.get(srv.url + "/metrics").text)

        prompt = ALPHABET[2:42]   # 40 tokens: the second time, 9 pages (36 tokens) hit
        for _ in range(2):
            c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        m = scrape()
        assert m[hit] == pytest.approx(36 / 80)
        assert m[hit] == pytest.approx(engine.block_manager.stats().prefix_cache_hit_rate)
        assert m[preempted] == 0

        # two requests of 4 + 56 tokens need 15 pages each: one is preempted. The first
        # step waits until both are submitted, so neither finishes alone.
        real_step = engine.step

        def step_once_both_pending():
            _wait_for(lambda: srv.loop.pending >= 2)
            engine.step = real_step
            return real_step()

        engine.step = step_once_both_pending

        async def both():
            ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            return await asyncio.gather(*(ac.completions.create(
                model=MODEL, prompt=p, max_tokens=56, temperature=0,
                extra_body={"ignore_eos": True}) for p in ("abcd", "bcde")))

        rs = asyncio.run(both())
        wait_idle(engine)
        assert [r.usage.completion_tokens for r in rs] == [56, 56]
        m = scrape()
    assert engine.scheduler.num_preemptions >= 1
    assert m[preempted] == engine.scheduler.num_preemptions
    assert m[hit] == pytest.approx(engine.block_manager.stats().prefix_cache_hit_rate)


# ---- the CLI --------------------------------------------------------------------------

def test_cli_serve_bad_host_or_port_fails_before_loading_the_model(monkeypatch, capsys):
    import jaxrt.runtime.engine as engine_module
    from jaxrt.cli.main import main

    def no_load(*a, **kw):   # an AssertionError is a bug to main(): exit 1, not 2
        raise AssertionError("the model was loaded before --host/--port were checked")

    monkeypatch.setattr(engine_module, "Engine", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for argv, says in ((["--host", "999.1.1.1"], "999.1.1.1"),
                           (["--port", str(port)], str(port)),
                           (["--port", "-1"], "--port")):
            assert main(["serve", "smollm2-135m", *argv]) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("jaxrt serve: error: ") and err.count("\n") == 1, err
            assert says in err
