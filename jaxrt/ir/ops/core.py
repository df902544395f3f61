"""Structural ops: weights and compile-time constants."""
from __future__ import annotations

import numpy as np

from ..opdef import AttrSpec, OpDef, Trait, VerifyError, register
from ..types import TensorType
from ._util import cast_to


def _verify_weight(ins, outs, attrs):
    if not attrs.name:
        raise VerifyError("weight: empty name")


# weight @name : type. The module's weight table must declare the same type.
weight = register(OpDef(
    "weight", 0, attrs={"name": AttrSpec(str)},
    traits=frozenset({Trait.PURE}), verify=_verify_weight,
    doc="A named model weight; data lives outside the IR."))


def _verify_constant(ins, outs, attrs):
    (t,) = outs
    if not t.is_static:
        raise VerifyError(f"constant: result type {t} must be static")
    v = attrs.value
    if isinstance(v, tuple):
        if len(v) != t.num_elements():
            raise VerifyError(f"constant: {len(v)} values for type {t}")
        if any(isinstance(x, str) for x in v):
            raise VerifyError("constant: values must be numbers")
    elif t.dtype.is_int and not float(v).is_integer():
        raise VerifyError(f"constant: {v} is not an integer for {t}")


def _ref_constant(*, attrs, out_types):
    (t,) = out_types
    v = attrs.value
    data = np.asarray(v, dtype=np.float64)
    if isinstance(v, tuple):
        data = data.reshape(t.shape)
    return cast_to(np.broadcast_to(data, t.shape), t)


# constant {value = 0.5} : f32[4, 4]   -- a scalar value is splatted; a tuple is dense row-major
constant = register(OpDef(
    "constant", 0, attrs={"value": AttrSpec((float, tuple))},
    traits=frozenset({Trait.PURE, Trait.CONSTANT_LIKE}),
    verify=_verify_constant, reference=_ref_constant))

