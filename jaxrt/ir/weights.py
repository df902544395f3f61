"""Weight definitions: a weight computed from other weights, once, at load.

A module weight is either a *source* (its data comes from the model file) or *defined*
as a pure function of other weights:

    weight @w.bf16 : bf16[576, 576] = cast(@w) {dtype = bf16}
    weight @"model.layers.0:30.mlp.up_proj.weight" : f32[30, 1536, 576] = stack(@a, @b, ...)

Passes add definitions (outline-layers stacks per-layer weights, cast-float casts them,
fusion will concatenate, `quantize` computes scales and codes and, for SmoothQuant, the
smoothing factors from calibrated activation ranges read from a calibration file, or
reads GPTQ's codes and scales from one: jaxrt/calibration.py); `materialize` evaluates the ones a
module still uses, on the host, exactly once. Source data must already have the declared
type: a mismatch is an error, never a silent cast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from jaxrt.errors import InputError
from .opdef import VerifyError
from .quant import (QUANT_DTYPES, check_quant_dtype, check_scale, compute_scale, group_count,
                    quantize)
from .types import DType, TensorType


@dataclass(frozen=True)
class WeightDef:
    """`op(@sources...) {attrs}`; attrs is a tuple of (key, value) pairs in print order."""

    op: str
    sources: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)


def _ints(v, what) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,)
    if not isinstance(v, tuple) or not all(isinstance(x, int) and not isinstance(x, bool)
                                           for x in v):
        raise VerifyError(f"{what} must be integers, got {v!r}")
    return v


def _axis(d: WeightDef, rank: int) -> int:
    axis = d.attr("axis", 0)
    if not isinstance(axis, int) or isinstance(axis, bool) or not -rank <= axis < rank:
        raise VerifyError(f"{d.op}: axis {axis!r} out of range for rank {rank}")
    return axis % rank


def _infer_stack(d, ts):
    if len(set(ts)) != 1:
        raise VerifyError(f"stack: sources differ in type: {sorted({str(t) for t in ts})}")
    axis = _axis(d, ts[0].rank + 1)
    shape = list(ts[0].shape)
    shape.insert(axis, len(ts))
    return TensorType(tuple(shape), ts[0].dtype)


def _infer_concat(d, ts):
    rank = ts[0].rank
    axis = _axis(d, rank)
    for t in ts[1:]:
        if t.dtype != ts[0].dtype or t.rank != rank or any(
                a != b for i, (a, b) in enumerate(zip(t.shape, ts[0].shape)) if i != axis):
            raise VerifyError(f"concat: {t} does not concatenate with {ts[0]} on axis {axis}")
    shape = list(ts[0].shape)
    shape[axis] = sum(t.shape[axis] for t in ts)
    return TensorType(tuple(shape), ts[0].dtype)


def _infer_slice(d, ts):
    (t,) = ts
    axis = _axis(d, t.rank)
    start, stop = d.attr("start"), d.attr("stop")
    for v in (start, stop):
        _ints(v, "slice: start/stop")
    if not 0 <= start < stop <= t.shape[axis]:
        raise VerifyError(f"slice: [{start}:{stop}] out of range for {t} axis {axis}")
    shape = list(t.shape)
    shape[axis] = stop - start
    return TensorType(tuple(shape), t.dtype)


def _infer_transpose(d, ts):
    (t,) = ts
    perm = _ints(d.attr("perm"), "transpose: perm")
    if sorted(perm) != list(range(t.rank)):
        raise VerifyError(f"transpose: perm {perm} is not a permutation of {t.rank} axes")
    return TensorType(tuple(t.shape[i] for i in perm), t.dtype)


def _infer_cast(d, ts):
    (t,) = ts
    dtype = d.attr("dtype")
    if not isinstance(dtype, DType):
        raise VerifyError(f"cast: dtype must be a dtype, got {dtype!r}")
    if not (dtype.is_float and t.dtype.is_float):
        raise VerifyError(f"cast: {t.dtype.value} -> {dtype.value} is not a float cast "
                          f"(integer and fp8 weights need scales: quantization)")
    if dtype.itemsize == 1:
        raise VerifyError(f"cast: {dtype.value} needs scales (quantization), not a cast")
    return t.with_dtype(dtype)


def _infer_repeat(d, ts):
    (t,) = ts
    axis = _axis(d, t.rank)
    block, times = d.attr("block"), d.attr("times")
    for v in (block, times):
        _ints(v, "repeat: block/times")
    if block < 1 or times < 1 or t.shape[axis] % block:
        raise VerifyError(f"repeat: axis {axis} of {t} is not whole blocks of {block} "
                          f"(times {times})")
    shape = list(t.shape)
    shape[axis] *= times
    return TensorType(tuple(shape), t.dtype)


def _eval_repeat(d, xs):
    """Each `block` rows of `axis` repeated `times` times in place: [a, b] -> [a, a, b, b]
    (KV heads replicated for tensor parallelism, jaxrt/passes/shard.py)."""
    x = xs[0]
    axis = _axis(d, x.ndim)
    block, times = d.attr("block"), d.attr("times")
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    out = np.repeat(x.reshape(shape), times, axis=axis)
    return np.ascontiguousarray(out.reshape(x.shape[:axis] + (x.shape[axis] * times,)
                                            + x.shape[axis + 1:]))
def _infer_quant_scale(d, ts):
    (t,) = ts
    dtype = d.attr("dtype")
    check_quant_dtype(dtype, "quant_scale")
    if t.rank != 2 or not t.dtype.is_float or t.dtype in QUANT_DTYPES:
        raise VerifyError(f"quant_scale: expects a float [out, in] weight, got {t}")
    group_size = d.attr("group_size", 0)
    _ints(group_size, "quant_scale: group_size")
    return TensorType(group_count(d.attr("granularity"), *t.shape, group_size), DType.f32)


def _infer_quantize(d, ts):
    t, scale = ts
    if not t.dtype.is_float or t.dtype in QUANT_DTYPES:
        raise VerifyError(f"quantize: expects a float weight, got {t}")
    check_quant_dtype(d.attr("dtype"), "quantize")
    check_scale(t, scale, "quantize")
    return t.with_dtype(d.attr("dtype"))


def _eval_quant_scale(d, xs):
    rows, cols = xs[0].shape
    shape = group_count(d.attr("granularity"), rows, cols, d.attr("group_size", 0))
    return compute_scale(xs[0], d.attr("dtype"), shape)


def _infer_calibration(d, ts):
    shape = _ints(d.attr("shape"), "calibration: shape")
    for key in ("file", "tensor", "sha256"):
        if not isinstance(d.attr(key), str):
            raise VerifyError(f"calibration: {key} must be a string, got {d.attr(key)!r}")
    dtype = d.attr("dtype", DType.f32)
    if dtype != DType.f32:
        check_quant_dtype(dtype, "calibration")
    return TensorType(shape, dtype)


# how a calibration file stores each dtype: fp8 codes as their u8 bits (no fp8 type in
# safetensors' numpy reader), the rest as themselves
_CALIBRATION_STORAGE = {DType.f32: np.float32, DType.int8: np.int8, DType.f8e4m3: np.uint8}


def _eval_calibration(d, xs):
    from jaxrt.calibration import read_calibration_tensor
    arr = read_calibration_tensor(d.attr("file"), d.attr("tensor"), d.attr("sha256"))
    dtype = d.attr("dtype", DType.f32)
    if arr.dtype != _CALIBRATION_STORAGE[dtype]:
        raise InputError(f"{d.attr('file')}: tensor {d.attr('tensor')} is {arr.dtype}, "
                         f"not {np.dtype(_CALIBRATION_STORAGE[dtype])} ({dtype.value} data)")
    return arr.view(dtype.to_numpy())


def _vector_for(t: TensorType, s: TensorType, what: str) -> None:
    if t.rank < 1 or s.rank != 1 or s.shape[0] != t.shape[-1] or s.dtype != DType.f32:
        raise VerifyError(f"{what}: factors {s} must be f32[{t.shape[-1] if t.rank else '?'}]"
                          f" for {t}")


def _infer_smooth_factor(d, ts):
    act, *ws = ts
    alpha = d.attr("alpha")
    if not isinstance(alpha, float) or not 0.0 <= alpha <= 1.0:
        raise VerifyError(f"smooth_factor: alpha must be a float in [0, 1], got {alpha!r}")
    if not ws:
        raise VerifyError("smooth_factor: needs the activation range and >= 1 weight")
    for w in ws:
        if w.rank != 2 or not w.dtype.is_float or w.dtype in QUANT_DTYPES:
            raise VerifyError(f"smooth_factor: expects float [out, in] weights, got {w}")
        _vector_for(w, act, "smooth_factor")
    return act


SMOOTH_FLOOR = 1e-5  # SmoothQuant's clamp: a dead channel (max 0) never divides by 0


def smooth_factors(act: np.ndarray, ws: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha), the weight max taken over the rows of
    every weight reading that input (one factor per input: a fused qkv and unfused q, k,
    v agree); both maxima floored at SMOOTH_FLOOR, as is s (SmoothQuant's reference)."""
    wmax = np.max([np.abs(np.asarray(w, np.float32)).max(axis=0) for w in ws], axis=0)
    a = np.maximum(np.asarray(act, np.float32), SMOOTH_FLOOR)
    s = a ** alpha / np.maximum(wmax, SMOOTH_FLOOR) ** (1.0 - alpha)
    return np.maximum(s, SMOOTH_FLOOR).astype(np.float32)


def _eval_smooth_factor(d, xs):
    return smooth_factors(xs[0], xs[1:], d.attr("alpha"))


def _infer_scale_columns(d, ts):
    w, s = ts
    if w.rank != 2 or not w.dtype.is_float or w.dtype in QUANT_DTYPES:
        raise VerifyError(f"scale_columns: expects a float [out, in] weight, got {w}")
    _vector_for(w, s, "scale_columns")
    return w.with_dtype(DType.f32)


def _infer_smooth_norm(d, ts):
    g, s = ts
    if g.rank != 1 or not g.dtype.is_float or g.dtype in QUANT_DTYPES:
        raise VerifyError(f"smooth_norm: expects a float [dim] norm weight, got {g}")
    _vector_for(g, s, "smooth_norm")
    if not isinstance(d.attr("offset", 0.0), float):
        raise VerifyError(f"smooth_norm: offset must be a float, got {d.attr('offset')!r}")
    return g


def _eval_smooth_norm(d, xs):
    """The norm weight g' with offset + g' = (offset + g) / s: the norm's output divided
    by s channel-wise (rms_norm multiplies by offset + g)."""
    g, s = xs
    off = d.attr("offset", 0.0)
    return ((off + g.astype(np.float32)) / s - off).astype(g.dtype)


def _infer_reciprocal(d, ts):
    (s,) = ts
    dtype = d.attr("dtype")
    if s.rank != 1 or s.dtype != DType.f32 or not isinstance(dtype, DType) or \
            not dtype.is_float or dtype in QUANT_DTYPES:
        raise VerifyError(f"reciprocal: expects f32[n] and a float dtype, got {s}, {dtype!r}")
    return s.with_dtype(dtype)


# name -> (number of sources (None: one or more), attribute keys, infer, evaluate)
_DEFS: dict[str, tuple[int | None, tuple[str, ...], Callable, Callable]] = {
    "stack": (None, ("axis",), _infer_stack,
              lambda d, xs: np.stack(xs, axis=_axis(d, xs[0].ndim + 1))),
    "concat": (None, ("axis",), _infer_concat,
               lambda d, xs: np.concatenate(xs, axis=_axis(d, xs[0].ndim))),
    "slice": (1, ("axis", "start", "stop"), _infer_slice,
              lambda d, xs: np.take(xs[0], np.arange(d.attr("start"), d.attr("stop")),
                                    axis=_axis(d, xs[0].ndim))),
    "transpose": (1, ("perm",), _infer_transpose,
                  lambda d, xs: np.ascontiguousarray(np.transpose(xs[0], d.attr("perm")))),
    "repeat": (1, ("axis", "block", "times"), _infer_repeat, _eval_repeat),
    "cast": (1, ("dtype",), _infer_cast,
             lambda d, xs: xs[0].astype(d.attr("dtype").to_numpy())),
    # quant_scale(@w) {dtype, granularity, group_size?}: f32 scales max|w| / qmax
    "quant_scale": (1, ("dtype", "granularity", "group_size"), _infer_quant_scale,
                    _eval_quant_scale),
    # quantize(@w, @scale) {dtype}: the codes of w / scale (jaxrt/ir/quant.py)
    "quantize": (2, ("dtype",), _infer_quantize,
                 lambda d, xs: quantize(xs[0], xs[1], d.attr("dtype"))),
    # calibration() {file, tensor, shape, sha256, dtype?}: data of a calibration file's
    # tensor (jaxrt calibrate): f32, or GPTQ's i8 / f8e4m3fn codes (dtype); sha256 is the
    # file's, checked when read (and part of the weight cache's key, so a recalibrated
    # file is never served from the cache)
    "calibration": (0, ("file", "tensor", "shape", "sha256", "dtype"), _infer_calibration,
                    _eval_calibration),
    # smooth_factor(@act_max, @w...) {alpha}: SmoothQuant's per-input-channel factors
    "smooth_factor": (None, ("alpha",), _infer_smooth_factor, _eval_smooth_factor),
    # scale_columns(@w, @s): w[:, j] * s[j] in f32 (the weight side of smoothing)
    "scale_columns": (2, (), _infer_scale_columns,
                      lambda d, xs: xs[0].astype(np.float32) * xs[1][None, :]),
    # smooth_norm(@g, @s) {offset}: a norm weight whose output is divided by s
    "smooth_norm": (2, ("offset",), _infer_smooth_norm, _eval_smooth_norm),
    # reciprocal(@s) {dtype}: 1 / s in the activations' dtype (an explicit smoothing scale)
    "reciprocal": (1, ("dtype",), _infer_reciprocal,
                   lambda d, xs: (1.0 / xs[0]).astype(d.attr("dtype").to_numpy())),
}

WEIGHT_DEF_OPS = tuple(_DEFS)


def infer_def(d: WeightDef, source_types: list[TensorType]) -> TensorType:
    """The type `d` produces from its sources' types; VerifyError if ill-formed."""
    spec = _DEFS.get(d.op)
    if spec is None:
        raise VerifyError(f"unknown weight definition {d.op!r}; expected one of "
                          f"{', '.join(WEIGHT_DEF_OPS)}")
    arity, keys, infer, _ = spec
    if arity is None and not source_types:
        raise VerifyError(f"{d.op}: needs at least one source")
    if arity is not None and len(source_types) != arity:
        raise VerifyError(f"{d.op}: takes {arity} source(s), got {len(source_types)}")
    extra = {k for k, _ in d.attrs} - set(keys)
    if extra:
        raise VerifyError(f"{d.op}: unknown attribute(s) {sorted(extra)}")
    return infer(d, source_types)


def row_parts(module, name: str, leaf: Callable[[str], bool]) -> list[str]:
    """The weights `name` is made of through row concatenations (concat on axis 0: fused
    projections) and casts, depth first: each a weight where `leaf` holds, or one that is
    neither (the walk stops there too)."""
    if leaf(name):
        return [name]
    d = module.weight_defs.get(name)
    if d is None or d.op not in ("concat", "cast") or (d.op == "concat"
                                                      and d.attr("axis", 0) != 0):
        return [name]
    return [n for s in d.sources for n in row_parts(module, s, leaf)]


def define_weight(module, name: str, d: WeightDef) -> str:
    """Adds weight `name` (suffixed with "_" until unused) defined by `d`, its type inferred
    from the sources'; returns the name it got."""
    while name in module.weights:
        name += "_"
    module.weights[name] = infer_def(d, [module.weights[s] for s in d.sources])
    module.weight_defs[name] = d
    return name


def verify_defs(weights: Mapping[str, TensorType], defs: Mapping[str, WeightDef]) -> None:
    """Every definition names declared weights defined before it (no cycles), and its
    declared type is what the definition produces."""
    order = list(weights)
    pos = {n: i for i, n in enumerate(order)}
    for name, d in defs.items():
        where = f"weight @{name}"
        if name not in weights:
            raise VerifyError("definition of an undeclared weight", where)
        for s in d.sources:
            if s not in weights:
                raise VerifyError(f"unknown source weight @{s}", where)
            if pos[s] >= pos[name]:
                raise VerifyError(f"source @{s} must be declared before it", where)
        try:
            t = infer_def(d, [weights[s] for s in d.sources])
        except VerifyError as e:
            raise VerifyError(str(e), where) from None
        if t != weights[name]:
            raise VerifyError(f"declared {weights[name]} but {d.op} gives {t}", where)


def resident_weights(module) -> list[str]:
    """The weights functions read: what lives on the device, in declaration order."""
    from .ops import weight
    read = {op.attrs.name for fn in module.functions.values() for op in fn.ops
            if op.opdef is weight}
    return [n for n in module.weights if n in read]


def used_weights(module) -> list[str]:
    """Weights the module's functions read, plus everything their definitions need, in
    declaration order."""
    from .ops import weight
    need = {op.attrs.name for fn in module.functions.values() for op in fn.ops
            if op.opdef is weight}
    for name in reversed(list(module.weights)):
        if name in need and name in module.weight_defs:
            need.update(module.weight_defs[name].sources)
    return [n for n in module.weights if n in need]


def prune_weights(module) -> list[str]:
    """Drop weights nothing uses any more (in place); returns the dropped names."""
    keep = set(used_weights(module))
    dropped = [n for n in module.weights if n not in keep]
    for n in dropped:
        del module.weights[n]
        module.weight_defs.pop(n, None)
        module.shardings.pop(n, None)
    return dropped


def source_weights(module, names: Iterable[str] | None = None) -> list[str]:
    """The source (file) weights needed to produce `names` (default: every used weight)."""
    need = set(used_weights(module) if names is None else names)
    for name in reversed(list(module.weights)):
        if name in need and name in module.weight_defs:
            need.update(module.weight_defs[name].sources)
    return [n for n in module.weights if n in need and n not in module.weight_defs]


def check_data(name: str, arr: np.ndarray, t: TensorType) -> np.ndarray:
    """`arr` as the data of weight `name`: exactly its declared shape and dtype."""
    arr = np.asarray(arr)
    if tuple(arr.shape) != t.shape or arr.dtype != t.dtype.to_numpy():
        raise InputError(f"weight {name}: data is {arr.dtype}{list(arr.shape)}, the module "
                         f"declares {t} (a pass must define a cast; data is never cast "
                         f"silently)")
    return arr


def materialize(module, sources: Mapping[str, np.ndarray], names: Iterable[str] | None = None,
                *, on_result: Callable[[str, np.ndarray], Any] | None = None
                ) -> dict[str, Any]:
    """Evaluate the weights `names` (default: those the functions read) on the host.

    `sources` maps source-weight names to data (a lazy mapping is read once per name);
    it may also hold results of defined weights (a cache of an earlier run): those are
    used as given, still checked against the declared type, and their definitions are
    not evaluated, nor their sources read. An intermediate result is dropped as soon as
    nothing else needs it.
    `on_result(name, array)` may transform each requested result (e.g. `jax.device_put`)
    before the next one is computed.
    """
    from .ops import weight
    if names is None:
        used = {op.attrs.name for fn in module.functions.values() for op in fn.ops
                if op.opdef is weight}
        names = [n for n in module.weights if n in used]
    names = list(names)
    defs = module.weight_defs
    for n in names:
        if n not in module.weights:
            raise ValueError(f"unknown weight {n}")
    evaluate = {n: n not in sources for n in defs}  # False: `sources` holds its result
    refs: dict[str, int] = {}  # how many pending readers each weight has

    def count(n: str) -> None:
        refs[n] = refs.get(n, 0) + 1
        if refs[n] == 1 and evaluate.get(n, False):
            for s in defs[n].sources:
                count(s)

    for n in names:
        count(n)
    missing = [n for n in module.weights
               if n in refs and not evaluate.get(n, False) and n not in sources]
    if missing:
        raise InputError(f"{len(missing)} weight(s) missing, e.g. {missing[:3]}")
    cache: dict[str, np.ndarray] = {}

    def get(n: str) -> np.ndarray:
        if n in cache:
            arr = cache[n]
        elif evaluate.get(n, False):
            d = defs[n]
            arr = check_data(n, _DEFS[d.op][3](d, [get(s) for s in d.sources]),
                             module.weights[n])
        else:
            arr = check_data(n, sources[n], module.weights[n])
        refs[n] -= 1
        if refs[n] > 0:
            cache[n] = arr
        else:
            cache.pop(n, None)
        return arr

    out = {}
    for n in names:
        arr = get(n)
        out[n] = on_result(n, arr) if on_result else arr
    return out
