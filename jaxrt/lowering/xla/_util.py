"""Dtype helpers shared by the XLA rules.

The numpy references evaluate every float op in f32 and round the result to the result
type; rules do the same (upcast, compute, cast back), and contractions accumulate in f32.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ...ir import DType, TensorType

F32 = jnp.float32


def np_dtype(t: TensorType | DType) -> np.dtype:
    return (t.dtype if isinstance(t, TensorType) else t).to_numpy()


def upcast(x):
    """Floats narrower than f32 -> f32 (the references' compute type); others unchanged."""
    return x.astype(F32) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != F32 else x


def cast(x, t: TensorType):
    dt = np_dtype(t)
    return x if x.dtype == dt else x.astype(dt)


def precision(*xs):
    """Full f32 matmul precision for f32 operands (GPUs would otherwise use TF32)."""
    return lax.Precision.HIGHEST if any(x.dtype == F32 for x in xs) else None


def accumulator(*xs):
    """Accumulation dtype of a contraction: f32 for floats, i32 for integers."""
    return F32 if jnp.issubdtype(xs[0].dtype, jnp.floating) else jnp.int32


def contract(a, b, lhs_contract, rhs_contract, lhs_batch=(), rhs_batch=()):
    """lax.dot_general accumulating in f32 (i32 for ints)."""
    return lax.dot_general(a, b, ((tuple(lhs_contract), tuple(rhs_contract)),
                                  (tuple(lhs_batch), tuple(rhs_batch))),
                           precision=precision(a, b), preferred_element_type=accumulator(a, b))
