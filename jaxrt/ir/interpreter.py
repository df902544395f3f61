"""Reference interpreter: runs a Function on numpy arrays with each op's reference."""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .module import Function, Module, Op
from .ops import scan, weight
from .types import TensorType, substitute_dims


def bind_dims(fn: Function, inputs: list[np.ndarray]) -> dict[str, int]:
    """Symbolic dim -> size, read off the argument arrays."""
    bindings: dict[str, int] = {}
    for a, x in zip(fn.args, inputs):
        if a.type.rank != np.ndim(x):
            raise ValueError(f"argument %{a.hint}: rank {np.ndim(x)} != {a.type}")
        for d, n in zip(a.type.shape, np.shape(x)):
            if isinstance(d, str):
                if bindings.setdefault(d, n) != n:
                    raise ValueError(f"dim {d} bound to {bindings[d]} and {n}")
            elif d != n:
                raise ValueError(f"argument %{a.hint}: shape {np.shape(x)} != {a.type}")
    return bindings


def run_function(fn: Function, inputs: list[np.ndarray],
                 weights: Mapping[str, np.ndarray] | None = None,
                 module: Module | None = None,
                 observe: Callable[[Op, list[np.ndarray]], None] | None = None
                 ) -> list[np.ndarray]:
    """Run `fn` on numpy inputs; `module` supplies the bodies of scan ops. `observe(op,
    operand values)` is called before each op runs (calibration reads linear inputs)."""
    if len(inputs) != len(fn.args):
        raise ValueError(f"@{fn.name} takes {len(fn.args)} arguments, got {len(inputs)}")
    bindings = bind_dims(fn, inputs)
    env = {a: np.asarray(x) for a, x in zip(fn.args, inputs)}
    for op in fn.ops:
        out_types = [substitute_dims(r.type, bindings) for r in op.results]
        if observe is not None:
            observe(op, [env[v] for v in op.operands])
        if op.opdef is weight:
            outs = [np.asarray((weights or {})[op.attrs.name])]
        elif op.opdef is scan:
            outs = _run_scan(op, [env[v] for v in op.operands], weights, module, observe)
        else:
            if op.opdef.reference is None:
                raise NotImplementedError(f"{op.opdef.name} has no reference semantics")
            outs = op.opdef.reference(*[env[v] for v in op.operands], attrs=op.attrs,
                                      out_types=out_types)
            if not isinstance(outs, (tuple, list)):
                outs = [outs]
        for r, x in zip(op.results, outs):
            env[r] = np.asarray(x)
    return [env[v] for v in fn.results]


def _run_scan(op, operands, weights, module, observe=None) -> list[np.ndarray]:
    if module is None or op.attrs.body not in module.functions:
        raise ValueError(f"scan: body @{op.attrs.body} needs the module")
    body = module.functions[op.attrs.body]
    k, m = op.attrs.carried, op.attrs.invariant
    carried, invariant, stacked = operands[:k], operands[k:k + m], operands[k + m:]
    for i in range(op.attrs.length):
        carried = run_function(body, [np.asarray(i, np.int32), *carried, *invariant,
                                      *[x[i] for x in stacked]], weights, module,
                               observe)
    return carried


def run(module: Module, name: str, inputs: list[np.ndarray],
        weights: Mapping[str, np.ndarray] | None = None,
        observe: Callable[[Op, list[np.ndarray]], None] | None = None) -> list[np.ndarray]:
    if module.weight_defs and weights is not None:  # evaluate stacks, casts, ... first
        from .weights import materialize, resident_weights
        weights = {**weights, **materialize(module, weights, resident_weights(module))}
    return run_function(module.functions[name], inputs, weights, module, observe)
