"""cse and dce."""
import numpy as np

from jaxrt.ir import Builder, Module, OpDef, ops, verify
from jaxrt.ir.ops._util import infer_same
from jaxrt.passes.cse import EliminateCommonSubexpressions as CSE
from jaxrt.passes.dce import EliminateDeadCode as DCE

from tests.passes.passes_testutil import (assert_same_results, const, function, op_names,
                                          random_inputs, run, t)


T = t(2, 3)
# An op with side effects (no Trait.PURE), not registered: cse and dce must leave it alone.
EFFECT = OpDef("test.effect", 1, traits=frozenset(), infer=infer_same,
               reference=lambda x, *, attrs, out_types: x)


def check_sound(body, passes, args=None):
    m = function(args or {"x": T, "y": T}, body)
    inputs = random_inputs(m, seed=1)
    want = run(m, inputs)
    for p in passes:
        p(m)
    verify(m)
    assert_same_results(want, run(m, inputs), str(m))
    return m


def test_cse_merges_identical_pure_ops_and_rewires_uses():
    m = check_sound(lambda b, x, y: (b(ops.mul, b(ops.add, x, y), y),
                                     b(ops.mul, b(ops.add, x, y), y)), [CSE()])
    fn = m.functions["f"]
    assert op_names(m) == ["add", "mul"]
    assert fn.results[0] is fn.results[1]


def test_cse_commutative_operands_in_either_order():
    m = check_sound(lambda b, x, y: (b(ops.add, x, y), b(ops.add, y, x),
                                     b(ops.sub, x, y), b(ops.sub, y, x)), [CSE()])
    assert op_names(m) == ["add", "sub", "sub"]


def test_cse_respects_attrs_types_and_signed_zero():
    m = check_sound(lambda b, x, y: (
        b(ops.reduce_sum, x, axes=(0,)), b(ops.reduce_sum, x, axes=(1,)),
        const(b, 0.0, T), const(b, 0.0, T), const(b, -0.0, T), const(b, 0.0, t(3)),
        b(ops.transpose, x, perm=(1, 0)), b(ops.transpose, x, perm=(1, 0))), [CSE()])
    assert op_names(m) == ["reduce_sum", "reduce_sum", "constant", "constant", "constant",
                           "transpose"]


def test_cse_merges_weight_references_by_name():
    m = Module("w")
    b = Builder.new_function(m, "f", [("x", t(3, 4))])
    w1 = b.weight("a", t(4, 4))
    w2 = b.weight("a")
    w3 = b.weight("b", t(4, 4))
    b.ret(b(ops.matmul, b.fn.args[0], w1), b(ops.matmul, b.fn.args[0], w2),
          b(ops.matmul, b.fn.args[0], w3))
    CSE()(m)
    verify(m)
    assert [op.attrs.name for op in m.functions["f"].ops if op.opdef is ops.weight] == ["a", "b"]
    assert op_names(m).count("matmul") == 2


def test_cse_collapses_whole_duplicated_subgraphs():
    def body(b, x, y):
        def chain():
            return b(ops.exp, b(ops.neg, b(ops.mul, x, const(b, 2.0, T))))
        return b(ops.add, chain(), chain())

    m = check_sound(body, [CSE()])
    assert op_names(m) == ["constant", "mul", "neg", "exp", "add"]


def test_cse_leaves_effects_alone():
    m = check_sound(lambda b, x, y: (b(EFFECT, x), b(EFFECT, x)), [CSE(), DCE()])
    assert op_names(m) == ["test.effect", "test.effect"]


def test_dce_removes_unused_pure_ops_only():
    def body(b, x, y):
        dead = b(ops.exp, b(ops.neg, x))
        b(ops.add, dead, y)
        b(EFFECT, x)  # unused but effectful: kept
        return b(ops.mul, x, y)

    m = check_sound(body, [DCE()])
    assert op_names(m) == ["test.effect", "mul"]


def test_dce_prunes_weights_only_when_asked():
    m = Module("w")
    b = Builder.new_function(m, "f", [("x", t(3, 4))])
    used = b.weight("used", t(4, 4))
    b.weight("dead_ref", t(4, 4))  # referenced by a dead op only
    m.weights["never"] = t(2)
    b.ret(b(ops.matmul, b.fn.args[0], used))
    DCE()(m)
    assert list(m.weights) == ["used", "dead_ref", "never"]
    from jaxrt.passes.manager import PassManager
    pm = PassManager("dce{prune-weights=true}")
    pm.run(m)
    verify(m)
    assert list(m.weights) == ["used"]
    assert pm.stats.passes[0].counters == {"ops-removed": 0, "weights-pruned": 2}


def test_dce_keeps_everything_returned():
    m = check_sound(lambda b, x, y: (x, b(ops.neg, x)), [DCE()])
    assert op_names(m) == ["neg"]
    assert np.array_equal(run(m, [np.ones((2, 3), np.float32)] * 2)[0], np.ones((2, 3)))
