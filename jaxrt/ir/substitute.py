"""Whole-module type substitutions: bind symbolic dims, change the float compute dtype.

Both rebuild every op through `make_op`, so result types are re-inferred and the new
module verifies by construction; the input module is left untouched.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

from .module import Function, Module, Op, Value, make_op
from .opdef import VerifyError
from .ops import convert, dequantize, iota, quantize, quantized_linear, weight
from .types import DType, TensorType, substitute_dims
from .weights import prune_weights

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
                 weight_defs=dict(module.weight_defs),
                 attributes=copy.deepcopy(module.attributes),
                 shardings=dict(module.shardings))
    for fn in module.functions.values():
        args = [Value(arg_type(a), None, i, hint=a.hint) for i, a in enumerate(fn.args)]
        env: dict[Value, Value] = dict(zip(fn.args, args))
        ops: list[Op] = []
        for op in fn.ops:
            operands = [env[v] for v in op.operands]
            attrs = op.opdef.make_attrs(dict(attrs_of(op)))
            if op.opdef is weight:
                result_types = [new.weights[attrs.name]]
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
    if not dtype.is_float or dtype.itemsize == 1:
        raise ValueError(f"compute dtype must be f32, bf16 or f16, got {dtype.value} "
                         f"(8-bit and integer types need scales: quantization)")
    if any(op.opdef in (quantized_linear, quantize, dequantize)
           for fn in module.functions.values() for op in fn.ops):
        raise ValueError(f"module @{module.name} is quantized: change the float dtype "
                         f"before quantizing (its scales stay f32), not after")
    keep = frozenset(keep_f32)
    # A shallow copy whose weight table gains the cast definitions; `module` is untouched.
    module = Module(module.name, module.functions, dict(module.weights),
                    dict(module.weight_defs), module.attributes, dict(module.shardings))
    renamed = _cast_weights(module, dtype, keep) if dtype != DType.f32 else {}

    def retype(t: TensorType) -> TensorType:
        return t.with_dtype(dtype) if t.dtype == DType.f32 else t

    def attrs_of(op: Op) -> Mapping:
        if op.opdef is convert and op.attrs.dtype == DType.f32:
            return op.attrs.replace(dtype=dtype)
        if op.opdef is weight and op.attrs.name in renamed:
            return op.attrs.replace(name=renamed[op.attrs.name])
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
        weight_type=lambda n, t: t,  # new types come from the cast definitions
        arg_type=lambda a: a.type if a.hint in keep else retype(a.type),
        attrs_of=attrs_of,
        given_type=lambda op, t: t if op.opdef is iota else retype(t),  # iota: i32/f32 only
        fix_operands=fix_operands)
    new.attributes["float_dtype"] = dtype.value
    prune_weights(new)
    return new


def _cast_weights(module: Module, dtype: DType, keep: frozenset) -> dict[str, str]:
    """Define a `dtype` copy of every f32 weight the functions read (in place); returns
    old name -> new name. A stack or concat is rebuilt from cast parts, so the host never
    holds the whole f32 stack next to its cast."""
    from .weights import WeightDef, infer_def
    suffix = "." + dtype.value
    made: dict[str, str] = {}

    def cast(name: str) -> str:
        if name in made:
            return made[name]
        d = module.weight_defs.get(name)
        new = name + suffix
        while new in module.weights:
            new += suffix
        if d is not None and d.op in ("stack", "concat", "slice", "transpose"):
            nd = WeightDef(d.op, tuple(cast(s) for s in d.sources), d.attrs)
        else:
            nd = WeightDef("cast", (name,), (("dtype", dtype),))
        module.weights[new] = infer_def(nd, [module.weights[s] for s in nd.sources])
        module.weight_defs[new] = nd
        made[name] = new
        return new

    used = [op.attrs.name for fn in module.functions.values() for op in fn.ops
            if op.opdef is weight]
    return {n: cast(n) for n in dict.fromkeys(used)
            if n not in keep and module.weights[n].dtype == DType.f32}


_rebuild = rebuild  # the name passes/plan_kv_cache.py imports

__all__ = ["bind_dims", "rebuild", "set_float_dtype"]
