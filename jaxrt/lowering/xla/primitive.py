"""XLA rules for structural and primitive ops (jaxrt.ir.ops.core / primitive)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ...ir import ops
from ..registry import LoweringError, rule
from ._util import cast, contract, np_dtype, upcast

# ---- structural -------------------------------------------------------------------------


@rule(ops.weight)
def _weight(ctx, *, attrs, out_types):
    try:
        return ctx.weights[attrs.name]
    except KeyError:
        raise LoweringError(f"weight @{attrs.name} was not provided") from None


@rule(ops.constant)
def _constant(ctx, *, attrs, out_types):
    # The reference builds the exact (dtype-rounded) array; it becomes an XLA literal.
    return jnp.asarray(ops.constant.reference(attrs=attrs, out_types=out_types))


@rule(ops.iota)
def _iota(ctx, *, attrs, out_types):
    (t,) = out_types
    return lax.broadcasted_iota(np_dtype(t), t.shape, attrs.dimension)

# ---- elementwise ------------------------------------------------------------------------


def _elementwise(opdef, fn):
    @rule(opdef)
    def lower(ctx, *xs, attrs, out_types):
        return cast(fn(*[upcast(x) for x in xs]), out_types[0])
    return lower


def _int_safe_div(a, b):
    if jnp.issubdtype(a.dtype, jnp.integer):  # numpy floor division, 0 where b == 0
        return jnp.where(b == 0, 0, a // jnp.where(b == 0, 1, b))
    return a / b


def _nan_unless(ok, y):
    return jnp.where(ok, y, jnp.nan)


_elementwise(ops.add, jnp.add)
_elementwise(ops.sub, jnp.subtract)
_elementwise(ops.mul, jnp.multiply)
_elementwise(ops.div, _int_safe_div)
_elementwise(ops.maximum, jnp.maximum)
_elementwise(ops.minimum, jnp.minimum)
_elementwise(ops.pow_, jnp.power)
_elementwise(ops.neg, jnp.negative)
_elementwise(ops.exp, lambda x: jnp.exp(jnp.clip(x, -1e30, 88.0)))  # as the reference
_elementwise(ops.log, lambda x: _nan_unless(x > 0, jnp.log(x)))
_elementwise(ops.tanh, jnp.tanh)
_elementwise(ops.rsqrt, lambda x: _nan_unless(x > 0, lax.rsqrt(x)))
_elementwise(ops.sqrt, lambda x: _nan_unless(x >= 0, jnp.sqrt(x)))
_elementwise(ops.cos, jnp.cos)
_elementwise(ops.sin, jnp.sin)

_COMPARE = {"eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal,
            "gt": jnp.greater, "ge": jnp.greater_equal}


@rule(ops.compare)
def _compare(ctx, a, b, *, attrs, out_types):
    return _COMPARE[attrs.direction](upcast(a), upcast(b))


@rule(ops.select)
def _select(ctx, pred, a, b, *, attrs, out_types):
    return cast(jnp.broadcast_to(jnp.where(pred, a, b), out_types[0].shape), out_types[0])


@rule(ops.convert)
def _convert(ctx, x, *, attrs, out_types):
    (t,) = out_types
    x = upcast(x)
    if t.dtype.is_int:  # saturating, truncating toward zero, NaN -> 0 (as the reference)
        info = np.iinfo(np_dtype(t))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return cast(jnp.clip(x, info.min, info.max), t)
        x = jnp.trunc(jnp.nan_to_num(x))
        # f32 cannot hold int32's max: saturate explicitly rather than trust the cast.
        y = cast(jnp.clip(x, info.min, info.max), t)
        return jnp.where(x >= info.max, info.max, jnp.where(x <= info.min, info.min, y)
                         ).astype(np_dtype(t))
    return cast(x, t)

# ---- reductions ---------------------------------------------------------------------------


def _reduction(opdef, fn):
    @rule(opdef)
    def lower(ctx, x, *, attrs, out_types):
        return cast(fn(upcast(x), axis=tuple(attrs.axes), keepdims=attrs.keepdims),
                    out_types[0])
    return lower


_reduction(ops.reduce_sum, jnp.sum)
_reduction(ops.reduce_max, jnp.max)
_reduction(ops.reduce_mean, jnp.mean)

# ---- shapes -------------------------------------------------------------------------------


@rule(ops.reshape)
def _reshape(ctx, x, *, attrs, out_types):
    return jnp.reshape(x, out_types[0].shape)


@rule(ops.transpose)
def _transpose(ctx, x, *, attrs, out_types):
    return jnp.transpose(x, attrs.perm)


@rule(ops.broadcast)
def _broadcast(ctx, x, *, attrs, out_types):
    return jnp.broadcast_to(x, out_types[0].shape)


@rule(ops.concat)
def _concat(ctx, *xs, attrs, out_types):
    return jnp.concatenate(xs, axis=attrs.axis)


@rule(ops.slice_)
def _slice(ctx, x, *, attrs, out_types):
    return lax.slice_in_dim(x, attrs.start, attrs.limit, attrs.stride, axis=attrs.axis)


@rule(ops.take)
def _take(ctx, x, idx, *, attrs, out_types):
    return jnp.take(x, idx, axis=attrs.axis, mode="clip")

# ---- contractions -------------------------------------------------------------------------


@rule(ops.dot_general)
def _dot_general(ctx, a, b, *, attrs, out_types):
    y = contract(a, b, attrs.lhs_contract, attrs.rhs_contract, attrs.lhs_batch,
                 attrs.rhs_batch)
    return cast(y, out_types[0])


@rule(ops.matmul)
def _matmul(ctx, a, b, *, attrs, out_types):
    return cast(contract(a, b, (a.ndim - 1,), (0,)), out_types[0])
