"""Op definitions: type inference, and reference semantics against direct formulas.

References compute in f32 while the direct formulas here use f64, so f32 comparisons use
rtol/atol 1e-5 unless a comment says why a check needs more.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from jaxrt.ir import (Builder, DType, Module, TensorType, Value, VerifyError, make_op, ops,
                      verify)
from jaxrt.ir.interpreter import run
from tests.strategies import numeric_modules

F32, BF16, I32, I1 = DType.f32, DType.bf16, DType.int32, DType.bool_
TOL = dict(rtol=1e-5, atol=1e-5)


def T(*shape, dtype=F32) -> TensorType:
    return TensorType(tuple(shape), dtype)


def infer(opdef, *types, **attrs) -> TensorType | tuple:
    op = make_op(opdef, [Value(t) for t in types], attrs)
    return op.results[0].type if len(op.results) == 1 else tuple(r.type for r in op.results)


def apply(opdef, *arrays, result_types=None, **attrs):
    """Run one op through a verified module and the interpreter; checks the result types."""
    m = Module()
    b = Builder.new_function(m, "f", [(f"x{i}", T(*np.shape(x), dtype=DType.from_numpy(
        np.asarray(x).dtype))) for i, x in enumerate(arrays)])
    out = b(opdef, *b.fn.args, result_types=result_types, **attrs)
    outs = out if isinstance(out, tuple) else (out,)
    b.ret(*outs)
    verify(m)
    results = run(m, "f", [np.asarray(x) for x in arrays])
    for v, r in zip(outs, results):
        assert r.shape == v.type.shape and r.dtype == v.dtype.to_numpy(), (r.shape, v.type)
    return results[0] if len(results) == 1 else results


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---- type inference ----------------------------------------------------------------------------

def test_elementwise_inference_broadcasts_symbolic_dims():
    assert infer(ops.add, T("T", 1), T(1, 8)) == T("T", 8)
    assert infer(ops.mul, T(8), T("B", "T", 8)) == T("B", "T", 8)
    assert infer(ops.compare, T("T"), T("T"), direction="lt") == T("T", dtype=I1)
    assert infer(ops.select, T("T", dtype=I1), T(1), T("T")) == T("T")
    assert infer(ops.convert, T(3), dtype=BF16) == T(3, dtype=BF16)
    with pytest.raises(VerifyError, match="do not broadcast"):
        infer(ops.add, T("T"), T("S"))
    with pytest.raises(VerifyError, match="dtypes differ"):
        infer(ops.add, T(2), T(2, dtype=BF16))
    with pytest.raises(VerifyError, match="float"):
        infer(ops.exp, T(2, dtype=I32))
    with pytest.raises(VerifyError, match="arithmetic on i1"):
        infer(ops.sub, T(2, dtype=I1), T(2, dtype=I1))
    with pytest.raises(VerifyError, match="arithmetic on i1"):
        infer(ops.neg, T(2, dtype=I1))
    assert infer(ops.maximum, T(2, dtype=I1), T(2, dtype=I1)) == T(2, dtype=I1)
    with pytest.raises(VerifyError, match="predicate must be i1"):
        infer(ops.select, T(2), T(2), T(2))


def test_shape_op_inference():
    assert infer(ops.reduce_sum, T("T", 4, 8), axes=(-1, 0)) == T(4)
    assert infer(ops.reduce_max, T("T", 4), axes=(1,), keepdims=True) == T("T", 1)
    assert infer(ops.reshape, T("T", 4, 8), shape=(2, "T", 16)) == T(2, "T", 16)
    assert infer(ops.transpose, T("T", 4, 8), perm=(2, 0, 1)) == T(8, "T", 4)
    assert infer(ops.broadcast, T(1, 8), shape=("B", "T", 8)) == T("B", "T", 8)
    assert infer(ops.concat, T("T", 2), T("T", 3), axis=-1) == T("T", 5)
    assert infer(ops.slice_, T("T", 10), axis=1, start=1, limit=8, stride=3) == T("T", 3)
    assert infer(ops.take, T(100, 8), T("S", "Q", dtype=I32), axis=0) == T("S", "Q", 8)
    assert infer(ops.matmul, T("T", 4, 8), T(8, 16)) == T("T", 4, 16)
    for opdef, types, attrs, message in [
        (ops.reduce_sum, [T(4, 4)], {"axes": (0, -2)}, "repeated"),
        (ops.reshape, [T("T", 4)], {"shape": ("S", 4)}, "symbolic dims"),
        (ops.reshape, [T(4, 4)], {"shape": (3, 5)}, "elements"),
        (ops.transpose, [T(4, 4)], {"perm": (0, 0)}, "permutation"),
        (ops.broadcast, [T(3)], {"shape": (4,)}, "do not broadcast"),
        (ops.concat, [T("T"), T("T")], {"axis": 0}, "must be static"),
        (ops.slice_, [T("T")], {"axis": 0, "start": 0, "limit": 1}, "must be static"),
        (ops.slice_, [T(4)], {"axis": 0, "start": 3, "limit": 2}, "out of range"),
    ]:
        with pytest.raises(VerifyError, match=message):
            infer(opdef, *types, **attrs)
    with pytest.raises(VerifyError, match="indices must be i32"):
        infer(ops.take, T(4), T(2))
    with pytest.raises(VerifyError, match="contraction mismatch"):
        infer(ops.matmul, T(4, 8), T(4, 8))


def test_llm_op_inference():
    assert infer(ops.embedding, T("T", dtype=I32), T(100, 8, dtype=BF16)) == T("T", 8, dtype=BF16)
    assert infer(ops.linear, T("T", 8), T(16, 8), T(16)) == T("T", 16)
    assert infer(ops.rms_norm, T("T", 8), T(8)) == T("T", 8)
    assert infer(ops.rope, T("T", 4, 16), T("T", dtype=I32)) == T("T", 4, 16)
    assert infer(ops.logits, T("N", 8, dtype=BF16), T(100, 8, dtype=BF16)) == T("N", 100)
    assert infer(ops.argmax, T("N", 100)) == T("N", dtype=I32)
    assert infer(ops.attention, T(2, 3, 8, 16), T(2, 5, 2, 16), T(2, 5, 2, 32),
                 scale=0.25) == T(2, 3, 8, 32)
    kv = T(2, 2, "pages", "page_size", 2, 16)
    assert infer(ops.kv_update, kv, T("T", 2, 16), T("T", 2, 16), T("T", dtype=I32),
                 layer=1) == kv
    i32 = dict(dtype=I32)
    assert infer(ops.paged_attention, T("T", 8, 16), kv, T("S", "MP", **i32), T("S", **i32),
                 T("S", "Q", **i32), T("T", **i32), layer=0, scale=0.25) == T("T", 8, 16)
    with pytest.raises(VerifyError, match="even"):
        infer(ops.rope, T("T", 4, 15), T("T", dtype=I32))
    with pytest.raises(VerifyError, match="multiple"):
        infer(ops.attention, T(1, 3, 6, 16), T(1, 5, 4, 16), T(1, 5, 4, 16), scale=1.0)
    with pytest.raises(VerifyError, match="window"):
        infer(ops.attention, T(1, 3, 4, 16), T(1, 5, 4, 16), T(1, 5, 4, 16), scale=1.0,
              window=0)
    with pytest.raises(VerifyError, match="layer 2 out of range"):
        infer(ops.kv_update, kv, T("T", 2, 16), T("T", 2, 16), T("T", dtype=I32), layer=2)
    with pytest.raises(VerifyError, match="number of sequences"):
        infer(ops.paged_attention, T("T", 8, 16), kv, T("S", "MP", **i32), T("S2", **i32),
              T("S", "Q", **i32), T("T", **i32), layer=0, scale=0.25)
    with pytest.raises(VerifyError, match="rms_norm"):
        infer(ops.rms_norm, T("T", 8), T(4))
    with pytest.raises(VerifyError, match="linear"):
        infer(ops.linear, T("T", 8), T(16, 8), T(8))


def test_attribute_validation():
    with pytest.raises(VerifyError, match="not in"):
        infer(ops.rope, T(4, 16), T(dtype=I32), style="diagonal")
    with pytest.raises(VerifyError, match="missing attribute 'scale'"):
        infer(ops.attention, T(1, 1, 1, 4), T(1, 1, 1, 4), T(1, 1, 1, 4))
    with pytest.raises(VerifyError, match="unknown attribute"):
        infer(ops.neg, T(4), axis=0)
    # ints widen to floats for float attrs (and inside constant tuples); lists become tuples
    assert make_op(ops.rms_norm, [Value(T(4)), Value(T(4))], {"eps": 1}).attrs.eps == 1.0
    const = make_op(ops.constant, [], {"value": [1, 2]}, [T(2)])
    assert const.attrs.value == (1.0, 2.0) and isinstance(const.attrs.value[0], float)
    with pytest.raises(VerifyError, match="not an integer"):
        make_op(ops.constant, [], {"value": 0.5}, [T(2, dtype=I32)])
    with pytest.raises(VerifyError, match="static"):
        make_op(ops.constant, [], {"value": 0.5}, [T("T")])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(numeric_modules())
def test_references_agree_with_inferred_types(case):
    """Every op's reference, on random data and attributes, returns its inferred types."""
    m, inputs, weights = case
    fn = m.functions["f"]
    with np.errstate(all="ignore"):  # random graphs overflow (exp, pow, div) and make nans
        outs = run(m, "f", inputs, weights)
    for v, x in zip(fn.results, outs):
        assert x.shape == v.type.shape and x.dtype == v.dtype.to_numpy(), (x.shape, v.type)


# ---- elementwise and shape references -----------------------------------------------------------

@pytest.mark.parametrize("opdef,fn", [
    (ops.add, np.add), (ops.sub, np.subtract), (ops.mul, np.multiply), (ops.div, np.divide),
    (ops.maximum, np.maximum), (ops.minimum, np.minimum),
])
def test_binary_broadcasting(rng, opdef, fn):
    a, b = randn(rng, 3, 1, 4), randn(rng, 5, 1) + 3.0
    np.testing.assert_allclose(apply(opdef, a, b), fn(a, b), **TOL)


def test_pow_and_integer_division():
    a = np.array([4.0, 2.0, 9.0], np.float32)
    np.testing.assert_allclose(apply(ops.pow_, a, np.float32(0.5)), np.sqrt(a), **TOL)
    x, y = np.array([7, -7, 5], np.int32), np.array([2, 2, 0], np.int32)
    np.testing.assert_array_equal(apply(ops.div, x, y), [3, -4, 0])  # floor; x/0 -> 0
    base, exponent = np.array([2, 1, -1, -1, 0, 3], np.int32), np.array([-1, -1, -3, -2, -1, 2],
                                                                         np.int32)
    np.testing.assert_array_equal(apply(ops.pow_, base, exponent), [0, 1, -1, 1, 0, 9])


@pytest.mark.parametrize("opdef,fn", [
    (ops.exp, np.exp), (ops.tanh, np.tanh), (ops.cos, np.cos), (ops.sin, np.sin),
    (ops.neg, np.negative), (ops.sqrt, np.sqrt), (ops.log, np.log),
    (ops.rsqrt, lambda x: 1 / np.sqrt(x)),
])
def test_unary(rng, opdef, fn):
    x = np.abs(randn(rng, 2, 5)) + 0.1
    np.testing.assert_allclose(apply(opdef, x), fn(x.astype(np.float64)), **TOL)


def test_domain_edges():
    # The IR defines log and rsqrt as nan outside x > 0 (0 included), and the XLA lowering
    # matches; sqrt is nan only below 0.
    x = np.array([-1.0, 0.0, 4.0], np.float32)
    np.testing.assert_allclose(apply(ops.log, x), [np.nan, np.nan, math.log(4.0)], **TOL)
    np.testing.assert_array_equal(apply(ops.sqrt, x), [np.nan, 0.0, 2.0])
    np.testing.assert_array_equal(apply(ops.rsqrt, x), [np.nan, np.nan, 0.5])


def test_compare_select_convert(rng):
    a, b = randn(rng, 4, 3), randn(rng, 3)
    for direction, fn in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                          ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)]:
        np.testing.assert_array_equal(apply(ops.compare, a, b, direction=direction), fn(a, b))
    pred = a > 0
    np.testing.assert_array_equal(apply(ops.select, pred, a, b), np.where(pred, a, b))
    x = np.array([1.7, -1.7, 3e9, -3e9, np.nan], np.float32)
    # truncates toward zero, saturates, nan -> 0
    np.testing.assert_array_equal(apply(ops.convert, x, dtype=I32),
                                  [1, -1, 2 ** 31 - 1, -2 ** 31, 0])
    y = apply(ops.convert, np.array([1.0 + 2 ** -10], np.float32), dtype=BF16)
    assert y.dtype.name == "bfloat16" and float(y[0]) == 1.0  # bf16 keeps 8 mantissa bits


@pytest.mark.parametrize("opdef,fn", [(ops.reduce_sum, np.sum), (ops.reduce_max, np.max),
                                      (ops.reduce_mean, np.mean)])
@pytest.mark.parametrize("axes,keepdims", [((0,), False), ((-1, 0), True), ((), False)])
def test_reductions(rng, opdef, fn, axes, keepdims):
    x = randn(rng, 3, 4, 5)
    np.testing.assert_allclose(apply(opdef, x, axes=axes, keepdims=keepdims),
                               fn(x, axis=axes, keepdims=keepdims), **TOL)


def test_shape_ops(rng):
    x = randn(rng, 2, 3, 4)
    np.testing.assert_array_equal(apply(ops.reshape, x, shape=(6, 4)), x.reshape(6, 4))
    np.testing.assert_array_equal(apply(ops.transpose, x, perm=(2, 0, 1)),
                                  x.transpose(2, 0, 1))
    np.testing.assert_array_equal(apply(ops.broadcast, x[:, :1], shape=(5, 2, 3, 4)),
                                  np.broadcast_to(x[:, :1], (5, 2, 3, 4)))
    np.testing.assert_array_equal(apply(ops.concat, x, x[:, :1], axis=1),
                                  np.concatenate([x, x[:, :1]], axis=1))
    np.testing.assert_array_equal(apply(ops.slice_, x, axis=2, start=1, limit=4, stride=2),
                                  x[:, :, 1:4:2])
    idx = np.array([[2, 0], [9, -5]], np.int32)  # out-of-range indices clamp
    np.testing.assert_array_equal(apply(ops.take, x, idx, axis=1),
                                  np.take(x, np.clip(idx, 0, 2), axis=1))


def test_iota_and_constants():
    np.testing.assert_array_equal(apply(ops.iota, dimension=1, result_types=[T(2, 3, dtype=I32)]),
                                  [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(apply(ops.iota, dimension=-2, result_types=[T(2, 3)]),
                                  [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(apply(ops.constant, value=1.5, result_types=[T(2, 2)]),
                                  np.full((2, 2), 1.5))
    np.testing.assert_array_equal(
        apply(ops.constant, value=(1, 2, 3, 4, 5, 6), result_types=[T(2, 3, dtype=I32)]),
        [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("lhs_shape,rhs_shape,attrs,spec", [
    ((3, 4), (4, 5), dict(lhs_contract=(1,), rhs_contract=(0,)), "ik,kj->ij"),
    ((2, 3, 4), (2, 4, 5), dict(lhs_contract=(2,), rhs_contract=(1,), lhs_batch=(0,),
                                rhs_batch=(0,)), "bik,bkj->bij"),
    # batch and contraction dims anywhere, two contractions, free dims on both sides
    ((4, 2, 3, 5), (5, 6, 3, 2, 7), dict(lhs_contract=(3, 2), rhs_contract=(0, 2),
                                         lhs_batch=(1,), rhs_batch=(3,)), "ibkc,cjkbl->bijl"),
    ((3,), (3,), dict(lhs_contract=(0,), rhs_contract=(0,)), "k,k->"),
    ((2, 3), (4,), dict(lhs_contract=(), rhs_contract=()), "ij,k->ijk"),
])
def test_dot_general_matches_einsum(rng, lhs_shape, rhs_shape, attrs, spec):
    a, b = randn(rng, *lhs_shape), randn(rng, *rhs_shape)
    np.testing.assert_allclose(apply(ops.dot_general, a, b, **attrs),
                               np.einsum(spec, a.astype(np.float64), b), **TOL)


def test_matmul_linear_embedding_logits(rng):
    x, w, bias = randn(rng, 2, 3, 8), randn(rng, 5, 8), randn(rng, 5)
    np.testing.assert_allclose(apply(ops.matmul, x, w.T.copy()), x @ w.T, **TOL)
    np.testing.assert_allclose(apply(ops.linear, x, w), x @ w.T, **TOL)
    np.testing.assert_allclose(apply(ops.linear, x, w, bias), x @ w.T + bias, **TOL)
    ids = np.array([[0, 4], [2, 99]], np.int32)  # 99 clamps to the last row
    np.testing.assert_array_equal(apply(ops.embedding, ids, w), w[[[0, 4], [2, 4]]])
    raw = x @ w.T
    np.testing.assert_allclose(apply(ops.logits, x, w), raw, **TOL)
    np.testing.assert_allclose(apply(ops.logits, x, w, softcap=2.0), np.tanh(raw / 2) * 2, **TOL)
    np.testing.assert_array_equal(apply(ops.argmax, raw), np.argmax(raw, axis=-1))
    np.testing.assert_array_equal(apply(ops.argmax, raw, axis=0), np.argmax(raw, axis=0))


# ---- nn references against direct formulas ---------------------------------------------------

def test_activations(rng):
    x, y = randn(rng, 4, 6) * 3, randn(rng, 4, 6)
    xd = x.astype(np.float64)
    silu = xd / (1 + np.exp(-xd))
    erf = np.vectorize(math.erf)
    gelu_erf = 0.5 * xd * (1 + erf(xd / math.sqrt(2)))
    gelu_tanh = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    np.testing.assert_allclose(apply(ops.silu, x), silu, **TOL)
    np.testing.assert_allclose(apply(ops.gelu, x, approximate="none"), gelu_erf, **TOL)
    np.testing.assert_allclose(apply(ops.gelu, x), gelu_tanh, **TOL)
    np.testing.assert_allclose(apply(ops.swiglu, x, y), silu * y, **TOL)
    np.testing.assert_allclose(apply(ops.geglu, x, y, approximate="none"), gelu_erf * y, **TOL)
    e = np.exp(xd - xd.max(axis=0))
    np.testing.assert_allclose(apply(ops.softmax, x, axis=0), e / e.sum(axis=0), **TOL)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(rng, offset):
    x, w = randn(rng, 3, 16), randn(rng, 16)
    xd = x.astype(np.float64)
    want = xd / np.sqrt((xd ** 2).mean(-1, keepdims=True) + 1e-5) * (offset + w)
    np.testing.assert_allclose(apply(ops.rms_norm, x, w, eps=1e-5, offset=offset), want, **TOL)


def test_layer_norm(rng):
    x, w, b = randn(rng, 3, 16), randn(rng, 16), randn(rng, 16)
    xd = x.astype(np.float64)
    want = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(apply(ops.layer_norm, x, w, b, eps=1e-5), want, **TOL)
    with pytest.raises(VerifyError, match="layer_norm"):
        infer(ops.layer_norm, T("T", 8), T(8), T(4))


def _rope_direct(x, pos, theta, style, freq_fn=lambda f: f):
    """Rotate each pair (i, i + D/2) ("half") or (2i, 2i + 1) ("interleaved") by pos * freq_i."""
    out = np.empty(x.shape, np.float64)
    d = x.shape[-1]
    for t in range(x.shape[0]):
        for i in range(d // 2):
            angle = pos[t] * freq_fn(theta ** (-2 * i / d))
            c, s = math.cos(angle), math.sin(angle)
            a, b = (i, i + d // 2) if style == "half" else (2 * i, 2 * i + 1)
            out[t, :, a] = x[t, :, a] * c - x[t, :, b] * s
            out[t, :, b] = x[t, :, b] * c + x[t, :, a] * s
    return out


# Angles are rounded to f32 in the reference: |pos * freq| < 40 gives errors below 1e-5 rad,
# and cos/sin of f32 angles add a few ulps, hence 1e-4 rather than 1e-5.
ROPE_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_matches_direct_formula(rng, style):
    x, pos = randn(rng, 5, 3, 16), np.array([0, 1, 7, 20, 39], np.int32)
    got = apply(ops.rope, x, pos, theta=10000.0, style=style)
    np.testing.assert_allclose(got, _rope_direct(x, pos, 10000.0, style), **ROPE_TOL)
    got = apply(ops.rope, x, pos, theta=500.0, style=style, scaling="linear", factor=4.0)
    np.testing.assert_allclose(got, _rope_direct(x, pos, 500.0, style, lambda f: f / 4.0),
                               **ROPE_TOL)


def test_rope_llama3_scaling(rng):
    def llama3(freq, factor=8.0, low=1.0, high=4.0, original=64):
        wavelen = 2 * math.pi / freq  # HF's _compute_llama3_parameters, one frequency at a time
        if wavelen < original / high:
            return freq
        if wavelen > original / low:
            return freq / factor
        smooth = (original / wavelen - low) / (high - low)
        return (1 - smooth) * freq / factor + smooth * freq

    # head_dim 32 and theta 10000 put frequencies in all three bands for original=64
    x, pos = randn(rng, 4, 2, 32), np.array([0, 3, 17, 39], np.int32)
    got = apply(ops.rope, x, pos, theta=10000.0, scaling="llama3", factor=8.0,
                original_max_position=64)
    np.testing.assert_allclose(got, _rope_direct(x, pos, 10000.0, "half", llama3), **ROPE_TOL)


# ---- attention -----------------------------------------------------------------------------------

def _attention_loop(q, k, v, scale, causal, window=None, softcap=None):
    """One query, one head at a time: queries are the last S of the L key positions."""
    b_, s_, h_, _ = q.shape
    length, kvh = k.shape[1], k.shape[2]
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for b in range(b_):
        for h in range(h_):
            g = h // (h_ // kvh)  # GQA: consecutive query heads share a kv head
            for s in range(s_):
                qp = length - s_ + s
                keys = [j for j in range(length) if (not causal or j <= qp)
                        and (window is None or qp - j < window)]
                scores = np.array([q[b, s, h] @ k[b, j, g] * scale for j in keys], np.float64)
                if softcap is not None:
                    scores = np.tanh(scores / softcap) * softcap
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, s, h] = sum(pj * v[b, j, g] for pj, j in zip(p, keys))
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal,window,softcap", [(True, None, None), (False, None, None),
                                                   (True, 3, None), (True, None, 1.5),
                                                   (False, 2, 0.7)])
def test_attention_matches_loop(rng, heads, kv_heads, causal, window, softcap):
    q, k = randn(rng, 2, 3, heads, 8), randn(rng, 2, 6, kv_heads, 8)
    v = randn(rng, 2, 6, kv_heads, 5)
    got = apply(ops.attention, q, k, v, scale=0.3, causal=causal, window=window,
                softcap=softcap)
    np.testing.assert_allclose(got, _attention_loop(q, k, v, 0.3, causal, window, softcap),
                               **TOL)


def test_kv_update_and_paged_attention_match_dense_attention(rng):
    """A ragged step: seq 0 prefills 3 tokens after 5 cached, seq 1 decodes 1 after 6, one padding
    token and one padding sequence; written to layer 1 of a cache with scattered pages."""
    layers, pages, page_size, kvh, heads, d = 2, 8, 4, 2, 4, 8
    attrs = dict(scale=d ** -0.5, causal=True, window=5, softcap=3.0)
    cached, new = [5, 6], [3, 1]
    page_table = np.array([[6, 1, 3], [0, 7, 2], [5, 5, 5]], np.int32)  # row 2: padding seq
    full_k = [randn(rng, c + n, kvh, d) for c, n in zip(cached, new)]
    full_v = [randn(rng, c + n, kvh, d) for c, n in zip(cached, new)]
    kv = randn(rng, layers, 2, pages, page_size, kvh, d)  # garbage everywhere else

    def slot(seq, position):
        return page_table[seq, position // page_size] * page_size + position % page_size

    for s in range(2):  # the cached prefix is already in place
        for p in range(cached[s]):
            page, off = divmod(slot(s, p), page_size)
            kv[1, 0, page, off], kv[1, 1, page, off] = full_k[s][p], full_v[s][p]
    # this step's tokens: seq 0's three, seq 1's one, then a padding token
    token_seq = [0, 0, 0, 1]
    positions = np.array([5, 6, 7, 6, 0], np.int32)
    slots = np.array([slot(s, p) for s, p in zip(token_seq, positions)] + [pages * page_size],
                     np.int32)
    k_new = np.stack([full_k[s][p] for s, p in zip(token_seq, positions)] + [full_k[0][0]])
    v_new = np.stack([full_v[s][p] for s, p in zip(token_seq, positions)] + [full_v[0][0]])
    q = randn(rng, 5, heads, d)
    context_lens = np.array([8, 7, 0], np.int32)
    q_index = np.array([[0, 1, 2], [3, 5, 9], [5, 5, 5]], np.int32)  # >= T pads

    m = Module()
    i32 = dict(dtype=I32)
    b = Builder.new_function(m, "step", [
        ("q", T("T", heads, d)), ("k", T("T", kvh, d)), ("v", T("T", kvh, d)),
        ("kv", T(*kv.shape)), ("slots", T("T", **i32)), ("page_table", T("S", "MP", **i32)),
        ("context_lens", T("S", **i32)), ("q_index", T("S", "Q", **i32)),
        ("positions", T("T", **i32))])
    qv, kk, vv, kvv, sl, pt, cl, qi, pos = b.fn.args
    kv2 = b(ops.kv_update, kvv, kk, vv, sl, layer=1)
    b.ret(b(ops.paged_attention, qv, kv2, pt, cl, qi, pos, layer=1, **attrs), kv2)
    verify(m)
    out, kv_out = run(m, "step", [q, k_new, v_new, kv, slots, page_table, context_lens, q_index,
                                  positions])

    np.testing.assert_array_equal(kv_out[0], kv[0])  # other layer untouched
    for s, rows in [(0, [0, 1, 2]), (1, [3])]:
        dense = apply(ops.attention, q[None, rows], full_k[s][None], full_v[s][None], **attrs)
        np.testing.assert_allclose(out[rows], dense[0], **TOL)
    np.testing.assert_array_equal(out[4], 0)  # the padding token attends to nothing
    # the padding token's slot was dropped: every written slot holds the new k
    for t in range(4):
        page, off = divmod(slots[t], page_size)
        np.testing.assert_array_equal(kv_out[1, 0, page, off], k_new[t])
