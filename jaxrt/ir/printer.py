"""MLIR-like text printer. Stable output: golden files compare it byte for byte.

    module @name attributes {arch = "llama"} {
      weight @embed : f32[100, 8]
      func @step(%tokens: i32[T]) -> (f32[T, 8]) {
        %0 = weight @embed : f32[100, 8]
        %1 = llm.embedding(%tokens, %0) : f32[T, 8]
        return %1
      }
    }

Values are named only here: arguments by their name, op results by number.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from .module import Function, Module
from .ops import weight
from .types import DType, TensorType

# Used with fullmatch: "$" would also match before a trailing newline.
_BARE_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def format_symbol(name: str) -> str:
    return "@" + (name if _BARE_SYMBOL.fullmatch(name) else json.dumps(name))


def format_type(t: TensorType) -> str:
    return str(t)


def format_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = repr(float(x))
    return text if any(c in text for c in ".en") else text + ".0"


def format_attr_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_float(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, DType):
        return v.value
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(format_attr_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return format_attr_dict(v)
    raise TypeError(f"cannot print attribute value {v!r}")


def format_attr_dict(attrs: dict) -> str:
    return "{" + ", ".join(f"{_key(k)} = {format_attr_value(v)}" for k, v in attrs.items()) + "}"


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else json.dumps(k)


def print_function(fn: Function, indent: str = "  ") -> str:
    names: dict = {}
    for a, n in zip(fn.args, fn.arg_names):
        names[a] = "%" + n
    args = ", ".join(f"{names[a]}: {format_type(a.type)}" for a in fn.args)
    rets = ", ".join(format_type(v.type) for v in fn.results)
    lines = [f"{indent}func {format_symbol(fn.name)}({args}) -> ({rets}) {{"]
    counter = 0
    body = indent * 2
    for op in fn.ops:
        res = []
        for r in op.results:
            names[r] = f"%{counter}"
            res.append(names[r])
            counter += 1
        lhs = ", ".join(res) + " = " if res else ""
        types = [format_type(r.type) for r in op.results]
        ty = types[0] if len(types) == 1 else "(" + ", ".join(types) + ")"
        if op.opdef is weight:
            lines.append(f"{body}{lhs}weight {format_symbol(op.attrs.name)} : {ty}")
            continue
        operands = ", ".join(names.get(v, "%<undefined>") for v in op.operands)
        attrs = " " + format_attr_dict(dict(op.attrs)) if op.attrs else ""
        lines.append(f"{body}{lhs}{op.opdef.name}({operands}){attrs} : {ty}")
    lines.append(f"{body}return " + ", ".join(names.get(v, "%<undefined>")
                                              for v in fn.results))
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def print_module(m: Module) -> str:
    head = f"module {format_symbol(m.name)}"
    if m.attributes:
        head += " attributes " + format_attr_dict(m.attributes)
    lines = [head + " {"]
    for name, t in m.weights.items():
        line = f"  weight {format_symbol(name)} : {format_type(t)}"
        d = m.weight_defs.get(name)
        if d is not None:
            line += (f" = {d.op}(" + ", ".join(format_symbol(s) for s in d.sources) + ")"
                     + (" " + format_attr_dict(dict(d.attrs)) if d.attrs else ""))
        spec = m.shardings.get(name)
        if spec is not None:
            line += f" sharded {spec}"
        lines.append(line)
    for fn in m.functions.values():
        lines.append(print_function(fn))
    lines.append("}")
    return "\n".join(lines) + "\n"
