"""canonicalize: algebraic simplification to a fixed point, so that later passes (fusion,
lowering) see one spelling of each computation.

Float semantics: by default every rule is exact under IEEE-754, NaN, inf and the sign of
zero included (as MLIR's arith folders and LLVM without fast-math flags). So x + (-0.0)
folds but x + (+0.0) does not: for x = -0.0 it is +0.0, and 1/x would turn -inf into +inf.
The `no-signed-zeros` option also folds x + 0.0 and x - (-0.0), as XLA does. Rules that
would change NaN/inf results are restricted to integers: x * 0 is NaN for x = inf or NaN,
and x - x is NaN for x = inf. mul(x, x) is deliberately left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxrt.ir import ops
from jaxrt.ir.module import Value
from jaxrt.ir.opdef import Trait
from jaxrt.errors import SettingError
from jaxrt.ir.types import DType

from .manager import RewritePass, register_pass
from .pattern import Any, Const, Pat, is_int, splat_value
from .rewrite import Rule, RuleSet

FOLD_LIMIT = 4096  # fold ops whose operands and result have at most this many elements

# Conversions that keep every value exactly (NaN and inf included): a -> {b}.
# int8 fits bf16's and f16's significands; fp8's ranges and significands fit f16 and bf16.
EXACT_CONVERSIONS: dict[DType, frozenset[DType]] = {
    DType.bool_: frozenset(DType) - {DType.bool_},
    DType.int8: frozenset({DType.int32, DType.f32, DType.bf16, DType.f16}),
    DType.int32: frozenset(),  # f32 has a 24-bit significand
    DType.f32: frozenset(),
    DType.f16: frozenset({DType.f32}),
    DType.bf16: frozenset({DType.f32}),
    DType.f8e4m3: frozenset({DType.f16, DType.bf16, DType.f32}),
    DType.f8e5m2: frozenset({DType.f16, DType.bf16, DType.f32}),
}


# ---- predicates -----------------------------------------------------------------------------

def is_identity_perm(perm: tuple) -> bool:
    return tuple(perm) == tuple(range(len(perm)))


def same_type_as_operand(v: Value) -> bool:
    return v.type == v.owner.operands[0].type


def exact_conversion(v: Value) -> bool:
    """v = convert(x) keeps every value of x exactly."""
    return v.dtype in EXACT_CONVERSIONS.get(v.owner.operands[0].dtype, ())


def _is_constant(v: Value) -> bool:
    return v.owner is not None and v.owner.opdef is ops.constant


def all_operands_constant(v: Value) -> bool:
    """A pure op with numpy semantics whose operands are all `constant` ops."""
    op = v.owner
    return (bool(op.operands) and op.opdef.reference is not None
            and op.opdef.has(Trait.PURE) and not op.opdef.has(Trait.CONSTANT_LIKE)
            and all(_is_constant(o) for o in op.operands))


def commutative_with_variable_rhs(v: Value) -> bool:
    op = v.owner
    return op.opdef.has(Trait.COMMUTATIVE) and not _is_constant(op.operands[1])


# ---- handlers -------------------------------------------------------------------------------

def forward(rw, x):
    """The root is x (unless it broadcast x to a bigger shape)."""
    return x if x.type == rw.root.type else None


def forward_if_nsz(rw, x):
    """Forward x if the pass may ignore the sign of zero (never needed for integers)."""
    return forward(rw, x) if getattr(rw.ctx, "no_signed_zeros", False) else None


def zeros(rw, x):
    return rw.splat(0.0, rw.root.type)


def choose_branch(rw, p, x, y):
    take = splat_value(p)
    if take is None:
        return None
    return forward(rw, x if take else y)


def compose_transposes(rw, x, inner):
    # y = transpose(x, p): y.shape[i] = x.shape[p[i]]; z = transpose(y, q) -> perm p[q[j]]
    p, q = inner.owner.attrs.perm, rw.op.attrs.perm
    perm = tuple(p[j] for j in q)
    return x if is_identity_perm(perm) else rw(ops.transpose, x, perm=perm)


def reshape_once(rw, x):
    return x if x.type == rw.root.type else rw(ops.reshape, x, shape=rw.root.shape)


def convert_once(rw, x):
    return x if x.type == rw.root.type else rw(ops.convert, x, dtype=rw.root.dtype)


def resplat(rw, c):
    value = splat_value(c)
    if value is None or not rw.root.type.is_static:
        return None
    return rw.constant(value, rw.root.type)


def swap_operands(rw, c, x):
    return rw.create(rw.op.opdef, [x, c], rw.op.attrs).results[0]


def fold(rw):
    """Evaluate the root with its numpy reference. Elementwise ops of splats fold at any
    size (computed on one element); anything else only up to the fold limit."""
    op, t = rw.op, rw.root.type
    if len(op.results) != 1 or not t.is_static:
        return None
    splats = [splat_value(o) for o in op.operands]
    with np.errstate(all="ignore"):
        if op.opdef.has(Trait.ELEMENTWISE) and None not in splats:
            args = [np.asarray(s).astype(o.dtype.to_numpy()) for s, o in zip(splats, op.operands)]
            out = op.opdef.reference(*args, attrs=op.attrs, out_types=[t.with_shape(())])
            return rw.constant(float(np.asarray(out).astype(t.dtype.to_numpy())), t)
        limit = getattr(rw.ctx, "fold_limit", FOLD_LIMIT)
        if t.num_elements() > limit or any(o.type.num_elements() > limit for o in op.operands):
            return None
        args = [ops.constant.reference(attrs=o.owner.attrs, out_types=[o.type])
                for o in op.operands]
        out = op.opdef.reference(*args, attrs=op.attrs, out_types=[t])
    values = np.asarray(out).astype(t.dtype.to_numpy()).astype(np.float64).ravel()
    first = values[0] if values.size else 0.0
    splat = (np.isnan(values) & np.isnan(first)) | (
        (values == first) & (np.signbit(values) == np.signbit(first)))
    if values.size and splat.all():
        return rw.constant(float(first), t)
    return rw.constant(values, t)


# ---- rules (priority order) ---------------------------------------------------------------

RULES = RuleSet([
    # add(x, -0.0) -> x   (integer zeros have no sign: every integer add(x, 0) matches)
    Rule("add-zero", Pat(ops.add, "x", Const(-0.0)), forward),
    # add(x, +0.0) -> x   under no-signed-zeros (-0.0 + 0.0 is +0.0)
    Rule("add-zero-nsz", Pat(ops.add, "x", Const(0.0)), forward_if_nsz),
    # sub(x, +0.0) -> x
    Rule("sub-zero", Pat(ops.sub, "x", Const(0.0)), forward),
    # sub(x, -0.0) -> x   under no-signed-zeros (-0.0 - -0.0 is +0.0)
    Rule("sub-zero-nsz", Pat(ops.sub, "x", Const(-0.0)), forward_if_nsz),
    # mul(x, 1) -> x
    Rule("mul-one", Pat(ops.mul, "x", Const(1.0)), forward),
    # div(x, 1) -> x
    Rule("div-one", Pat(ops.div, "x", Const(1.0)), forward),
    # mul(x, 0) -> 0, integers only
    Rule("mul-zero-int", Pat(ops.mul, Any("x", where=is_int), Const(0.0)), zeros),
    # sub(x, x) -> 0, integers only
    Rule("sub-self-int", Pat(ops.sub, Any("x", where=is_int), "x"), zeros),
    # neg(neg(x)) -> x
    Rule("neg-neg", Pat(ops.neg, Pat(ops.neg, "x")), forward),
    # max(x, x) -> x; min(x, x) -> x
    Rule("max-min-self", Pat((ops.maximum, ops.minimum), "x", "x"), forward),
    # select(p, x, x) -> x
    Rule("select-same", Pat(ops.select, Any(), "x", "x"), forward),
    # select(true, x, y) -> x; select(false, x, y) -> y
    Rule("select-constant", Pat(ops.select, Const(name="p"), "x", "y"), choose_branch),
    # transpose(transpose(x, p), q) -> transpose(x, p[q]), or x if that is the identity
    Rule("transpose-transpose", Pat(ops.transpose, Pat(ops.transpose, "x", name="inner")),
         compose_transposes),
    # transpose(x, identity) -> x
    Rule("transpose-identity", Pat(ops.transpose, "x", attrs={"perm": is_identity_perm}),
         forward),
    # reshape(x, shape(x)) -> x
    Rule("reshape-identity", Pat(ops.reshape, "x", where=same_type_as_operand), forward),
    # reshape(reshape(x, s1), s2) -> reshape(x, s2)
    Rule("reshape-reshape", Pat(ops.reshape, Pat(ops.reshape, "x")), reshape_once),
    # broadcast(x, shape(x)) -> x
    Rule("broadcast-identity", Pat(ops.broadcast, "x", where=same_type_as_operand), forward),
    # convert(x, dtype(x)) -> x
    Rule("convert-identity", Pat(ops.convert, "x", where=same_type_as_operand), forward),
    # convert(convert(x, b), c) -> convert(x, c) when x's dtype converts to b exactly
    Rule("convert-convert", Pat(ops.convert, Pat(ops.convert, "x", where=exact_conversion)),
         convert_once),
    # slice(x) covering all of x -> x
    Rule("slice-identity", Pat(ops.slice_, "x", where=same_type_as_operand), forward),
    # concat(x) -> x
    Rule("concat-single", Pat(ops.concat, "x"), forward),
    # broadcast/reshape/transpose(splat c) -> splat c of the result type
    Rule("reshape-splat", Pat((ops.broadcast, ops.reshape, ops.transpose), Const(name="c")),
         resplat),
    # op(constants...) -> constant, by the op's numpy reference
    Rule("fold-constants", Pat(None, where=all_operands_constant), fold),
    # op(c, x) -> op(x, c) for commutative ops: constants go to the right
    Rule("constant-to-right", Pat(None, Const(name="c"), "x", commutative=False,
                                  where=commutative_with_variable_rhs), swap_operands),
])


@register_pass
@dataclass(frozen=True)
class Canonicalize(RewritePass):
    """Algebraic simplification and constant folding, to a fixed point."""

    name = "canonicalize"
    rules = RULES
    fold_limit: int = FOLD_LIMIT
    no_signed_zeros: bool = False  # fold x + 0.0 and x - (-0.0) for floats too

    def __post_init__(self):
        if self.fold_limit < 0:
            raise SettingError(f"canonicalize: fold-limit must be >= 0, got {self.fold_limit}")

