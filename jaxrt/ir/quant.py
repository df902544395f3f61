"""Quantization formats and their numpy reference math (no jax).

A quantized tensor is a pair (q, scale): q holds int8 or fp8 e4m3fn codes, scale f32
factors with q's rank. The scale's layout says the granularity:

    per tensor   scale [1, ..., 1]
    per channel  scale [out, 1]          (weights [out, in]: one factor per output row)
    per group    scale [out, in / g]     (g consecutive input elements share a factor)
    per token    scale [T, 1]            (activations [T, in], computed at run time)

In general every axis of the scale is 1 or the tensor's size, except the last, which
divides the tensor's last axis into equal groups. Quantization is symmetric (no zero
point): value = q * scale, scale = max|x| / qmax over the elements that share it, with
qmax 127 for int8 (-128 is never produced, so the code range is symmetric) and 448 for
e4m3fn (its largest finite value). An all-zero block gets scale 1 (any scale is exact).
Rounding: int8 round-half-to-even then clip; fp8 the IEEE cast (nearest even) of the
value clipped to +-448 (e4m3fn has no infinity: an overflow would be NaN).
"""
from __future__ import annotations

import numpy as np

from .opdef import VerifyError
from .types import DType, TensorType

QUANT_DTYPES = (DType.int8, DType.f8e4m3)
QMAX = {DType.int8: 127.0, DType.f8e4m3: 448.0}
GRANULARITIES = ("tensor", "channel", "group")


def check_quant_dtype(dtype, what: str) -> DType:
    if dtype not in QUANT_DTYPES:
        got = dtype.value if isinstance(dtype, DType) else repr(dtype)
        raise VerifyError(f"{what}: quantized dtype must be i8 or f8e4m3fn, got {got}")
    return dtype


def check_scale(x: TensorType, scale: TensorType, what: str) -> None:
    """`scale` is a valid scale layout for `x` (module docstring); VerifyError naming
    both shapes otherwise."""
    def bad(why: str) -> VerifyError:
        return VerifyError(f"{what}: scale shape {_dims(scale)} does not fit tensor "
                           f"shape {_dims(x)} ({why})")

    if scale.dtype != DType.f32:
        raise VerifyError(f"{what}: scales must be f32, got {scale}")
    if scale.rank != x.rank or x.rank == 0:
        raise bad("ranks differ" if x.rank else "scalars are not quantized")
    for i, (d, s) in enumerate(zip(x.shape[:-1], scale.shape[:-1])):
        if s != 1 and s != d:
            raise bad(f"axis {i} must be 1 or {d}")
    d, s = x.shape[-1], scale.shape[-1]
    if s == 1 or s == d:
        return
    if not (isinstance(d, int) and isinstance(s, int) and s > 0 and d % s == 0):
        raise bad(f"the last axis must be 1, {d} or divide {d} into groups")


def _dims(t: TensorType) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def group_count(granularity: str, rows: int, cols: int, group_size: int) -> tuple[int, int]:
    """The scale shape [rows', groups] of a [rows, cols] weight at `granularity`."""
    if granularity == "tensor":
        return 1, 1
    if granularity == "channel":
        return rows, 1
    if granularity == "group":
        if group_size <= 0 or cols % group_size:
            raise VerifyError(f"group size {group_size} does not divide the input "
                              f"dimension {cols}")
        return rows, cols // group_size
    raise VerifyError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def expand_scale(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The scale broadcast to the tensor's shape (each group's factor repeated)."""
    scale = np.asarray(scale, np.float32)
    reps = shape[-1] // scale.shape[-1]
    if reps > 1:
        scale = np.repeat(scale, reps, axis=-1)
    return np.broadcast_to(scale, shape)


def _block_amax(x: np.ndarray, scale_shape: tuple[int, ...]) -> np.ndarray:
    """max|x| over the elements that share each factor of a `scale_shape` scale."""
    a = np.abs(np.asarray(x, np.float32))
    g = scale_shape[-1]
    a = a.reshape(a.shape[:-1] + (g, a.shape[-1] // g)).max(axis=-1)  # [..., g]
    axes = tuple(i for i, s in enumerate(scale_shape[:-1]) if s == 1 and a.shape[i] != 1)
    return a.max(axis=axes, keepdims=True) if axes else a


def compute_scale(x: np.ndarray, dtype: DType, scale_shape: tuple[int, ...]) -> np.ndarray:
    """f32 scales max|x| / qmax per block (1 where the block is all zero)."""
    amax = _block_amax(x, scale_shape)
    scale = (amax / np.float32(QMAX[dtype])).astype(np.float32)
    return np.where(amax > 0, scale, np.float32(1.0)).reshape(scale_shape)


def quantize(x: np.ndarray, scale: np.ndarray, dtype: DType) -> np.ndarray:
    """Codes of x / scale in `dtype` (f32 division, then the rounding above)."""
    y = np.asarray(x, np.float32) / expand_scale(scale, np.shape(x))
    qmax = np.float32(QMAX[dtype])
    if dtype == DType.int8:
        return np.clip(np.rint(y), -qmax, qmax).astype(np.int8)
    return np.clip(y, -qmax, qmax).astype(dtype.to_numpy())


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q * scale in f32."""
    return np.asarray(q).astype(np.float32) * expand_scale(scale, np.shape(q))


def token_scale(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Dynamic per-token (per-row) scales of activations x[..., in]: [..., 1] f32."""
    return compute_scale(x, dtype, tuple(np.shape(x)[:-1]) + (1,))
