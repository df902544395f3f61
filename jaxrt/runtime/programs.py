"""The device programs a runner compiles around one model step.

A step is a pure function `step(params, tokens, positions, slot_mapping, page_table,
context_lens, q_index, logit_index, kv) -> (logits f32[N, V], kv)` (the `@step` contract,
docs/architecture.md). `StepPrograms` compiles two programs around it, per shape:

- the **sampled step**: one step, then sampling (`sampler.sample_tokens`: greedy,
  temperature, min-p/top-k/top-p, seeds) on the device. It returns the sampled tokens and
  their logprobs packed in one array (`unpack_sampled`: one device-to-host read a step),
  and keeps the logits on the device for the requests that need the full sampler
  (penalties, top-n logprobs, beams);
- the **decode loop**: `num_steps` decode steps of S sequences in one call. Step k feeds
  step k-1's sampled tokens back on the device and derives the slots and context lengths
  from the page table, so the host sends one batch of inputs and reads one batch of
  outputs per `num_steps` tokens. Row s runs `steps_left[s]` steps (the slots the host
  reserved for it); after that it writes to the padding slot and attends to nothing.
  A loop may start from the tokens of an earlier loop still on the device (`feed`), so
  the host can queue the next call before it reads the last one's tokens;
- the **decode forward**: the decode loop's first step, its logits returned instead of
  sampled. Structured output splits its decode step in two: the forward is queued (from
  the last call's tokens on the device), the host advances the grammars and fills the
  token bitmask meanwhile, and a small masked sampling program
  (`structured.sample_masked`) draws the tokens.

Every call takes its integer and float inputs packed into one int32 buffer (floats as
their bits), so a call is one host-to-device copy, whatever the number of arrays.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .sampler import sample_tokens, unpack_sampling

StepFn = Callable[..., tuple[Any, Any]]
SAMPLING_FLOATS, SAMPLING_INTS = 3, 4   # columns of SamplingBatch.packed()


def pack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """int32 and float32 arrays -> one flat int32 buffer (floats as their bits)."""
    return np.concatenate([np.ascontiguousarray(a).view(np.int32).reshape(-1)
                           for a in arrays])


def _unpack(buf, layout: Sequence[tuple[tuple[int, ...], Any]]) -> list:
    """The inverse of `pack` inside a trace: layout = [(shape, dtype), ...]."""
    out, at = [], 0
    for shape, dtype in layout:
        n = int(np.prod(shape, dtype=np.int64))
        part = buf[at:at + n].reshape(shape)
        out.append(part if dtype == jnp.int32 else lax.bitcast_convert_type(part, dtype))
        at += n
    return out


def step_layout(T: int, S: int, Q: int, MP: int, N: int, mask_words: int = 0) -> list:
    """The sampled step's packed inputs; `mask_words` > 0 (the masked variant) appends
    a token bitmask i32[N, mask_words] (jaxrt.runtime.structured)."""
    i32, f32 = jnp.int32, jnp.float32
    layout = [((T,), i32), ((T,), i32), ((T,), i32), ((S, MP), i32), ((S,), i32),
              ((S, Q), i32), ((N,), i32), ((N, SAMPLING_FLOATS), f32),
              ((N, SAMPLING_INTS), i32)]
    return layout + ([((N, mask_words), i32)] if mask_words else [])


def decode_layout(S: int, MP: int) -> list:
    i32, f32 = jnp.int32, jnp.float32
    return [((S,), i32), ((S,), i32), ((S, MP), i32), ((S,), i32), ((2, S), i32),
            ((S, SAMPLING_FLOATS), f32), ((S, SAMPLING_INTS), i32)]


def buffer_size(layout) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in layout)


def pack_sampled(tokens, token_lp):
    """tokens i32[N], logprobs f32[N] -> i32[2, N] (the logprobs as their bits): what the
    host reads of a sampled step, in one transfer (`unpack_sampled`)."""
    return jnp.stack([tokens, lax.bitcast_convert_type(token_lp, jnp.int32)])


def unpack_sampled(sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sampled step's i32[2, N] on the host -> (tokens i32[N], logprobs f32[N])."""
    sampled = np.asarray(sampled)
    return sampled[0], sampled[1].view(np.float32)


def sampled_step(step: StepFn, layout, masked: bool = False) -> Callable:
    """(params, packed, kv) -> (sampled i32[2, N], logits f32[N, V], kv): `sampled` is
    the tokens and their logprobs (`pack_sampled`). `masked`: the layout ends with a
    token bitmask, applied to the logits (-inf where a bit is clear) before sampling;
    the logits returned are the masked ones."""
    def run(params, packed, kv):
        parts = _unpack(packed, layout)
        *args, floats, ints = parts[:9]
        logits, kv = step(params, *args, kv)
        if masked:
            from .structured import apply_token_bitmask
            logits = apply_token_bitmask(logits, parts[9])
        tokens, token_lp, _ = sample_tokens(logits, *unpack_sampling(floats, ints))
        return pack_sampled(tokens, token_lp), logits, kv
    return run


def _decode_step_inputs(positions, page_table, steps_left, k, *, page_size: int,
                        pad_slot: int):
    """Decode step k's positions, slots, context lengths, q_index and logit rows from the
    rows' first positions and page tables (rows past their steps_left write the padding
    slot and attend to nothing)."""
    s, mp = page_table.shape
    rows = jnp.arange(s, dtype=jnp.int32)
    pos = positions + k                                                   # [S]
    live = k < steps_left
    page = jnp.take_along_axis(
        page_table, jnp.minimum(pos // page_size, mp - 1)[:, None], axis=1)[:, 0]
    slots = jnp.where(live, page * page_size + pos % page_size, pad_slot)
    ctx = jnp.where(live, pos + 1, 0)
    q_index = jnp.where(live, rows, s)[:, None]  # finished rows are padding
    return pos, slots, ctx, q_index, rows


def _fed_tokens(tokens, feed, feed_at):
    """tokens[s], or feed[feed_at[0, s], feed_at[1, s]] where feed_at[0, s] >= 0."""
    fed = feed[jnp.maximum(feed_at[0], 0), jnp.maximum(feed_at[1], 0)]
    return jnp.where(feed_at[0] >= 0, fed, tokens)


def decode_forward(step: StepFn, layout, *, page_size: int, pad_slot: int) -> Callable:
    """(params, packed, feed, kv) -> (logits f32[S, V], kv): the decode loop's first step
    (the loop's layout, its sampling columns unused), logits returned, not sampled."""
    def run(params, packed, feed, kv):
        tokens, positions, page_table, steps_left, feed_at, _, _ = _unpack(packed, layout)
        tokens = _fed_tokens(tokens, feed, feed_at)
        pos, slots, ctx, q_index, rows = _decode_step_inputs(
            positions, page_table, steps_left, 0, page_size=page_size, pad_slot=pad_slot)
        return step(params, tokens, pos, slots, page_table, ctx, q_index, rows, kv)
    return run


def decode_loop(step: StepFn, layout, *, page_size: int, pad_slot: int,
                num_steps: int) -> Callable:
    """(params, packed, feed, kv) -> (tokens i32[K, S], logprobs f32[K, S], kv): K =
    num_steps decode steps from tokens[S] at positions[S] (each row's one uncomputed
    token). `feed` i32[K, S] is an earlier call's output tokens, still on the device:
    row s starts from feed[feed_at[0, s], feed_at[1, s]] instead of tokens[s] where
    feed_at[0, s] >= 0, so a call can be queued before the last one's tokens are read.

    Rows sample without truncation (`sample_tokens(truncate=False)`): requests with
    top-k, top-p or min-p take the sampled step instead."""
    def run(params, packed, feed, kv):
        tokens, positions, page_table, steps_left, feed_at, floats, ints = \
            _unpack(packed, layout)
        tokens = _fed_tokens(tokens, feed, feed_at)
        temperature, top_k, top_p, min_p, seed_lo, seed_hi, step0 = \
            unpack_sampling(floats, ints)
        s = page_table.shape[0]

        def body(k, carry):
            tok, kv, out_tokens, out_lp = carry
            pos, slots, ctx, q_index, rows = _decode_step_inputs(
                positions, page_table, steps_left, k, page_size=page_size,
                pad_slot=pad_slot)
            logits, kv = step(params, tok, pos, slots, page_table, ctx, q_index, rows, kv)
            new, lp, _ = sample_tokens(logits, temperature, top_k, top_p, min_p, seed_lo,
                                       seed_hi, step0 + k, truncate=False)
            return (new, kv, out_tokens.at[k].set(new), out_lp.at[k].set(lp))

        init = (tokens, kv, jnp.zeros((num_steps, s), jnp.int32),
                jnp.zeros((num_steps, s), jnp.float32))
        _, kv, out_tokens, out_lp = lax.fori_loop(0, num_steps, body, init)
        return out_tokens, out_lp, kv
    return run


def _sharded_step(step: StepFn, mesh) -> StepFn:
    """`step` on a mesh (`jaxrt.lowering.mesh.StepMesh`). With dp > 1 the batch's rows
    (tokens, sequences, logit rows) are split over dp. The logits are computed split by
    vocabulary, then gathered whole on every device before anything samples them:
    without the first constraint the partitioner may gather the LM head's weight
    instead (cheaper on tiny shapes, a vocab x hidden copy every step on real ones);
    without the second it carries the split into the sampler's sort, cumsum and
    reductions, a collective each."""
    constrain = jax.lax.with_sharding_constraint
    split_rows = mesh.mesh.shape.get("dp", 1) > 1

    def run(params, *args):
        *batch, kv = args
        if split_rows:
            batch = [constrain(x, mesh.rows()) for x in batch]
        logits, kv = step(params, *batch, kv)
        logits = constrain(logits, mesh.logits())
        return constrain(logits, mesh.replicated), kv
    return run


class StepPrograms:
    """Compiled sampled steps and decode loops of one step function, by shape.

    `params_struct` and `kv_struct` are the ShapeDtypeStructs (or arrays) programs are
    lowered against; `pad_slot` is a slot past the cache (writes there are dropped)."""

    def __init__(self, step: StepFn, *, page_size: int, pad_slot: int, mesh=None):
        self._step, self.page_size, self.pad_slot = step, page_size, pad_slot
        # A `jaxrt.lowering.mesh.StepMesh` for a sharded module: inputs and sampled
        # outputs replicated (the logits gathered), the cache kept as it is split.
        self.mesh = mesh
        if mesh is not None:
            self._step = _sharded_step(step, mesh)
        self._compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0

    def has(self, key: tuple) -> bool:
        return key in self._compiled

    def forget(self, key: tuple) -> None:
        """Drop a compiled program (the next compile of its key builds it again)."""
        self._compiled.pop(key, None)

    def temp_bytes(self, key: tuple) -> int | None:
        """XLA's temporary bytes of a compiled program, or None where the backend does
        not say."""
        try:
            stats = self._compiled[key].memory_analysis()
        except (NotImplementedError, RuntimeError):
            return None
        return None if stats is None else int(stats.temp_size_in_bytes)

    def trace_step(self, shape: tuple[int, int, int, int, int], params_struct, kv_struct,
                   mask_words: int = 0, *, dense: bool = False):
        """The sampled step of a bucket, traced (jax.stages.Traced): lower and compile.
        `mask_words` > 0: the masked variant (a token bitmask of that many words a row).
        `dense`: decode attention over the whole table (`attention.dense_decode`)."""
        from ..lowering.xla.attention import dense_decode
        layout = step_layout(*shape, mask_words)
        with dense_decode(dense):
            return self._trace(sampled_step(self._step, layout, masked=mask_words > 0),
                               layout, params_struct, kv_struct, outputs=2)

    @staticmethod
    def step_key(shape, mask_words: int = 0) -> tuple:
        return ("step-masked", *shape, mask_words) if mask_words else ("step", *shape)

    def compile_step(self, shape: tuple[int, int, int, int, int], params_struct,
                     kv_struct, mask_words: int = 0, *, dense: bool = False) -> float:
        key = self.step_key(shape, mask_words)
        if key in self._compiled:
            return 0.0
        return self._finish(key, lambda: self.trace_step(shape, params_struct, kv_struct,
                                                         mask_words, dense=dense))

    def compile_decode(self, S: int, MP: int, num_steps: int, params_struct,
                       kv_struct, *, dense: bool = False) -> float:
        """Compile the decode loop; `dense` traces its paged attention over the whole
        table at once (`attention.dense_decode`)."""
        key = ("decode", S, MP, num_steps)
        if key in self._compiled:
            return 0.0
        from ..lowering.xla.attention import dense_decode
        layout = decode_layout(S, MP)
        fn = decode_loop(self._step, layout, page_size=self.page_size,
                         pad_slot=self.pad_slot, num_steps=num_steps)
        feed = jax.ShapeDtypeStruct((num_steps, S), jnp.int32)

        def trace():
            with dense_decode(dense):
                return self._trace(fn, layout, params_struct, kv_struct, feed)
        return self._finish(key, trace)

    def compile_decode_forward(self, S: int, MP: int, params_struct, kv_struct, *,
                               dense: bool = False) -> float:
        """Compile the decode forward (`decode_forward`) of S rows and MP table pages."""
        key = ("decode-forward", S, MP)
        if key in self._compiled:
            return 0.0
        from ..lowering.xla.attention import dense_decode
        layout = decode_layout(S, MP)
        fn = decode_forward(self._step, layout, page_size=self.page_size,
                            pad_slot=self.pad_slot)
        feed = jax.ShapeDtypeStruct((1, S), jnp.int32)

        def trace():
            with dense_decode(dense):
                return self._trace(fn, layout, params_struct, kv_struct, feed, outputs=1)
        return self._finish(key, trace)

    def run_decode_forward(self, S: int, MP: int, params, packed: np.ndarray, feed, kv):
        """-> (logits [S, V], kv) on the device; `feed`: an earlier call's tokens [1, S],
        or None."""
        if feed is None:
            feed = self._no_feed(1, S)
        return self._compiled[("decode-forward", S, MP)](params, packed, feed, kv)

    def _trace(self, fn, layout, params_struct, kv_struct, *extra,
               outputs: int | None = None):
        """`outputs`: how many outputs precede the cache (default 3 less the extras: a
        decode loop's tokens and logprobs)."""
        buf = jax.ShapeDtypeStruct((buffer_size(layout),), jnp.int32)
        if self.mesh is None:
            return jax.jit(fn, donate_argnums=(2 + len(extra),)).trace(
                params_struct, buf, *extra, kv_struct)
        rep = self.mesh.replicated
        buf = jax.ShapeDtypeStruct(buf.shape, buf.dtype, sharding=rep)
        extra = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep) for x in extra]
        outs = (rep,) * (3 - len(extra) if outputs is None else outputs) \
            + (self.mesh.kv(),)
        return jax.jit(fn, donate_argnums=(2 + len(extra),), out_shardings=outs).trace(
            params_struct, buf, *extra, kv_struct)

    def _finish(self, key, trace) -> float:
        start = time.perf_counter()
        self._compiled[key] = trace().lower().compile(compiler_options=COMPILER_OPTIONS)
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        return seconds

    def run_step(self, shape, params, packed: np.ndarray, kv, mask_words: int = 0):
        """-> (sampled i32[2, N] (`unpack_sampled`), logits, kv), all on the device."""
        return self._compiled[self.step_key(shape, mask_words)](params, packed, kv)

    def run_decode(self, S: int, MP: int, num_steps: int, params, packed: np.ndarray,
                   feed, kv):
        """-> (tokens [K, S], logprobs [K, S], kv), on the device. `feed`: an earlier
        decode call's tokens [K, S], or None (then every row starts from its token)."""
        if feed is None:
            feed = self._no_feed(num_steps, S)
        return self._compiled[("decode", S, MP, num_steps)](params, packed, feed, kv)

    def _no_feed(self, num_steps: int, S: int):
        key = ("no-feed", num_steps, S)
        if key not in self._compiled:
            zeros = jnp.zeros((num_steps, S), jnp.int32)
            self._compiled[key] = (zeros if self.mesh is None
                                   else jax.device_put(zeros, self.mesh.replicated))
        return self._compiled[key]


# XLA's rematerialization pass off for step programs. XLA counts the donated KV cache
# twice (input and output), so with a cache planned to fill the device it believes a
# step needs ~2x the cache, past the device's memory, and rematerializes and schedules
# for memory; nothing is saved (the cache is updated in place) but the program is slower.
# One H200, Llama-3.1-8B shape, bf16, a 109 GB cache, in the same call: batch-1 decode
# 156 -> 196 tok/s, offline 512 x 128/128 7,578 -> 8,984 tok/s (bench/results/
# decode_8b_remat_h200.json). The plan-kv-cache pass leaves the activations their room.
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}


def greedy_sampling(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed sampling arguments of n greedy rows (`SamplingBatch.packed()` layout)."""
    floats = np.zeros((n, SAMPLING_FLOATS), np.float32)
    floats[:, 1] = 1.0  # top_p
    return floats, np.zeros((n, SAMPLING_INTS), np.int32)
