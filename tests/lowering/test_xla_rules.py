"""Every XLA lowering rule against its op's numpy reference, in f32 and bf16.

Each case builds a one-op function, lowers and jits it, and compares with the reference
interpreter on the same inputs. Tolerances:
- f32: rtol 1e-5 and atol 1e-5 x max|reference|. Rules and references evaluate the same
  formulas in f32; they differ only in summation order and fused multiply-adds, a few
  ulps (~1e-7) of the operands' scale, which a cancelling sum can make large relative to
  a near-zero result but never relative to the result's scale.
- bf16: rtol 1e-2 and atol 1e-2 x max|reference|. Both sides compute in f32 and round
  once to bf16 (8 significant bits, one ulp = 2^-7 relative at worst), so results agree
  to one bf16 rounding step; attention also multiplies probabilities in bf16 (see
  lowering/xla/attention.py), a second rounding of the same size.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxrt.ir import OPS, DType, Module, TensorType, interpreter, make_op, ops
from jaxrt.ir.module import Function, Value
from jaxrt.lowering.compile import lower_function

# The references compute NaN on purpose for out-of-domain cases (log(-1), all -inf softmax).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

F32, BF16, I32 = DType.f32, DType.bf16, DType.int32
rng = np.random.default_rng(1234)


def normal(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def ints(lo, hi, *shape):
    return rng.integers(lo, hi, shape).astype(np.int32)


def case(opdef, inputs, bf16=True, weights=None, result_types=None, **attrs):
    return pytest.param(opdef, inputs, attrs, bf16, weights, result_types,
                        id=f"{opdef.name}-{len(CASES)}")


CASES: list = []


def add(*a, **k):
    CASES.append(case(*a, **k))


# ---- structural ---------------------------------------------------------------------------
add(ops.weight, [], weights={"w": normal(3, 4)}, name="w")
add(ops.constant, [], result_types=[TensorType((2, 3), F32)], value=0.3)
add(ops.constant, [], result_types=[TensorType((2, 2), F32)], value=(1.0, -2.5, 3.25, 0.1))
add(ops.constant, [], bf16=False, result_types=[TensorType((3,), I32)], value=7.0)
add(ops.iota, [], bf16=False, result_types=[TensorType((3, 5), I32)], dimension=1)
add(ops.iota, [], bf16=False, result_types=[TensorType((4, 2), F32)], dimension=0)

# ---- elementwise ----------------------------------------------------------------------------
for opdef in (ops.add, ops.sub, ops.mul, ops.maximum, ops.minimum):
    add(opdef, [normal(3, 4), normal(4)])
    add(opdef, [ints(-9, 9, 2, 3), ints(-9, 9, 1, 3)], bf16=False)
add(ops.div, [normal(3, 4), normal(3, 4) + 3.0])
add(ops.div, [ints(-20, 20, 5, 4), ints(-3, 4, 5, 4)], bf16=False)  # includes b == 0
add(ops.pow_, [np.abs(normal(3, 4)) + 0.1, normal(3, 4)])
add(ops.neg, [normal(2, 5)])
add(ops.neg, [ints(-5, 5, 7)], bf16=False)
add(ops.exp, [normal(3, 4, scale=3.0)])
add(ops.exp, [np.array([-1e31, -100.0, 0.0, 88.5, 200.0], np.float32)], bf16=False)
add(ops.log, [np.abs(normal(3, 4)) + 0.05])
add(ops.log, [np.array([-1.0, 0.0, 0.5, 3.0], np.float32)])  # NaN outside the domain
add(ops.tanh, [normal(3, 4, scale=2.0)])
add(ops.rsqrt, [np.abs(normal(3, 4)) + 0.05])
add(ops.rsqrt, [np.array([-1.0, 0.0, 4.0], np.float32)])
add(ops.sqrt, [np.abs(normal(3, 4))])
add(ops.sqrt, [np.array([-1.0, 0.0, 4.0], np.float32)])
add(ops.cos, [normal(3, 4, scale=3.0)])
add(ops.sin, [normal(3, 4, scale=3.0)])
for direction in ("eq", "ne", "lt", "le", "gt", "ge"):
    a = np.round(normal(3, 4)).astype(np.float32)
    add(ops.compare, [a, np.round(normal(4)).astype(np.float32)], direction=direction)
add(ops.compare, [ints(0, 3, 5), ints(0, 3, 5)], bf16=False, direction="le")
add(ops.select, [rng.random((3, 4)) < 0.5, normal(3, 4), normal(4)])
add(ops.convert, [normal(3, 4, scale=10.0)], dtype=DType.bf16)
add(ops.convert, [np.array([1.7, -1.7, 3e9, -3e9, np.nan, 0.2], np.float32)], bf16=False,
    dtype=DType.int32)
add(ops.convert, [ints(-300, 300, 8)], bf16=False, dtype=DType.int8)  # saturates
add(ops.convert, [ints(-3, 3, 8)], bf16=False, dtype=DType.f32)
add(ops.convert, [normal(6)], dtype=DType.bool_)
add(ops.convert, [normal(6)], dtype=DType.f16)

# ---- reductions and shapes ------------------------------------------------------------------
for opdef in (ops.reduce_sum, ops.reduce_max, ops.reduce_mean):
    add(opdef, [normal(2, 3, 4)], axes=(0, 2))
    add(opdef, [normal(2, 3, 4)], axes=(-1,), keepdims=True)
add(ops.reduce_sum, [ints(-5, 5, 3, 4)], bf16=False, axes=(1,))
add(ops.reshape, [normal(2, 3, 4)], shape=(6, 4))
add(ops.transpose, [normal(2, 3, 4)], perm=(2, 0, 1))
add(ops.broadcast, [normal(3, 1)], shape=(2, 3, 4))
add(ops.concat, [normal(2, 3), normal(1, 3), normal(4, 3)], axis=0)
add(ops.slice_, [normal(4, 9)], axis=1, start=1, limit=8, stride=3)
add(ops.take, [normal(5, 3), ints(-2, 8, 2, 4)], axis=0)  # out of range: clamped
add(ops.take, [normal(3, 6), ints(0, 6, 4)], axis=1)

# ---- contractions ---------------------------------------------------------------------------
add(ops.dot_general, [normal(2, 3, 5), normal(2, 5, 4)], lhs_contract=(2,), rhs_contract=(1,),
    lhs_batch=(0,), rhs_batch=(0,))
add(ops.dot_general, [normal(4, 6), normal(3, 6)], lhs_contract=(1,), rhs_contract=(1,))
add(ops.dot_general, [ints(-4, 4, 3, 5), ints(-4, 4, 5, 2)], bf16=False, lhs_contract=(1,),
    rhs_contract=(0,))
add(ops.matmul, [normal(2, 3, 8), normal(8, 5)])

# ---- llm.* ---------------------------------------------------------------------------------
add(ops.silu, [normal(3, 7, scale=4.0)])
add(ops.gelu, [normal(3, 7, scale=3.0)], approximate="tanh")
add(ops.gelu, [normal(3, 7, scale=3.0)], approximate="none")
add(ops.swiglu, [normal(4, 6, scale=2.0), normal(4, 6)])
add(ops.geglu, [normal(4, 6, scale=2.0), normal(4, 6)], approximate="tanh")
add(ops.geglu, [normal(4, 6, scale=2.0), normal(6)], approximate="none")
add(ops.softmax, [normal(3, 9, scale=4.0)])
add(ops.softmax, [normal(5, 2, 3, scale=4.0)], axis=0)
add(ops.softmax, [np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]], np.float32)])
add(ops.embedding, [ints(-1, 12, 2, 5), normal(10, 6)])  # out of range: clamped
add(ops.linear, [normal(2, 3, 8), normal(5, 8)])
add(ops.linear, [normal(4, 8), normal(5, 8), normal(5)])
add(ops.rms_norm, [normal(4, 16, scale=3.0), normal(16)], eps=1e-5)
add(ops.rms_norm, [normal(2, 3, 8), normal(8, scale=0.1)], eps=1e-6, offset=1.0)
add(ops.layer_norm, [normal(4, 16, scale=3.0), normal(16), normal(16)], eps=1e-5)
add(ops.add_rms_norm, [normal(4, 16, scale=3.0), normal(4, 16), normal(16)], eps=1e-5)
add(ops.add_rms_norm, [normal(2, 3, 8), normal(2, 3, 8), normal(8, scale=0.1)], eps=1e-6,
    offset=1.0)
POS = ints(0, 4000, 5)
add(ops.rope, [normal(5, 3, 8), POS], theta=10000.0)
add(ops.rope, [normal(5, 2, 16), POS], theta=500000.0, style="interleaved")
add(ops.rope, [normal(5, 2, 16), POS], theta=500000.0, scaling="llama3", factor=8.0,
    low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64)
add(ops.rope, [normal(5, 2, 8), POS], theta=10000.0, scaling="linear", factor=4.0)
add(ops.rope, [normal(2, 5, 3, 8), ints(0, 50, 2, 5)], theta=10000.0)
add(ops.logits, [normal(4, 16), normal(30, 16)])
add(ops.logits, [normal(2, 3, 16), normal(30, 16)], softcap=5.0)
add(ops.argmax, [normal(4, 30)])
add(ops.argmax, [normal(4, 30, 3)], axis=1)
for attrs in ({"scale": 0.35}, {"scale": 0.5, "window": 3, "softcap": 2.0},
              {"scale": 0.3, "causal": False}):
    add(ops.attention, [normal(2, 4, 6, 8), normal(2, 7, 2, 8), normal(2, 7, 2, 8)], **attrs)
add(ops.attention, [normal(1, 3, 3, 4), normal(1, 5, 1, 4), normal(1, 5, 1, 6)], scale=0.5)
KV = normal(2, 2, 4, 2, 2, 4)  # [layers, 2, pages, page_size, kv_heads, head_dim]
add(ops.kv_update, [KV, normal(5, 2, 4), normal(5, 2, 4), np.array([3, 0, 8, -1, 7], np.int32)],
    layer=1)
add(ops.paged_attention,
    [normal(4, 4, 4), KV, np.array([[2, 0], [1, 3]], np.int32), np.array([3, 4], np.int32),
     np.array([[0, 1], [3, 9]], np.int32), np.array([1, 2, 0, 3], np.int32)],
    layer=0, scale=0.5)


# ---- quantization (f32 only: scales are f32 whatever the compute dtype) ---------------------
I8, F8 = DType.int8, DType.f8e4m3
QX = normal(4, 8, scale=3.0)
for qdt in (I8, F8):
    for scale in (np.full((1, 1), 0.05, np.float32), np.abs(normal(4, 1)) + 0.01,
                  np.abs(normal(4, 2)) + 0.01):
        add(ops.quantize, [QX, scale], bf16=False, dtype=qdt)
add(ops.dequantize, [ints(-127, 128, 4, 8).astype(np.int8), np.abs(normal(4, 2))], bf16=False,
    dtype=F32)
add(ops.dequantize, [normal(3, 8).astype(F8.to_numpy()), np.abs(normal(1, 1))], bf16=False,
    dtype=BF16)
for act in ("none", "token"):
    add(ops.quantized_linear, [normal(5, 8), ints(-127, 128, 6, 8).astype(np.int8),
                               np.abs(normal(6, 1)) * 0.01], bf16=False, act=act)
    add(ops.quantized_linear, [normal(2, 5, 8), ints(-127, 128, 6, 8).astype(np.int8),
                               np.abs(normal(6, 4)) * 0.01, normal(6)], bf16=False, act=act)
    add(ops.quantized_linear, [normal(5, 8), normal(6, 8).astype(F8.to_numpy()),
                               np.abs(normal(6, 2)) * 0.1], bf16=False, act=act)
    add(ops.quantized_linear, [normal(5, 8), normal(6, 8).astype(F8.to_numpy()),
                               np.full((1, 1), 0.1, np.float32)], bf16=False, act=act)


def one_op_module(opdef, inputs, attrs, weights, result_types, dtype: DType) -> Module:
    def ir_type(x):
        dt = DType.from_numpy(x.dtype)
        return TensorType(x.shape, dtype if dt == F32 else dt)
    m = Module("t")
    for name, w in (weights or {}).items():
        m.weights[name] = ir_type(w)
    args = [Value(ir_type(x), None, i, hint=f"a{i}") for i, x in enumerate(inputs)]
    if result_types is not None:
        result_types = [t.with_dtype(dtype) if t.dtype == F32 else t for t in result_types]
    if opdef is ops.weight:
        result_types = [m.weights[attrs["name"]]]
    op = make_op(opdef, args, attrs, result_types)
    m.add_function(Function("f", args, [op], list(op.results)))
    return m


def cast_inputs(arrays, dtype: DType):
    return [x.astype(dtype.to_numpy()) if x.dtype == np.float32 else x for x in arrays]


# Every case in f32; the cases with float data also in bf16 (integer-only cases have no
# bf16 variant to run).
DTYPED_CASES = [pytest.param(*p.values, F32, id=f"{p.id}-f32") for p in CASES] + [
    pytest.param(*p.values, BF16, id=f"{p.id}-bf16") for p in CASES if p.values[3]]


@pytest.mark.parametrize("opdef, inputs, attrs, bf16, weights, result_types, dtype",
                         DTYPED_CASES)
def test_rule_matches_reference(opdef, inputs, attrs, bf16, weights, result_types, dtype):
    module = one_op_module(opdef, inputs, attrs, weights, result_types, dtype)
    xs = cast_inputs(inputs, dtype)
    ws = {k: v for k, v in zip(weights or {}, cast_inputs(list((weights or {}).values()),
                                                          dtype))}
    expected = interpreter.run(module, "f", xs, ws)
    got = jax.jit(lower_function(module, "f"))(ws, *xs)
    tol = 1e-5 if dtype == F32 else 1e-2  # see the module docstring
    for g, e, r in zip(got, expected, module.functions["f"].results):
        g = np.asarray(g)
        assert g.dtype == r.type.dtype.to_numpy() and g.shape == e.shape
        if e.dtype.kind in "iub":
            np.testing.assert_array_equal(g, e)
            continue
        e32, g32 = e.astype(np.float32), g.astype(np.float32)
        finite = np.isfinite(e32)
        scale = float(np.max(np.abs(e32[finite]), initial=0.0))
        np.testing.assert_allclose(g32, e32, rtol=tol, atol=tol * max(scale, 1e-30),
                                   equal_nan=True)


def test_every_op_has_a_rule_and_a_case():
    from jaxrt.lowering.registry import missing_rules
    assert missing_rules("xla") == []
    covered = {p.values[0].name for p in CASES}
    covered.add("scan")  # needs a body function: its cases are in tests/lowering/test_scan.py
    assert sorted(set(OPS) - covered) == []



@pytest.mark.parametrize("groups", [1, 4])
def test_weight_only_linear_contracts_the_codes(groups):
    """Weight-only quant.linear feeds the dot a bare convert of the codes (which XLA fuses
    into the dot) and scales the dot's result: no multiply over a weight-shaped array
    (scaling the weights first ran 0.70x bf16 on an H200, bench/bench_int8_matmul.py)."""
    x, w = normal(5, 64).astype(BF16.to_numpy()), ints(-127, 128, 32, 64).astype(np.int8)
    scale = np.abs(normal(32, groups)) * 0.01
    module = one_op_module(ops.quantized_linear, [x, w, scale], {"act": "none"}, None, None,
                           F32)  # x stays bf16, the scales f32
    jaxpr = jax.make_jaxpr(lower_function(module, "f"))({}, x, w, scale).jaxpr
    eqns = {e.outvars[0]: e for e in jaxpr.eqns}
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1
    rhs = eqns[dots[0].invars[1]]
    while rhs.primitive.name in ("reshape", "broadcast_in_dim"):
        rhs = eqns[rhs.invars[0]]
    assert rhs.primitive.name == "convert_element_type" and rhs.invars[0] is jaxpr.invars[1]
    muls = [e for e in jaxpr.eqns if e.primitive.name == "mul"]
    assert muls and all(e.outvars[0].aval.size < w.size for e in muls)
