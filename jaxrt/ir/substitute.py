"""Whole-module type substitutions: bind symbolic dims, change the float compute dtype.

Both rebuild every op through `make_op`, so result types are re-inferred and the new
module verifies by construction; the input module is left untouched.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

from .module import Function, Module, Op, Value, make_op
from .opdef import VerifyError
from .ops import convert, iota, weight
from .types import DType, TensorType, substitute_dims

AttrsFn = Callable[[Op], Mapping]  # op -> its attributes in the new module


def rebuild(module: Module, *, weight_type: Callable[[str, TensorType], TensorType],
            arg_type: Callable[[Value], TensorType], attrs_of: AttrsFn,
            given_type: Callable[[Op, TensorType], TensorType],
            fix_operands: Callable[[Op, list[Value], "list[Op]"], list[Value]] | None = None
            ) -> Module:
    """A copy of `module` with new weight/argument types, every op rebuilt by `make_op`.

    weight_type(name, type) and arg_type(arg) give the new types; attrs_of(op) the op's
    new attributes; given_type(op, type) the result types of ops without inference
    (constant, iota; weights take their table type). If an op no longer type-checks,
    fix_operands(op, operands, ops_so_far) may append ops and return new operands.
    """
    new = Module(module.name, weights={n: weight_type(n, t) for n, t in module.weights.items()},
                 attributes=copy.deepcopy(module.attributes))
    for fn in module.functions.values():
        args = [Value(arg_type(a), None, i, hint=a.hint) for i, a in enumerate(fn.args)]
        env: dict[Value, Value] = dict(zip(fn.args, args))
        ops: list[Op] = []
        for op in fn.ops:
            operands = [env[v] for v in op.operands]
            attrs = op.opdef.make_attrs(dict(attrs_of(op)))
            if op.opdef is weight:
                result_types = [new.weights[op.attrs.name]]
            elif op.opdef.infer is None:
                result_types = [given_type(op, r.type) for r in op.results]
            else:
                result_types = None
            try:
                new_op = make_op(op.opdef, operands, attrs, result_types)
            except VerifyError:
                if fix_operands is None:
                    raise
                operands = fix_operands(op, operands, ops)
                new_op = make_op(op.opdef, operands, attrs, result_types)
            ops.append(new_op)
            env.update(zip(op.results, new_op.results))
        new.add_function(Function(fn.name, args, ops, [env[v] for v in fn.results]))
    return new


def bind_dims(module: Module, bindings: Mapping[str, int]) -> Module:
    """A copy of `module` with the named symbolic dims replaced by sizes everywhere.

    Dims appear in value types and in `shape` attributes (reshape, broadcast); other
    symbolic dims stay symbolic.
    """
    bindings = dict(bindings)
    for k, n in bindings.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"dim {k!r} must bind to a non-negative int, got {n!r}")

    def sub(t: TensorType) -> TensorType:
        return substitute_dims(t, bindings)

    def attrs_of(op: Op) -> Mapping:
        shape = op.attrs.get("shape")
        if isinstance(shape, tuple):
            return op.attrs.replace(
                shape=tuple(bindings.get(d, d) if isinstance(d, str) else d for d in shape))
        return op.attrs

    return rebuild(module, weight_type=lambda n, t: sub(t), arg_type=lambda a: sub(a.type),
                    attrs_of=attrs_of, given_type=lambda op, t: sub(t))


def set_float_dtype(module: Module, dtype: DType, *, keep_f32: Iterable[str] = ()) -> Module:
    """A copy of `module` computing in `dtype` wherever it computed in f32.

    Every f32 weight, argument, constant and `convert {dtype = f32}` becomes `dtype`;
    other results follow by type inference, so ops that always produce f32 (llm.logits)
    keep doing so. `keep_f32` names arguments and weights that stay f32 (e.g. "kv" for a
    full-precision cache). An f32 value that reaches an op needing `dtype` operands (a
    kept weight, an f32 iota) gets a `convert` in front of that op; ops that accept mixed
    dtypes (kv.update, llm.paged_attention on an f32 cache) take it as is.
    """
    if not dtype.is_float:
        raise ValueError(f"compute dtype must be a float type, got {dtype.value}")
    keep = frozenset(keep_f32)

    def retype(t: TensorType) -> TensorType:
        return t.with_dtype(dtype) if t.dtype == DType.f32 else t

    def attrs_of(op: Op) -> Mapping:
        if op.opdef is convert and op.attrs.dtype == DType.f32:
            return op.attrs.replace(dtype=dtype)
        return op.attrs

    def fix_operands(op: Op, operands: list[Value], ops: list[Op]) -> list[Value]:
        fixed = []
        for v in operands:
            if v.dtype == DType.f32 and dtype != DType.f32:
                cvt = make_op(convert, [v], {"dtype": dtype})
                ops.append(cvt)
                v = cvt.result
            fixed.append(v)
        return fixed

    new = rebuild(
        module,
        weight_type=lambda n, t: t if n in keep else retype(t),
        arg_type=lambda a: a.type if a.hint in keep else retype(a.type),
        attrs_of=attrs_of,
        given_type=lambda op, t: t if op.opdef is iota else retype(t),  # iota: i32/f32 only
        fix_operands=fix_operands)
    new.attributes["float_dtype"] = dtype.value
    return new


_rebuild = rebuild  # the name passes/plan_kv_cache.py imports

__all__ = ["bind_dims", "rebuild", "set_float_dtype"]
