"""cast-float: compute in another float dtype (bf16 on GPUs) wherever the model used f32."""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.ir.module import Module
from jaxrt.ir.substitute import set_float_dtype
from jaxrt.ir.types import DType

from .manager import Pass, PassContext, register_pass


@register_pass
@dataclass(frozen=True)
class CastFloat(Pass):
    """Weights, activations and the KV cache take `dtype`; logits stay f32 (llm.logits
    always yields f32). `keep-kv-f32` leaves the cache argument in f32."""

    name = "cast-float"
    dtype: str = "bf16"
    keep_kv_f32: bool = False

    def __post_init__(self):
        if not DType.parse(self.dtype).is_float:
            raise ValueError(f"dtype must be a float type, got {self.dtype}")

    def run(self, module: Module, ctx: PassContext) -> None:
        new = set_float_dtype(module, DType.parse(self.dtype),
                              keep_f32=("kv",) if self.keep_kv_f32 else ())
        module.functions, module.weights = new.functions, new.weights
        module.attributes = new.attributes
