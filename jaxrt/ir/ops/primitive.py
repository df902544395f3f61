"""Primitive tensor ops with numpy reference semantics (numpy broadcasting rules)."""
from __future__ import annotations

import numpy as np

from ..opdef import AttrSpec, OpDef, Trait, VerifyError, register
from ..types import DType, TensorType, broadcast_shapes
from ._util import (as_compute, cast_to, infer_binary, infer_float_unary, infer_same,
                    norm_axis, ref_binary, ref_unary, same_dtype)

P, E, C = Trait.PURE, Trait.ELEMENTWISE, Trait.COMMUTATIVE


def _no_i1(infer):
    """Arithmetic on i1 is undefined (XLA has none): use compare/select, or convert first."""
    def checked(types, attrs):
        if any(t.dtype == DType.bool_ for t in types):
            raise VerifyError(f"arithmetic on i1 operands: {[str(t) for t in types]}")
        return infer(types, attrs)
    return checked


def _binary(name, fn, commutative=False, infer=_no_i1(infer_binary)):
    traits = frozenset({P, E, C} if commutative else {P, E})
    return register(OpDef(name, 2, traits=traits, infer=infer, reference=ref_binary(fn)))


def _unary(name, fn, float_only=True):
    return register(OpDef(name, 1, traits=frozenset({P, E}),
                          infer=infer_float_unary if float_only else _no_i1(infer_same),
                          reference=ref_unary(fn)))


def _safe_pow(a, b):
    with np.errstate(all="ignore"):
        if a.dtype.kind in "iu" and b.dtype.kind in "iu":  # x ** -n truncates, as jnp.power
            a, b = np.broadcast_arrays(a, b)
            neg = np.where(a == -1, np.where(b % 2 == 0, 1, -1), (a == 1).astype(a.dtype))
            return np.where(b < 0, neg, np.power(a, np.maximum(b, 0))).astype(a.dtype)
        return np.power(a, b)


def _safe_div(a, b):
    with np.errstate(all="ignore"):
        if a.dtype.kind in "iu":
            return np.where(b == 0, 0, a // np.where(b == 0, 1, b)).astype(a.dtype)
        return a / b


add = _binary("add", np.add, commutative=True)
sub = _binary("sub", np.subtract)
mul = _binary("mul", np.multiply, commutative=True)
div = _binary("div", _safe_div)
maximum = _binary("max", np.maximum, commutative=True, infer=infer_binary)  # i1: or
minimum = _binary("min", np.minimum, commutative=True, infer=infer_binary)  # i1: and
pow_ = _binary("pow", _safe_pow)

neg = _unary("neg", np.negative, float_only=False)
exp = _unary("exp", lambda x: np.exp(np.clip(x, -1e30, 88.0)))
log = _unary("log", lambda x: np.log(np.where(x > 0, x, np.nan)))
tanh = _unary("tanh", np.tanh)
rsqrt = _unary("rsqrt", lambda x: 1.0 / np.sqrt(np.where(x > 0, x, np.nan)))
sqrt = _unary("sqrt", lambda x: np.sqrt(np.where(x >= 0, x, np.nan)))
cos = _unary("cos", np.cos)
sin = _unary("sin", np.sin)

# ---- compare / select / convert -------------------------------------------------

_DIRECTIONS = ("eq", "ne", "lt", "le", "gt", "ge")
_CMP = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
        "gt": np.greater, "ge": np.greater_equal}


def _infer_compare(types, attrs):
    same_dtype(types, "compare")
    return [TensorType(broadcast_shapes(types[0].shape, types[1].shape), DType.bool_)]


compare = register(OpDef(
    "compare", 2, attrs={"direction": AttrSpec(str, choices=_DIRECTIONS)},
    traits=frozenset({P, E}), infer=_infer_compare,
    reference=lambda a, b, *, attrs, out_types: _CMP[attrs.direction](as_compute(a),
                                                                      as_compute(b))))


def _infer_select(types, attrs):
    pred, a, b = types
    if pred.dtype != DType.bool_:
        raise VerifyError(f"select: predicate must be i1, got {pred}")
    dt = same_dtype([a, b], "select")
    return [TensorType(broadcast_shapes(pred.shape, a.shape, b.shape), dt)]


# select(pred, a, b) = pred ? a : b
select = register(OpDef(
    "select", 3, traits=frozenset({P, E}), infer=_infer_select,
    reference=lambda p, a, b, *, attrs, out_types: cast_to(np.where(p, as_compute(a),
                                                                    as_compute(b)),
                                                           out_types[0])))

convert = register(OpDef(
    "convert", 1, attrs={"dtype": AttrSpec(DType)}, traits=frozenset({P, E}),
    infer=lambda types, attrs: [types[0].with_dtype(attrs.dtype)],
    reference=lambda x, *, attrs, out_types: _convert_ref(x, out_types[0])))


def _convert_ref(x, t):
    x = as_compute(x)
    if t.dtype.is_int:
        info = np.iinfo(t.dtype.to_numpy())
        # clip in f64: f32 rounds int32's max up to 2**31, which would wrap on the cast
        x = np.clip(np.trunc(np.nan_to_num(x.astype(np.float64))), info.min, info.max)
    return cast_to(x, t)


# ---- reductions ---------------------------------------------------------------------

def _infer_reduce(types, attrs):
    (t,) = types
    axes = {norm_axis(a, t.rank) for a in attrs.axes}
    if len(axes) != len(attrs.axes):
        raise VerifyError(f"repeated reduction axes {attrs.axes}")
    if attrs.keepdims:
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return [t.with_shape(shape)]


def _reduce(name, fn):
    def reference(x, *, attrs, out_types):
        return cast_to(fn(as_compute(x), axis=tuple(attrs.axes), keepdims=attrs.keepdims),
                       out_types[0])
    return register(OpDef(name, 1, attrs={"axes": AttrSpec(tuple),
                                          "keepdims": AttrSpec(bool, default=False)},
                          infer=_infer_reduce, reference=reference))


reduce_sum = _reduce("reduce_sum", np.sum)
reduce_max = _reduce("reduce_max", np.max)
reduce_mean = _reduce("reduce_mean", np.mean)

# ---- shape ops ----------------------------------------------------------------------


def _infer_reshape(types, attrs):
    (t,) = types
    new = tuple(attrs.shape)
    if t.is_static and all(isinstance(d, int) for d in new):
        if t.num_elements() != int(np.prod(new, dtype=np.int64)):
            raise VerifyError(f"reshape: {t} has {t.num_elements()} elements, not {new}")
    else:  # symbolic: the multiset of symbolic dims must be preserved
        if sorted(d for d in t.shape if isinstance(d, str)) != \
                sorted(d for d in new if isinstance(d, str)):
            raise VerifyError(f"reshape: symbolic dims of {t} and {new} differ")
        if int(np.prod([d for d in t.shape if isinstance(d, int)], dtype=np.int64)) != \
                int(np.prod([d for d in new if isinstance(d, int)], dtype=np.int64)):
            raise VerifyError(f"reshape: static sizes of {t} and {new} differ")
    return [t.with_shape(new)]


# Reference ops receive result types with symbolic dims already bound (see interpreter).
reshape = register(OpDef(
    "reshape", 1, attrs={"shape": AttrSpec(tuple)}, infer=_infer_reshape,
    reference=lambda x, *, attrs, out_types: np.reshape(x, out_types[0].shape)))


def _infer_transpose(types, attrs):
    (t,) = types
    if sorted(attrs.perm) != list(range(t.rank)):
        raise VerifyError(f"transpose: {attrs.perm} is not a permutation of rank {t.rank}")
    return [t.with_shape(t.shape[p] for p in attrs.perm)]


transpose = register(OpDef(
    "transpose", 1, attrs={"perm": AttrSpec(tuple)}, infer=_infer_transpose,
    reference=lambda x, *, attrs, out_types: np.transpose(x, attrs.perm)))


def _infer_broadcast(types, attrs):
    (t,) = types
    shape = tuple(attrs.shape)
    if broadcast_shapes(t.shape, shape) != shape:
        raise VerifyError(f"broadcast: {t} does not broadcast to {shape}")
    return [t.with_shape(shape)]


# broadcast(x) {shape}: numpy broadcast_to
broadcast = register(OpDef(
    "broadcast", 1, attrs={"shape": AttrSpec(tuple)}, infer=_infer_broadcast,
    reference=lambda x, *, attrs, out_types: np.broadcast_to(x, out_types[0].shape).copy()))


def _infer_concat(types, attrs):
    dt = same_dtype(types, "concat")
    rank = types[0].rank
    ax = norm_axis(attrs.axis, rank)
    total: int | str = 0
    for t in types:
        if t.rank != rank or any(a != b for i, (a, b) in enumerate(zip(t.shape, types[0].shape))
                                 if i != ax):
            raise VerifyError(f"concat: incompatible shapes {[str(t) for t in types]}")
        d = t.shape[ax]
        if isinstance(d, str) or isinstance(total, str):
            raise VerifyError("concat: the concatenated axis must be static")
        total += d
    shape = list(types[0].shape)
    shape[ax] = total
    return [TensorType(tuple(shape), dt)]


concat = register(OpDef(
    "concat", (1, None), attrs={"axis": AttrSpec(int)}, infer=_infer_concat,
    reference=lambda *xs, attrs, out_types: np.concatenate(xs, axis=attrs.axis)))


def _infer_slice(types, attrs):
    (t,) = types
    ax = norm_axis(attrs.axis, t.rank)
    d = t.shape[ax]
    if isinstance(d, str):
        raise VerifyError("slice: the sliced axis must be static")
    if not (0 <= attrs.start <= attrs.limit <= d) or attrs.stride < 1:
        raise VerifyError(f"slice: [{attrs.start}:{attrs.limit}:{attrs.stride}] "
                          f"out of range for dim {d}")
    shape = list(t.shape)
    shape[ax] = len(range(attrs.start, attrs.limit, attrs.stride))
    return [t.with_shape(shape)]


def _ref_slice(x, *, attrs, out_types):
    idx = [slice(None)] * x.ndim
    idx[attrs.axis] = slice(attrs.start, attrs.limit, attrs.stride)
    return x[tuple(idx)].copy()


# slice(x) {axis, start, limit, stride}: one axis, static bounds
slice_ = register(OpDef(
    "slice", 1, attrs={"axis": AttrSpec(int), "start": AttrSpec(int), "limit": AttrSpec(int),
                       "stride": AttrSpec(int, default=1)},
    infer=_infer_slice, reference=_ref_slice))


def _infer_take(types, attrs):
    x, idx = types
    if idx.dtype != DType.int32:
        raise VerifyError(f"take: indices must be i32, got {idx}")
    ax = norm_axis(attrs.axis, x.rank)
    return [x.with_shape(x.shape[:ax] + idx.shape + x.shape[ax + 1:])]


# take(x, idx) {axis}: numpy take; out-of-range indices are clamped
take = register(OpDef(
    "take", 2, attrs={"axis": AttrSpec(int, default=0)}, infer=_infer_take,
    reference=lambda x, i, *, attrs, out_types: np.take(x, i, axis=attrs.axis, mode="clip")))


def _verify_iota(ins, outs, attrs):
    (t,) = outs
    norm_axis(attrs.dimension, t.rank)
    if t.dtype not in (DType.int32, DType.f32):
        raise VerifyError(f"iota: dtype must be i32 or f32, got {t.dtype.value}")


def _ref_iota(*, attrs, out_types):
    (t,) = out_types
    shape = [1] * t.rank
    shape[attrs.dimension] = t.shape[attrs.dimension]
    ramp = np.arange(t.shape[attrs.dimension]).reshape(shape)
    return np.broadcast_to(ramp, t.shape).astype(t.dtype.to_numpy())


iota = register(OpDef(
    "iota", 0, attrs={"dimension": AttrSpec(int)},
    traits=frozenset({P, Trait.CONSTANT_LIKE}), verify=_verify_iota, reference=_ref_iota))

# ---- contractions -------------------------------------------------------------------


def _infer_dot_general(types, attrs):
    lhs, rhs = types
    dt = same_dtype(types, "dot_general")
    lc, rc, lb, rb = attrs.lhs_contract, attrs.rhs_contract, attrs.lhs_batch, attrs.rhs_batch
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise VerifyError("dot_general: contract/batch dim lists differ in length")
    for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
        if lhs.shape[a] != rhs.shape[b]:
            raise VerifyError(f"dot_general: dim {a} of {lhs} != dim {b} of {rhs}")
    for dims, t in ((lc + lb, lhs), (rc + rb, rhs)):
        if len(set(dims)) != len(dims) or any(not 0 <= d < t.rank for d in dims):
            raise VerifyError(f"dot_general: bad dims {dims} for {t}")
    lfree = [d for i, d in enumerate(lhs.shape) if i not in lc + lb]
    rfree = [d for i, d in enumerate(rhs.shape) if i not in rc + rb]
    return [TensorType(tuple(lhs.shape[i] for i in lb) + tuple(lfree) + tuple(rfree), dt)]


def _ref_dot_general(a, b, *, attrs, out_types):
    a, b = as_compute(a), as_compute(b)
    lc, rc, lb, rb = attrs.lhs_contract, attrs.rhs_contract, attrs.lhs_batch, attrs.rhs_batch
    lfree = [i for i in range(a.ndim) if i not in lc + lb]
    rfree = [i for i in range(b.ndim) if i not in rc + rb]
    a2 = np.transpose(a, list(lb) + lfree + list(lc))
    b2 = np.transpose(b, list(rb) + list(rc) + rfree)
    nb = len(lb)
    bshape = a2.shape[:nb]
    ashape, bshape_free = a2.shape[nb:nb + len(lfree)], b2.shape[nb + len(rc):]
    k = int(np.prod(a2.shape[nb + len(lfree):], dtype=np.int64))
    a3 = a2.reshape(bshape + (int(np.prod(ashape, dtype=np.int64)), k))
    b3 = b2.reshape(bshape + (k, int(np.prod(bshape_free, dtype=np.int64))))
    out = np.matmul(a3, b3).reshape(bshape + ashape + bshape_free)
    return cast_to(out, out_types[0])


dot_general = register(OpDef(
    "dot_general", 2,
    attrs={"lhs_contract": AttrSpec(tuple), "rhs_contract": AttrSpec(tuple),
           "lhs_batch": AttrSpec(tuple, default=()), "rhs_batch": AttrSpec(tuple, default=())},
    infer=_infer_dot_general, reference=_ref_dot_general))


def _infer_matmul(types, attrs):
    a, b = types
    dt = same_dtype(types, "matmul")
    if a.rank < 1 or b.rank != 2:
        raise VerifyError(f"matmul: expects x[..., k] @ w[k, n], got {a} @ {b}")
    if a.shape[-1] != b.shape[0]:
        raise VerifyError(f"matmul: contraction mismatch {a} @ {b}")
    return [TensorType(a.shape[:-1] + b.shape[1:], dt)]


# matmul(x[..., k], w[k, n]) -> [..., n]
matmul = register(OpDef(
    "matmul", 2, infer=_infer_matmul,
    reference=lambda a, b, *, attrs, out_types: cast_to(as_compute(a) @ as_compute(b),
                                                        out_types[0])))
