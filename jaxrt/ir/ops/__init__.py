"""The op registry's contents. Import op definitions from here: `ops.add`, `ops.rms_norm`."""
from .core import constant, weight
from .primitive import (add, broadcast, compare, concat, convert, cos, div, dot_general, exp,
                        iota, log, matmul, maximum, minimum, mul, neg, pow_, reduce_max,
                        reduce_mean, reduce_sum, reshape, rsqrt, select, sin, slice_, sqrt,
                        sub, take, tanh, transpose)
from .nn import (add_rms_norm, argmax, embedding, gelu, geglu, layer_norm, linear, logits,
                 rms_norm, rope, silu, softmax, swiglu)
from .attention import attention, kv_update, paged_attention
from .control import scan
from .quant import dequantize, quantize
from .quant import linear as quantized_linear

__all__ = [n for n in dir() if not n.startswith("_") and n not in ("core", "primitive", "nn",
                                                                "control", "quant")]
