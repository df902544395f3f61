"""Pattern language: Pat / Any / Const / Or, captures, commutativity, explain mode."""
import math

import pytest

from jaxrt.ir import ops
from jaxrt.passes.pattern import (Any, Const, MatchFailure, Or, Pat, is_float, is_int,
                                  splat_value)

from tests.passes.passes_testutil import F16, F32, I32, const, function, t


T = t(2, 3)


def build(body, dtype=F32):
    """(function, its result) for body(b, x, y) over x, y : dtype[2, 3]."""
    ty = t(2, 3, dtype=dtype)
    m = function({"x": ty, "y": ty}, body)
    fn = m.functions["f"]
    return fn, fn.results[0]


def test_pat_matches_op_and_captures_operands():
    fn, v = build(lambda b, x, y: b(ops.add, x, y))
    x, y = fn.args
    caps = Pat(ops.add, "a", Any("b"), name="root").match(v)
    assert caps == {"a": x, "b": y, "root": v}


def test_pat_rejects_other_op_and_arguments():
    fn, v = build(lambda b, x, y: b(ops.sub, x, y))
    assert Pat(ops.add).match(v) is None
    assert Pat(ops.add).match(fn.args[0]) is None  # arguments have no op
    assert Pat(None).match(v) == {}  # any op
    assert Pat((ops.add, ops.sub)).match(v) == {}


def test_unconstrained_operands_vs_arity():
    fn, v = build(lambda b, x, y: b(ops.add, x, y))
    assert Pat(ops.add).match(v) == {}
    assert Pat(ops.add, "a").match(v) is None  # one operand pattern for a binary op


def test_commutative_ops_match_either_order():
    fn, v = build(lambda b, x, y: b(ops.add, const(b, 0.0, T), x))
    caps = Pat(ops.add, "x", Const(0.0)).match(v)
    assert caps == {"x": fn.args[0]}
    assert Pat(ops.add, "x", Const(0.0), commutative=False).match(v) is None


def test_non_commutative_ops_match_in_order_only():
    _, v = build(lambda b, x, y: b(ops.sub, const(b, 0.0, T), x))
    assert Pat(ops.sub, "x", Const(0.0)).match(v) is None
    assert Pat(ops.sub, Const(0.0), "x").match(v) is not None


def test_same_name_must_bind_same_value():
    _, same = build(lambda b, x, y: b(ops.sub, x, x))
    _, diff = build(lambda b, x, y: b(ops.sub, x, y))
    p = Pat(ops.sub, "x", "x")
    assert p.match(same) is not None
    assert p.match(diff) is None
    assert "capture 'x' is bound to %x but here is %y" in str(p.match(diff, explain=True))


def test_commutative_retry_rolls_back_captures():
    # add(neg(x), x): the first order binds x := neg(x) and fails; the swap must start clean
    fn, v = build(lambda b, x, y: b(ops.add, b(ops.neg, x), x))
    caps = Pat(ops.add, "x", Pat(ops.neg, "x")).match(v)
    assert caps == {"x": fn.args[0]}


def test_attrs_by_value_predicate_and_whole_attrs():
    _, v = build(lambda b, x, y: b(ops.transpose, x, perm=(1, 0)))
    assert Pat(ops.transpose, attrs={"perm": (1, 0)}).match(v) is not None
    assert Pat(ops.transpose, attrs={"perm": [1, 0]}).match(v) is not None  # lists normalize
    assert Pat(ops.transpose, attrs={"perm": (0, 1)}).match(v) is None
    assert Pat(ops.transpose, attrs={"perm": lambda p: p[0] == 1}).match(v) is not None
    assert Pat(ops.transpose, attrs=lambda a: a.perm == (0, 1)).match(v) is None
    assert Pat(None, attrs={"axes": (0,)}).match(v) is None  # transpose has no `axes`


def test_where_predicate_on_value():
    _, v = build(lambda b, x, y: b(ops.add, x, y))
    assert Pat(ops.add, where=lambda v: v.type.shape == (2, 3)).match(v) is not None
    assert Pat(ops.add, where=lambda v: v.type.rank == 1).match(v) is None


def test_any_type_predicate_matches_arguments():
    fn, _ = build(lambda b, x, y: x, dtype=I32)
    assert Any("x", where=is_int).match(fn.args[0]) == {"x": fn.args[0]}
    assert Any("x", where=is_float).match(fn.args[0]) is None


def test_const_splat_and_dense_all_equal():
    def body(b, x):
        return (const(b, 0.0, T), const(b, [1.0] * 6, T), const(b, [1, 2, 3, 4, 5, 6], T),
                const(b, -0.0, T), const(b, math.nan, T))
    m = function({"x": T}, body)
    zero, ones, ramp, negzero, nan = m.functions["f"].results
    assert Const(0.0).match(zero) == {}
    assert Const(1.0, name="c").match(ones) == {"c": ones}
    assert Const(1.0).match(ramp) is None
    assert Const().match(ramp) == {}  # any constant
    assert splat_value(ramp) is None and splat_value(ones) == 1.0
    # the sign of zero counts in floats: 1 / x tells them apart
    assert Const(0.0).match(negzero) is None and Const(-0.0).match(negzero) == {}
    assert Const(math.nan).match(nan) == {}
    assert Const(0.0).match(m.functions["f"].args[0]) is None


def test_const_compares_in_the_constants_dtype():
    # 1e-30 is a normal f32 number but underflows to 0 in f16; integer zeros have no sign
    m = function({"x": T}, lambda b, x: (const(b, 1e-30, T), const(b, 1e-30, t(2, 3, dtype=F16)),
                                         const(b, -0.0, t(2, 3, dtype=I32))))
    f32_tiny, f16_tiny, int_zero = m.functions["f"].results
    assert Const(0.0).match(f32_tiny) is None
    assert Const(0.0).match(f16_tiny) == {}
    assert Const(0.0).match(int_zero) == {} and Const(-0.0).match(int_zero) == {}


def test_or_first_alternative_and_rollback():
    fn, v = build(lambda b, x, y: b(ops.maximum, x, x))
    p = Or(Pat(ops.minimum, "x", "x"), Pat(ops.maximum, "x", "x"))
    assert p.match(v) == {"x": fn.args[0]}
    assert p.root_opdefs() == {ops.minimum, ops.maximum}
    with pytest.raises(ValueError, match="capture different names"):
        Or(Pat(ops.add, "x", "y"), Pat(ops.sub, "x", "z"))


def test_root_opdefs_and_capture_names():
    p = Pat(ops.transpose, Pat(ops.transpose, "x", name="inner"))
    assert p.root_opdefs() == {ops.transpose}
    assert p.capture_names() == {"x", "inner"}
    assert Pat(None).root_opdefs() is None
    assert Const().root_opdefs() == {ops.constant}
    assert Any().root_opdefs() is None


def test_explain_reports_the_failing_operand():
    _, v = build(lambda b, x, y: b(ops.add, x, b(ops.mul, x, y)))
    fail = Pat(ops.add, "x", Const(0.0), commutative=False).match(v, explain=True)
    assert isinstance(fail, MatchFailure) and not fail
    assert str(fail) == "operand 1: expected constant 0.0, found mul %?"
    named = fail.render(lambda val: "%7")
    assert named == "operand 1: expected constant 0.0, found mul %7"


def test_explain_nested_and_commutative_reasons():
    _, v = build(lambda b, x, y: b(ops.add, x, y))
    p = Pat(ops.add, "x", Pat(ops.neg, "y"))
    text = str(p.match(v, explain=True))
    assert text.startswith("neither operand order matches")
    assert "operand 1: expected neg, found argument %y" in text
    assert "swapped: operand 0: expected neg" in text  # operand 0 of the op is %x


def test_explain_attribute_and_predicate_reasons():
    _, v = build(lambda b, x, y: b(ops.transpose, x, perm=(1, 0)))

    def is_identity(perm):
        return perm == tuple(range(len(perm)))

    text = str(Pat(ops.transpose, attrs={"perm": is_identity}).match(v, explain=True))
    assert "attribute perm = (1, 0)" in text and "fails predicate is_identity" in text
    assert "test_pattern.py:" in text  # predicates are located in the source
    text = str(Pat(ops.transpose, attrs={"perm": (0, 1)}).match(v, explain=True))
    assert "is not (0, 1)" in text


def test_explain_is_lazy():
    calls = []

    def namer(v):
        calls.append(v)
        return "%v"

    _, v = build(lambda b, x, y: b(ops.add, x, y))
    fail = Pat(ops.sub, "x", "y").match(v, explain=True)
    assert calls == []  # nothing formatted yet
    assert fail.render(namer) == "expected sub, found add %v" and calls == [v]


def test_match_never_explains_in_fast_mode():
    _, v = build(lambda b, x, y: b(ops.add, x, y))
    assert Pat(ops.sub).match(v) is None  # not a MatchFailure


def test_pat_requires_opdefs_and_patterns():
    with pytest.raises(TypeError):
        Pat(("add",))
    with pytest.raises(TypeError):
        Pat(ops.add, 3)
    assert repr(Pat(ops.add, "x", Const(0.0))) == "add(x, const(0.0))"
