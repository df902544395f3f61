"""cse: merge pure ops that compute the same thing.

Two ops are the same when they have the same OpDef, operands (in either order for
commutative ops), attributes and result types. Weight references are `weight` ops keyed by
name, so two references to one weight merge too. One forward walk: operands are merged
before their users are keyed, so whole duplicated subgraphs collapse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from jaxrt.ir.module import Function, Module, Op, Value
from jaxrt.ir.opdef import Trait

from .manager import Pass, PassContext, register_pass


def _attr_key(x):
    """Attribute values as a key where -0.0 and 0.0 differ (they compare equal in Python)."""
    if isinstance(x, float):
        return (x, math.copysign(1.0, x)) if x == 0.0 else x
    if isinstance(x, tuple):
        return tuple(_attr_key(y) for y in x)
    return x


def _op_key(op: Op) -> tuple:
    operands = tuple(id(v) for v in op.operands)
    if op.opdef.has(Trait.COMMUTATIVE):
        operands = tuple(sorted(operands))
    attrs = tuple((k, _attr_key(v)) for k, v in op.attrs.items())
    return (op.opdef, operands, attrs, tuple(r.type for r in op.results))


def eliminate_common_subexpressions(fn: Function) -> int:
    """Merge duplicate pure ops of `fn` in place; returns how many ops were removed."""
    seen: dict[tuple, Op] = {}
    replace: dict[Value, Value] = {}
    kept: list[Op] = []
    removed = 0
    for op in fn.ops:
        if replace and any(v in replace for v in op.operands):
            op.operands = [replace.get(v, v) for v in op.operands]
        if not op.opdef.has(Trait.PURE):
            kept.append(op)
            continue
        key = _op_key(op)
        first = seen.get(key)
        if first is None:
            seen[key] = op
            kept.append(op)
        else:
            replace.update(zip(op.results, first.results))
            removed += 1
    if removed:
        fn.results = [replace.get(v, v) for v in fn.results]
        fn.set_ops(kept)
    return removed


@register_pass
@dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    """Merge duplicate pure ops (and duplicate weight references)."""

    name = "cse"

    def run(self, module: Module, ctx: PassContext) -> None:
        ctx.count("ops-merged", 0)
        for fn in module.functions.values():
            ctx.count("ops-merged", eliminate_common_subexpressions(fn))
