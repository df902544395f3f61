"""Structured output through the OpenAI server: vLLM's guided_* fields and OpenAI's
response_format constrain the output; bad ones are 400s before anything is queued."""
from __future__ import annotations

import re

import httpx
import openai
import pytest

from jaxrt.runtime.engine import Engine
from jaxrt.serve.server import ServerThread
from tests.runtime.fake_model import FakeRunner
from tests.runtime.test_structured import alphabet_tokenizer

MODEL = "fake"


@pytest.fixture(scope="module")
def server():
    # the shapes of tests/runtime's engines (FakeRunner shares compiled programs)
    engine = Engine(FakeRunner(num_pages=64, page_size=4), tokenizer=alphabet_tokenizer(),
                    max_num_seqs=4, max_num_batched_tokens=48, max_model_len=48,
                    warmup=False, log=None)
    with ServerThread(engine, model_name=MODEL) as srv:
        yield srv


def test_guided_fields_and_response_format(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = c.completions.create(model=MODEL, prompt="abc", max_tokens=10,
                               extra_body={"guided_regex": "[a-d]{4}"})
    assert re.fullmatch("[a-d]{4}", out.choices[0].text)
    assert out.choices[0].finish_reason == "stop"
    out = c.completions.create(model=MODEL, prompt="abc", max_tokens=10, n=3, seed=4,
                               temperature=1.0,
                               extra_body={"guided_choice": ["up", "down", "left"]})
    assert all(ch.text in ("up", "down", "left") for ch in out.choices)
    out = c.completions.create(
        model=MODEL, prompt="abc", max_tokens=10, extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "n", "schema": {
                "type": "integer", "minimum": 0, "maximum": 999}}}})
    assert 0 <= int(out.choices[0].text) <= 999


@pytest.mark.parametrize("extra, message", [
    ({"guided_regex": "a(b"}, "regex"),
    ({"guided_json": "{oops"}, "not valid JSON"),
    ({"guided_json": {"type": "objekt"}}, "objekt"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "only one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    # JSON needs '{' or '"', which this alphabet lacks: refused when the request is added
    ({"response_format": {"type": "json_object"}}, "vocabulary"),
])
def test_bad_constraints_are_400(server, extra, message):
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "abc", "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
