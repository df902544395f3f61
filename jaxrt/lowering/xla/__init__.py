"""XLA lowering rules (jax.numpy / lax), one for every op in `jaxrt.ir.OPS`."""
from . import attention, control, nn, primitive, quant  # noqa: F401  (importing registers the rules)
