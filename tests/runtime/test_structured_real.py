"""Structured output on the real SmolLM2: hypothesis-drawn JSON schemas (objects, arrays,
enums, numbers, nesting), every output parses and validates; a constrained request in a
batch leaves the unconstrained ones token-identical."""
from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams

MAX_TOKENS = 64
NAMES = ["id", "name", "count", "tags", "ok", "kind", "score", "items"]


def leaf():
    return st.one_of(
        st.just({"type": "boolean"}),
        st.lists(st.sampled_from(["red", "green", "blue", "a b", "x"]), min_size=1,
                 max_size=3, unique=True).map(lambda v: {"enum": v}),
        st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
        st.tuples(st.integers(-50, 50), st.integers(0, 50)).map(
            lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
        st.tuples(st.integers(-10, 10), st.integers(1, 10)).map(
            lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]}))


def compound(children):
    obj = st.dictionaries(st.sampled_from(NAMES), children, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props),
                       "additionalProperties": False})
    arr = st.tuples(children, st.integers(0, 3)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1]})
    return st.one_of(obj, arr)


SCHEMAS = st.recursive(leaf(), compound, max_leaves=5).map(
    lambda s: s if s.get("type") == "object" else
    {"type": "object", "properties": {"value": s}, "required": ["value"],
     "additionalProperties": False})


@pytest.fixture(scope="module")
def smollm2():
    return Engine("smollm2-135m", max_num_seqs=4, max_model_len=256,
                  max_num_batched_tokens=64, warmup=False, log=None)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(schemas=st.lists(SCHEMAS, min_size=1, max_size=3), as_text=st.booleans())
def test_json_schemas_on_smollm2(smollm2, schemas, as_text):
    params = [SamplingParams(max_tokens=MAX_TOKENS,
                             json_schema=json.dumps(s) if as_text else s) for s in schemas]
    outs = smollm2.generate(["Reply with JSON."] * len(schemas), params)
    for schema, out in zip(schemas, outs):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_smollm2_batch_mix_and_choice(smollm2):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = smollm2.generate(prompts, plain)
    mixed = smollm2.generate(prompts + ["Is water wet? Answer:", "Call 555-"],
                             [plain, plain, SamplingParams(choice=["yes", "no"]),
                              SamplingParams(regex=r"[0-9]{3}-[0-9]{4}", max_tokens=12)])
    assert [o.ids for o in mixed[:2]] == [o.ids for o in alone]
    assert mixed[2].text in ("yes", "no") and mixed[2].finish_reason == "stop"
    assert len(mixed[3].text) == 8 and mixed[3].text[3] == "-"
