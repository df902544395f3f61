"""XLA rules for the `llm.*` ops of jaxrt.ir.ops.nn (f32 compute, cast to the result type)."""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.scipy.special import erf

from ...ir import ops
from ...ir.ops.nn import rope_inv_freq
from ..registry import rule
from ._util import F32, cast, contract, upcast


def silu(x):
    return x / (1.0 + jnp.exp(-jnp.clip(x, -88.0, 88.0)))


def gelu(x, approximate: str):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def softmax(x, axis: int = -1):
    """Stable softmax; an all -inf row gives NaN like the reference."""
    m = jnp.max(x, axis=axis, keepdims=True)
    e = jnp.exp(x - jnp.where(jnp.isfinite(m), m, 0.0))
    return e / jnp.sum(e, axis=axis, keepdims=True)


@rule(ops.silu)
def _silu(ctx, x, *, attrs, out_types):
    return cast(silu(upcast(x)), out_types[0])


@rule(ops.gelu)
def _gelu(ctx, x, *, attrs, out_types):
    return cast(gelu(upcast(x), attrs.approximate), out_types[0])


@rule(ops.swiglu)
def _swiglu(ctx, gate, up, *, attrs, out_types):
    return cast(silu(upcast(gate)) * upcast(up), out_types[0])


@rule(ops.geglu)
def _geglu(ctx, gate, up, *, attrs, out_types):
    return cast(gelu(upcast(gate), attrs.approximate) * upcast(up), out_types[0])


@rule(ops.softmax)
def _softmax(ctx, x, *, attrs, out_types):
    return cast(softmax(upcast(x), attrs.axis), out_types[0])


@rule(ops.embedding)
def _embedding(ctx, ids, table, *, attrs, out_types):
    return jnp.take(table, ids, axis=0, mode="clip")  # [..., hidden]


@rule(ops.linear)
def _linear(ctx, x, w, b=None, *, attrs, out_types):
    y = contract(x, w, (x.ndim - 1,), (1,))  # x[..., in] . w[out, in] -> f32[..., out]
    if b is not None:
        y = y + upcast(b)
    return cast(y, out_types[0])


@rule(ops.rms_norm)
def _rms_norm(ctx, x, w, *, attrs, out_types):
    xf = upcast(x)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + attrs.eps)
    return cast(y * (attrs.offset + upcast(w)), out_types[0])


@rule(ops.add_rms_norm)
def _add_rms_norm(ctx, x, r, w, *, attrs, out_types):
    total = cast(upcast(x) + upcast(r), out_types[0])  # as `add` lowers; the norm reads it
    return total, _rms_norm(ctx, total, w, attrs=attrs, out_types=out_types[1:])


@rule(ops.layer_norm)
def _layer_norm(ctx, x, w, b, *, attrs, out_types):
    xf = upcast(x)
    centered = xf - jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    y = centered * lax.rsqrt(var + attrs.eps)
    return cast(y * upcast(w) + upcast(b), out_types[0])


@rule(ops.rope)
def _rope(ctx, x, positions, *, attrs, out_types):
    xf = upcast(x)  # [..., heads, head_dim]
    d = xf.shape[-1]
    inv = jnp.asarray(rope_inv_freq(d, attrs), dtype=F32)  # [d/2], exact float64 -> f32
    ang = positions.astype(F32)[..., None, None] * inv  # [..., 1, d/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if attrs.style == "half":
        x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
        y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        y = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    return cast(y, out_types[0])


@rule(ops.logits)
def _logits(ctx, h, w, *, attrs, out_types):
    y = contract(h, w, (h.ndim - 1,), (1,))  # f32[..., vocab]
    if attrs.softcap is not None:
        y = jnp.tanh(y / attrs.softcap) * attrs.softcap
    return cast(y, out_types[0])


@rule(ops.argmax)
def _argmax(ctx, x, *, attrs, out_types):
    return jnp.argmax(upcast(x), axis=attrs.axis).astype(jnp.int32)
