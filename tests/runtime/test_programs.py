"""The step programs' packed outputs (jaxrt.runtime.programs)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrt.runtime.programs import pack_sampled, unpack_sampled


def test_sampled_tokens_and_logprobs_round_trip_bit_exactly():
    """A sampled step's tokens and logprobs come back in one i32[2, N] array: every
    float (negative, -0, -inf, NaN, subnormal) and token survives bit for bit."""
    tokens = np.asarray([0, 7, 49151, 2**31 - 1, 3, 5], np.int32)
    lp = np.asarray([-0.0, -1e-3, -np.inf, np.nan, -1e-42, -87.5], np.float32)
    packed = jax.jit(pack_sampled)(jnp.asarray(tokens), jnp.asarray(lp))
    assert packed.shape == (2, 6) and packed.dtype == jnp.int32
    got_tokens, got_lp = unpack_sampled(np.asarray(packed))
    assert got_tokens.dtype == np.int32 and got_lp.dtype == np.float32
    np.testing.assert_array_equal(got_tokens, tokens)
    np.testing.assert_array_equal(got_lp.view(np.int32), lp.view(np.int32))
