"""StepExecutable: one model's `@step` compiled per shape bucket, weights and KV cache on
device; plus `greedy_generate`, a single-sequence driver for tests and a CLI fallback.

The batching runtime (jaxrt.runtime) builds its Engine on `StepExecutable.run`.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..ir import DType, Module, ops, verify
from ..ir.substitute import bind_dims, set_float_dtype
from ..ir.weights import materialize, resident_weights
from .compile import default_float_dtype, enable_persistent_cache, lower_function
from .mesh import StepMesh

_ZEROS = ThreadPoolExecutor(1, thread_name_prefix="jaxrt-kv-zeros")
_PLACE = ThreadPoolExecutor(1, thread_name_prefix="jaxrt-weights")

STEP_ARG_NAMES = ("tokens", "positions", "slot_mapping", "page_table", "context_lens",
                  "q_index", "logit_index", "kv")


def as_dtype(dtype) -> DType:
    """None (the backend's default), a DType, "f32"/"bf16"/"float32"/... or a numpy dtype."""
    if dtype is None:
        return default_float_dtype()
    if isinstance(dtype, DType):
        return dtype
    if isinstance(dtype, str):
        aliases = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
        return DType.parse(aliases.get(dtype, dtype))
    return DType.from_numpy(dtype)


_as_dtype = as_dtype  # the name jaxrt/runtime/engine.py imports


class StepExecutable:
    """A module's `@step` bound to `num_pages` x `page_size` cache pages, ready to run.

    `dtype` is the float compute dtype (default: f32 on CPU, bf16 elsewhere); weights and
    the KV cache take it too unless named in `keep_f32` (e.g. ("kv",)). Logits are f32.
    """

    def __init__(self, module: Module, weights: Mapping[str, np.ndarray], *, num_pages: int,
                 page_size: int, dtype=None, keep_f32: Iterable[str] = (),
                 backends: str | Sequence[str] | None = None, wait: bool = True,
                 max_model_len: int | None = None):
        enable_persistent_cache()
        # the planned sequence length (plan-kv-cache); Engine(exe) defaults to it, not to
        # the cache's whole capacity (a table that wide makes every decode step read more)
        self.max_model_len = max_model_len
        fn = module.functions.get("step")
        if fn is None or tuple(fn.arg_names) != STEP_ARG_NAMES:
            raise ValueError(f"module @{module.name} has no @step with arguments "
                             f"{STEP_ARG_NAMES}")
        # A module from the pass pipeline may already be cast (cast-float records
        # "float_dtype") and planned (plan-kv-cache binds the cache dims).
        cast_to = module.attributes.get("float_dtype")
        self.dtype = as_dtype(dtype if dtype is not None else cast_to)
        if cast_to not in (None, "f32", self.dtype.value):
            raise ValueError(f"module @{module.name} computes in {cast_to}; it cannot run "
                             f"as {self.dtype.value}")
        bound = bind_dims(module, {"pages": num_pages, "page_size": page_size})
        if self.dtype != DType.f32 and cast_to != self.dtype.value:
            bound = set_float_dtype(bound, self.dtype, keep_f32=keep_f32)
        verify(bound)
        self.module = bound
        self.num_pages, self.page_size = num_pages, page_size
        step = bound.functions["step"]
        self._kv_type = step.arg("kv").type
        if self._kv_type.shape[2:4] != (num_pages, page_size):
            raise ValueError(f"kv cache {self._kv_type} is not {num_pages} pages of "
                             f"{page_size}")
        self._logits_type = step.results[0].type
        # Zeroing the cache is page faults, not arithmetic (4 GiB: ~2 s on a 2-core VM):
        # done on a thread (XLA releases the GIL) while weights load and buckets trace and
        # compile, which need only its shape. Resolved by the first run.
        # A sharded module (the shard pass) runs on a device mesh: weights and the cache
        # are split as it says; None keeps the single-device path untouched.
        self.mesh = StepMesh.of(bound)
        self._kv_struct = jax.ShapeDtypeStruct(
            self._kv_type.shape, self._kv_type.dtype.to_numpy(),
            **({} if self.mesh is None else {"sharding": self.mesh.kv()}))
        self._kv_future = _ZEROS.submit(self._zero_cache)
        self._kv: jax.Array | None = None
        # Weights likewise, with wait=False: reading them (the weight cache: page faults,
        # GIL released) overlaps tracing and compiling, which need only their types.
        # ready() (or the first run) waits, and raises what placing them raised.
        names = resident_weights(bound)
        self._weight_structs = {n: jax.ShapeDtypeStruct(
            bound.weights[n].shape, bound.weights[n].dtype.to_numpy(),
            **({} if self.mesh is None else {"sharding": self.mesh.weight(n)}))
            for n in names}
        self._weights: dict[str, jax.Array] | None = None
        self._weights_future = _PLACE.submit(self._place_weights, weights)
        if wait:
            self.ready()
        from ..runtime.programs import StepPrograms
        if backends is None:  # Pallas kernels first on one Hopper GPU (lowering.pallas)
            from .pallas import default_backends
            backends = default_backends(sharded=self.mesh is not None)
        self.backends = (backends,) if isinstance(backends, str) else tuple(backends)
        self._kernel_decode: bool | None = None  # `_decode_kernel`, once asked
        self._programs = StepPrograms(lower_function(bound, "step", backends=backends),
                                      page_size=page_size, pad_slot=num_pages * page_size,
                                      mesh=self.mesh)
        self._shapes: set[tuple[int, int, int, int, int]] = set()
        # (S, MP, num_steps, temp bytes) of dense decode loops that copied the cache
        self.decode_fallbacks: list[tuple[int, int, int, int]] = []

    def _place_weights(self, weights: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """The weights @step reads, on the device. Defined weights (stacks, casts) are
        computed here once from the source data, which must have its declared type."""
        if self.mesh is None:
            place = lambda name, arr: jax.device_put(arr)  # noqa: E731
        else:
            place = lambda name, arr: jax.device_put(arr, self.mesh.weight(name))  # noqa: E731
        return materialize(self.module, weights, resident_weights(self.module),
                           on_result=place)

    def _zero_cache(self) -> jax.Array:
        shape, dtype = self._kv_struct.shape, self._kv_struct.dtype
        if self.mesh is None:
            return jnp.zeros(shape, dtype).block_until_ready()
        # Each device zeroes only its own shard.
        return jax.jit(lambda: jnp.zeros(shape, dtype),
                       out_shardings=self.mesh.kv())().block_until_ready()

    # ---- properties -----------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self._kv_type.shape[0]

    @property
    def vocab_size(self) -> int:
        return self._logits_type.shape[-1]

    @property
    def kv_dtype(self) -> DType:
        return self._kv_type.dtype

    @property
    def kv_bytes_per_token(self) -> int:
        layers, two, _, _, kv_heads, head_dim = self._kv_type.shape
        return layers * two * kv_heads * head_dim * self._kv_type.dtype.itemsize

    @property
    def compile_seconds_total(self) -> float:
        return self._programs.compile_seconds

    @property
    def kv_cache(self) -> jax.Array:
        """The current cache (replaced by every `run`; do not hold on to it across runs)."""
        return self._cache()

    def ready(self) -> None:
        """Wait until the weights and the KV cache are on the device (raising what
        placing the weights raised)."""
        self._placed()
        self._cache()

    def _placed(self) -> dict[str, jax.Array]:
        if self._weights is None:
            self._weights = self._weights_future.result()
            self._weights_future = None
        return self._weights

    def _cache(self) -> jax.Array:
        if self._kv is None:
            self._kv, self._kv_future = self._kv_future.result(), None
        return self._kv

    @property
    def compiled_shapes(self) -> list[tuple[int, int, int, int, int]]:
        return sorted(self._shapes)

    # ---- compile and run --------------------------------------------------------------

    def _dense(self, S: int, MP: int) -> bool:
        """Whether decode programs of S sequences attend to their whole table at once
        (`attention.decode_dense`: K+V of a device's heads against the bound)."""
        from .xla.attention import decode_dense
        if self._decode_kernel():
            return False  # the kernel reads each row's own pages: one full-width table
        parts = 1 if self.mesh is None else self.mesh.kv_parts  # a device's KV heads
        return decode_dense(S, MP * self.page_size,
                            self.kv_bytes_per_token // self.num_layers // parts)

    def _decode_kernel(self) -> bool:
        """Whether decode steps' paged attention runs the Pallas kernel (worked out once:
        it walks the module)."""
        if self._kernel_decode is None:
            self._kernel_decode = self._kernel_covers_decode()
        return self._kernel_decode

    def _kernel_covers_decode(self) -> bool:
        if "pallas" not in self.backends:
            return False
        from .pallas import attention_kernel_applies
        attn = next((op for fn in self.module.functions.values() for op in fn.ops
                     if op.opdef is ops.paged_attention), None)
        if attn is None:
            return False
        q_type = attn.operands[0].type
        return attention_kernel_applies(self._kv_type.dtype.to_numpy(),
                                        q_type.dtype.to_numpy(), q_type.shape[1],
                                        self._kv_type.shape[4], q_type.shape[2],
                                        self.page_size, 1, attn.attrs.causal)

    def decode_widths(self, S: int, MP: int) -> tuple[int, ...]:
        """The page-table widths (pages, narrowest first) decode loops of S rows compile
        for. A dense loop reads K+V for every page of its table, so where the dense
        attention holds for tables narrower than MP, the engine picks the narrowest width
        that holds its rows' contexts from a ladder (DENSE_MIN_WIDTH_TOKENS, then by
        DENSE_WIDTH_GROWTH): a 200-token context does not read an 8,192-token table.
        Always ends with MP (dense or the block loop, which stops at the longest
        context by itself)."""
        from .xla.attention import DENSE_MIN_WIDTH_TOKENS, DENSE_WIDTH_GROWTH
        widths, w = [], max(1, DENSE_MIN_WIDTH_TOKENS // self.page_size)
        while w < MP and self._dense(S, w):
            widths.append(w)
            w *= DENSE_WIDTH_GROWTH
        return (*widths, MP)

    def compile_for(self, T: int, S: int, Q: int, MP: int, N: int) -> float:
        """Compile the bucket (tokens, sequences, queries per sequence, max pages per
        sequence, logit rows) ahead of time: the step with sampling on the device
        (`jaxrt.runtime.programs`); returns the seconds spent (0 if cached)."""
        seconds = self._programs.compile_step((T, S, Q, MP, N), self._weight_structs,
                                              self._kv_struct,
                                              dense=Q == 1 and self._dense(S, MP))
        self._shapes.add((T, S, Q, MP, N))
        return seconds

    def compile_decode(self, S: int, MP: int, num_steps: int) -> float:
        """Compile the loop of `num_steps` decode steps of S sequences (see `decode`).

        Where `attention.decode_dense` allows, its attention reads the whole table at once
        (no inner loops, so the device runs the loop without the host). Such a loop is
        kept only if XLA updates the cache in place: one whose temporary buffers are as
        large as the cache copies it every call, so it is compiled again with the block
        loop, with a warning (`decode_fallbacks` records the shapes)."""
        dense = self._dense(S, MP)
        seconds = self._programs.compile_decode(S, MP, num_steps, self._weight_structs,
                                                self._kv_struct, dense=dense)
        if dense:
            key = ("decode", S, MP, num_steps)
            temp = self._programs.temp_bytes(key)
            parts = 1 if self.mesh is None else self.mesh.kv_parts
            cache = int(np.prod(self._kv_struct.shape)) * self._kv_struct.dtype.itemsize \
                // parts
            if temp is not None and temp >= cache:
                import warnings
                warnings.warn(f"jaxrt: the dense decode loop of {S} rows needs "
                              f"{temp / 2**30:.1f} GiB of temporaries against a "
                              f"{cache / 2**30:.1f} GiB KV cache (a copy of the cache); "
                              f"compiling it with the block loop instead",
                              RuntimeWarning, stacklevel=2)
                self.decode_fallbacks.append((S, MP, num_steps, temp))
                self._programs.forget(key)
                seconds += self._programs.compile_decode(
                    S, MP, num_steps, self._weight_structs, self._kv_struct, dense=False)
        return seconds

    def compile_decode_forward(self, S: int, MP: int) -> float:
        """Compile the decode forward of S sequences (see `decode_forward`)."""
        return self._programs.compile_decode_forward(S, MP, self._weight_structs,
                                                     self._kv_struct,
                                                     dense=self._dense(S, MP))

    def memory_analysis(self, T: int, S: int, Q: int, MP: int, N: int):
        """XLA's memory statistics of a bucket (compiling it if needed): argument, output,
        alias (the donated cache) and temp bytes, for sizing the cache against activations."""
        self.compile_for(T, S, Q, MP, N)
        return self._programs._compiled[("step", T, S, Q, MP, N)].memory_analysis()

    def run_sampled(self, tokens, positions, slot_mapping, page_table, context_lens,
                    q_index, logit_index, sampling: tuple[np.ndarray, np.ndarray],
                    token_bitmask: np.ndarray | None = None):
        """One step and its sampling on the device (see docs/architecture.md): returns
        (sampled i32[2, N], logits f32[N, vocab]), both on the device; `sampled` holds
        the tokens and their logprobs' bits, read in one transfer
        (`jaxrt.runtime.programs.unpack_sampled`). `sampling` is `SamplingBatch.packed()`
        of N rows.

        Compiles on the first call for a new shape bucket; the cache is donated and
        replaced, so only this object should keep a reference to it. `token_bitmask`
        i32[N, ceil(vocab/32)] (structured output) runs the masked variant of the step,
        compiled on its first use: logits outside the mask are -inf before sampling.
        """
        from ..runtime.programs import pack
        args = [np.asarray(a, np.int32) for a in (tokens, positions, slot_mapping,
                                                  page_table, context_lens, q_index,
                                                  logit_index)]
        key = _bucket(*args)
        words = 0 if token_bitmask is None else int(token_bitmask.shape[1])
        if not self._programs.has(self._programs.step_key(key, words)):
            if words:  # the masked variant of the bucket
                self._programs.compile_step(key, self._weight_structs, self._kv_struct,
                                            words, dense=key[2] == 1 and self._dense(
                                                key[1], key[3]))
            else:
                self.compile_for(*key)  # recorded in compiled_shapes
        extra = [] if token_bitmask is None else [np.asarray(token_bitmask, np.int32)]
        packed = pack([*args, *sampling, *extra])
        sampled, logits, self._kv = self._programs.run_step(
            key, self._placed(), packed, self._cache(), words)
        return sampled, logits

    def run(self, tokens, positions, slot_mapping, page_table, context_lens, q_index,
            logit_index) -> jax.Array:
        """One step; returns f32 logits [N, vocab] on device (`run_sampled` with greedy
        rows, whose tokens are dropped)."""
        from ..runtime.programs import greedy_sampling
        return self.run_sampled(tokens, positions, slot_mapping, page_table, context_lens,
                                q_index, logit_index, greedy_sampling(len(logit_index)))[1]

    def decode(self, tokens, positions, page_table, steps_left, num_steps: int,
               sampling: tuple[np.ndarray, np.ndarray], feed=None, feed_at=None):
        """`num_steps` decode steps of S = len(tokens) sequences in one call: row s feeds
        tokens[s] at positions[s] and runs steps_left[s] <= num_steps steps, writing the
        slots its page table row gives. Returns (tokens i32[K, S], logprobs f32[K, S]) on
        the device; rows past their steps_left hold garbage. With `feed` (an earlier
        call's tokens, on the device), row s starts from feed[feed_at[0, s], feed_at[1,
        s]] where feed_at[0, s] >= 0 (jaxrt.runtime.programs.decode_loop)."""
        from ..runtime.programs import pack
        s, mp, args = _decode_args(tokens, positions, page_table, steps_left, feed_at)
        if not self._programs.has(("decode", s, mp, num_steps)):
            self.compile_decode(s, mp, num_steps)
        packed = pack([*args, *sampling])
        out_tokens, out_lp, self._kv = self._programs.run_decode(
            s, mp, num_steps, self._placed(), packed, feed, self._cache())
        return out_tokens, out_lp


    def decode_forward(self, tokens, positions, page_table, steps_left, feed=None,
                       feed_at=None) -> jax.Array:
        """One decode step of S = len(tokens) sequences as `decode`'s first (rows with
        steps_left 0 are padding), returning its logits f32[S, vocab] on the device
        instead of sampling them; `feed` an earlier call's tokens [1, S] (structured
        output samples them with its mask: `jaxrt.runtime.structured.sample_masked`)."""
        from ..runtime.programs import greedy_sampling, pack
        s, mp, args = _decode_args(tokens, positions, page_table, steps_left, feed_at)
        if not self._programs.has(("decode-forward", s, mp)):
            self.compile_decode_forward(s, mp)
        packed = pack([*args, *greedy_sampling(s)])
        logits, self._kv = self._programs.run_decode_forward(
            s, mp, self._placed(), packed, feed, self._cache())
        return logits

def _bucket(tokens, positions, slot_mapping, page_table, context_lens, q_index,
            logit_index) -> tuple[int, int, int, int, int]:
    for name, a, rank in (("tokens", tokens, 1), ("positions", positions, 1),
                          ("slot_mapping", slot_mapping, 1), ("page_table", page_table, 2),
                          ("context_lens", context_lens, 1), ("q_index", q_index, 2),
                          ("logit_index", logit_index, 1)):
        if a.ndim != rank or a.dtype != np.int32:
            raise ValueError(f"{name}: expected rank-{rank} int32, got {a.dtype}{a.shape}")
    t = tokens.shape[0]
    s, mp = page_table.shape
    if positions.shape[0] != t or slot_mapping.shape[0] != t:
        raise ValueError("tokens, positions and slot_mapping must have the same length")
    if context_lens.shape[0] != s or q_index.shape[0] != s:
        raise ValueError("page_table, context_lens and q_index disagree on sequences")
    return t, s, q_index.shape[1], mp, logit_index.shape[0]


def greedy_generate(exe: StepExecutable, prompt_ids: Sequence[int], max_new_tokens: int,
                    stop_ids: Iterable[int] = ()) -> list[int]:
    """Greedy continuation of one sequence laid out in pages 0, 1, 2, ... of the cache.

    Prefills the whole prompt in one step, then decodes one token per step; returns the
    new tokens (ending with the stop token if one was produced).
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("greedy_generate needs a non-empty prompt")
    if max_new_tokens <= 0:
        return []
    stop = {int(t) for t in stop_ids}
    written = len(prompt) + max_new_tokens - 1  # the last new token is never fed back
    n_pages = math.ceil(written / exe.page_size)
    if n_pages > exe.num_pages:
        raise ValueError(f"{written} tokens need {n_pages} pages; the cache has "
                         f"{exe.num_pages}")
    page_table = np.arange(n_pages, dtype=np.int32)[None]  # slot of position p is p
    n = len(prompt)
    pos = np.arange(n, dtype=np.int32)
    logits = exe.run(np.asarray(prompt, np.int32), pos, pos, page_table,
                     np.asarray([n], np.int32), pos[None], np.asarray([n - 1], np.int32))
    out: list[int] = []
    one = np.zeros(1, np.int32)
    while True:
        token = int(jnp.argmax(logits[0]))
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            return out
        p = np.asarray([n], np.int32)
        logits = exe.run(np.asarray([token], np.int32), p, p, page_table,
                         np.asarray([n + 1], np.int32), one[None], one)
        n += 1


def _decode_args(tokens, positions, page_table, steps_left, feed_at):
    """(S, MP, the int32 inputs of a decode call: tokens, positions, page table, steps
    left, feed_at (default: every row from its own token))."""
    if feed_at is None:
        feed_at = np.full((2, len(tokens)), -1, np.int32)
    args = [np.asarray(a, np.int32) for a in (tokens, positions, page_table, steps_left,
                                              feed_at)]
    return (*args[2].shape, args)
