"""Fuzzing every input surface (issue 11): GGUF, safetensors and config.json; engine
directories; IR text; chat templates; CLI options; Engine and SamplingParams arguments.

For every case: only the project's own error types escape (InputError and the OS path
errors of jaxrt.errors.USER_ERRORS); time and Python-heap peak stay bounded, memory in
proportion to the input; whatever is accepted is taken exactly as given (no coercion that
changes the output). The fuzzers explore: hypothesis draws new cases each run
(derandomize=False) and prints the seed/blob to reproduce a failure.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import struct
import tempfile
import time
import tracemalloc

import pytest
from frontends_synth import tiny_hf_config, write_tiny_gguf, write_tiny_hf_dir
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxrt.errors import USER_ERRORS, InputError

EXPLORE = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])


@functools.lru_cache(maxsize=None)
def _workdir() -> str:
    return tempfile.mkdtemp(prefix="jaxrt_fuzz_untrusted_")


class Bounded:
    """Runs `fn`; only the project's errors may escape; checks wall time and the Python
    heap's peak (`memory_per_byte` x input size + `memory_base`)."""

    def __init__(self, size: int, *, seconds: float = 10.0, memory_per_byte: int = 64,
                 memory_base: int = 64 << 20):
        self.limit = memory_per_byte * size + memory_base
        self.seconds = seconds

    def __call__(self, fn, *args, **kwargs):
        tracemalloc.start()
        start = time.monotonic()
        error = None
        try:
            result = fn(*args, **kwargs)
        except USER_ERRORS as e:
            result, error = None, e
            assert "\n" not in str(e), f"multi-line error: {e!r}"
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        elapsed = time.monotonic() - start
        assert elapsed < self.seconds, f"took {elapsed:.1f} s"
        assert peak < self.limit, f"peak {peak} bytes over {self.limit}"
        return result, error


# ---- model files: GGUF, safetensors, config.json -----------------------------------------

@functools.lru_cache(maxsize=None)
def _gguf_bytes() -> bytes:
    path = write_tiny_gguf(os.path.join(_workdir(), "base.gguf"), hidden=32, ff=32)
    with open(path, "rb") as f:
        return f.read()


@settings(max_examples=25, **EXPLORE)
@given(data=st.data())
def test_fuzz_gguf_bytes(data):
    from jaxrt.frontends.gguf_reader import read_gguf
    blob = bytearray(_gguf_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(blob) - 1))
        value = data.draw(st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from(
            [struct.pack("<Q", v) for v in (0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1)])))
        blob[at:at + len(value)] = value
    path = os.path.join(_workdir(), "fuzz.gguf")
    with open(path, "wb") as f:
        f.write(blob)

    def load():
        model = read_gguf(path)
        for name in model.weights:
            model.weights[name]
        model.tokenizer.encode("hello world")
    Bounded(len(blob))(load)


@functools.lru_cache(maxsize=None)
def _hf_template() -> str:
    return write_tiny_hf_dir(os.path.join(_workdir(), "hf"))


_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 8, 16]),
    st.floats(allow_nan=True, allow_infinity=False), st.text(max_size=8),
    st.lists(st.integers(-3, 20), max_size=3), st.dictionaries(
        st.sampled_from(["rope_type", "factor", "type", "low_freq_factor"]),
        st.one_of(st.sampled_from(["linear", "llama3", "default", "yarn"]),
                  st.floats(-2, 10), st.integers(-1, 4)), max_size=3))
_CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "rms_norm_eps", "rope_theta", "rope_scaling", "head_dim", "sliding_window",
                "bos_token_id", "eos_token_id", "hidden_act", "tie_word_embeddings",
                "model_type"]


@settings(max_examples=40, **EXPLORE)
@given(changes=st.dictionaries(st.sampled_from(_CONFIG_KEYS), _JSON_VALUES, min_size=1,
                               max_size=3),
       model_type=st.sampled_from(["llama", "mistral", "qwen2"]))
def test_fuzz_hf_config(changes, model_type):
    from jaxrt.frontends.hf_reader import read_hf_dir
    root = os.path.join(_workdir(), "hf_config_fuzz")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(_hf_template(), root)
    config = {**tiny_hf_config(model_type), **changes}
    text = json.dumps(config)
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write(text)
    model, error = Bounded(len(text))(read_hf_dir, root)
    if model is None:
        return
    c = model.config  # accepted: exactly what the file says, and sane
    for key, field in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                       ("num_hidden_layers", "num_layers")):
        assert getattr(c, field) == config[key] and type(getattr(c, field)) is int
    assert math.isfinite(c.rms_eps) and c.rms_eps > 0
    assert math.isfinite(c.rope_theta) and c.rope_theta > 0
    assert c.rope_scaling.factor > 0
    assert c.sliding_window is None or (type(c.sliding_window) is int and c.sliding_window > 0)
    if config.get("rms_norm_eps") is not None:
        assert c.rms_eps == config["rms_norm_eps"]


# ---- engine directories ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _engine_template() -> str:
    from jaxrt.compiler import load, save_engine
    out = os.path.join(_workdir(), "engine")
    save_engine(load(_hf_template()), out)
    return out


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


@settings(max_examples=30, **EXPLORE)
@given(data=st.data())
def test_fuzz_engine_directory(data):
    from jaxrt.compiler import load_engine
    src = _engine_template()
    root = os.path.join(_workdir(), "engine_fuzz")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(src, root)
    with open(os.path.join(src, "engine.json")) as f:
        meta = json.load(f)
    original = json.loads(json.dumps(meta))
    where = data.draw(st.sampled_from(["engine.json", "model.jxr"]))
    if where == "engine.json":
        path = data.draw(st.sampled_from(sorted(_paths(meta), key=str)))
        parent = meta
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(_JSON_VALUES)
        else:
            del parent[path[-1]]
        with open(os.path.join(root, "engine.json"), "w") as f:
            json.dump(meta, f)
    else:
        with open(os.path.join(src, "model.jxr"), "rb") as f:
            text = bytearray(f.read())
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(text) - 1))
            text[at:at + 1] = data.draw(st.sampled_from(
                [b"9", b"0", b"-", b'"', b"{", b"]", b"\xff", b"i32", b" ", b"99999999"]))
        with open(os.path.join(root, "model.jxr"), "wb") as f:
            f.write(text)
    size = sum(os.path.getsize(os.path.join(root, n)) for n in os.listdir(root))
    model, _ = Bounded(size)(load_engine, root)
    if model is not None and where == "engine.json":
        # accepted: the change could not alter what runs
        assert model.config.to_dict() == original["config"] or \
            model.config == load_engine(src).config


# ---- IR text ------------------------------------------------------------------------------

_IR_TOKENS = ["module", "@m", "@\"q\\\"x\"", "attributes", "{", "}", "(", ")", "[", "]", ",",
              ":", "=", "->", "func", "@step", "weight", "@w", "%x", "%0", "f32", "i32[",
              "return", "1", "-7", "1e999999", "2.5", "inf", "nan", "\"s\"", "\"unterminated",
              "\\", "llm.rms_norm", "add", "// c\n", "\n", " ", "\xff", "9" * 50, "T", "\"\\u"]


@settings(max_examples=150, **EXPLORE)
@given(tokens=st.lists(st.sampled_from(_IR_TOKENS), max_size=60),
       blob=st.text(max_size=40), big=st.integers(0, 200_000))
def test_fuzz_ir_text(tokens, blob, big):
    from jaxrt.ir.parser import parse
    text = " ".join(tokens) + blob
    Bounded(len(text))(parse, text)
    # a long literal costs memory in proportion to its length, with a small constant
    long_text = 'module @m attributes {s = "' + "a\\\"" * big + '"} {\n}\n'
    m, _ = Bounded(len(long_text), memory_per_byte=8, memory_base=4 << 20)(parse, long_text)
    assert m.attributes["s"] == 'a"' * big


# ---- chat templates ------------------------------------------------------------------------

_PIECES = ["{{ ", " }}", "{% for i in range(", ") %}", "{% endfor %}", "{% if ", " %}",
           "{% endif %}", "messages", "[0]", "['content']", "|length", "|join(', ')",
           "|center(", "|tojson", "*", "**", "+", "~", "/", "%", "'x'", "[1, 2]", "9",
           "99999", "10**9", "(", ")", "{% macro f(n) %}{{ f(n) }}{% endmacro %}", "f(1)",
           "{% set ns = namespace(s='ab') %}", "{% set ns.s = ns.s ~ ns.s %}", "ns.s",
           ".upper()", ".replace('a', 'bbbb')", "raise_exception('no')", "loop.index",
           "range(100000)", "'%9999999d' % 1", "'{:>9999999}'.format(1)", "x.y", "}}"]


@settings(max_examples=120, **EXPLORE)
@given(pieces=st.lists(st.sampled_from(_PIECES), max_size=16),
       content=st.text(max_size=30))
def test_fuzz_chat_templates(pieces, content):
    from jaxrt.frontends.chat_template import render_chat
    template = "".join(pieces)
    messages = [{"role": "user", "content": content}]
    out, _ = Bounded(len(template), seconds=3.0)(
        render_chat, template, messages, time_limit=0.5, max_chars=1 << 20)
    assert out is None or len(out) <= 1 << 20


# ---- CLI options --------------------------------------------------------------------------

_OPTION_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "2", "nan", "inf", "-inf", "1e9",
                                            str(2**70), "", "²", "0x10", "1.5"]),
                           st.text(min_size=1, max_size=6))


@settings(max_examples=30, **EXPLORE)
@given(data=st.data())
def test_fuzz_cli_options(data, capsys):
    from jaxrt.cli.main import main
    command = data.draw(st.sampled_from(["generate", "bench", "inspect", "opt"]))
    value = data.draw(_OPTION_VALUES)
    if command == "generate":
        flag = data.draw(st.sampled_from(["--temperature", "--top-k", "--top-p", "--min-p",
                                          "--seed", "--beam-width", "--logprobs",
                                          "--repetition-penalty", "--num-pages",
                                          "--kv-cache-max-gib", "--max-model-len",
                                          "--kv-cache-memory-fraction", "--stop"]))
        # --max-tokens 0 makes every accepted setting end in an error before compiling
        argv = ["generate", _hf_template(), "--prompt", "w3", "--max-tokens", "0", flag, value]
    elif command == "bench":
        flag = data.draw(st.sampled_from(["--bucket-growth", "--max-num-seqs"]))
        argv = ["bench", _engine_template(), flag, value, "--num-requests", "0"]
    elif command == "inspect":
        argv = ["inspect", _engine_template(), "--bind", f"T={value}"]
    else:
        path = os.path.join(_workdir(), "m.jxr")
        with open(path, "w") as f:
            f.write("module @m {\n}\n")
        argv = ["opt", path, "-p", data.draw(st.sampled_from(
            ["plan-kv-cache{page-size=", "cast-float{dtype=", "canonicalize{x=", "cse,"]))
            + value + "}"]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a usage error, exit 2
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert "Traceback" not in err


# ---- Engine and SamplingParams arguments ------------------------------------------------------

_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                 st.floats(allow_nan=True), st.text(max_size=3),
                 st.lists(st.integers(-2, 300), max_size=3))
_FIELDS = ["max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
           "stop_token_ids", "logprobs", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "beam_width", "length_penalty", "ignore_eos",
           "json_schema", "regex", "choice", "grammar"]


@settings(max_examples=200, **EXPLORE)
@given(fields=st.dictionaries(st.sampled_from(_FIELDS), _ANY, max_size=3),
       prompt_len=st.integers(-1, 70))
def test_fuzz_sampling_params(fields, prompt_len):
    from jaxrt.runtime.request import SamplingParams
    try:
        p = SamplingParams(**fields)
        p.validate(100, 64, prompt_len, max_logprobs=20)
    except InputError as e:
        assert "\n" not in str(e)
        return
    for name, value in fields.items():  # accepted exactly as given
        if name == "choice" and value is not None:
            assert p.choice == tuple(value)
        elif name not in ("stop", "stop_token_ids"):
            assert getattr(p, name) == value or (value != value)
    assert p.seed is None or 0 <= p.seed < 2**64
    assert 0 < p.max_tokens and prompt_len + p.max_tokens <= 64


@pytest.fixture(scope="module")
def fake_runner():
    from tests.runtime.fake_model import FakeRunner
    return FakeRunner(num_pages=64, page_size=4)


_ENGINE_ARGS = ["max_num_seqs", "max_num_batched_tokens", "max_model_len", "seed", "q_block",
                "bucket_growth", "min_bucket_tokens", "decode_steps", "max_logprobs",
                "num_pages", "page_size"]


_SPECULATIVE = st.one_of(_ANY, st.dictionaries(
    st.sampled_from(["method", "num_tokens", "max_ngram", "min_ngram", "model"]),
    st.one_of(_ANY, st.just("ngram"), st.integers(0, 20)), max_size=4))


@settings(max_examples=60, **EXPLORE)
@given(kwargs=st.dictionaries(st.sampled_from(_ENGINE_ARGS),
                              st.one_of(st.integers(-3, 70), st.sampled_from([2**64, 2**70]),
                                        st.none()), max_size=3)
       | st.fixed_dictionaries({"speculative": _SPECULATIVE}),
       params=st.one_of(st.none(), st.dictionaries(st.sampled_from(_FIELDS), _ANY,
                                                   max_size=2)))
def test_fuzz_engine_arguments(fake_runner, kwargs, params):
    from jaxrt.runtime.engine import Engine
    try:
        engine = Engine(fake_runner, warmup=False, log=None, **kwargs)
    except InputError as e:
        assert "\n" not in str(e)
        return
    if "bucket_growth" in kwargs and kwargs["bucket_growth"] is not None:
        assert engine.policy.growth == kwargs["bucket_growth"] >= 2
    if kwargs.get("max_num_seqs") is not None:
        assert engine.config.max_num_seqs == kwargs["max_num_seqs"] >= 1
    assert len(engine.policy.all_buckets()) < 200
    try:
        engine.add_request([5, 6, 7], params)  # a dict is refused, never coerced
        assert params is None
    except InputError as e:
        assert "\n" not in str(e)
    finally:
        engine.close()
