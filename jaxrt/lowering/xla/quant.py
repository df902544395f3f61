"""XLA rules for the `quant.*` ops (jaxrt/ir/ops/quant.py; math in jaxrt/ir/quant.py).

- Weight-only `quant.linear`: (x . w^T) * scale, group by group. The codes convert to
  the activation dtype exactly (int8 and fp8 e4m3 values are bf16/f16/f32 values), so
  the dot's operand is a bare convert, which XLA fuses into the dot; the f32 result is
  scaled per output channel. (Scaling the weights first, rounded to the activation
  dtype, made XLA materialize or fuse a multiply per weight: 0.70x bf16 on an H200, and
  3.9x slower than this form on a CPU at 8B shapes: bench/bench_int8_matmul.py.)
- `act = token` (dynamic W8A8): activations are quantized per token, then int8 x int8
  -> int32 (`preferred_element_type=int32`) or fp8 x fp8 -> f32 dots, one per scale
  group (a batched dot), scaled by weight and token scales in f32. fp8 dots need a GPU
  of compute capability 8.9 or later (Ada, Hopper); an older GPU is refused. On a CPU
  XLA runs both dots itself, so CI runs every mode.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ...errors import SettingError
from ...ir import DType, ops
from ...ir.quant import QMAX
from ..registry import rule
from ._util import F32, cast, contract, np_dtype, upcast


def expand_scale(scale, shape):
    """scale [..., G] broadcast to `shape` (each group's factor repeated)."""
    reps = shape[-1] // scale.shape[-1]
    if reps > 1:
        scale = jnp.repeat(scale, reps, axis=-1)
    return jnp.broadcast_to(scale, shape)


def quantize(x, scale, dtype: DType):
    y = upcast(x) / expand_scale(scale, x.shape)
    qmax = QMAX[dtype]
    if dtype == DType.int8:
        return jnp.clip(jnp.round(y), -qmax, qmax).astype(jnp.int8)
    return jnp.clip(y, -qmax, qmax).astype(np_dtype(dtype))


def dequantize(q, scale):
    return q.astype(F32) * expand_scale(scale, q.shape)


def token_scale(x, dtype: DType):
    amax = jnp.max(jnp.abs(upcast(x)), axis=-1, keepdims=True)  # [..., 1]
    scale = amax / jnp.float32(QMAX[dtype])
    return jnp.where(scale > 0, scale, jnp.float32(1.0))  # as jaxrt/ir/quant.py


def check_fp8_device() -> None:
    """fp8 dots need compute capability >= 8.9 on a GPU; other platforms run them."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return
    cc = getattr(dev, "compute_capability", "0.0")
    major, minor = (int(p) for p in str(cc).split(".")[:2])
    if (major, minor) < (8, 9):
        raise SettingError(f"fp8 activations need a GPU of compute capability 8.9 or "
                           f"later; {dev.device_kind} is {cc} (use fp8-weight)")


@rule(ops.quantize)
def _quantize(ctx, x, scale, *, attrs, out_types):
    return quantize(x, scale, attrs.dtype)


@rule(ops.dequantize)
def _dequantize(ctx, q, scale, *, attrs, out_types):
    return cast(dequantize(q, scale), out_types[0])


@rule(ops.quantized_linear)
def _quantized_linear(ctx, x, w, scale, b=None, *, attrs, out_types):
    if attrs.act == "none":
        y = _weight_only_linear(x, w, scale)
    else:
        y = _token_linear(x, w, scale)
    if b is not None:
        y = y + upcast(b)
    return cast(y, out_types[0])


def _weight_only_linear(x, w, scale):
    """f32 x . dequantize(w)^T as (x . w^T) * scale per scale group."""
    return _scaled_dot(x, w.astype(x.dtype), scale, contract)  # the convert is exact


def _token_linear(x, w, scale):
    dtype = DType.from_numpy(w.dtype)
    if dtype == DType.f8e4m3:
        check_fp8_device()
    xs = token_scale(x, dtype)  # f32[..., 1]
    xq = quantize(x, xs, dtype)  # [..., in]
    acc_t = jnp.int32 if dtype == DType.int8 else F32

    def dot(a, b, lc, rc, lb, rb):
        return lax.dot_general(a, b, ((lc, rc), (lb, rb)), preferred_element_type=acc_t)
    return _scaled_dot(xq, w, scale, dot) * xs


def _scaled_dot(x, w, scale, dot):
    """f32 (x[..., in] . w[out, in]^T) times `scale` [out, G]: one dot, or with G > 1 a
    batched dot over the groups, each group's result scaled, then summed. `dot(a, b,
    lhs_contract, rhs_contract, lhs_batch, rhs_batch)` makes the accumulator."""
    out, n = w.shape
    g = scale.shape[-1]
    if g == 1:
        acc = dot(x, w, (x.ndim - 1,), (1,), (), ())  # [..., out]
        return acc.astype(F32) * jnp.broadcast_to(scale, (out, 1))[:, 0]
    xg = x.reshape(x.shape[:-1] + (g, n // g))  # [..., G, gs]
    lead = xg.ndim - 2
    wg = w.reshape(out, g, n // g)  # [out, G, gs]
    acc = dot(xg, wg, (xg.ndim - 1,), (2,), (lead,), (1,))  # [G, ..., out]
    ws = jnp.broadcast_to(scale, (out, g)).T.reshape((g,) + (1,) * lead + (out,))
    return jnp.sum(acc.astype(F32) * ws, axis=0)  # [..., out]
