"""Shared helpers for op definitions: inference shorthands and numpy reference glue."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..opdef import Attrs, VerifyError
from ..types import DType, TensorType, broadcast_shapes


def compute_dtype(dt: DType) -> np.dtype:
    """numpy dtype used to evaluate references: f32 for every float, else the type itself."""
    return np.dtype(np.float32) if dt.is_float else dt.to_numpy()


def as_compute(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind == "V" or x.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2",
                                                "float16"):
        return x.astype(np.float32)
    return x


def cast_to(x, t: TensorType) -> np.ndarray:
    return np.asarray(x).astype(t.dtype.to_numpy())


def same_dtype(types: list[TensorType], what: str) -> DType:
    dts = {t.dtype for t in types}
    if len(dts) != 1:
        raise VerifyError(f"{what}: operand dtypes differ: {sorted(d.value for d in dts)}")
    return dts.pop()


def infer_binary(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    dt = same_dtype(types, "binary op")
    return [TensorType(broadcast_shapes(types[0].shape, types[1].shape), dt)]


def infer_same(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    return [types[0]]


def infer_float_unary(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    if not types[0].dtype.is_float:
        raise VerifyError(f"expected a float operand, got {types[0]}")
    return [types[0]]


def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise VerifyError(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def ref_unary(fn: Callable) -> Callable:
    def reference(x, *, attrs, out_types):
        return cast_to(fn(as_compute(x)), out_types[0])
    return reference


def ref_binary(fn: Callable) -> Callable:
    def reference(a, b, *, attrs, out_types):
        return cast_to(fn(as_compute(a), as_compute(b)), out_types[0])
    return reference
