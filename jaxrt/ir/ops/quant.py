"""Quantization ops (namespace `quant.`); formats and math in jaxrt/ir/quant.py.

    quant.quantize(x, scale) {dtype}     float x -> i8/f8e4m3fn codes of x / scale
    quant.dequantize(q, scale) {dtype}   codes -> float q * scale (rounded to `dtype`)
    quant.linear(x, wq, scale, bias?) {act}
        y[..., out] = x[..., in] . dequantize(wq[out, in], scale)^T (+ bias)

`quant.linear` is the canonical form of a quantized projection, rather than `llm.linear`
fed by a `quant.dequantize`: the lowering must see activation, codes and scales
together to choose the contraction ((x . codes^T) * scale for weight-only, an int8 x int8
-> int32 or fp8 x fp8 -> f32 dot for `act = token`), and one op cannot be split by
other rewrites (CSE could share a dequantize between uses, DCE could not tell a
dequantized weight from a float one). `act = token` quantizes x per token at run time
to the weight's dtype (dynamic W8A8: no calibration).
"""
from __future__ import annotations

import numpy as np

from .. import quant as Q
from ..opdef import AttrSpec, OpDef, VerifyError, register
from ..types import DType, TensorType
from ._util import as_compute, cast_to

_DTYPE = AttrSpec(DType)
ACT_MODES = ("none", "token")


def _infer_quantize(types, attrs):
    x, scale = types
    if not x.dtype.is_float or x.dtype in Q.QUANT_DTYPES:
        raise VerifyError(f"quant.quantize: expects a float tensor, got {x}")
    Q.check_quant_dtype(attrs.dtype, "quant.quantize")
    Q.check_scale(x, scale, "quant.quantize")
    return [x.with_dtype(attrs.dtype)]


def _infer_dequantize(types, attrs):
    q, scale = types
    Q.check_quant_dtype(q.dtype, "quant.dequantize")
    if not attrs.dtype.is_float or attrs.dtype in Q.QUANT_DTYPES:
        raise VerifyError(f"quant.dequantize: result dtype must be f32, bf16 or f16, "
                          f"got {attrs.dtype.value}")
    Q.check_scale(q, scale, "quant.dequantize")
    return [q.with_dtype(attrs.dtype)]


quantize = register(OpDef(
    "quant.quantize", 2, attrs={"dtype": _DTYPE}, infer=_infer_quantize,
    reference=lambda x, s, *, attrs, out_types: Q.quantize(as_compute(x), s, attrs.dtype)))

dequantize = register(OpDef(
    "quant.dequantize", 2, attrs={"dtype": _DTYPE}, infer=_infer_dequantize,
    reference=lambda q, s, *, attrs, out_types: cast_to(Q.dequantize(q, s), out_types[0])))


def _infer_qlinear(types, attrs):
    x, w, scale = types[:3]
    what = "quant.linear"
    if not x.dtype.is_float or x.dtype in Q.QUANT_DTYPES:
        raise VerifyError(f"{what}: activations must be f32, bf16 or f16, got {x}")
    Q.check_quant_dtype(w.dtype, what)
    if w.rank != 2 or x.shape[-1] != w.shape[1]:
        raise VerifyError(f"{what}: expects x[..., in] and w[out, in], got {x}, {w}")
    Q.check_scale(w, scale, what)
    if len(types) == 4 and (types[3].shape != (w.shape[0],) or types[3].dtype != x.dtype):
        raise VerifyError(f"{what}: bias {types[3]} must be {x.dtype.value}[{w.shape[0]}]")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


def _ref_qlinear(x, w, scale, b=None, *, attrs, out_types):
    out_dtype = out_types[0]
    if attrs.act == "none":
        # The dequantized weight in f32, unrounded: the lowering contracts the codes and
        # scales the f32 result, (x . w^T) * scale per group, which is this product.
        y = as_compute(x) @ Q.dequantize(w, scale).T
    else:
        y = token_linear(as_compute(x), w, scale)
    if b is not None:
        y = y + as_compute(b)
    return cast_to(y, out_dtype)


def token_linear(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x . dequantize(w)^T with x quantized per token to w's dtype: the codes are
    contracted exactly (int64 for int8; float64 for fp8, whose products are exact)
    group by group, then scaled."""
    dtype = DType.from_numpy(w.dtype)
    xs = Q.token_scale(x, dtype)  # [..., 1]
    xq = Q.quantize(x, xs, dtype)
    out, n = w.shape
    g = scale.shape[-1]
    acc_t = np.int64 if dtype == DType.int8 else np.float64
    xg = xq.astype(acc_t).reshape(xq.shape[:-1] + (g, n // g))  # [..., G, gs]
    wg = w.astype(acc_t).reshape(out, g, n // g)  # [out, G, gs]
    acc = np.einsum("...gk,ogk->...og", xg, wg).astype(np.float64)  # [..., out, G]
    ws = np.broadcast_to(np.asarray(scale, np.float64), (out, g))
    return ((acc * ws).sum(axis=-1) * xs.astype(np.float64)).astype(np.float32)


linear = register(OpDef(
    "quant.linear", (3, 4), attrs={"act": AttrSpec(str, default="none", choices=ACT_MODES)},
    infer=_infer_qlinear, reference=_ref_qlinear))
