"""raise-llm-ops: recognize LLM ops in imported primitive graphs (run canonicalize first).

A JAX model imported through its jaxpr (`jaxrt/frontends/jax_import.py`) is primitives:
`dot_general`, `mul`, `reduce_sum`, ... This pass raises the spellings Flax NNX / MaxText /
gpt-fast-style code produces to `llm.*` ops, so the KV-cache insertion, fusions and
kernels see the same ops a hand-written builder emits:

    rms-norm   x * rsqrt(sum(x*x)/n + eps) * w          -> rms_norm(x, w) {eps}
    layer-norm (x - mean x) * rsqrt(var x + eps) * w + b -> layer_norm(x, w, b) {eps}
               (var two-pass or E[x^2] - E[x]^2, Flax's fast form; / sqrt as well)
               ... * (1 + w)  (Gemma)                    -> rms_norm(x, w) {offset = 1}
    silu       x * 1/(1 + exp(-x))                       -> silu(x)
    gelu-tanh  x * 0.5 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  -> gelu(x) {tanh}
    geglu      gelu(g) * u                               -> geglu(g, u)
    swiglu     silu(g) * u                               -> swiglu(g, u)
    softmax    exp(x - max(x)) / sum(exp(x - max(x)))    -> softmax(x)
    linear     dot_general(x, w[in, out])                -> linear(x, @w.T)  (weight def)
               dot_general(x, transpose(w[out, in]))     -> linear(x, w)
               linear(x, w) + b[out]                     -> linear(x, w, b)
    embedding  take(w[V, H], ids (negatives wrapped))    -> embedding(ids, w)
    rope       x*cos(E) + rotate_half(x)*sin(E), E = concat(p*f, p*f), f the frequencies
               of some theta (optionally / a linear factor)  -> rope(x, p) {theta, ...}
               stack([x1 c - x2 s, x1 s + x2 c], -1), x1/x2 = x[..., 0::2]/x[..., 1::2]
                                                     -> rope(x, p) {style = interleaved}
    attention  softmax(mask(q.k * scale)) . v, causal mask from one positions vector, GQA
               by repeat (broadcast + reshape)       -> attention(q, k, v) {scale, causal}
               or by reshape: q[T, KVH, G, D] . k[S, KVH, D] batched over KVH (gpt-fast,
               MaxText; [T, G, KVH, D] too, its heads reordered kv-major)
               mask & (p[:, None] - p[None, :] < w)  -> ... {window = w}
               tanh(q.k * scale / c) * c             -> ... {softcap = c}

Rules whose handler declines record why in `RaiseLLMOps.misses` (rule -> last reason),
which `jaxrt inspect` and `insert-kv-cache`'s errors report.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxrt.ir import ops
from jaxrt.ir.module import Value
from jaxrt.ir.ops.nn import rope_inv_freq
from jaxrt.ir.types import DType, TensorType
from jaxrt.ir.weights import WeightDef

from .manager import RewritePass, register_pass
from .pattern import Any, Const, Pat, splat_value
from .rewrite import Rule, RuleSet, apply_rules

F32 = DType.f32


def _miss(rw, rule: str, reason: str):
    misses = getattr(rw.ctx, "misses", None)
    if misses is not None:
        misses[rule] = reason
    return None


def strip_shape(v: Value) -> Value:
    """Look through reshapes and broadcasts that only add or repeat size-1 axes."""
    while v.owner is not None and v.owner.opdef in (ops.reshape, ops.broadcast):
        src = v.owner.operands[0]
        if v.owner.opdef is ops.reshape:
            if [d for d in src.shape if d != 1] != [d for d in v.shape if d != 1]:
                return v
        v = src
    return v


def _const_array(v: Value):
    v = strip_shape(v)
    if v.owner is None or v.owner.opdef is not ops.constant:
        return None
    val = v.owner.attrs.value
    arr = np.asarray(val, np.float64)
    return arr.reshape(v.shape) if isinstance(val, tuple) else np.full(v.shape, arr)


def _is(v: Value, opdef) -> bool:
    return v.owner is not None and v.owner.opdef is opdef


# ---- rms-norm ---------------------------------------------------------------------------------

_NORMED = Pat(ops.mul, "x", Pat(ops.rsqrt, Pat(ops.add, Pat(ops.div, Pat(
    ops.reshape, Pat(ops.reduce_sum, Pat(ops.mul, "x", "x"), name="sum")), Const(name="n")),
    Const(name="eps"))), name="normed")


def raise_rms_norm(rw, x, sum, n, eps, normed, w):
    h = x.shape[-1]
    axes = sum.owner.attrs.axes
    if tuple(a % x.type.rank for a in axes) != (x.type.rank - 1,):
        return _miss(rw, "rms-norm", f"sum over axes {axes}, not the last")
    if splat_value(n) != float(h):
        return _miss(rw, "rms-norm", f"mean divides by {splat_value(n)}, not {h}")
    w = strip_shape(w)
    offset = 0.0
    if _is(w, ops.add) and splat_value(w.owner.operands[1]) == 1.0:
        w, offset = strip_shape(w.owner.operands[0]), 1.0
    if w.shape != (h,) or w.dtype != x.dtype:
        return _miss(rw, "rms-norm", f"scale {w.type} is not a [{h}] vector")
    return rw(ops.rms_norm, x, w, eps=_shortest(splat_value(eps)), offset=offset)


# ---- layer-norm -------------------------------------------------------------------------------

def _mean_of(v: Value):
    """sum(x, last axis) / n (reshapes around either) with n = x's last dim -> x."""
    v = strip_shape(v)
    if not _is(v, ops.div):
        return None
    total, n = v.owner.operands
    total = strip_shape(total)
    if not _is(total, ops.reduce_sum):
        return None
    x = total.owner.operands[0]
    last = x.type.rank - 1
    if tuple(a % x.type.rank for a in total.owner.attrs.axes) != (last,) or \
            splat_value(n) != float(x.shape[-1]):
        return None
    return x


def _centered(v: Value):
    """x - mean(x) -> x, else None."""
    v = strip_shape(v)
    if _is(v, ops.sub):
        x, m = v.owner.operands
        if _mean_of(m) is x:
            return x
    return None


def _variance_of(v: Value):
    """mean((x - mean x)^2), or E[x^2] - E[x]^2 (Flax's fast form, maybe clamped at 0)
    -> x, else None."""
    v = strip_shape(v)
    if _is(v, ops.maximum) and splat_value(v.owner.operands[1]) == 0.0:
        v = strip_shape(v.owner.operands[0])
    sq = _mean_of(v)
    if sq is not None and _is(sq, ops.mul) and sq.owner.operands[0] is sq.owner.operands[1]:
        return _centered(sq.owner.operands[0])  # two-pass
    if _is(v, ops.sub):
        ex2, m2 = v.owner.operands
        sq = _mean_of(ex2)
        m2 = strip_shape(m2)
        if sq is not None and _is(sq, ops.mul) and sq.owner.operands[0] is \
                sq.owner.operands[1] and _is(m2, ops.mul) and \
                strip_shape(m2.owner.operands[0]) is strip_shape(m2.owner.operands[1]):
            x = sq.owner.operands[0]
            if _mean_of(m2.owner.operands[0]) is x:
                return x
    return None


def _inverse_std(v: Value, inverted: bool):
    """rsqrt(var(x) + eps) (or sqrt(...) under a division) -> (x, eps), else None."""
    v = strip_shape(v)
    if not _is(v, ops.sqrt if inverted else ops.rsqrt):
        return None
    s = strip_shape(v.owner.operands[0])
    if not _is(s, ops.add) or splat_value(s.owner.operands[1]) is None:
        return None
    x = _variance_of(s.owner.operands[0])
    return None if x is None else (x, _shortest(splat_value(s.owner.operands[1])))


def _factors(v: Value, out: list, inverted: bool = False) -> list:
    """The leaves of a product (mul, and div whose divisor is kept as inverted)."""
    if _is(v, ops.mul):
        for o in v.owner.operands:
            _factors(o, out, inverted)
    elif _is(v, ops.div) and splat_value(v.owner.operands[1]) is None:
        _factors(v.owner.operands[0], out, inverted)
        out.append((v.owner.operands[1], not inverted))
    else:
        out.append((v, inverted))
    return out


def _layer_norm_parts(factors):
    """The factors (x - mean x), rsqrt(var x + eps) (or a divisor sqrt(...)) and w, in any
    order -> (x, w, eps), else None."""
    if len(factors) != 3:
        return None
    centered = [f for f, inv in factors if not inv and _centered(f) is not None]
    stds = [(f, st) for f, inv in factors if (st := _inverse_std(f, inv)) is not None]
    if len(centered) != 1 or len(stds) != 1:
        return None
    x = _centered(centered[0])
    std_factor, (source, eps) = stds[0]
    rest = [(f, inv) for f, inv in factors if f is not centered[0] and f is not std_factor]
    if source is not x or len(rest) != 1 or rest[0][1]:
        return None
    return x, strip_shape(rest[0][0]), eps


def raise_layer_norm(rw, y, b):
    """(x - mean x) * rsqrt(var x + eps) * w + b, in any association -> layer_norm."""
    for prod, bias in ((y, b), (b, y)):
        parts = _layer_norm_parts(_factors(prod, []))
        if parts is None:
            continue
        x, w, eps = parts
        bias, h = strip_shape(bias), x.shape[-1]
        if w.shape != (h,) or bias.shape != (h,) or not (w.dtype == bias.dtype == x.dtype):
            return _miss(rw, "layer-norm", f"scale {w.type} or bias {bias.type} is not a "
                                           f"[{h}] vector of {x.dtype}")
        return rw(ops.layer_norm, x, w, bias, eps=eps)
    return None


# ---- activations and softmax -----------------------------------------------------------------

def raise_silu(rw, x):
    return rw(ops.silu, x)


def raise_swiglu(rw, g, u):
    return rw(ops.swiglu, g, u) if g.type == u.type else None


_CUBE = Pat(ops.mul, "x", Pat(ops.mul, "x", "x"))
_GELU_TANH = Pat(ops.mul, "x", Pat(ops.mul, Pat(ops.add, Pat(ops.tanh, Pat(ops.mul, Pat(
    ops.add, "x", Pat(ops.mul, _CUBE, Const(name="c3"))), Const(name="k"))), Const(1.0)),
    Const(0.5)))


def raise_gelu_tanh(rw, x, c3, k):
    if not (np.isclose(splat_value(c3), 0.044715, rtol=1e-6)
            and np.isclose(splat_value(k), np.sqrt(2 / np.pi), rtol=1e-6)):
        return _miss(rw, "gelu-tanh", f"constants {splat_value(c3)}, {splat_value(k)} are "
                                      f"not 0.044715 and sqrt(2/pi)")
    return rw(ops.gelu, x, approximate="tanh")


def raise_geglu(rw, g, u):
    if g.type != u.type:
        return None
    return rw(ops.geglu, g, u, approximate=rw.root.owner.operands[0].owner.attrs.approximate
              if _is(rw.root.owner.operands[0], ops.gelu) else
              rw.root.owner.operands[1].owner.attrs.approximate)


_EXP = Pat(ops.exp, Pat(ops.sub, "x", Any("m")), name="e")


def raise_softmax(rw, x, m, e, s):
    axis = x.type.rank - 1
    red = strip_shape(s)
    if not _is(red, ops.reduce_sum) or red.owner.operands[0] is not e or \
            tuple(red.owner.attrs.axes) != (axis,):
        return _miss(rw, "softmax", "denominator is not the sum of the numerator over the "
                                    "last axis")
    mx = strip_shape(m)
    if _is(mx, ops.maximum):  # max(reduce_max(x), -inf), as jax.nn.softmax spells it
        a, c = mx.owner.operands
        if splat_value(c) != -np.inf:
            return _miss(rw, "softmax", "max against a constant other than -inf")
        mx = strip_shape(a)
    if not _is(mx, ops.reduce_max) or mx.owner.operands[0] is not x or \
            tuple(mx.owner.attrs.axes) != (axis,):
        return _miss(rw, "softmax", "subtracted value is not the max over the last axis")
    return rw(ops.softmax, x, axis=-1)


# ---- linear, embedding ------------------------------------------------------------------------

def _is_weight(v: Value) -> bool:
    return _is(v, ops.weight)


def raise_linear(rw, x, w):
    a = w.owner.attrs if w.owner is not None else None
    dg = rw.root.owner.attrs
    if dg.lhs_batch or dg.rhs_batch or dg.lhs_contract != (x.type.rank - 1,):
        return _miss(rw, "linear", "not a contraction of x's last axis without batch dims")
    if w.type.rank != 2:
        return _miss(rw, "linear", f"weight {w.type} is not a matrix")
    if _is(w, ops.transpose) and _is_weight(w.owner.operands[0]) and dg.rhs_contract == (0,):
        return rw(ops.linear, x, w.owner.operands[0])  # x @ w.T, w[out, in]
    if not _is_weight(w):
        return _miss(rw, "linear", "the matrix is not a weight")
    name = a.name
    if dg.rhs_contract == (1,):
        return rw(ops.linear, x, w)
    tname = f"{name}.T"  # [in, out] (Flax kernels) -> [out, in]
    if tname not in rw.module.weights:
        rw.module.weights[tname] = TensorType(w.shape[::-1], w.dtype)
        rw.module.weight_defs[tname] = WeightDef("transpose", (name,), (("perm", (1, 0)),))
    return rw(ops.linear, x, rw.weight(tname))


def raise_linear_bias(rw, y, b):
    """linear(x, w) + b[out] (a bias weight, broadcast over rows) -> linear(x, w, b)."""
    op = y.owner
    bias = strip_shape(b)
    if len(op.operands) != 2 or not _is_weight(bias) or bias.shape != (y.shape[-1],) or \
            bias.dtype != y.dtype:
        return None
    if rw.num_uses(y) != 1:  # another user needs the product without the bias
        return _miss(rw, "linear-bias", "the product without its bias has other uses")
    return rw(ops.linear, *op.operands, bias)


def raise_embedding(rw, table, ids):
    if rw.root.owner.attrs.axis != 0 or table.type.rank != 2:
        return _miss(rw, "embedding", "not a row lookup in a [vocab, hidden] table")
    if _is(ids, ops.select):  # jnp.take wraps negative ids: where(ids < 0, ids + V, ids)
        p, wrapped, raw = ids.owner.operands
        if (_is(p, ops.compare) and p.owner.operands[0] is raw and _is(wrapped, ops.add)
                and wrapped.owner.operands[0] is raw):
            ids = raw
    return rw(ops.embedding, ids, table)


# ---- rope -------------------------------------------------------------------------------------

def _rotate_half_of(v: Value):
    """concat(-x[..., h:], x[..., :h]) -> x, else None."""
    if not _is(v, ops.concat) or len(v.owner.operands) != 2:
        return None
    a, b = v.owner.operands
    if not _is(a, ops.neg) or not _is(b, ops.slice_):
        return None
    hi = a.owner.operands[0]
    if not _is(hi, ops.slice_):
        return None
    x = b.owner.operands[0]
    d = x.shape[-1]
    last = x.type.rank - 1
    ha, la = hi.owner.attrs, b.owner.attrs
    if (hi.owner.operands[0] is not x or ha.axis % x.type.rank != last
            or la.axis % x.type.rank != last or (ha.start, ha.limit) != (d // 2, d)
            or (la.start, la.limit) != (0, d // 2) or ha.stride != 1 or la.stride != 1):
        return None
    return x


def _positions_times_frequencies(f: Value):
    """positions[:, None] (maybe converted) * constant frequencies -> (positions, inv)."""
    if not _is(f, ops.mul):
        return None
    for p, c in (f.owner.operands, f.owner.operands[::-1]):
        inv = _const_array(c)
        p = strip_shape(p)
        if _is(p, ops.convert):
            p = strip_shape(p.owner.operands[0])
        if inv is not None and p.dtype == DType.int32:
            return p, inv.reshape(-1)
    return None


def _rope_angles(e: Value):
    """E = concat(F, F), F = positions[:, None] * inv_freq -> (positions, inv_freq)."""
    if not _is(e, ops.concat) or len(e.owner.operands) != 2 or \
            e.owner.operands[0] is not e.owner.operands[1]:
        return None
    return _positions_times_frequencies(e.owner.operands[0])


def _finish_rope(rw, rule: str, x: Value, cos: Value, sin: Value, angles_of, shape: str,
                 **style):
    """rope(x, positions) from cos/sin of one angle tensor that `angles_of` reads as
    (positions, constant frequencies) spelled `shape`, else a recorded miss."""
    c, s = strip_shape(cos), strip_shape(sin)
    if not (_is(c, ops.cos) and _is(s, ops.sin) and c.owner.operands[0] is s.owner.operands[0]):
        return _miss(rw, rule, "cos/sin are not of one angle tensor")
    got = angles_of(c.owner.operands[0])
    if got is None:
        return _miss(rw, rule, f"angles are not {shape} with constant frequencies f")
    pos, inv = got
    if pos.shape != x.shape[:-2]:
        return _miss(rw, rule, f"positions {pos.type} do not match {x.type}")
    attrs = _fit_theta(inv, x.shape[-1])
    if attrs is None:
        return _miss(rw, rule, "frequencies are not theta ** (-2i/d) of any theta (plain, "
                               "linear or llama3-scaled)")
    return rw(ops.rope, x, pos, **style, **attrs)


def _fit_theta(inv: np.ndarray, head_dim: int):
    """RoPE attrs whose frequencies are `inv` (plain, linearly scaled or llama3-scaled),
    else None."""
    if inv.size != head_dim // 2 or inv.size < 2 or np.any(inv <= 0):
        return None
    ratio = inv[1] / inv[0]  # theta ** (-2 / d)
    factor = float(1.0 / inv[0])
    scaled = {"scaling": "linear", "factor": _shortest(factor)} \
        if abs(factor - 1.0) > 1e-6 else {}
    # the shortest decimal theta whose frequencies these are (10000, not the 9999.999 a
    # float32 ratio raised to d/2 gives), as configs and the builders write it
    for theta in _round_candidates(float(ratio ** (-head_dim / 2.0))):
        attrs = {"theta": theta, **scaled}
        if _frequencies_match(inv, head_dim, attrs):
            return attrs
    # llama3 keeps the highest frequencies and scales the lowest: theta from either pair
    # (a float32 ratio raised to the d/2 leaves theta a few ulps * d off: round candidates)
    for a, b in ((0, 1), (-2, -1)):
        estimate = float((inv[b] / inv[a]) ** (-head_dim / 2.0))
        for theta in _round_candidates(estimate):
            attrs = _fit_llama3(inv, head_dim, theta)
            if attrs is not None:
                return attrs
    return None


def _round_candidates(estimate: float) -> list[float]:
    """`estimate` rounded to 1..7 significant digits, then as a float32: shortest first."""
    return list(dict.fromkeys([float(f"{estimate:.{digits}g}") for digits in range(1, 8)]
                              + [float(np.float32(estimate))]))


def _shortest(x: float) -> float:
    """The shortest decimal with x's float32 value (a float32 constant's 9.99999974e-06
    -> 1e-05): what the attribute means, as configs and the builders write it."""
    return float(str(np.float32(x)))


def _frequencies_match(inv: np.ndarray, head_dim: int, attrs: dict) -> bool:
    probe = _Attrs(**{"scaling": "none", "factor": 1.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position": 8192, **attrs})
    return bool(np.allclose(inv, rope_inv_freq(head_dim, probe), rtol=1e-5, atol=0))


def _fit_llama3(inv: np.ndarray, head_dim: int, theta: float):
    """Llama 3's scaling keeps the high frequencies, divides
    the low ones by `factor` and blends a band between, linearly in frequency:
    blend = A * f + B with A = orig / (2 pi (high - low)), B = -low / (high - low). Only
    the ratios orig : low : high matter, so low = 1; without a blended band the common
    (low, high) = (1, 4) is tried with power-of-two original lengths."""
    plain = rope_inv_freq(head_dim, _Attrs(theta=theta, scaling="none"))
    kept = inv / plain  # 1 for kept, 1 / factor for scaled
    factor = float(1.0 / kept[-1])
    if factor <= 1.0 + 1e-6:
        return None
    blend = (kept - 1.0 / factor) / (1.0 - 1.0 / factor)  # 1 kept ... 0 scaled
    band = (blend > 1e-4) & (blend < 1 - 1e-4)
    candidates = []
    if band.sum() >= 2:
        a, b = np.polyfit(plain[band], blend[band], 1)
        if b < 0:
            high = 1.0 - 1.0 / b
            candidates.append((1.0, high, round(2 * np.pi * a * (high - 1.0))))
    candidates += [(1.0, high, 2 ** k) for high in (4.0, 2.0, 8.0) for k in range(4, 21)]
    if not band.any() and (blend > 0.5).any() and (blend < 0.5).any():
        # no blended band: any orig below the shortest scaled wavelength and a high factor
        # keeping the longest kept one below orig / high give these frequencies
        wavelen = 2 * np.pi / plain
        kept_max, scaled_min = wavelen[blend > 0.5].max(), wavelen[blend < 0.5].min()
        orig = int(np.ceil(scaled_min)) - 1
        if orig > kept_max:
            candidates.append((1.0, float((1.0 + orig / kept_max) / 2), orig))
    for low, high, orig in candidates:
        attrs = {"theta": theta, "scaling": "llama3", "factor": float(np.float32(factor)),
                 "low_freq_factor": float(low), "high_freq_factor": float(np.float32(high)),
                 "original_max_position": int(orig)}
        if orig >= 1 and _frequencies_match(inv, head_dim, attrs):
            # written shortest, as configs do: factor 32, not the 31.999998 float32 gives
            for f in _round_candidates(factor):
                for h in _round_candidates(high):
                    short = {**attrs, "factor": f, "high_freq_factor": h}
                    if _frequencies_match(inv, head_dim, short):
                        return short
            return attrs
    return None


class _Attrs:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def raise_rope(rw, a, b):
    for xc, rs in ((a, b), (b, a)):
        x, cos = xc.owner.operands
        for x, cos in ((x, cos), (cos, x)):
            r, sin = rs.owner.operands
            for r, sin in ((r, sin), (sin, r)):
                if _rotate_half_of(r) is not x:
                    continue
                return _finish_rope(rw, "rope", x, cos, sin, _rope_angles,
                                    "concat(p*f, p*f)")
    return _miss(rw, "rope", "no operand is rotate_half(x) * sin beside x * cos")


def _parity_of(v: Value):
    """x[..., p::2] (a take of constant ids p, p+2, ... or a stride-2 slice on the last
    axis) -> (x, p), else None."""
    if _is(v, ops.take) and v.owner.attrs.axis % v.type.rank == v.type.rank - 1:
        x, ids = v.owner.operands
        ids_v = _const_array(ids)
        d = x.shape[-1]
        if ids_v is not None and isinstance(d, int) and d % 2 == 0:
            flat = ids_v.reshape(-1)
            for p in (0, 1):
                if flat.shape == (d // 2,) and np.array_equal(flat, np.arange(p, d, 2)):
                    return x, p
    if _is(v, ops.slice_):
        a = v.owner.attrs
        x = v.owner.operands[0]
        d = x.shape[-1]
        if a.axis % x.type.rank == x.type.rank - 1 and a.stride == 2 and a.start in (0, 1) \
                and isinstance(d, int) and a.limit >= d - 1 + a.start - (d - 1) % 2:
            return x, a.start
    return None


def _split_products(v: Value, opdef):
    """opdef(mul(a, b), mul(c, d)) -> ((a, b), (c, d)), else None."""
    if not _is(v, opdef):
        return None
    l, r = v.owner.operands
    if not (_is(l, ops.mul) and _is(r, ops.mul)):
        return None
    return tuple(l.owner.operands), tuple(r.owner.operands)


def _even_odd_times(pair):
    """mul operands (x[..., p::2], t) in either order -> (x, p, t), else None."""
    for a, b in (pair, pair[::-1]):
        got = _parity_of(a)
        if got is not None:
            return got[0], got[1], b
    return None


def raise_rope_interleaved(rw, y, parts):
    """reshape(stack([x1 c - x2 s, x1 s + x2 c], -1), x.shape) with x1 = x[..., 0::2],
    x2 = x[..., 1::2] and c, s = cos, sin(p * f) -> rope(x, p) {style = interleaved}."""
    a, b = (strip_shape(o) for o in parts.owner.operands)
    if parts.owner.attrs.axis % parts.type.rank != parts.type.rank - 1 or \
            parts.shape[-1] != 2:
        return None
    minus, plus = _split_products(a, ops.sub), _split_products(b, ops.add)
    if minus is None or plus is None:
        return None
    terms = [_even_odd_times(t) for t in (*minus, *plus)]
    if any(t is None for t in terms):
        return _miss(rw, "rope-interleaved", "the rotated halves are not x[..., 0::2] and "
                                             "x[..., 1::2] times cos and sin")
    (x0, p0, c0), (x1, p1, s0) = terms[0], terms[1]
    plus_terms = sorted(terms[2:], key=lambda t: t[1])  # (even, sin), (odd, cos)
    (x2, p2, s1), (x3, p3, c1) = plus_terms
    if not (x0 is x1 is x2 is x3 and (p0, p1, p2, p3) == (0, 1, 0, 1)
            and strip_shape(c0) is strip_shape(c1) and strip_shape(s0) is strip_shape(s1)):
        return _miss(rw, "rope-interleaved", "x[0::2] c - x[1::2] s and x[0::2] s + "
                                             "x[1::2] c do not share x, cos and sin")
    x = x0
    if y.shape != x.shape:
        return None
    return _finish_rope(rw, "rope-interleaved", x, c0, s0, _positions_times_frequencies,
                        "p*f", style="interleaved")


# ---- attention --------------------------------------------------------------------------------

def _unrepeat(v: Value):
    """k[T, H, D] = reshape(broadcast(reshape(k[T, KVH, D], [T, KVH, 1, D]))) ->
    (k's source, [T, KVH, D]) (GQA by jnp.repeat), else (v, its shape)."""
    if _is(v, ops.reshape):
        b = v.owner.operands[0]
        if _is(b, ops.broadcast) and b.type.rank == 4:
            src = b.owner.operands[0]
            if _is(src, ops.reshape) and src.shape[2] == 1 and \
                    v.shape == (src.shape[0], b.shape[1] * b.shape[2], src.shape[3]):
                return src.owner.operands[0], (src.shape[0], src.shape[1], src.shape[3])
    return v, v.shape


def _causal_positions(mask: Value):
    """mask = (p[:, None] >= p[None, :]) (or <= swapped) -> p, else None."""
    m = strip_shape(mask)
    if not _is(m, ops.compare) or m.type.rank != 2:
        return None
    a, b = (strip_shape(o) for o in m.owner.operands)
    d = m.owner.attrs.direction
    if a is b and d in ("ge", "le"):
        ra, rb = m.owner.operands
        rows_first = ra.type.shape[1:] == (1,) and rb.type.shape[:1] == (1,)
        if (d == "ge") == rows_first:
            return a
    return None


def _window_of(mask: Value, pos: Value):
    """mask = (p[:, None] - p[None, :] < w) (or <= w - 1) over the positions p -> the
    window w (keys with q_pos - k_pos >= w masked: transformers' and Gemma's), else None."""
    m = strip_shape(mask)
    if not _is(m, ops.compare) or m.type.rank != 2:
        return None
    diff, bound = m.owner.operands
    w = splat_value(bound)
    d = m.owner.attrs.direction
    if w is None or d not in ("lt", "le") or not _is(diff, ops.sub):
        return None
    rows, cols = diff.owner.operands
    if strip_shape(rows) is not pos or strip_shape(cols) is not pos or \
            rows.type.shape[1:] != (1,) or cols.type.shape[:1] != (1,):
        return None
    window = int(w) + (1 if d == "le" else 0)
    return window if window == w + (1 if d == "le" else 0) and window >= 1 else None


def _mask_positions(mask: Value):
    """A causal mask, or a causal mask `&` a sliding window (in either order) ->
    (positions, window or None); None for any other mask."""
    pos = _causal_positions(mask)
    if pos is not None:
        return pos, None
    m = strip_shape(mask)
    if _is(m, ops.minimum) and m.dtype == DType.bool_:  # boolean and
        for causal, window in (m.owner.operands, reversed(m.owner.operands)):
            pos = _causal_positions(causal)
            w = None if pos is None else _window_of(window, pos)
            if w is not None:
                return pos, w
    return None


def _softcapped(v: Value):
    """v = tanh(x / c) * c (or x * (1/c) inside) -> (x, c), else (v, None)."""
    if not _is(v, ops.mul):
        return v, None
    t, cap = v.owner.operands
    c = splat_value(cap)
    if c is None or not _is(t, ops.tanh) or c <= 0:
        return v, None
    inner = t.owner.operands[0]
    if _is(inner, ops.div) and splat_value(inner.owner.operands[1]) == c:
        return inner.owner.operands[0], float(c)
    if _is(inner, ops.mul) and splat_value(inner.owner.operands[1]) is not None and \
            np.isclose(splat_value(inner.owner.operands[1]) * c, 1.0, rtol=1e-6):
        return inner.owner.operands[0], float(c)
    return v, None


def _masked_scores(rw, probs: Value):
    """softmax(select(causal mask, scores, -inf)) with scores soft-capped and scaled ->
    (scores before the scale, positions, window, softcap, scale), else None (a recorded
    miss)."""
    s = probs.owner.operands[0]
    if not _is(s, ops.select):
        return _miss(rw, "attention", "scores are not masked with select (a bidirectional "
                                      "or unmasked softmax is not causal attention)")
    mask, scores, fill = s.owner.operands
    causal = _mask_positions(mask)
    if causal is None:
        return _miss(rw, "attention", "mask is not causal (positions[:, None] >= "
                                      "positions[None, :], optionally & a window "
                                      "positions[:, None] - positions[None, :] < w)")
    pos, window = causal
    fv = _const_array(fill)
    if fv is None or not np.all(fv <= -1e30):
        return _miss(rw, "attention", "masked scores are not filled with -inf or the "
                                      "most negative float")
    scores, softcap = _softcapped(scores)  # the cap applies to the scaled scores
    scale = 1.0
    if _is(scores, ops.mul) and splat_value(scores.owner.operands[1]) is not None:
        scale = float(splat_value(scores.owner.operands[1]))
        scores = scores.owner.operands[0]
    return scores, pos, window, softcap, scale


def _without_scale(q: Value, scale: float):
    """q * c (a splat c) -> (q, scale * c), else (q, scale)."""
    if _is(q, ops.mul) and splat_value(q.owner.operands[1]) is not None:
        return q.owner.operands[0], scale * float(splat_value(q.owner.operands[1]))
    return q, scale


def raise_attention(rw, p, v):
    dg = rw.root.owner.attrs
    probs, vals, probs_first = (p, v, True) if _is(p, ops.softmax) else (v, p, False)
    if not _is(probs, ops.softmax):
        return None
    if probs.type.rank == 4:
        return _raise_grouped_attention(rw, probs, vals, probs_first)
    pa = (dg.lhs_contract, dg.lhs_batch) if probs_first else (dg.rhs_contract, dg.rhs_batch)
    va = (dg.rhs_contract, dg.rhs_batch) if probs_first else (dg.lhs_contract, dg.lhs_batch)
    if probs.type.rank != 3 or vals.type.rank != 3 or pa != ((2,), (0,)) or va != ((0,), (1,)):
        return _miss(rw, "attention", "probabilities [H, T, S] . values [S, H, D] expected")
    parts = _masked_scores(rw, probs)
    if parts is None:
        return None
    scores, pos, window, softcap, scale = parts
    if not _is(scores, ops.dot_general):
        return _miss(rw, "attention", "scores are not a dot_general")
    sa = scores.owner.attrs
    q, k = scores.owner.operands
    if (sa.lhs_batch, sa.rhs_batch, sa.lhs_contract, sa.rhs_contract) != ((1,), (1,), (2,), (2,)) \
            or q.type.rank != 3 or k.type.rank != 3:
        return _miss(rw, "attention", "scores are not q[T, H, D] . k[S, H, D] over D")
    q, scale = _without_scale(q, scale)
    (k, kshape), (vv, vshape) = _unrepeat(k), _unrepeat(vals)
    if kshape != vshape or pos.shape != q.shape[:1] or kshape[0] != q.shape[0]:
        return _miss(rw, "attention", "queries, keys and values do not share one sequence")
    t, h, d = q.shape
    q4 = rw(ops.reshape, q, shape=(1, t, h, d))
    k4 = rw(ops.reshape, k, shape=(1,) + kshape)
    v4 = rw(ops.reshape, vv, shape=(1,) + vshape)
    out = rw(ops.attention, q4, k4, v4, scale=scale, causal=True, window=window,
             softcap=softcap)  # [1, T, H, D]
    out = rw(ops.reshape, out, shape=(t, h, vshape[2]))
    # the dot_general's layout: [H, T, D] (probs first) or [H, D, T]
    return rw(ops.transpose, out, perm=(1, 0, 2) if probs_first else (1, 2, 0))


def _dot_labels(op, lhs: list, rhs: list) -> list:
    """The labels of dot_general's result axes (batch, lhs free, rhs free) from its
    operands' axis labels."""
    a = op.attrs
    used_l, used_r = set(a.lhs_batch) | set(a.lhs_contract), set(a.rhs_batch) | set(a.rhs_contract)
    return ([lhs[i] for i in a.lhs_batch] + [x for i, x in enumerate(lhs) if i not in used_l]
            + [x for i, x in enumerate(rhs) if i not in used_r])


def _raise_grouped_attention(rw, probs, vals, probs_first):
    """GQA by reshape: q[T, KVH, G, D] (head kv * G + g; or [T, G, KVH, D], head
    g * KVH + kv) . k[S, KVH, D] batched over the kv heads into scores [KVH, G, T, S]
    (the two head axes in either order, through transposes), softmax, . v[S, KVH, D]
    -> attention over q's heads in kv-major order. Which of q's head axes pairs with k's
    kv heads (the dot_general's batch axis) decides the order, never the sizes."""
    dg = rw.root.owner
    parts = _masked_scores(rw, probs)
    if parts is None:
        return None
    scores, pos, window, softcap, scale = parts
    perm = (0, 1, 2, 3)  # scores axis j = the dot_general's axis perm[j]
    while _is(scores, ops.transpose) or _is(scores, ops.mul):
        if _is(scores, ops.mul):
            scores, scale = _without_scale(scores, scale)
            if _is(scores, ops.mul):
                break
        else:
            perm = tuple(scores.owner.attrs.perm[i] for i in perm)
            scores = scores.owner.operands[0]
    if not _is(scores, ops.dot_general):
        return _miss(rw, "attention", "grouped scores are not a dot_general")
    sa = scores.owner.attrs
    lhs, rhs = scores.owner.operands
    if (lhs.type.rank, rhs.type.rank) == (4, 3):
        q, k, qb, qc, kb, kc = lhs, rhs, sa.lhs_batch, sa.lhs_contract, sa.rhs_batch, \
            sa.rhs_contract
    elif (lhs.type.rank, rhs.type.rank) == (3, 4):
        q, k, qb, qc, kb, kc = rhs, lhs, sa.rhs_batch, sa.rhs_contract, sa.lhs_batch, \
            sa.lhs_contract
    else:
        return _miss(rw, "attention", "grouped scores are not q[T, KVH, G, D] . k[S, KVH, D]")
    if qc != (3,) or kc != (2,) or kb != (1,) or qb not in ((1,), (2,)):
        return _miss(rw, "attention", "grouped scores must contract head_dim and batch k's "
                                      "kv heads with one head axis of q[T, ., ., D]")
    kv_axis = qb[0]
    q_labels = ["T", None, None, "D"]
    q_labels[kv_axis], q_labels[3 - kv_axis] = "kv", "group"
    k_labels = ["S", "kv", "D"]
    dg_labels = _dot_labels(scores.owner, *((q_labels, k_labels) if q is lhs
                                            else (k_labels, q_labels)))
    labels = [dg_labels[i] for i in perm]
    if labels[2:] != ["T", "S"] or set(labels[:2]) != {"kv", "group"}:
        return _miss(rw, "attention", f"grouped scores are [{', '.join(labels)}], not "
                                      f"[kv, group, T, S] (heads in either order)")
    pa = (dg.attrs.lhs_batch, dg.attrs.lhs_contract) if probs_first else \
        (dg.attrs.rhs_batch, dg.attrs.rhs_contract)
    va = (dg.attrs.rhs_batch, dg.attrs.rhs_contract) if probs_first else \
        (dg.attrs.lhs_batch, dg.attrs.lhs_contract)
    if vals.type.rank != 3 or va != ((1,), (0,)) or \
            pa != ((labels.index("kv"),), (labels.index("S"),)):
        return _miss(rw, "attention", "grouped probabilities . values must contract the "
                                      "keys and batch the kv heads of v[S, KVH, D]")
    q, scale = _without_scale(q, scale)
    if vals.shape[:2] != k.shape[:2] or k.shape[0] != q.shape[0] or pos.shape != q.shape[:1]:
        return _miss(rw, "attention", "queries, keys and values do not share one sequence")
    v_labels = ["S", "kv", "D"]
    out_labels = _dot_labels(dg, *((labels, v_labels) if probs_first else (v_labels, labels)))
    t, kvh, group, d, dv = q.shape[0], q.shape[kv_axis], q.shape[3 - kv_axis], q.shape[3], \
        vals.shape[2]
    if kv_axis == 2:  # group-major heads: put the kv heads first
        q = rw(ops.transpose, q, perm=(0, 2, 1, 3))
    q4 = rw(ops.reshape, q, shape=(1, t, kvh * group, d))  # head = kv * G + g
    k4 = rw(ops.reshape, k, shape=(1,) + k.shape)
    v4 = rw(ops.reshape, vals, shape=(1,) + vals.shape)
    out = rw(ops.attention, q4, k4, v4, scale=scale, causal=True, window=window,
             softcap=softcap)  # [1, T, H, Dv]
    out = rw(ops.reshape, out, shape=(t, kvh, group, dv))  # [T, kv, group, Dv]
    order = tuple(["T", "kv", "group", "D"].index(x) for x in out_labels)
    return out if order == (0, 1, 2, 3) else rw(ops.transpose, out, perm=order)


# ---- rules ------------------------------------------------------------------------------------

RULES = RuleSet([
    # x * rsqrt(sum(x*x)/n + eps) * w -> rms_norm(x, w)
    Rule("rms-norm", Pat(ops.mul, _NORMED, "w"), raise_rms_norm),
    # (x - mean x) * rsqrt(var x + eps) * w + b -> layer_norm(x, w, b)
    Rule("layer-norm", Pat(ops.add, "y", "b"), raise_layer_norm),
    # x * 1 / (1 + exp(-x)) -> silu(x)
    Rule("silu", Pat(ops.mul, "x", Pat(ops.div, Const(1.0), Pat(ops.add, Pat(
        ops.exp, Pat(ops.neg, "x")), Const(1.0)))), raise_silu),
    # silu(g) * u -> swiglu(g, u)
    Rule("swiglu", Pat(ops.mul, Pat(ops.silu, "g"), "u"), raise_swiglu),
    # x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) -> gelu(x) {tanh}
    Rule("gelu-tanh", _GELU_TANH, raise_gelu_tanh),
    # gelu(g) * u -> geglu(g, u)
    Rule("geglu", Pat(ops.mul, Pat(ops.gelu, "g"), "u"), raise_geglu),
    # exp(x - max(x)) / sum(exp(x - max(x))) -> softmax(x)
    Rule("softmax", Pat(ops.div, _EXP, Any("s")), raise_softmax),
    # x * cos + rotate_half(x) * sin -> rope(x, positions)
    Rule("rope", Pat(ops.add, Pat(ops.mul, name="a"), Pat(ops.mul, name="b")), raise_rope),
    # reshape(stack([x1 c - x2 s, x1 s + x2 c], -1)) -> rope(x, positions) {interleaved}
    Rule("rope-interleaved", Pat(ops.reshape, Pat(ops.concat, name="parts"), name="y"),
         raise_rope_interleaved),
    # dot_general(x, w) -> linear(x, w')
    Rule("linear", Pat(ops.dot_general, "x", Pat((ops.weight, ops.transpose), name="w")),
         raise_linear),
    # linear(x, w) + b -> linear(x, w, b)
    Rule("linear-bias", Pat(ops.add, Pat(ops.linear, name="y"), "b", commutative=True),
         raise_linear_bias),
    # take(w, ids) -> embedding(ids, w)
    Rule("embedding", Pat(ops.take, Pat(ops.weight, name="table"), "ids"), raise_embedding),
    # softmax(causal(q.k * s)) . v -> attention(q, k, v)
    Rule("attention", Pat(ops.dot_general, "p", "v", commutative=True), raise_attention),
])


@register_pass
@dataclass(frozen=True)
class RaiseLLMOps(RewritePass):
    """Raise imported primitive spellings to llm.* ops (after canonicalize)."""

    name = "raise-llm-ops"
    rules = RULES

    def run(self, module, ctx) -> None:
        notes = _Attrs(misses={})
        apply_rules(module, self.rules, ctx=notes, stats=ctx.stats.rules,
                    max_steps=self.max_steps)
        # why rules declined (rule -> last reason): for `jaxrt inspect` and insert-kv-cache
        module.attributes["raise_misses"] = dict(sorted(notes.misses.items()))
