"""Every canonicalize rule: a positive case and a near miss that must not fire it.

Each case builds a small function, runs canonicalize, and checks (1) whether the named rule
rewrote, (2) the ops left, (3) the verifier, and (4) that the reference interpreter gives
the same results before and after on inputs that include NaN, inf and signed zeros.
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from jaxrt.ir import DType, ops, verify
from jaxrt.passes.canonicalize import RULES, Canonicalize
from jaxrt.passes.manager import PassManager

from tests.passes.passes_testutil import (BF16, F32, I32, assert_same_results, const, function,
                                          op_names, random_inputs, run, t)


F = t(2, 3)
I = t(2, 3, dtype=I32)
XY = {"x": F, "y": F}


@dataclass
class Case:
    rule: str
    fires: bool
    body: Callable
    after: list[str]  # op names left after canonicalize
    args: dict = field(default_factory=lambda: dict(XY))
    options: dict = field(default_factory=dict)
    id: str = ""

    def __post_init__(self):
        self.args = {**XY, **self.args}  # bodies take (b, x, y)


def c(b, value, type=F):
    return const(b, value, type)


CASES = [
    # add(x, -0.0) -> x
    Case("add-zero", True, lambda b, x, y: b(ops.add, x, c(b, -0.0)), [], id="add-neg-zero"),
    Case("add-zero", True, lambda b, x, y: b(ops.add, c(b, -0.0), x), [], id="zero-on-left"),
    Case("add-zero", True, lambda b, x, y: b(ops.add, x, c(b, 0.0, I)), [],
         args={"x": I, "y": I}, id="int-zero"),
    Case("add-zero", False, lambda b, x, y: b(ops.add, x, c(b, 1e-30)), ["constant", "add"],
         id="tiny-not-zero"),
    Case("add-zero", False, lambda b, x, y: b(ops.add, x, c(b, 0.0)), ["constant", "add"],
         id="positive-zero-keeps-signed-zeros"),
    Case("add-zero", False, lambda b, x, y: b(ops.add, x, c(b, -0.0)), ["constant", "add"],
         args={"x": t(3), "y": F}, id="zero-broadcasts-x"),
    # add(x, +0.0) -> x under no-signed-zeros
    Case("add-zero-nsz", True, lambda b, x, y: b(ops.add, x, c(b, 0.0)), [],
         options={"no_signed_zeros": True}, id="nsz"),
    Case("add-zero-nsz", False, lambda b, x, y: b(ops.add, x, c(b, 0.0)), ["constant", "add"],
         id="default-options"),
    # sub(x, +0.0) -> x
    Case("sub-zero", True, lambda b, x, y: b(ops.sub, x, c(b, 0.0)), [], id="sub-zero"),
    Case("sub-zero", False, lambda b, x, y: b(ops.sub, c(b, 0.0), x), ["constant", "sub"],
         id="zero-minus-x"),
    Case("sub-zero", False, lambda b, x, y: b(ops.sub, x, c(b, -0.0)), ["constant", "sub"],
         id="minus-neg-zero"),
    # sub(x, -0.0) -> x under no-signed-zeros
    Case("sub-zero-nsz", True, lambda b, x, y: b(ops.sub, x, c(b, -0.0)), [],
         options={"no_signed_zeros": True}, id="nsz"),
    Case("sub-zero-nsz", False, lambda b, x, y: b(ops.sub, x, c(b, 1.0)), ["constant", "sub"],
         options={"no_signed_zeros": True}, id="not-zero"),
    # mul(x, 1) -> x
    Case("mul-one", True, lambda b, x, y: b(ops.mul, c(b, 1.0), x), [], id="one"),
    Case("mul-one", False, lambda b, x, y: b(ops.mul, x, c(b, 1.0000001)), ["constant", "mul"],
         id="almost-one"),
    # div(x, 1) -> x
    Case("div-one", True, lambda b, x, y: b(ops.div, x, c(b, 1.0)), [], id="one"),
    Case("div-one", False, lambda b, x, y: b(ops.div, c(b, 1.0), x), ["constant", "div"],
         id="reciprocal"),
    # mul(x, 0) -> 0 for integers
    Case("mul-zero-int", True, lambda b, x, y: b(ops.mul, x, c(b, 0.0, I)), ["constant"],
         args={"x": I, "y": I}, id="int"),
    Case("mul-zero-int", False, lambda b, x, y: b(ops.mul, x, c(b, 0.0)), ["constant", "mul"],
         id="float-nan-inf"),
    # sub(x, x) -> 0 for integers
    Case("sub-self-int", True, lambda b, x, y: b(ops.sub, x, x), ["constant"],
         args={"x": I, "y": I}, id="int"),
    Case("sub-self-int", False, lambda b, x, y: b(ops.sub, x, x), ["sub"], id="float-inf"),
    Case("sub-self-int", False, lambda b, x, y: b(ops.sub, x, y), ["sub"],
         args={"x": I, "y": I}, id="different"),
    # neg(neg(x)) -> x
    Case("neg-neg", True, lambda b, x, y: b(ops.neg, b(ops.neg, x)), [], id="twice"),
    Case("neg-neg", False, lambda b, x, y: b(ops.neg, b(ops.exp, b(ops.neg, x))),
         ["neg", "exp", "neg"], id="not-adjacent"),
    # max(x, x) -> x; min(x, x) -> x
    Case("max-min-self", True, lambda b, x, y: b(ops.maximum, x, x), [], id="max"),
    Case("max-min-self", True, lambda b, x, y: b(ops.minimum, x, x), [], id="min"),
    Case("max-min-self", False, lambda b, x, y: b(ops.maximum, x, y), ["max"], id="different"),
    # select(p, x, x) -> x
    Case("select-same", True,
         lambda b, x, y: b(ops.select, b(ops.compare, x, y, direction="lt"), x, x), [],
         id="same"),
    Case("select-same", False,
         lambda b, x, y: b(ops.select, b(ops.compare, x, y, direction="lt"), x, y),
         ["compare", "select"], id="different"),
    # select(true, x, y) -> x; select(false, x, y) -> y
    Case("select-constant", True,
         lambda b, x, y: b(ops.select, c(b, 0.0, t(2, 3, dtype=DType.bool_)), x, y), [],
         id="false"),
    Case("select-constant", False,
         lambda b, x, y: b(ops.select, c(b, [1, 0, 1, 0, 1, 0], t(2, 3, dtype=DType.bool_)),
                           x, y), ["constant", "select"], id="mixed-mask"),
    Case("select-constant", False,
         lambda b, x, y: b(ops.select, c(b, 1.0, t(2, 3, dtype=DType.bool_)), x, y),
         ["constant", "select"], args={"x": t(3), "y": F}, id="x-broadcasts"),
    # transpose(transpose(x, p), q) -> transpose(x, p[q]) or x
    Case("transpose-transpose", True,
         lambda b, x, y: b(ops.transpose, b(ops.transpose, x, perm=(1, 0)), perm=(1, 0)), [],
         id="identity"),
    Case("transpose-transpose", True,
         lambda b, x, y: b(ops.transpose, b(ops.transpose, x, perm=(1, 2, 0)), perm=(1, 2, 0)),
         ["transpose"], args={"x": t(2, 3, 4)}, id="composed"),
    Case("transpose-transpose", False,
         lambda b, x, y: b(ops.transpose, b(ops.neg, b(ops.transpose, x, perm=(1, 0))),
                           perm=(1, 0)), ["transpose", "neg", "transpose"], id="not-adjacent"),
    # transpose(x, identity) -> x
    Case("transpose-identity", True, lambda b, x, y: b(ops.transpose, x, perm=(0, 1)), [],
         id="identity"),
    Case("transpose-identity", False, lambda b, x, y: b(ops.transpose, x, perm=(1, 0)),
         ["transpose"], args={"x": t(3, 3)}, id="square-swap-keeps-type"),
    # reshape(x, shape(x)) -> x
    Case("reshape-identity", True, lambda b, x, y: b(ops.reshape, x, shape=(2, 3)), [],
         id="same-shape"),
    Case("reshape-identity", False, lambda b, x, y: b(ops.reshape, x, shape=(3, 2)),
         ["reshape"], id="other-shape"),
    # reshape(reshape(x, s1), s2) -> reshape(x, s2)
    Case("reshape-reshape", True,
         lambda b, x, y: b(ops.reshape, b(ops.reshape, x, shape=(6,)), shape=(3, 2)),
         ["reshape"], id="chain"),
    Case("reshape-reshape", True,
         lambda b, x, y: b(ops.reshape, b(ops.reshape, x, shape=(2, "T")), shape=("T", 1, 2)),
         ["reshape"], args={"x": t("T", 2)}, id="symbolic"),
    Case("reshape-reshape", False,
         lambda b, x, y: b(ops.reshape, b(ops.neg, b(ops.reshape, x, shape=(6,))), shape=(3, 2)),
         ["reshape", "neg", "reshape"], id="not-adjacent"),
    # broadcast(x, shape(x)) -> x
    Case("broadcast-identity", True, lambda b, x, y: b(ops.broadcast, x, shape=(2, 3)), [],
         id="same-shape"),
    Case("broadcast-identity", False, lambda b, x, y: b(ops.broadcast, x, shape=(2, 3)),
         ["broadcast"], args={"x": t(3)}, id="real-broadcast"),
    # convert(x, dtype(x)) -> x
    Case("convert-identity", True, lambda b, x, y: b(ops.convert, x, dtype=DType.f32), [],
         id="same-dtype"),
    Case("convert-identity", False, lambda b, x, y: b(ops.convert, x, dtype=BF16), ["convert"],
         id="narrowing"),
    # convert(convert(x, b), c) -> convert(x, c) when x converts to b exactly
    Case("convert-convert", True,
         lambda b, x, y: b(ops.convert, b(ops.convert, x, dtype=F32), dtype=DType.f16),
         ["convert"], args={"x": t(2, 3, dtype=BF16)}, id="via-f32"),
    Case("convert-convert", True,
         lambda b, x, y: b(ops.convert, b(ops.convert, x, dtype=F32), dtype=BF16), [],
         args={"x": t(2, 3, dtype=BF16)}, id="round-trip"),
    Case("convert-convert", True,
         lambda b, x, y: b(ops.convert, b(ops.convert, x, dtype=I32), dtype=F32), ["convert"],
         args={"x": t(2, 3, dtype=DType.int8)}, id="int8-widening"),
    Case("convert-convert", False,
         lambda b, x, y: b(ops.convert, b(ops.convert, x, dtype=BF16), dtype=F32),
         ["convert", "convert"], id="lossy-round-trip"),
    Case("convert-convert", False,
         lambda b, x, y: b(ops.convert, b(ops.convert, x, dtype=F32), dtype=I32),
         ["convert", "convert"], args={"x": I}, id="int32-through-f32"),
    # slice covering all of x -> x
    Case("slice-identity", True,
         lambda b, x, y: b(ops.slice_, x, axis=1, start=0, limit=3), [], id="full"),
    Case("slice-identity", False,
         lambda b, x, y: b(ops.slice_, x, axis=1, start=0, limit=3, stride=2), ["slice"],
         id="strided"),
    # concat(x) -> x
    Case("concat-single", True, lambda b, x, y: b(ops.concat, x, axis=0), [], id="single"),
    Case("concat-single", False, lambda b, x, y: b(ops.concat, x, y, axis=0), ["concat"],
         id="two"),
    # broadcast/reshape/transpose(splat) -> splat
    Case("reshape-splat", True,
         lambda b, x, y: b(ops.add, x, b(ops.broadcast, c(b, 2.0, t(3)), shape=(2, 3))),
         ["constant", "add"], id="broadcast"),
    Case("reshape-splat", True,
         lambda b, x, y: b(ops.add, x, b(ops.transpose, c(b, 2.0, t(3, 2)), perm=(1, 0))),
         ["constant", "add"], id="transpose"),
    Case("reshape-splat", False,
         lambda b, x, y: b(ops.add, x, b(ops.broadcast, c(b, [1, 2, 3], t(3)), shape=(2, 3))),
         ["constant", "add"], id="dense-is-folded-instead"),
    Case("reshape-splat", False,
         lambda b, x, y: b(ops.add, x, b(ops.broadcast, y, shape=(2, 3))),
         ["broadcast", "add"], args={"x": F, "y": t(3)}, id="not-constant"),
    # op(constants...) -> constant
    Case("fold-constants", True,
         lambda b, x, y: b(ops.add, x, b(ops.add, c(b, 1.5), c(b, 2.0))),
         ["constant", "add"], id="splats"),
    Case("fold-constants", True,
         lambda b, x, y: b(ops.mul, c(b, [1, 2, 3, 4, 5, 6]), c(b, [2, 2, 2, 0.5, 0.5, 0.5])),
         ["constant"], id="dense"),
    Case("fold-constants", True,
         lambda b, x, y: b(ops.exp, c(b, 0.5, t(256, 256))), ["constant"],
         id="elementwise-splat-above-limit"),
    Case("fold-constants", True,
         lambda b, x, y: b(ops.select, b(ops.compare, c(b, 1.0), c(b, 2.0), direction="lt"),
                           x, y), [], id="compare-then-select"),
    Case("fold-constants", True,
         lambda b, x, y: b(ops.reduce_sum, c(b, [1, 2, 3, 4, 5, 6]), axes=(1,)), ["constant"],
         id="reduction"),
    Case("fold-constants", False, lambda b, x, y: b(ops.neg, c(b, np.arange(4097.0), t(4097))),
         ["constant", "neg"], id="dense-above-limit"),
    Case("fold-constants", False, lambda b, x, y: b(ops.neg, c(b, [1, 2, 3, 4, 5, 6])),
         ["constant", "neg"], options={"fold_limit": 4}, id="fold-limit-option"),
    Case("fold-constants", False, lambda b, x, y: b(ops.add, c(b, 2.0), x),
         ["constant", "add"], id="not-all-constant"),
    # op(c, x) -> op(x, c) for commutative ops
    Case("constant-to-right", True, lambda b, x, y: b(ops.add, c(b, 2.0), x),
         ["constant", "add"], id="add"),
    Case("constant-to-right", True, lambda b, x, y: b(ops.maximum, c(b, 2.0), x),
         ["constant", "max"], id="max"),
    Case("constant-to-right", False, lambda b, x, y: b(ops.sub, c(b, 2.0), x),
         ["constant", "sub"], id="not-commutative"),
    Case("constant-to-right", False, lambda b, x, y: b(ops.add, x, c(b, 2.0)),
         ["constant", "add"], id="already-right"),
]


def canonicalize(m, **options):
    pm = PassManager([Canonicalize(**options)])
    pm.run(m)
    return pm.stats.passes[0].rules


@pytest.mark.parametrize("case", CASES, ids=[
    f"{c.rule}-{'fires' if c.fires else 'near-miss'}-{c.id}" for c in CASES])
def test_rule(case):
    m = function(case.args, case.body)
    if not all(a.type.is_static for a in m.functions["f"].args):
        inputs = None
    else:
        inputs = random_inputs(m, seed=0)
        want = run(m, inputs)
    stats = canonicalize(m, **case.options)
    verify(m)
    rewrites = stats[case.rule].rewrites
    assert (rewrites > 0) == case.fires, stats.table()
    assert op_names(m) == case.after, str(m)
    if inputs is not None:
        assert_same_results(want, run(m, inputs), str(m))


def test_every_rule_has_a_positive_and_a_near_miss():
    for rule in RULES:
        kinds = {c.fires for c in CASES if c.rule == rule.name}
        missing = {True: "positive", False: "near-miss"}
        assert kinds == {True, False}, \
            f"rule {rule.name} lacks a {missing[({True, False} - kinds).pop()]} case"


def results_op(m):
    return m.functions["f"].ops


def test_composed_transpose_perm():
    m = function({"x": t(2, 3, 4)}, lambda b, x: b(ops.transpose, b(ops.transpose, x,
                                                                   perm=(1, 2, 0)),
                                                 perm=(1, 2, 0)))
    canonicalize(m)
    (op,) = results_op(m)
    assert op.attrs.perm == (2, 0, 1) and op.results[0].type == t(4, 2, 3)


def test_folded_values():
    m = function({"x": F}, lambda b, x: (b(ops.add, c(b, 1.5), c(b, 2.0)),
                                         b(ops.add, c(b, [1, 2, 3, 4, 5, 6]),
                                           c(b, [6, 5, 4, 3, 2, 1])),
                                         b(ops.mul, c(b, [1, 2, 3, 4, 5, 6]), c(b, 2.0)),
                                         b(ops.add, c(b, 3.0, I), c(b, 4.0, I))))
    canonicalize(m)
    values = [op.attrs.value for op in results_op(m)]
    assert values == [3.5, 7.0, (2.0, 4.0, 6.0, 8.0, 10.0, 12.0), 7.0]  # all-equal -> splat


def test_constant_moves_right():
    m = function({"x": F}, lambda b, x: b(ops.mul, c(b, 3.0), x))
    canonicalize(m)
    fn = m.functions["f"]
    assert fn.ops[-1].operands[0] is fn.args[0]


def test_mul_x_x_is_left_alone():
    m = function({"x": F}, lambda b, x: b(ops.mul, x, x))
    stats = canonicalize(m)
    assert stats.steps == 0 and op_names(m) == ["mul"]


def test_signed_zero_semantics_are_kept_by_default():
    # 1 / (x + 0.0) at x = -0.0 is +inf; folding x + 0.0 -> x would make it -inf
    def body(b, x):
        return b(ops.div, c(b, 1.0, t(1)), b(ops.add, x, c(b, 0.0, t(1))))

    x = np.array([-0.0], np.float32)
    m = function({"x": t(1)}, body)
    canonicalize(m)
    assert run(m, [x])[0][0] == np.inf
    m = function({"x": t(1)}, body)
    canonicalize(m, no_signed_zeros=True)  # the documented difference of the option
    assert run(m, [x])[0][0] == -np.inf
