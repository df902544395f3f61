"""XLA rule for `scan`: the body function lowered once and run by `jax.lax.scan`.

The body compiles once however many iterations it has, which is what makes a model's
compile time independent of its depth. Carried values (the residual stream and the KV
cache) are the loop carry, so XLA updates the cache in place inside the loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ...ir import ops
from ..registry import rule


@rule(ops.scan)
def _scan(ctx, *operands, attrs, out_types):
    from ..compile import lower_function  # compile imports the rule registry
    body = lower_function(ctx.module, attrs.body, backends=ctx.backends)
    k, m = attrs.carried, attrs.invariant
    carried, invariant, stacked = operands[:k], operands[k:k + m], operands[k + m:]

    def step(carry, xs):
        i, slices = xs[0], xs[1:]
        return tuple(body(ctx.weights, i, *carry, *invariant, *slices)), None

    iters = jnp.arange(attrs.length, dtype=jnp.int32)
    out, _ = jax.lax.scan(step, tuple(carried), (iters, *stacked))
    return out
