"""Shared by fuse-qkv and fuse-gate-up: projections of one input as one matmul.

    linear(x, @a, @ba?), linear(x, @b, @bb?), ...
      -> y = linear(x, @ab, @bab?)  with  weight @ab = concat(@a, @b) {axis = 0}
         slice(y) {axis = -1, [0:out_a]}, slice(y) {[out_a:out_a + out_b]}, ...

The concatenated weights (and biases) are weight definitions: computed once at load, cast
by cast-float, stacked by outline-layers and quantized as one weight by quantize. The
slices are exact (a matmul's output columns do not depend on each other), so the fused
module computes the same values as the original one.
"""
from __future__ import annotations

import os

from jaxrt.ir import ops
from jaxrt.ir.module import Module, Op, Value
from jaxrt.ir.weights import WeightDef, define_weight


def plain_projection(op: Op, x: Value) -> bool:
    """op is linear(x, @w, @b?) with its weight (and bias) read straight from the module."""
    return (op.opdef is ops.linear and op.operands[0] is x
            and all(v.owner is not None and v.owner.opdef is ops.weight
                    for v in op.operands[1:]))


def fuse_projections(rw, x: Value, linears: list[Op]) -> list[Value] | None:
    """The slices of one fused projection replacing each of `linears` (in order), built
    by `rw`; None if they do not fuse (not all plain projections of x, biases on some
    only, different dtypes, or no module to define weights in)."""
    module = rw.module
    if module is None or len(linears) < 2 or \
            not all(plain_projection(op, x) for op in linears):
        return None
    if len({len(op.operands) for op in linears}) != 1 or \
            len({op.result.dtype for op in linears}) != 1:
        return None
    weights = [op.operands[1].owner.attrs.name for op in linears]
    fused = [rw.weight(define_concat(module, weights))]
    if len(linears[0].operands) == 3:
        fused.append(rw.weight(define_concat(module, [op.operands[2].owner.attrs.name
                                                      for op in linears])))
    y = rw(ops.linear, x, *fused)  # [..., sum of outs]
    axis = y.type.rank - 1
    parts, start = [], 0
    for op in linears:
        width = op.result.shape[-1]
        parts.append(rw(ops.slice_, y, axis=axis, start=start, limit=start + width))
        start += width
    return parts


def define_concat(module: Module, names: list[str]) -> str:
    """A weight defined as concat(@names...) {axis = 0}: an existing one with that very
    definition, else a new one named after its parts (q/k/v_proj -> qkv_proj)."""
    d = WeightDef("concat", tuple(names), (("axis", 0),))
    for name, existing in module.weight_defs.items():
        if existing == d:
            return name
    return define_weight(module, fused_name(names), d)


def fused_name(names: list[str]) -> str:
    """`a.q_proj.weight`, `a.k_proj.weight`, `a.v_proj.weight` -> `a.qkv_proj.weight`;
    `m.gate_proj.weight`, `m.up_proj.weight` -> `m.gate_up_proj.weight`."""
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    if min(map(len, names)) <= len(prefix) + len(suffix):
        return names[0] + ".fused"
    middles = [n[len(prefix):len(n) - len(suffix)] for n in names]
    joiner = "" if all(len(m) == 1 for m in middles) else "_"
    return prefix + joiner.join(middles) + suffix
