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
    # A scale that underflows to 0 (max|x| below qmax * 2^-149) would divide by zero: 1
    # flushes such a row's codes to 0 (an error below 2^-142).
    return np.where(scale > 0, scale, np.float32(1.0)).reshape(scale_shape)


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


# ---- quantized KV cache (the quantize-kv-cache pass) --------------------------------------
#
# A quantized cache kv[layers, 2, pages, page_size, KVH, D + 4] holds int8 or e4m3fn codes.
# Each (token, kv head) row of K (and of V) is quantized when kv.update writes it, with
# its own f32 scale max|row| / qmax (1 for an all-zero row); the scale's 4 bytes
# (little-endian IEEE f32) are stored as the row's last 4 elements, bit for bit, so the
# codes and their scale live in the same slot and move together (one scatter, one
# gather, the same page ids, the same head split). Attention reads value = code * scale.
# A fresh (zeroed) cache reads as zeros: code 0 with scale 0.0. Rows whose max is below
# qmax * 2^-126 get subnormal scales (XLA on CPU may flush them: not bit-exact there).

KV_SCALE_ELEMS = 4  # one-byte elements holding a row's f32 scale


def is_quantized_cache(kv: TensorType) -> bool:
    return kv.dtype in QUANT_DTYPES


def kv_head_dim(kv: TensorType):
    """The head dimension a cache of type `kv` stores (its last axis less the scale's)."""
    d = kv.shape[-1]
    if is_quantized_cache(kv) and isinstance(d, int):
        return d - KV_SCALE_ELEMS
    return d


def pack_kv(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Rows x[..., D] -> codes and scale [..., D + 4] in `dtype` (see above)."""
    x = np.asarray(x, np.float32)
    scale = token_scale(x, dtype)  # [..., 1]
    codes = quantize(x, scale, dtype)
    scale_bytes = np.ascontiguousarray(scale.astype("<f4")).view(np.uint8)  # [..., 4]
    return np.concatenate([codes, scale_bytes.view(dtype.to_numpy())], axis=-1)


def unpack_kv(packed: np.ndarray) -> np.ndarray:
    """Packed rows [..., D + 4] -> their values code * scale, f32 [..., D]."""
    packed = np.asarray(packed)
    raw = np.ascontiguousarray(packed[..., -KV_SCALE_ELEMS:]).view(np.uint8)
    scale = raw.view("<f4").astype(np.float32)  # [..., 1]
    return dequantize(packed[..., :-KV_SCALE_ELEMS], valid_kv_scale(scale, packed.dtype))


def kv_scale_limit(dtype) -> float:
    """The largest scale kv.update can write (max f32 / qmax): code * scale stays finite."""
    return float(np.finfo(np.float32).max) / QMAX[DType.from_numpy(dtype)]


def valid_kv_scale(scale: np.ndarray, dtype) -> np.ndarray:
    """Scales as written, and 0 for bits no write produces (NaN, inf, beyond the limit:
    a page's bytes before its first write), so an unwritten slot reads as finite values
    and a masked key's 0 probability times its value stays 0."""
    return np.where(np.abs(scale) <= kv_scale_limit(dtype), scale, np.float32(0))
