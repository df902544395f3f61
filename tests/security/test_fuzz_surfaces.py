"""Fuzzing the input surfaces test_fuzz_untrusted.py does not reach: JSON nesting in every
JSON file a model or engine directory carries, structured-output constraints, pipeline
text and name patterns, settings given with an engine directory, `jax:` specs, and the
server's request bodies.

As there: only the project's error types escape, time and the Python heap stay bounded,
and what is accepted is taken exactly as given. Hypothesis explores (derandomize=False)
and prints the blob that reproduces a failure.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import time

import pytest
from frontends_synth import write_tiny_hf_dir
from hypothesis import given, settings, strategies as st
from test_fuzz_untrusted import EXPLORE, Bounded

from jaxrt.errors import InputError, SettingError


@functools.lru_cache(maxsize=None)
def _workdir() -> str:
    return tempfile.mkdtemp(prefix="jaxrt_fuzz_surfaces_")


@functools.lru_cache(maxsize=None)
def _hf_dir() -> str:
    return write_tiny_hf_dir(os.path.join(_workdir(), "hf"))


@functools.lru_cache(maxsize=None)
def _engine_dir() -> str:
    from jaxrt.compiler import load, save_engine
    out = os.path.join(_workdir(), "engine")
    save_engine(load(_hf_dir(), max_model_len=32), out)
    return out


# ---- JSON in model and engine directories ---------------------------------------------------

def _json_texts():
    """JSON-ish text: valid values, deep or unbalanced nesting, brackets inside strings,
    escapes, bytes that are not UTF-8."""
    leaf = st.sampled_from(['1', '-0.5e3', 'true', 'null', '"s"', '"[{"', '"\\"]"', '"\\ud800"',
                            '{}', '[]', '1e999', 'NaN', '"\xff"'])
    deep = st.builds(lambda n, open_, close, inner: open_ * n + inner + close * n,
                     st.integers(1, 5000), st.sampled_from(['[', '{"a":']),
                     st.sampled_from([']', '}']), leaf)
    unbalanced = st.builds(lambda n, ch: ch * n, st.integers(1, 3000),
                           st.sampled_from(['[', '{', ']', '"', '\\']))
    return st.one_of(leaf, deep, unbalanced,
                     st.recursive(leaf, lambda inner: st.one_of(
                         st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
                         st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2).map(
                             lambda d: "{" + ",".join(f'"{k}":{v}' for k, v in d.items())
                             + "}")), max_leaves=8))


@settings(max_examples=40, **EXPLORE)
@given(where=st.sampled_from(["config.json", "tokenizer_config.json", "engine.json",
                              "header"]),
       value=_json_texts(), wrap=st.booleans(), raw=st.binary(max_size=4))
def test_fuzz_json_nesting_in_model_files(where, value, wrap, raw):
    from jaxrt.compiler import load_engine
    from jaxrt.frontends.hf_reader import read_hf_dir, read_safetensors_header
    text = ('{"x": ' + value + "}" if wrap else value).encode("utf-8", "surrogateescape") + raw
    src = _engine_dir() if where == "engine.json" else _hf_dir()
    root = os.path.join(_workdir(), "json_fuzz")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(src, root)
    if where == "header":  # a safetensors header of this JSON, lengths consistent
        path = os.path.join(root, "w.safetensors")
        with open(path, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
        Bounded(len(text), seconds=5.0)(read_safetensors_header, path)
        return
    with open(os.path.join(root, where), "wb") as f:
        f.write(text)
    read = load_engine if where == "engine.json" else read_hf_dir
    model, error = Bounded(len(text), seconds=10.0)(read, root)
    if model is not None:  # accepted: only a JSON object, at most 64 deep, as JSON says
        from jaxrt.errors import json_text_depth
        assert where != "engine.json" and json_text_depth(text) <= 64
        assert isinstance(json.loads(text), dict)


# ---- structured-output constraints ---------------------------------------------------------

_REGEX_TEXT = st.text(st.sampled_from(list("ab(|)*+?{}[]^$.\\-0123")) | st.sampled_from(
    ["\ud800", "\udcff", "é", "\x00"]), max_size=40)


@settings(max_examples=60, **EXPLORE)
@given(data=st.data())
def test_fuzz_structured_constraints(data):
    from jaxrt.runtime.request import SamplingParams
    from jaxrt.runtime.structured import MAX_CHOICES
    kind = data.draw(st.sampled_from(["regex", "choice", "grammar", "json_schema"]))
    if kind == "regex":
        value = data.draw(_REGEX_TEXT)
    elif kind == "choice":
        value = data.draw(st.one_of(
            st.lists(st.text(max_size=5) | _REGEX_TEXT, min_size=0, max_size=5),
            st.integers(MAX_CHOICES - 1, MAX_CHOICES + 2).map(
                lambda n: [f"c{i}" for i in range(n)])))
    elif kind == "grammar":
        value = data.draw(st.one_of(
            st.builds(lambda body: f"start: {body}", _REGEX_TEXT),
            st.builds(lambda n: "start: " + "(" * n + '"a"' + ")" * n, st.integers(1, 3000))))
    else:
        value = data.draw(st.one_of(_json_texts(), st.builds(
            lambda n: functools.reduce(lambda acc, _: {"type": "array", "items": acc},
                                       range(n), {}), st.integers(1, 3000))))
    # (json.dumps would itself recurse on the deep dicts: their base budget suffices)
    size = len(value) if isinstance(value, str) else sum(map(len, value)) \
        if isinstance(value, list) else 0
    params, error = Bounded(size, seconds=5.0)(SamplingParams, **{kind: value})
    if params is None:
        assert isinstance(error, SettingError) and f"SamplingParams.{kind}=" in str(error)
        assert len(str(error)) < 1000  # the bad value is echoed cut short
        return
    assert params.constraint  # accepted as given, with its grammar
    if kind == "choice":
        assert params.choice == tuple(value) and len(value) <= MAX_CHOICES
        for c in value:
            c.encode("utf-8")  # valid text only
    elif isinstance(value, str):
        value.encode("utf-8")


# ---- pipelines and name patterns ------------------------------------------------------------

_PIPELINE_TOKENS = ["canonicalize", "cse", "dce", "quantize", "plan-kv-cache", "cast-float",
                    "outline-layers", "shard", "{", "}", ",", "=", " ", "mode", "int8-weight",
                    "exclude", '"(a+)+$"', '"\\\\1"', '"["', "page-size", "memory-gib",
                    "nan", "inf", "1e300", "-1", "0", "99999999999999999999", "dtype", "bf16",
                    "tp", "2", '"', "\\", "fold-limit", "group-size", "\udcff"]


@settings(max_examples=80, **EXPLORE)
@given(tokens=st.lists(st.sampled_from(_PIPELINE_TOKENS), min_size=1, max_size=14))
def test_fuzz_pipeline_text(tokens):
    from jaxrt.passes.manager import parse_pipeline
    text = "".join(tokens)
    Bounded(len(text), seconds=2.0)(parse_pipeline, text)


@settings(max_examples=100, **EXPLORE)
@given(pattern=_REGEX_TEXT, name=st.text("ab.0_\n", max_size=20), long=st.integers(0, 3000))
def test_fuzz_name_patterns(pattern, name, long):
    """Every pattern is refused (SettingError) or matches in linear time, agreeing with
    Python's re on short names (where re's backtracking is still cheap)."""
    from jaxrt.passes.name_pattern import compile_name_pattern
    compiled, error = Bounded(len(pattern), seconds=1.0)(compile_name_pattern, pattern)
    if compiled is None:
        assert isinstance(error, SettingError)
        return
    try:
        expected = re.search(pattern, name) is not None
    except re.error:
        pytest.fail(f"accepted {pattern!r}, which Python's re refuses")
    assert compiled.search(name) == expected
    start = time.perf_counter()
    compiled.search("ab" * long + "!")
    assert time.perf_counter() - start < 1.0


# ---- settings given with an engine directory -----------------------------------------------

_ENGINE_SETTINGS = {
    "pipeline": st.sampled_from([None, "", "canonicalize", "cse,dce"]),
    "dtype": st.sampled_from([None, "float32", "bfloat16", "f16", "auto", "int8"]),
    "page_size": st.sampled_from([None, 8, 16, 32]),
    "max_model_len": st.sampled_from([0, 1, 16, 32, 33, 10**6]),
    "num_pages": st.sampled_from([0, 1, 10**9]),
    "quantize": st.sampled_from(["", "int8-weight"]),
    "tensor_parallel": st.sampled_from([1, 2]),
    "outline_layers": st.sampled_from([None, True, False]),
    "memory_fraction": st.sampled_from([0.9, 0.5]),
}


@settings(max_examples=40, **EXPLORE)
@given(options=st.fixed_dictionaries({}, optional=_ENGINE_SETTINGS))
def test_fuzz_settings_with_an_engine_directory(options):
    """Loading an engine directory with settings: refused, or the engine exactly as it
    was compiled (nothing of it silently overridden)."""
    from jaxrt.compiler import load
    model, error = Bounded(0, seconds=10.0, memory_base=512 << 20)(
        load, _engine_dir(), **options)
    if model is None:
        assert isinstance(error, SettingError)
        return
    plan = model.kv_plan
    assert options.get("page_size") in (None, plan["page_size"])
    assert options.get("max_model_len", 0) <= plan["max_model_len"]
    assert options.get("num_pages", 0) in (0, plan["num_pages"])
    assert options.get("dtype") in (None, "auto", "float32")
    assert options.get("pipeline") in (None, "", model.pipeline)
    assert not options.get("quantize") and options.get("tensor_parallel", 1) == 1


# ---- jax: specs ----------------------------------------------------------------------------

@settings(max_examples=30, **EXPLORE)
@given(module=st.sampled_from(["json", "math", "no_such_module_for_jaxrt", "", "jaxrt",
                               "os.path", "json.decoder", "..", "a b"]),
       attr=st.sampled_from(["", "loads", "pi", "dumps", "JSONDecoder", "x.y", "sep", ":"]),
       sep=st.sampled_from([":", "", "::"]))
def test_fuzz_jax_specs(module, attr, sep):
    """Specs naming modules that are not models: one-line InputErrors, never a traceback
    (the module list is fixed: naming a module runs its code)."""
    from jaxrt.cli._jax_spec import import_and_raise
    spec = f"jax:{module}{sep}{attr}"
    result, error = Bounded(len(spec), seconds=10.0, memory_base=256 << 20)(
        import_and_raise, spec)
    assert result is None and isinstance(error, InputError), spec


# ---- server request bodies ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    from jaxrt.runtime.engine import Engine
    from jaxrt.serve.server import ServerThread
    from tests.runtime.fake_model import FakeRunner
    engine = Engine(FakeRunner(num_pages=64, page_size=4), max_num_seqs=4, max_model_len=64,
                    warmup=False, log=None, chat_template="{{ messages[0]['content'] }}")
    with ServerThread(engine, model_name="fake") as srv:
        yield srv


_BODY_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
    st.text(max_size=6), st.lists(st.integers(-2, 80), max_size=4),
    st.sampled_from([10**12, -1, 0, 2**31, 2**63, "\\ud800", [[1, 2], [3]], {"a": 1},
                     ["a"] * 20, {"type": "object"}, {"name": "x", "schema": {"type": "x"}}]))
_BODY_FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                "stop", "stop_token_ids", "n", "logprobs", "echo", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar", "response_format", "stream",
                "prompt_logprobs", "ignore_eos", "best_of", "messages", "top_logprobs"]


@settings(max_examples=60, **EXPLORE)
@given(fields=st.dictionaries(st.sampled_from(_BODY_FIELDS), _BODY_VALUES, max_size=4),
       chat=st.booleans(), deep=st.sampled_from([0, 0, 0, 100, 100_000]),
       garbage=st.sampled_from([b"", b"", b"}", b"\xff", b"\x00"]))
def test_fuzz_server_requests(server, fields, chat, deep, garbage):
    """Any body gets a 2xx or a 4xx with one-line JSON error, and the server keeps
    serving: a body never reaches a 500 (which would mean the engine failed)."""
    import httpx
    body = {"model": "fake", "max_tokens": 2, **fields}
    if chat:
        body.setdefault("messages", [{"role": "user", "content": "abc"}])
        body.pop("prompt", None)
    else:
        body.setdefault("prompt", "abc")
    if deep:
        body["guided_json" if deep == 100 else "extra"] = "[" * deep + "]" * deep
    raw = json.dumps(body).encode() + garbage
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = httpx.post(server.url + path, content=raw, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400 and not body.get("stream"):
        message = r.json()["error"]["message"]
        assert "\n" not in message and len(message) < 2000
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200
