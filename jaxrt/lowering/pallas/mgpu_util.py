"""Pieces the Mosaic GPU kernels share."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def feed_ring(issue, n_steps, stages: int, free: tuple) -> None:
    """A memory warpgroup's loop over a `stages`-deep shared-memory ring: `issue(j, slot)`
    starts step j's copies into `slot`; the first `stages` steps go straight in, each
    later one once the compute side has signalled every barrier of `free` for its slot.
    The compute side signals only for steps j with j + stages < n_steps (the slots refilled
    here): an arrival nobody waits for leaves a phase unobserved, which Pallas's GPU
    interpreter refuses when the barrier is freed."""
    from jax.experimental import pallas as pl  # as the kernels: only when one is traced
    from jax.experimental.pallas import mosaic_gpu as plgpu

    for i in range(stages):
        @pl.when(i < n_steps)
        def _first():
            issue(i, i)

    @pl.loop(0, jnp.maximum(n_steps - stages, 0))
    def _rest(j):
        slot = lax.rem(j, stages)
        for barriers in free:
            plgpu.barrier_wait(barriers.at[slot])
        issue(j + stages, slot)
