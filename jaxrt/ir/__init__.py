"""jaxrt IR: typed SSA graphs of registered ops. Never imports jax."""
from . import ops
from .module import Builder, Function, Module, Op, Value, make_op
from .opdef import OPS, Attrs, AttrSpec, OpDef, Trait, VerifyError, lookup, register
from .types import DType, TensorType
from .verify import verify

__all__ = ["ops", "Builder", "Function", "Module", "Op", "Value", "make_op", "OPS", "Attrs",
           "AttrSpec", "OpDef", "Trait", "VerifyError", "lookup", "register", "DType",
           "TensorType", "verify"]
