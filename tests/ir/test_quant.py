"""Quantized IR: the formats' reference semantics (jaxrt/ir/quant.py), the quant.* ops'
verifier, and quantized weight definitions through materialize and the text format.

Round-trip bounds, derived from the formats (x' = dequantize(quantize(x))):
- int8: q = rint(x / s) clipped to +-127, so |x - x'| <= s / 2 for every element whose
  |x / s| <= 127.5 (all of them when s is computed: max|x| / s = 127), plus f32 rounding
  of the division and of q * s: a few ulps of |x|, bounded by 2^-22 |x| + 2^-22 s.
- fp8 e4m3fn (3 mantissa bits): a normal (|x / s| >= 2^-6) rounds to nearest with
  relative error <= 2^-4; a subnormal's spacing is 2^-9, so its error is <= 2^-10 s;
  values past 448 saturate to +-448 s.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.ir import DType, Module, TensorType, make_op, ops, verify
from jaxrt.ir import quant as Q
from jaxrt.ir.module import Builder
from jaxrt.ir.opdef import VerifyError
from jaxrt.ir.parser import parse
from jaxrt.ir.weights import WeightDef, infer_def, materialize

I8, F8, F32 = DType.int8, DType.f8e4m3, DType.f32
F32_SLACK = 2.0 ** -22  # a few f32 ulps (2^-24 relative each) of the division and product


@st.composite
def tensors(draw):
    """(x [rows, groups * group_size], scale shape) with any valid layout and magnitude."""
    rows, groups, gs = (draw(st.integers(1, n)) for n in (6, 4, 8))
    layout = draw(st.sampled_from(["tensor", "channel", "group", "row-group"]))
    shape = {"tensor": (1, 1), "channel": (rows, 1), "group": (rows, groups),
             "row-group": (1, groups)}[layout]
    seed = draw(st.integers(0, 2 ** 31))
    magnitude = 10.0 ** draw(st.integers(-4, 4))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, groups * gs)) * magnitude
    if draw(st.booleans()):  # outliers and exact zeros, as real weights have
        x[rng.random(x.shape) < 0.1] *= 50.0
        x[rng.random(x.shape) < 0.1] = 0.0
    return x.astype(np.float32), shape


def _check_int8(x, s, xq):
    s = Q.expand_scale(s, x.shape)
    err = np.abs(x - Q.dequantize(xq, s))
    inside = np.abs(x / s) <= 127.5
    bound = s / 2 + F32_SLACK * (np.abs(x) + s)
    assert (err[inside] <= bound[inside]).all()
    assert (Q.dequantize(xq, s)[~inside] == np.sign(x[~inside]) * 127 * s[~inside]).all()


def _check_fp8(x, s, xq):
    s = Q.expand_scale(s, x.shape)
    y = np.abs(x / s)
    err = np.abs(x - Q.dequantize(xq, s))
    normal = (y >= 2.0 ** -6) & (y <= 448)
    sub = y < 2.0 ** -6
    assert (err[normal] <= (2.0 ** -4 + F32_SLACK) * np.abs(x[normal])).all()
    assert (err[sub] <= (2.0 ** -10 + F32_SLACK) * s[sub]).all()
    over = y > 448
    assert (np.abs(Q.dequantize(xq, s)[over]) == 448 * s[over]).all()


@settings(max_examples=150, deadline=None)
@given(tensors(), st.sampled_from([I8, F8]))
def test_computed_scales_round_trip_within_the_format_bound(case, dtype):
    x, shape = case
    s = Q.compute_scale(x, dtype, shape)
    assert s.shape == shape and s.dtype == np.float32 and (s > 0).all()
    xq = Q.quantize(x, s, dtype)
    assert xq.dtype == dtype.to_numpy()
    (_check_int8 if dtype == I8 else _check_fp8)(x, s, xq)
    # the block maximum maps to the largest code: no range is wasted
    assert np.abs(Q.dequantize(xq, s)).max() == pytest.approx(np.abs(x).max(), rel=2 ** -20)


@settings(max_examples=100, deadline=None)
@given(tensors(), st.sampled_from([I8, F8]), st.integers(0, 2 ** 31))
def test_given_scales_round_trip_or_saturate(case, dtype, seed):
    """Any positive scales (not fitted to x): in range within the bound, else saturated."""
    x, shape = case
    rng = np.random.default_rng(seed)
    s = (np.abs(x).max() * 10.0 ** rng.uniform(-4, 0, shape) + 1e-30).astype(np.float32)
    (_check_int8 if dtype == I8 else _check_fp8)(x, s, Q.quantize(x, s, dtype))


def test_all_zero_blocks_get_scale_one_and_zero_codes():
    x = np.zeros((3, 4), np.float32)
    x[0] = [1, -2, 3, 0]
    s = Q.compute_scale(x, I8, (3, 1))
    assert s[1, 0] == s[2, 0] == 1.0
    assert (Q.quantize(x, s, I8)[1:] == 0).all()


def _types(x_shape, s_shape, sdt=F32):
    return TensorType(x_shape, F32), TensorType(s_shape, sdt)


@pytest.mark.parametrize("x_shape, s_shape, why", [
    ((4, 8), (4, 3), "divide 8 into groups"),
    ((4, 8), (2, 1), "axis 0 must be 1 or 4"),
    ((4, 8), (4,), "ranks differ"),
    ((4, 8), (4, 16), "divide 8 into groups"),
    (("T", 8), ("S", 1), "axis 0 must be 1 or T"),
])
def test_mismatched_scale_shapes_are_verify_errors_naming_both(x_shape, s_shape, why):
    x, s = _types(x_shape, s_shape)
    with pytest.raises(VerifyError, match=rf"scale shape \[.*\] does not fit tensor shape "
                                          rf"\[.*\] \(.*{why}"):
        make_op(ops.quantize, [_arg(x), _arg(s)], {"dtype": I8})
    q = _arg(x.with_dtype(I8))
    dims = ", ".join(map(str, s_shape))
    with pytest.raises(VerifyError, match=rf"quant.dequantize: scale shape \[{dims}\]"):
        make_op(ops.dequantize, [q, _arg(s)], {"dtype": F32})


@pytest.mark.parametrize("x_shape, s_shape", [((4, 8), (1, 1)), ((4, 8), (4, 1)),
                                              ((4, 8), (4, 2)), ((4, 8), (1, 8)),
                                              (("T", 8), ("T", 1))])
def test_valid_scale_layouts_verify(x_shape, s_shape):  # near misses of the above
    x, s = _types(x_shape, s_shape)
    assert make_op(ops.quantize, [_arg(x), _arg(s)], {"dtype": F8}).result.type == \
        x.with_dtype(F8)


def test_quantized_linear_checks_codes_scales_and_bias():
    x = _arg(TensorType(("T", 8), F32))
    w = _arg(TensorType((6, 8), I8))
    assert make_op(ops.quantized_linear, [x, w, _arg(TensorType((6, 2), F32))],
                   {"act": "token"}).result.type == TensorType(("T", 6), F32)
    with pytest.raises(VerifyError, match=r"scale shape \[8, 1\] does not fit tensor shape "
                                          r"\[6, 8\]"):
        make_op(ops.quantized_linear, [x, w, _arg(TensorType((8, 1), F32))], {})
    with pytest.raises(VerifyError, match="scales must be f32"):
        make_op(ops.quantized_linear, [x, w, _arg(TensorType((6, 1), DType.bf16))], {})
    with pytest.raises(VerifyError, match="quantized dtype must be i8 or f8e4m3fn"):
        make_op(ops.quantized_linear, [x, _arg(TensorType((6, 8), F32)),
                                       _arg(TensorType((6, 1), F32))], {})
    with pytest.raises(VerifyError, match=r"bias f32\[8\] must be f32\[6\]"):
        make_op(ops.quantized_linear, [x, w, _arg(TensorType((6, 1), F32)),
                                       _arg(TensorType((8,), F32))], {})


def _arg(t):
    from jaxrt.ir.module import Value
    return Value(t, None, 0)


def _quantized_module(dtype, granularity, group_size=0):
    """@f(x) = quant.linear(x, quantize(@w), quant_scale(@w)) with weight definitions."""
    m = Module("q")
    attrs = (("dtype", dtype), ("granularity", granularity))
    if group_size:
        attrs += (("group_size", group_size),)
    m.weights["w"] = TensorType((6, 8), F32)
    sd = WeightDef("quant_scale", ("w",), attrs)
    m.weights["w.s"] = infer_def(sd, [m.weights["w"]])
    m.weight_defs["w.s"] = sd
    qd = WeightDef("quantize", ("w", "w.s"), (("dtype", dtype),))
    m.weights["w.q"] = infer_def(qd, [m.weights["w"], m.weights["w.s"]])
    m.weight_defs["w.q"] = qd
    b = Builder.new_function(m, "f", [("x", TensorType((3, 8), F32))])
    b.ret(b(ops.quantized_linear, b.fn.args[0], b.weight("w.q"), b.weight("w.s")))
    return m


@pytest.mark.parametrize("dtype, granularity, group_size, scale_shape", [
    (I8, "tensor", 0, (1, 1)), (I8, "channel", 0, (6, 1)), (F8, "group", 4, (6, 2))])
def test_weight_definitions_materialize_once_and_round_trip_text(dtype, granularity,
                                                                  group_size, scale_shape):
    m = _quantized_module(dtype, granularity, group_size)
    verify(m)
    assert m.weights["w.s"] == TensorType(scale_shape, F32)
    assert m.weights["w.q"] == TensorType((6, 8), dtype)
    text = str(m)
    assert f'quant_scale(@w) {{dtype = {dtype.value}, granularity = "{granularity}"' in text
    assert parse(text) == m and str(parse(text)) == text
    w = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    reads = []

    class Source(dict):
        def __getitem__(self, k):
            reads.append(k)
            return super().__getitem__(k)

    out = materialize(m, Source(w=w))
    assert reads == ["w"]  # the float weight is read once for both definitions
    s = Q.compute_scale(w, dtype, scale_shape)
    np.testing.assert_array_equal(out["w.s"], s)
    np.testing.assert_array_equal(out["w.q"].view(np.uint8),
                                  Q.quantize(w, s, dtype).view(np.uint8))


@pytest.mark.parametrize("defn, message", [
    ('quant_scale(@w) {dtype = i8, granularity = "group", group_size = 3}',
     "group size 3 does not divide the input dimension 8"),
    ('quant_scale(@w) {dtype = i32, granularity = "channel"}',
     "quantized dtype must be i8 or f8e4m3fn, got i32"),
    ('quant_scale(@w) {dtype = i8, granularity = "row"}', "granularity must be one of"),
])
def test_bad_weight_definitions_are_refused_in_text(defn, message):
    text = f"module @q {{\n  weight @w : f32[6, 8]\n  weight @s : f32[6, 1] = {defn}\n}}\n"
    with pytest.raises(Exception, match=message):
        parse(text)


def test_quantize_definition_checks_its_scale_shape():
    text = ('module @q {\n  weight @w : f32[6, 8]\n  weight @s : f32[3, 1]\n'
            '  weight @q : i8[6, 8] = quantize(@w, @s) {dtype = i8}\n}\n')
    with pytest.raises(Exception, match=r"scale shape \[3, 1\] does not fit tensor shape "
                                        r"\[6, 8\]"):
        parse(text)


def test_quant_ops_round_trip_text_and_run_their_references():
    text = ("module @m {\n"
            "  func @f(%x: f32[T, 8], %s: f32[T, 1]) -> (f32[T, 8]) {\n"
            "    %0 = quant.quantize(%x, %s) {dtype = f8e4m3fn} : f8e4m3fn[T, 8]\n"
            "    %1 = quant.dequantize(%0, %s) {dtype = f32} : f32[T, 8]\n"
            "    return %1\n  }\n}\n")
    m = parse(text)
    verify(m)
    assert str(m) == text
    from jaxrt.ir.interpreter import run
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    s = Q.token_scale(x, F8)
    (y,) = run(m, "f", [x, s])
    _check_fp8(x, s, Q.quantize(x, s, F8))
    np.testing.assert_array_equal(y, Q.dequantize(Q.quantize(x, s, F8), s))
