"""Hypothesis strategy: small elementwise/shape-op graphs full of canonicalization chances.

Graphs start from two arguments x, y of one type and grow by steps that each add a few ops:
binary ops against constants 0/-0/1/-1/2/0.5 (splat, broadcast or dense, on either side),
self-applications (x - x, max(x, x)), negation pairs, nested transposes and reshapes
(often undoing each other), convert chains, broadcasts, slices, selects and ops on
constants only. Every op applies to a value drawn from the pool built so far.

Division only divides by nonzero constants or integers: 1 / (±0) exposes the sign of zero,
which the max/min references do not keep commutative (np.maximum(-0.0, 0.0) is its second
operand), so swapping the operands of those COMMUTATIVE ops, as canonicalize and cse may,
would flip an inf. Signed zeros themselves are still drawn, as inputs and constants.
"""
from __future__ import annotations

import itertools

import numpy as np
from hypothesis import strategies as st

from jaxrt.ir import Builder, DType, Module, TensorType, ops

F32, BF16, F16, I32 = DType.f32, DType.bf16, DType.f16, DType.int32
SHAPES = [(4,), (2, 3), (2, 1, 3)]
CONSTANTS = [0.0, -0.0, 1.0, -1.0, 2.0, 0.5]
NONZERO = [1.0, -1.0, 2.0, 0.5]


def _reshapes(n: int) -> list[tuple[int, ...]]:
    return sorted({s for r in (1, 2, 3) for s in itertools.product(range(1, n + 1), repeat=r)
                   if int(np.prod(s)) == n})


RESHAPES = {n: _reshapes(n) for n in (1, 2, 3, 4, 6, 8, 12, 16, 24)}


class _Graph:
    def __init__(self, draw, dtype: DType, shape: tuple[int, ...]):
        self.draw = draw
        self.m = Module("random")
        t = TensorType(shape, dtype)
        self.b = Builder.new_function(self.m, "f", [("x", t), ("y", t)])
        self.pool = list(self.b.fn.args)

    def pick(self, pred=lambda v: True):
        choices = [v for v in self.pool if pred(v)]
        return self.draw(st.sampled_from(choices)) if choices else None

    def constant(self, t: TensorType, values=CONSTANTS):
        """A constant that broadcasts to t: splat of t, of its last dim, of [1], or dense."""
        if t.dtype.is_int:
            values = [v for v in values if float(v).is_integer()]
        kind = self.draw(st.sampled_from(["splat", "row", "one", "dense"]))
        if kind == "dense":
            vals = self.draw(st.lists(st.sampled_from(values), min_size=t.num_elements(),
                                      max_size=t.num_elements()))
            return self.b(ops.constant, value=tuple(vals), result_types=[t])
        shape = {"splat": t.shape, "row": t.shape[-1:], "one": (1,)}[kind]
        value = self.draw(st.sampled_from(values))
        return self.b(ops.constant, value=value, result_types=[t.with_shape(shape)])

    def step(self, kind: str):
        b, draw = self.b, self.draw
        a = self.pick()
        t = a.type
        if kind == "binary":
            opdef = draw(st.sampled_from([ops.add, ops.sub, ops.mul, ops.maximum, ops.minimum]))
            other = self.pick(lambda v: v.type == t) if draw(st.booleans()) else None
            other = other if other is not None else self.constant(t)
            return b(opdef, *((a, other) if draw(st.booleans()) else (other, a)))
        if kind == "divide":
            if t.dtype.is_int:
                return b(ops.div, a, self.pick(lambda v: v.type == t))
            return b(ops.div, a, self.constant(t, NONZERO))
        if kind == "self":
            opdef = draw(st.sampled_from([ops.add, ops.sub, ops.mul, ops.maximum, ops.minimum]))
            return b(opdef, a, a)
        if kind == "neg":
            return b(ops.neg, b(ops.neg, a) if draw(st.booleans()) else a)
        if kind == "unary" and t.dtype.is_float:
            return b(draw(st.sampled_from([ops.exp, ops.tanh])), a)
        if kind == "transpose":
            p = tuple(draw(st.permutations(range(t.rank))))
            y = b(ops.transpose, a, perm=p)
            if draw(st.booleans()):
                q = tuple(int(i) for i in np.argsort(p)) if draw(st.booleans()) else \
                    tuple(draw(st.permutations(range(t.rank))))
                y = b(ops.transpose, y, perm=q)
            return y
        if kind == "reshape":
            y = b(ops.reshape, a, shape=draw(st.sampled_from(RESHAPES[t.num_elements()])))
            if draw(st.booleans()):
                back = t.shape if draw(st.booleans()) else \
                    draw(st.sampled_from(RESHAPES[t.num_elements()]))
                y = b(ops.reshape, y, shape=back)
            return y
        if kind == "convert":
            for _ in range(draw(st.integers(1, 3))):
                a = b(ops.convert, a, dtype=draw(st.sampled_from([F32, BF16, F16, I32])))
            return a
        if kind == "broadcast":
            shape = draw(st.sampled_from([t.shape, (2,) + t.shape])) if t.num_elements() <= 12 \
                else t.shape
            return b(ops.broadcast, a, shape=shape)
        if kind == "slice":
            axis = draw(st.integers(0, t.rank - 1))
            d = t.shape[axis]
            start = draw(st.integers(0, d - 1))
            return b(ops.slice_, a, axis=axis, start=start, limit=d,
                     stride=draw(st.integers(1, 2)))
        if kind == "select":
            other = self.pick(lambda v: v.type == t) or self.constant(t)
            pred = b(ops.compare, a, other, direction=draw(st.sampled_from(["lt", "eq"])))
            if draw(st.booleans()):
                pred = b(ops.compare, self.constant(t), self.constant(t), direction="ge")
            return b(ops.select, pred, a, other if draw(st.booleans()) else a)
        if kind == "constants":
            opdef = draw(st.sampled_from([ops.add, ops.mul, ops.sub, ops.maximum]))
            folded = b(opdef, self.constant(t), self.constant(t))
            return b(ops.add, a, folded)
        if kind == "constant":  # a constant in the pool: shape ops and folding apply to it
            return self.constant(t)
        if kind == "concat":
            return b(ops.concat, *([a] * draw(st.integers(1, 2))), axis=0)
        return None


KINDS = ["binary", "divide", "self", "neg", "unary", "transpose", "reshape", "convert",
         "broadcast", "slice", "select", "constants", "constant", "concat"]


@st.composite
def canonicalize_graphs(draw, max_steps: int = 8) -> Module:
    """A module with one function @f(x, y) returning one or two values of the graph."""
    g = _Graph(draw, draw(st.sampled_from([F32, F32, BF16, I32])), draw(st.sampled_from(SHAPES)))
    for _ in range(draw(st.integers(1, max_steps))):
        v = g.step(draw(st.sampled_from(KINDS)))
        if v is not None:
            g.pool.append(v)
    results = [g.pool[-1]]
    if len(g.pool) > 3 and draw(st.booleans()):
        results.append(g.pick())
    g.b.ret(*results)
    return g.m
