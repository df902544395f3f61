"""quantize-kv-cache: store the paged KV cache as int8 or fp8 e4m3fn codes with scales.

    quantize-kv-cache{dtype=int8}      (-q kv-int8; dtype=fp8: -q kv-fp8)

The cache argument `%kv : f32[layers, 2, pages, page_size, KVH, D]` becomes
`i8[layers, 2, pages, page_size, KVH, D + 4]` (or f8e4m3fn). Scales are per (token, kv
head) and per K / V: when `kv.update` writes a token, each head's row of D values gets
the symmetric scale max|row| / qmax (qmax 127 for int8, 448 for e4m3fn; 1 for an all-zero
row) and its codes round(x / scale) (int8: half-to-even, clipped to +-127; fp8: the
nearest-even cast of the value clipped to +-448). The scale's f32 bits are stored as the
row's last 4 elements, so codes and scale share the slot: one scatter writes both, one
gather reads both, page ids, prefix caching and the head split of tensor parallelism need
nothing new. `llm.paged_attention` reads code * scale (f32, then the query's dtype).
The reference math is jaxrt/ir/quant.py (`pack_kv` / `unpack_kv`); the XLA rules
(jaxrt/lowering/xla/attention.py) follow it exactly.

Error bound (per element, relative to its row's max |x|): int8 at most 1/254 (half a code
step of absmax/127); e4m3fn, with 3 mantissa bits, at most 2^-4 of the element's own
magnitude for |x| >= 2^-6 * scale (its normal range) and half a subnormal step,
2^-10 * scale, below. fp8 uses the same per-row dynamic scale as int8 rather than a
fixed per-tensor one: it needs no calibration and a row's max lands on 448 exactly, so
the format's whole range is used by every row.

Bytes per token: layers * 2 * KVH * (D + 4) instead of layers * 2 * KVH * D * itemsize
(plan-kv-cache counts the stored type, so more pages fit the same budget: for D = 64,
68 bytes a head against 128 in bf16 and 256 in f32).

Order: before plan-kv-cache (which sizes the cache from its element type and refuses a
dtype option for a quantized cache); anywhere after insert-kv-cache. A cache that is
already quantized, or already planned, is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.errors import SettingError
from jaxrt.ir.module import Module
from jaxrt.ir.quant import KV_SCALE_ELEMS, is_quantized_cache
from jaxrt.ir.substitute import rebuild
from jaxrt.ir.types import DType, TensorType

from .manager import Pass, PassContext, PipelineError, register_pass
from .plan_kv_cache import KV_ARG, _cache_type

# dtype option -> code dtype; `-q kv-<dtype>` in the drivers
KV_DTYPES = {"int8": DType.int8, "fp8": DType.f8e4m3}
KV_MODES = tuple(f"kv-{d}" for d in KV_DTYPES)


def kv_quant_pass(mode: str) -> str:
    """The pipeline entry of a driver's `-q kv-int8|kv-fp8`."""
    if mode not in KV_MODES:
        raise SettingError(f"KV-cache quantization must be one of {', '.join(KV_MODES)}, "
                           f"got {mode!r}")
    return f"quantize-kv-cache{{dtype={mode[3:]}}}"


@register_pass
@dataclass(frozen=True)
class QuantizeKVCache(Pass):
    name = "quantize-kv-cache"
    dtype: str = "int8"

    def __post_init__(self):
        if self.dtype not in KV_DTYPES:
            raise SettingError(f"quantize-kv-cache: dtype must be one of "
                               f"{', '.join(KV_DTYPES)}, got {self.dtype!r}")

    def run(self, module: Module, ctx: PassContext) -> None:
        cache = _cache_type(module)
        done = module.attributes.get("kv_quantization")
        if done or is_quantized_cache(cache):
            what = done["mode"] if done else f"its type is {cache}"
            raise PipelineError(f"quantize-kv-cache: the KV cache is already quantized "
                                f"({what}); quantizing its codes again would scale them twice")
        if "kv_cache" in module.attributes:
            raise PipelineError("quantize-kv-cache: the cache is already planned; run "
                                "quantize-kv-cache before plan-kv-cache")
        if not cache.dtype.is_float:
            raise PipelineError(f"quantize-kv-cache: the cache {cache} is not a float cache")
        code = KV_DTYPES[self.dtype]
        head_dim = cache.shape[5]
        new_type = TensorType(cache.shape[:5] + (head_dim + KV_SCALE_ELEMS,), code)
        new = rebuild(module, weight_type=lambda n, t: t,
                      arg_type=lambda a: new_type if a.hint == KV_ARG else a.type,
                      attrs_of=lambda op: op.attrs, given_type=lambda op, t: t)
        module.functions, module.weights = new.functions, new.weights
        module.attributes["kv_quantization"] = {
            "mode": f"kv-{self.dtype}", "dtype": code.value, "scale": "token-head",
            "scale_dtype": "f32", "bytes_per_row": head_dim + KV_SCALE_ELEMS}
        ctx.count("quantized_caches", 1)
