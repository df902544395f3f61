"""The verifier: every broken invariant is caught and located; valid modules pass."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from jaxrt.ir import (Attrs, Builder, DType, Function, Module, Op, TensorType, Value,
                      VerifyError, make_op, ops, verify)
from tests.strategies import modules

F32 = DType.f32


def vec(n=4, dtype=F32) -> TensorType:
    return TensorType((n,), dtype)


def small_module():
    """f(x) = exp(neg(x)) + w: three ops and a weight."""
    m = Module("m")
    b = Builder.new_function(m, "f", [("x", vec())])
    x = b.fn.args[0]
    e = b(ops.exp, b(ops.neg, x))
    b.ret(b(ops.add, e, b.weight("w", vec())))
    return m, b.fn


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules())
def test_random_modules_verify(m):
    verify(m)


def test_small_module_verifies():
    m, _ = small_module()
    verify(m)


def test_use_before_def():
    m, fn = small_module()
    fn.ops[0], fn.ops[1] = fn.ops[1], fn.ops[0]  # exp now precedes the neg it reads
    with pytest.raises(VerifyError, match="used before definition") as info:
        verify(m)
    assert info.value.where == "@f op #0 (exp)"


def test_cycle():
    m, fn = small_module()
    neg, exp = fn.ops[0], fn.ops[1]
    neg.operands = [exp.result]  # neg(exp(neg(...))): a two-op cycle
    with pytest.raises(VerifyError, match="cycle"):
        verify(m)
    with pytest.raises(VerifyError, match="cycle"):
        fn.toposort()


def test_foreign_value():
    m, fn = small_module()
    other = Builder.new_function(m, "g", [("y", vec())])
    other.ret(other(ops.neg, fn.args[0]))  # reads f's argument
    with pytest.raises(VerifyError, match="@g op #0"):
        verify(m)


def test_value_defined_twice():
    m, fn = small_module()
    fn.ops.insert(1, fn.ops[0])
    with pytest.raises(VerifyError, match="defined twice"):
        verify(m)


def test_result_not_owned_by_its_op():
    m, fn = small_module()
    fn.ops[0].results = (Value(vec(), fn.ops[1]),)
    with pytest.raises(VerifyError):
        verify(m)


def test_argument_owned_by_an_op():
    m, fn = small_module()
    fn.args.append(fn.ops[0].result)
    with pytest.raises(VerifyError, match="argument owned by an op"):
        verify(m)


def test_returned_value_undefined():
    m, fn = small_module()
    fn.results = [Value(vec())]
    with pytest.raises(VerifyError, match="returned value"):
        verify(m)


def test_wrong_result_type():
    m, fn = small_module()
    neg = fn.ops[0]
    fn.ops[0] = Op(ops.neg, neg.operands, neg.attrs, [vec(dtype=DType.bf16)])
    fn.replace_uses(neg.result, fn.ops[0].result)
    with pytest.raises(VerifyError, match="inference gives") as info:
        verify(m)
    assert info.value.where == "@f op #0 (neg)"


def test_wrong_result_count():
    x = Value(vec())
    op = Op(ops.iota, [], ops.iota.make_attrs({"dimension": 0}), [vec(), vec()])
    m = Module()
    m.add_function(Function("f", [x], [op], [op.results[0]]))
    with pytest.raises(VerifyError, match="expected 1 results"):
        verify(m)


def test_wrong_operand_types():
    x = Value(vec(dtype=DType.int32), hint="x")
    op = Op(ops.exp, [x], Attrs(), [vec()])  # exp of an integer
    m = Module()
    m.add_function(Function("f", [x], [op], [op.result]))
    with pytest.raises(VerifyError, match="expected a float operand") as info:
        verify(m)
    assert info.value.where == "@f op #0 (exp)"


@pytest.mark.parametrize("attrs,message", [
    ({"direction": "sideways"}, "not in"),      # not one of the choices
    ({"direction": 3}, "must be str"),          # wrong kind
    ({"direction": "lt", "bogus": 1}, "unknown attribute"),
    ({}, "missing attribute"),
])
def test_bad_attrs(attrs, message):
    m = Module()
    b = Builder.new_function(m, "f", [("x", vec())])
    x = b.fn.args[0]
    op = Op(ops.compare, [x, x], Attrs(attrs), [vec(dtype=DType.bool_)])
    b.fn.ops.append(op)
    b.ret(op.result)
    with pytest.raises(VerifyError, match=message):
        verify(m)


def test_attrs_must_be_normalized():
    m = Module()
    b = Builder.new_function(m, "f", [("x", vec())])
    # keepdims left out: make_attrs would fill its default, so this Attrs is not canonical
    op = Op(ops.reduce_sum, [b.fn.args[0]], Attrs({"axes": (0,)}), [TensorType((), F32)])
    b.fn.ops.append(op)
    b.ret(op.result)
    with pytest.raises(VerifyError, match="not normalized"):
        verify(m)


def test_op_verifier_runs():
    m = Module()
    b = Builder.new_function(m, "f", [])
    op = make_op(ops.constant, [], {"value": 1.0}, [vec()])
    op.attrs = Attrs({"value": (1.0, 2.0)})  # 2 values for 4 elements
    b.fn.ops.append(op)
    b.ret(op.result)
    with pytest.raises(VerifyError, match="2 values for type f32\\[4\\]"):
        verify(m)


def test_unknown_weight():
    m, fn = small_module()
    del m.weights["w"]
    with pytest.raises(VerifyError, match="unknown weight @w"):
        verify(m)


def test_weight_type_mismatch():
    m, fn = small_module()
    m.weights["w"] = vec(8)
    with pytest.raises(VerifyError, match="weight @w is f32\\[8\\], used as f32\\[4\\]"):
        verify(m)


def test_weights_must_be_static():
    m, _ = small_module()
    m.weights["dyn"] = TensorType(("T",), F32)
    with pytest.raises(VerifyError, match="static"):
        verify(m)


def test_builder_rejects_weight_redeclaration():
    m, fn = small_module()
    with pytest.raises(VerifyError, match="redeclared"):
        Builder(m, fn).weight("w", vec(8))


def test_duplicate_argument_names():
    m = Module()
    m.add_function(Function("f", [Value(vec(), hint="x"), Value(vec(), hint="x")]))
    with pytest.raises(VerifyError, match="duplicate argument name %x"):
        verify(m)


def test_unnamed_argument_clashing_with_its_printed_name():
    # the second argument prints as %arg1, like the first
    m = Module()
    m.add_function(Function("f", [Value(vec(), hint="arg1"), Value(vec())]))
    with pytest.raises(VerifyError, match="duplicate argument name %arg1"):
        verify(m)
    m.functions["f"].args[0].hint = None
    verify(m)


def test_duplicate_function():
    m, fn = small_module()
    with pytest.raises(VerifyError, match="duplicate function"):
        m.add_function(Function("f", []))
