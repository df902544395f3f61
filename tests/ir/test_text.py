"""Text format: printer/parser round trips, a golden Llama layer, and parse errors."""
from __future__ import annotations

import difflib
import math
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrt.ir import Builder, DType, Module, TensorType, ops, verify
from jaxrt.ir.parser import ParseError, parse
from jaxrt.ir.printer import print_module
from tests.strategies import modules

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "printer"
F32, I32 = DType.f32, DType.int32


def check_golden(name: str, text: str) -> None:
    """Compare byte for byte with tests/golden/printer/<name>; JAXRT_UPDATE_GOLDEN=1 rewrites."""
    path = GOLDEN / name
    if os.environ.get("JAXRT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())
        return
    assert path.exists(), f"{path} is missing; run with JAXRT_UPDATE_GOLDEN=1 to create it"
    want = path.read_bytes().decode()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            str(path), "printed"))
        pytest.fail(f"printed IR differs from the golden file (JAXRT_UPDATE_GOLDEN=1 "
                    f"rewrites it):\n{diff}")


def assert_round_trips(m: Module) -> str:
    text = print_module(m)
    back = parse(text)
    assert back == m, text
    assert print_module(back) == text
    return text


# ---- a Llama-style step function (used by the golden file and the timing test) ------------

def llama_module(layers=1, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256,
                 fused=True) -> Module:
    """The serving step function of docs/architecture.md; `fused=False` spells rms_norm and
    swiglu with primitives, the way a frontend might before fusion."""
    m = Module("llama", attributes={
        "arch": "llama",
        "config": {"hidden_size": hidden, "num_attention_heads": heads, "head_dim": head_dim,
                   "num_key_value_heads": kv_heads, "rope_theta": 500000.0,
                   "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
        "eos_token_ids": (128001, 128009)})
    kv_type = TensorType((layers, 2, "pages", "page_size", kv_heads, head_dim), F32)
    b = Builder.new_function(m, "step", [
        ("tokens", TensorType(("T",), I32)), ("positions", TensorType(("T",), I32)),
        ("slot_mapping", TensorType(("T",), I32)), ("page_table", TensorType(("S", "MP"), I32)),
        ("context_lens", TensorType(("S",), I32)), ("q_index", TensorType(("S", "Q"), I32)),
        ("logit_index", TensorType(("N",), I32)), ("kv", kv_type)])
    tokens, positions, slots, page_table, ctx, q_index, logit_index, kv = b.fn.args

    def w(name, *shape):
        return b.weight(name, TensorType(shape, F32))

    def norm(x, name):
        if fused:
            return b(ops.rms_norm, x, w(name, hidden), eps=1e-05)
        sq = b(ops.reduce_mean, b(ops.mul, x, x), axes=(-1,), keepdims=True)  # [T, 1]
        eps = b(ops.constant, value=1e-05, result_types=[TensorType((), F32)])
        scaled = b(ops.mul, x, b(ops.rsqrt, b(ops.add, sq, eps)))
        return b(ops.mul, scaled, w(name, hidden))

    h = b(ops.embedding, tokens, w("model.embed_tokens.weight", vocab, hidden))  # [T, hidden]
    for i in range(layers):
        p = f"model.layers.{i}."
        x = norm(h, p + "input_layernorm.weight")
        q = b(ops.linear, x, w(p + "self_attn.q_proj.weight", heads * head_dim, hidden))
        k = b(ops.linear, x, w(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden))
        v = b(ops.linear, x, w(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden))
        rope = dict(theta=500000.0, scaling="llama3", factor=8.0)
        q = b(ops.rope, b(ops.reshape, q, shape=("T", heads, head_dim)), positions, **rope)
        k = b(ops.rope, b(ops.reshape, k, shape=("T", kv_heads, head_dim)), positions, **rope)
        v = b(ops.reshape, v, shape=("T", kv_heads, head_dim))
        kv = b(ops.kv_update, kv, k, v, slots, layer=i)
        a = b(ops.paged_attention, q, kv, page_table, ctx, q_index, positions, layer=i,
              scale=head_dim ** -0.5)  # [T, heads, head_dim]
        a = b(ops.reshape, a, shape=("T", heads * head_dim))
        h = b(ops.add, h, b(ops.linear, a, w(p + "self_attn.o_proj.weight", hidden,
                                              heads * head_dim)))
        x = norm(h, p + "post_attention_layernorm.weight")
        gate = b(ops.linear, x, w(p + "mlp.gate_proj.weight", ffn, hidden))
        up = b(ops.linear, x, w(p + "mlp.up_proj.weight", ffn, hidden))
        act = b(ops.swiglu, gate, up) if fused else b(ops.mul, b(ops.silu, gate), up)
        h = b(ops.add, h, b(ops.linear, act, w(p + "mlp.down_proj.weight", hidden, ffn)))
    h = norm(b(ops.take, h, logit_index, axis=0), "model.norm.weight")  # [N, hidden]
    b.ret(b(ops.logits, h, w("lm_head.weight", vocab, hidden)), kv)
    verify(m)
    return m


def test_golden_llama_layer():
    m = llama_module()
    text = print_module(m)
    check_golden("llama_layer.jxr", text)
    assert parse(text, "llama_layer.jxr") == m


def test_large_module_parses_fast():
    # 32 layers at Llama-3-8B sizes; shapes do not affect the work, the op count does.
    m = llama_module(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                     vocab=128256, fused=False)
    assert len(m.functions["step"].ops) > 1300
    start = time.perf_counter()
    text = print_module(m)
    printed = time.perf_counter()
    back = parse(text)
    parsed = time.perf_counter()
    assert back == m
    # Typically ~0.05 s to print and ~0.1 s to parse; the bound leaves room for slow CI.
    assert parsed - printed < 1.0, f"parse took {parsed - printed:.3f} s"
    assert printed - start < 1.0, f"print took {printed - start:.3f} s"


# ---- round trips -------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules())
def test_random_modules_round_trip(m):
    verify(m)
    assert_round_trips(m)


def test_attribute_values_round_trip():
    m = Module("m", attributes={
        "floats": (0.0, -0.0, 1e-300, 1e300, 2.5e-07, math.inf, -math.inf, math.nan, 1.0),
        "ints": [0, -1, 2 ** 80], "flags": (True, False, None), "dtypes": tuple(DType),
        "text": "quote \" backslash \\ newline \n tab \t nul \x00 é \U0001f600 \ud800",
        "nested": {"a b": {"": ()}, "k\n": [[1], {"x": "y"}]}, "x.y": 1})
    b = Builder.new_function(m, "f", [("x", TensorType((2, 2), F32))])
    c = b(ops.constant, value=(math.nan, math.inf, -math.inf, -0.0),
          result_types=[TensorType((2, 2), F32)])
    b.ret(b(ops.add, b.fn.args[0], c))
    text = assert_round_trips(m)
    assert "[nan, inf, -inf, -0.0]" in text


def test_quoted_symbols_round_trip():
    m = Module('mod "x"')
    m.weights["model.layers.0.mlp.up_proj.weight"] = TensorType((2,), F32)
    m.weights["w\nwith newline"] = TensorType((2,), F32)
    m.weights[""] = TensorType((), DType.bf16)
    b = Builder.new_function(m, "f-1.x", [])
    b.ret(b.weight("w\nwith newline"), b.weight("model.layers.0.mlp.up_proj.weight"))
    Builder.new_function(m, "@odd name", [("a", TensorType((), DType.bool_))])
    text = assert_round_trips(m)
    assert 'weight @"w\\nwith newline" : f32[2]' in text
    assert "func @f-1.x() -> (f32[2], f32[2])" in text


def test_unnamed_arguments_round_trip():
    from jaxrt.ir import Function, Value
    m = Module()
    fn = m.add_function(Function("f", [Value(TensorType((2,), F32)), Value(TensorType((), F32))]))
    fn.results = list(fn.args)
    assert "func @f(%arg0: f32[2], %arg1: f32[]) -> (f32[2], f32[])" in assert_round_trips(m)


def test_hand_written_text():
    text = """
    // comments run to the end of a line
    module @m {
      weight @w : f32[4]   // a weight
      func @f(%x: f32[T, 4], %ids: i32[T]) -> (f32[T, 4], i1[T, 4]) {
        %w = weight @w : f32[4]
        %y = mul(%x, %w) : f32[T, 4]
        %s = llm.rms_norm(%y, %w) {offset = 1, "eps" = 1e-5} : (f32[T, 4])
        %c = compare(%s, %x) {direction = "lt"} : i1[T, 4]
        return %s, %c
      }
    }
    """
    m = parse(text)
    verify(m)
    norm = m.functions["f"].ops[2]
    assert norm.attrs.offset == 1.0 and norm.attrs.eps == 1e-5
    assert print_module(m).splitlines()[5] == \
        "    %2 = llm.rms_norm(%1, %0) {eps = 1e-05, offset = 1.0} : f32[T, 4]"
    assert_round_trips(m)


def test_multi_result_syntax_is_checked_against_the_op():
    with pytest.raises(ParseError, match="1 result"):
        parse("module @m {\n func @f(%x: f32[2]) -> () {\n"
              "  %0, %1 = neg(%x) : (f32[2], f32[2])\n  return\n }\n}\n")


# ---- parse errors ------------------------------------------------------------------------------

HEADER = "module @m {\n  weight @w : f32[4]\n  func @f(%x: f32[4], %i: i32[T]) -> (f32[4]) {\n"


def body(*lines: str) -> str:
    return HEADER + "".join(f"    {line}\n" for line in lines) + "  }\n}\n"


# (text, line, col, message fragment). Body lines start at line 4, column 5.
ERRORS = [
    (body("%0 = frob(%x) : f32[4]", "return %0"), 4, 10, "unknown op 'frob'"),
    (body("%0 = add(%x, %y) : f32[4]", "return %0"), 4, 18, "undefined value %y"),
    (body("%0 = neg(%x) : f32[4]", "%0 = neg(%0) : f32[4]", "return %0"), 5, 5,
     "value %0 redefined"),
    (body("%x = neg(%x) : f32[4]", "return %x"), 4, 5, "value %x redefined"),
    (body("%0 = add(%x, %x) : f32[5]", "return %0"), 4, 24, "does not match the inferred"),
    (body('%0 = reduce_sum(%x) {axes = "a"} : f32[]', "return %0"), 4, 33,
     "'axes' must be tuple"),
    (body("%0 = neg(%x) {bogus = 1} : f32[4]", "return %0"), 4, 19, "no attribute 'bogus'"),
    (body("%0 = transpose(%x) : f32[4]", "return %0"), 4, 10, "missing attribute 'perm'"),
    (body("%0 = add(%x, %i) : f32[4]", "return %0"), 4, 10, "dtypes differ"),
    (body("%0 = weight @nope : f32[4]", "return %0"), 4, 17, "unknown weight @nope"),
    (body("%0 = weight @w : f32[2]", "return %0"), 4, 22, "declared f32[4]"),
    (body("%0 = neg(%x) : f32[4]", "return %0, %x"), 5, 5, "returns 2 values"),
    (body("%0 = neg(%i) : i32[T]", "return %0"), 5, 12, "the signature says f32[4]"),
    (body("%0 = neg(%x) : f33[4]", "return %0"), 4, 20, "unknown dtype 'f33'"),
    (body("%0 = reshape(%x) {shape = [2, 2]} : f32[2, -2]", "return %0"), 4, 48,
     "expected a dim"),
    (body("%0 = neg(%x) : f32[4]"), 5, 3, "expected an op name, got '}'"),
    (body("%0 = neg(%x) : f32[4]", "return %0 $"), 5, 15, "unexpected character '$'"),
    (body("%0 = neg(%x) : f32[4]", "return %0", "%1 = neg(%x) : f32[4]"), 6, 5,
     "expected '}' after return"),
    ('module @m attributes {a = 1, a = 2} {\n}\n', 1, 30, "key 'a' given twice"),
    ('module @m attributes {a = "abc} {\n}\n', 1, 27, "unterminated string"),
    ('module @m attributes {a = "\\q"} {\n}\n', 1, 27, "bad string literal"),
    ("module @m attributes {a = f32} {\n  weight @w : f32[T]\n}\n", 2, 15,
     "static shapes"),
    ("module @m attributes {a = float} {\n}\n", 1, 27, "unknown attribute value 'float'"),
    ("module @m {\n  weight @w : f32[2]\n  weight @w : f32[2]\n}\n", 3, 10, "declared twice"),
    ("module @m {\n  func @f(%a: f32[], %a: f32[]) -> () {\n    return\n  }\n}\n", 2, 22,
     "argument %a defined twice"),
    ("module @m {\n}\n}\n", 3, 1, "expected end of input"),
    ("module @m {\n", 2, 1, "expected 'weight', 'func' or '}', got end of input"),
    ("", 1, 1, "expected 'module', got end of input"),
    ("module @m attributes {a = " + "[" * 100 + "]" * 100 + "} {\n}\n", 1, 91, "nested deeper"),
    ("module @m attributes {a = " + "9" * 5000 + "} {\n}\n", 1, 27, "digits"),
]


@pytest.mark.parametrize("text,line,col,fragment", ERRORS)
def test_parse_error_location(text, line, col, fragment):
    with pytest.raises(ParseError) as info:
        parse(text, "bad.jxr")
    e = info.value
    assert fragment in e.message
    assert (e.filename, e.line, e.col) == ("bad.jxr", line, col), str(e)
    assert str(e) == f"bad.jxr:{line}:{col}: {e.message}"


def test_parse_error_after_comments_and_blank_lines():
    text = "// header\n\nmodule @m { // open\n  // nothing yet\n  weight @w : f32[q.1]\n}\n"
    with pytest.raises(ParseError) as info:
        parse(text)
    assert (info.value.line, info.value.col) == (5, 19)
    assert str(info.value).startswith("<string>:5:19: expected a dim")


# ---- fuzzing: mutated text parses or raises ParseError, nothing else ----------------------------

_FRAGMENTS = ["%0", "%1", "%x", "%tokens", "@w", '@"q\\"', "(", ")", "{", "}", "[", "]", ",",
              ":", "=", "->", "-", "f32[2]", "i32[T]", "bf16", "-inf", "nan", "1e999", "1.5",
              "-1", "0", "9" * 5000, '"', "\\", "//", "\n", " ", "module", "func", "weight",
              "return", "attributes", "add", "llm.rope", "kv.update", "constant", "true",
              "none", "[" * 80, "{a = ", "\x00", "é", "\ud800"]


@st.composite
def mutated_texts(draw):
    base = draw(st.one_of(st.just(print_module(llama_module())),
                          modules(max_ops=5).map(print_module)))
    text = base
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "duplicate", "swap", "truncate",
                                     "replace_token"]))
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, 12)))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            piece = draw(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=3)))
            text = text[:i] + piece + text[i:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif kind == "swap":
            k = draw(st.integers(0, len(text)))
            a, b = sorted((i, k))
            text = text[:a] + text[b:b + 1] + text[a + 1:b] + text[a:a + 1] + text[b + 1:]
        elif kind == "truncate":
            text = text[:i]
        else:  # replace one whitespace-separated word
            words = text.split(" ")
            n = draw(st.integers(0, len(words) - 1))
            words[n] = draw(st.sampled_from(_FRAGMENTS))
            text = " ".join(words)
    return text


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mutated_texts())
def test_mutated_text_raises_only_parse_error(text):
    try:
        m = parse(text)
    except ParseError as e:
        assert e.line >= 1 and e.col >= 1
        assert e.line <= text.count("\n") + 1
        return
    verify(m)  # whatever parses is a valid module, and round-trips from then on
    assert_round_trips(m)
