"""cast-float: compute in another float dtype (bf16 on GPUs) wherever the model used f32."""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.errors import SettingError
from jaxrt.ir.module import Module
from jaxrt.ir.substitute import set_float_dtype
from jaxrt.ir.types import DType

from .manager import Pass, PassContext, PipelineError, register_pass

# Dtypes a tensor can take by a plain cast. Integer and fp8 types need scales (per tensor,
# channel or page) to hold a model's values: the quantize pass for weights and
# activations; a quantized KV cache does not exist yet.
UNSCALED_FLOAT_DTYPES = (DType.f32, DType.bf16, DType.f16)


def unscaled_float_dtype(text: str, needs: str, instead: str = "not supported yet") -> DType:
    """Parse `text`, refusing dtypes that would need `needs` (e.g. "a scaled (quantized)
    cache") rather than silently producing wrong numbers; `instead` says what to do."""
    dtype = DType.parse(text)
    if dtype not in UNSCALED_FLOAT_DTYPES:
        allowed = ", ".join(d.value for d in UNSCALED_FLOAT_DTYPES)
        why = (f"needs {needs}; {instead}" if dtype.is_float or dtype.is_int
               else "is not a number type")
        raise SettingError(f"dtype {dtype.value} {why} (supported: {allowed})")
    return dtype


@register_pass
@dataclass(frozen=True)
class CastFloat(Pass):
    """Weights, activations and the KV cache take `dtype`; logits stay f32 (llm.logits
    always yields f32). `keep-kv-f32` leaves the cache argument in f32."""

    name = "cast-float"
    dtype: str = "bf16"
    keep_kv_f32: bool = False

    def __post_init__(self):
        unscaled_float_dtype(self.dtype, "scaled (quantized) weights and activations",
                             "use the quantize pass (quantize{mode=int8-weight|fp8-weight|"
                             "w8a8|fp8})")

    def run(self, module: Module, ctx: PassContext) -> None:
        from .quantize import is_quantized
        if is_quantized(module):
            raise PipelineError("cast-float: the module is already quantized; run cast-float "
                                "before quantize (scales stay f32)")
        new = set_float_dtype(module, DType.parse(self.dtype),
                              keep_f32=("kv",) if self.keep_kv_f32 else ())
        module.functions, module.weights = new.functions, new.weights
        module.weight_defs = new.weight_defs
        module.attributes = new.attributes
