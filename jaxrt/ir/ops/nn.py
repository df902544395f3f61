"""LLM-level ops (namespace `llm.`): the vocabulary frontends emit and fusions target."""
from __future__ import annotations

import math

import numpy as np

from ..opdef import AttrSpec, OpDef, Trait, VerifyError, register
from ..types import DType, TensorType, broadcast_shapes
from ._util import as_compute, cast_to, infer_float_unary, same_dtype

P, E = Trait.PURE, Trait.ELEMENTWISE

# ---- activations ----------------------------------------------------------------------


def silu_np(x):
    return x / (1.0 + np.exp(-np.clip(x, -88.0, 88.0)))


def gelu_np(x, approximate: str):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float64])(x / math.sqrt(2.0)))


_APPROX = AttrSpec(str, default="tanh", choices=("tanh", "none"))

silu = register(OpDef(
    "llm.silu", 1, traits=frozenset({P, E}), infer=infer_float_unary,
    reference=lambda x, *, attrs, out_types: cast_to(silu_np(as_compute(x)), out_types[0])))

gelu = register(OpDef(
    "llm.gelu", 1, attrs={"approximate": _APPROX}, traits=frozenset({P, E}),
    infer=infer_float_unary,
    reference=lambda x, *, attrs, out_types: cast_to(gelu_np(as_compute(x), attrs.approximate),
                                                     out_types[0])))


def _infer_gated(types, attrs):
    dt = same_dtype(types, "gated activation")
    if not dt.is_float:
        raise VerifyError("gated activation needs float operands")
    return [TensorType(broadcast_shapes(types[0].shape, types[1].shape), dt)]


# swiglu(gate, up) = silu(gate) * up
swiglu = register(OpDef(
    "llm.swiglu", 2, traits=frozenset({P, E}), infer=_infer_gated,
    reference=lambda g, u, *, attrs, out_types: cast_to(
        silu_np(as_compute(g)) * as_compute(u), out_types[0])))

# geglu(gate, up) = gelu(gate) * up
geglu = register(OpDef(
    "llm.geglu", 2, attrs={"approximate": _APPROX}, traits=frozenset({P, E}),
    infer=_infer_gated,
    reference=lambda g, u, *, attrs, out_types: cast_to(
        gelu_np(as_compute(g), attrs.approximate) * as_compute(u), out_types[0])))


def softmax_np(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / np.sum(e, axis=axis, keepdims=True)


softmax = register(OpDef(
    "llm.softmax", 1, attrs={"axis": AttrSpec(int, default=-1)}, infer=infer_float_unary,
    reference=lambda x, *, attrs, out_types: cast_to(softmax_np(as_compute(x), attrs.axis),
                                                     out_types[0])))

# ---- embeddings, projections, norms ----------------------------------------------------


def _infer_embedding(types, attrs):
    ids, table = types
    if ids.dtype != DType.int32 or table.rank != 2:
        raise VerifyError(f"embedding: expects i32 ids and a [vocab, hidden] table, "
                          f"got {ids}, {table}")
    return [TensorType(ids.shape + (table.shape[1],), table.dtype)]


# embedding(ids[...], table[V, H]) -> [..., H]
embedding = register(OpDef(
    "llm.embedding", 2, infer=_infer_embedding,
    reference=lambda ids, table, *, attrs, out_types: np.take(table, ids, axis=0, mode="clip")))


def _infer_linear(types, attrs):
    x, w = types[0], types[1]
    dt = same_dtype(types, "linear")
    if w.rank != 2 or x.shape[-1] != w.shape[1]:
        raise VerifyError(f"linear: expects x[..., in] and w[out, in], got {x}, {w}")
    if len(types) == 3 and types[2].shape != (w.shape[0],):
        raise VerifyError(f"linear: bias {types[2]} must be [{w.shape[0]}]")
    return [TensorType(x.shape[:-1] + (w.shape[0],), dt)]


def _ref_linear(x, w, b=None, *, attrs, out_types):
    y = as_compute(x) @ as_compute(w).T
    if b is not None:
        y = y + as_compute(b)
    return cast_to(y, out_types[0])


# linear(x[..., in], w[out, in], bias[out]?) -> [..., out]   (PyTorch weight layout)
linear = register(OpDef("llm.linear", (2, 3), infer=_infer_linear, reference=_ref_linear))


def _infer_rms_norm(types, attrs):
    x, w = types
    same_dtype(types, "rms_norm")
    if w.shape != (x.shape[-1],):
        raise VerifyError(f"rms_norm: weight {w} must match the last dim of {x}")
    return [x]


def _ref_rms_norm(x, w, *, attrs, out_types):
    xf = as_compute(x)
    y = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + attrs.eps)
    return cast_to(y * (attrs.offset + as_compute(w)), out_types[0])


# rms_norm(x, w) = x / sqrt(mean(x^2) + eps) * (offset + w); Gemma uses offset 1
rms_norm = register(OpDef(
    "llm.rms_norm", 2, attrs={"eps": AttrSpec(float, default=1e-6),
                              "offset": AttrSpec(float, default=0.0)},
    infer=_infer_rms_norm, reference=_ref_rms_norm))

def _infer_add_rms_norm(types, attrs):
    x, r, w = types
    same_dtype(types, "add_rms_norm")
    if r.shape != x.shape:
        raise VerifyError(f"add_rms_norm: residual {r} must have the shape of {x} (no "
                          f"broadcasting)")
    if w.shape != (x.shape[-1],):
        raise VerifyError(f"add_rms_norm: weight {w} must match the last dim of {x}")
    return [x, x]


def _ref_add_rms_norm(x, r, w, *, attrs, out_types):
    total = cast_to(as_compute(x) + as_compute(r), out_types[0])  # rounded like add's
    return total, _ref_rms_norm(total, w, attrs=attrs, out_types=out_types[1:])


# add_rms_norm(x, r, w) = (s, rms_norm(s, w)) with s = x + r, rounded to the result dtype
# before the norm reads it: exactly add then rms_norm (the fuse-add-rmsnorm pass)
add_rms_norm = register(OpDef(
    "llm.add_rms_norm", 3, num_results=2, attrs={"eps": AttrSpec(float, default=1e-6),
                                                 "offset": AttrSpec(float, default=0.0)},
    infer=_infer_add_rms_norm, reference=_ref_add_rms_norm))


def _infer_layer_norm(types, attrs):
    x, w, b = types
    same_dtype(types, "layer_norm")
    if w.shape != (x.shape[-1],) or b.shape != (x.shape[-1],):
        raise VerifyError(f"layer_norm: weight {w} and bias {b} must match the last dim of {x}")
    return [x]


def _ref_layer_norm(x, w, b, *, attrs, out_types):
    xf = as_compute(x)
    centered = xf - np.mean(xf, axis=-1, keepdims=True)
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    y = centered / np.sqrt(var + attrs.eps)
    return cast_to(y * as_compute(w) + as_compute(b), out_types[0])


# layer_norm(x, w, b) = (x - mean(x)) / sqrt(var(x) + eps) * w + b (population variance)
layer_norm = register(OpDef(
    "llm.layer_norm", 3, attrs={"eps": AttrSpec(float, default=1e-5)},
    infer=_infer_layer_norm, reference=_ref_layer_norm))

# ---- rotary embeddings ---------------------------------------------------------------------

ROPE_ATTRS = {
    "theta": AttrSpec(float, default=10000.0),
    "style": AttrSpec(str, default="half", choices=("half", "interleaved")),
    "scaling": AttrSpec(str, default="none", choices=("none", "linear", "llama3")),
    "factor": AttrSpec(float, default=1.0),
    "low_freq_factor": AttrSpec(float, default=1.0),
    "high_freq_factor": AttrSpec(float, default=4.0),
    "original_max_position": AttrSpec(int, default=8192),
}


def rope_inv_freq(head_dim: int, attrs) -> np.ndarray:
    """Inverse frequencies [head_dim/2] in float64, with HF's linear and llama3 scaling."""
    inv = 1.0 / (attrs.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if attrs.scaling == "linear":
        inv = inv / attrs.factor
    elif attrs.scaling == "llama3":
        low_wl = attrs.original_max_position / attrs.low_freq_factor
        high_wl = attrs.original_max_position / attrs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / attrs.factor, inv)
        smooth = (attrs.original_max_position / wavelen - attrs.low_freq_factor) / (
            attrs.high_freq_factor - attrs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / attrs.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv


def _infer_rope(types, attrs):
    x, pos = types
    if pos.dtype != DType.int32 or x.rank < 2 or pos.shape != x.shape[:-2]:
        raise VerifyError(f"rope: expects x[..., heads, head_dim] and i32 positions[...], "
                          f"got {x}, {pos}")
    if not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
        raise VerifyError(f"rope: head_dim of {x} must be static and even")
    return [x]


def _ref_rope(x, pos, *, attrs, out_types):
    xf = as_compute(x)
    inv = rope_inv_freq(xf.shape[-1], attrs).astype(np.float32)
    ang = pos.astype(np.float32)[..., None, None] * inv  # [..., 1, D/2]
    cos, sin = np.cos(ang), np.sin(ang)
    if attrs.style == "half":
        h = xf.shape[-1] // 2
        x1, x2 = xf[..., :h], xf[..., h:]
        y = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        y = np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    return cast_to(y, out_types[0])


# rope(x[..., heads, head_dim], positions[...]): rotary position embedding
rope = register(OpDef("llm.rope", 2, attrs=ROPE_ATTRS, infer=_infer_rope, reference=_ref_rope))

# ---- logits and argmax -----------------------------------------------------------------------


def _infer_logits(types, attrs):
    h, w = types
    same_dtype(types, "logits")
    if w.rank != 2 or h.shape[-1] != w.shape[1]:
        raise VerifyError(f"logits: expects h[..., hidden] and w[vocab, hidden], got {h}, {w}")
    return [TensorType(h.shape[:-1] + (w.shape[0],), DType.f32)]


def _ref_logits(h, w, *, attrs, out_types):
    y = as_compute(h) @ as_compute(w).T
    if attrs.softcap is not None:
        y = np.tanh(y / attrs.softcap) * attrs.softcap
    return y.astype(np.float32)


# logits(h[..., H], w[V, H]) -> f32[..., V], optional final soft-cap tanh(y/c)*c
logits = register(OpDef(
    "llm.logits", 2, attrs={"softcap": AttrSpec(float, default=None, optional=True)},
    infer=_infer_logits, reference=_ref_logits))


def _infer_argmax(types, attrs):
    (x,) = types
    ax = attrs.axis % x.rank if -x.rank <= attrs.axis < x.rank else None
    if ax is None:
        raise VerifyError(f"argmax: axis {attrs.axis} out of range for {x}")
    return [TensorType(tuple(d for i, d in enumerate(x.shape) if i != ax), DType.int32)]


argmax = register(OpDef(
    "llm.argmax", 1, attrs={"axis": AttrSpec(int, default=-1)}, infer=_infer_argmax,
    reference=lambda x, *, attrs, out_types: np.argmax(as_compute(x), axis=attrs.axis)
    .astype(np.int32)))
