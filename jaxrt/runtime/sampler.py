"""On-device sampling: penalties, temperature, min-p / top-k / top-p, seeded Gumbel-max.

One jitted function per (batch rows N, penalties on/off); `Sampler.compile_for` builds them
ahead of time so nothing compiles on the request path.

Per row, in order (vLLM semantics):
1. penalties (only in the `penalties` variant): repetition penalty over tokens seen in the
   prompt or the output (logit / p if positive else logit * p), then
   `- frequency * count - presence * (count > 0)` over output token counts;
2. greedy rows (temperature 0) take the argmax of those logits;
3. logprobs = log_softmax(logits / T) (T = 1 for greedy rows): the *processed*
   distribution, before truncation. Top-n logprobs and beam candidates come from it;
4. random rows keep tokens passing min-p (prob >= min_p * max prob), then top-k, then
   top-p over the renormalized survivors (the smallest most-likely set with mass >= p;
   ties at a threshold are all kept), and draw with Gumbel-max.

Randomness is counter-based: the Gumbel noise of token v in a row is a hash of (seed,
step, v), where step is the request's output position. A token therefore depends only on
(seed, step) and the logits, never on what else shares the batch, nor on preemption and
recompute. The hash is murmur3's 32-bit finalizer, chained; we do not use threefry
(`jax.random`) because its unrolled rounds cost ~0.7 s of XLA compile per sampler
variant on CPU, where this costs ~0.05 s (tests check the resulting distribution).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .request import SamplingParams

# compiled sampler functions shared by every Sampler: (N, V, K, penalties) -> Compiled
_COMPILED: dict[tuple[int, int, int, bool], object] = {}


@dataclass(frozen=True)
class SampledToken:
    """One row of sampler output, on the host."""
    token: int
    logprob: float              # of `token` under the processed distribution
    top_ids: np.ndarray         # [K] most likely tokens, best first
    top_logprobs: np.ndarray    # [K]

    def top(self, n: int) -> dict[int, float]:
        """The n best tokens and the sampled one, token -> logprob."""
        d = {int(t): float(lp) for t, lp in zip(self.top_ids[:n], self.top_logprobs[:n])}
        d[self.token] = float(self.logprob)
        return d


@dataclass
class SamplingBatch:
    """Host arrays for N rows; `prompt_mask`/`output_counts` only when penalties are on."""
    temperature: np.ndarray     # f32[N]
    top_k: np.ndarray           # i32[N], 0 = off
    top_p: np.ndarray           # f32[N]
    min_p: np.ndarray           # f32[N]
    repetition_penalty: np.ndarray  # f32[N]
    presence_penalty: np.ndarray    # f32[N]
    frequency_penalty: np.ndarray   # f32[N]
    seed_lo: np.ndarray         # u32[N]
    seed_hi: np.ndarray         # u32[N]
    step: np.ndarray            # i32[N], the request's output position
    num_top_wanted: int = 0     # the most top logprobs a row asked for
    prompt_mask: np.ndarray | None = None    # bool[N, V]: token occurs in the prompt
    output_counts: np.ndarray | None = None  # i32[N, V]: occurrences in the output

    @classmethod
    def build(cls, rows: Sequence[tuple[SamplingParams, int, int, Sequence[int],
                                        Sequence[int]] | None],
              num_rows: int, vocab_size: int) -> "SamplingBatch":
        """rows[i] = (params, seed, step, prompt ids, output ids), None for padding; padded
        to `num_rows` greedy rows. Penalty arrays are built only if some row needs them."""
        n = num_rows
        # columns as Python lists, one array each at the end: every step builds a batch,
        # and per-element stores into numpy arrays cost more than the lists
        temperature, top_k, top_p, min_p = [0.0] * n, [0] * n, [1.0] * n, [0.0] * n
        repetition, presence, frequency = [1.0] * n, [0.0] * n, [0.0] * n
        seed_lo, seed_hi, steps = [0] * n, [0] * n, [0] * n
        num_top, penalized = 0, []
        for i, row in enumerate(rows):
            if row is None:
                continue
            p, seed, step, prompt, output = row
            # top_k >= V keeps every token, as the device's min(top_k, V) does; clamped
            # here too, so a huge k (any int validate() accepts) fits the int32 row
            temperature[i], top_k[i], top_p[i], min_p[i] = \
                p.temperature, min(p.top_k, vocab_size), p.top_p, p.min_p
            repetition[i] = p.repetition_penalty
            presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
            seed_lo[i], seed_hi[i] = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
            steps[i] = step
            num_top = max(num_top, p.logprobs or 0)
            if p.uses_penalties:
                penalized.append((i, prompt, output))
        f32 = np.float32
        b = cls(np.array(temperature, f32), np.array(top_k, np.int32), np.array(top_p, f32),
                np.array(min_p, f32), np.array(repetition, f32), np.array(presence, f32),
                np.array(frequency, f32), np.array(seed_lo, np.uint32),
                np.array(seed_hi, np.uint32), np.array(steps, np.int32), num_top)
        if penalized:
            b.prompt_mask = np.zeros((n, vocab_size), bool)
            b.output_counts = np.zeros((n, vocab_size), np.int32)
            for i, prompt, output in penalized:
                b.prompt_mask[i, np.asarray(prompt, np.int64)] = True
                np.add.at(b.output_counts[i], np.asarray(output, np.int64), 1)
        return b

    @property
    def has_penalties(self) -> bool:
        return self.output_counts is not None

    @property
    def needs_full_sampler(self) -> bool:
        """Penalties or top-n logprobs: what the step executables' own sampling lacks."""
        return self.has_penalties or self.num_top_wanted > 0

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """(f32[N, 3], i32[N, 4]): the arguments of `unpack_sampling`, two transfers."""
        n = len(self.temperature)
        floats = np.empty((n, 3), np.float32)  # (column stores: half np.stack's time)
        floats[:, 0], floats[:, 1], floats[:, 2] = self.temperature, self.top_p, self.min_p
        ints = np.empty((n, 4), np.int32)
        ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3] = \
            self.top_k, self.seed_lo.view(np.int32), self.seed_hi.view(np.int32), self.step
        return floats, ints

    def arrays(self) -> tuple[np.ndarray, ...]:
        base = (self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                self.presence_penalty, self.frequency_penalty, self.seed_lo, self.seed_hi,
                self.step)
        return base + ((self.prompt_mask, self.output_counts) if self.has_penalties else ())


# ---- the math (jnp, traced inside the jitted sampler; usable directly in tests) ----------

def apply_penalties(logits, prompt_mask, output_counts, repetition, presence, frequency):
    """logits [N, V]; prompt_mask bool [N, V]; output_counts i32 [N, V]; penalties [N]."""
    counts = output_counts.astype(jnp.float32)
    seen = prompt_mask | (output_counts > 0)
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def truncation_mask(scaled, top_k, top_p, min_p):
    """Which tokens random sampling may draw. scaled [N, V] = logits / T; top_k i32[N]
    (0 = off), top_p, min_p f32[N]. Off settings change nothing, exactly."""
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)                                   # [N, V]
    top = desc[:, :1]
    keep_min = jnp.where(min_p[:, None] > 0,
                         scaled >= top + jnp.log(jnp.maximum(min_p, 1e-30))[:, None], True)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)          # [N, 1]
    keep_k = scaled >= kth
    # top-p over the survivors of min-p and top-k: they are a prefix of `desc`
    floor = jnp.maximum(kth, jnp.where(min_p[:, None] > 0,
                                       top + jnp.log(jnp.maximum(min_p, 1e-30))[:, None],
                                       -jnp.inf))
    survivors = jnp.where(desc >= floor, desc, -jnp.inf)
    probs = jax.nn.softmax(survivors, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                          # mass above each
    in_p = (before < top_p[:, None]) & (desc >= floor)
    cutoff = jnp.min(jnp.where(in_p, desc, jnp.inf), axis=-1, keepdims=True)
    keep_p = jnp.where(top_p[:, None] < 1.0, scaled >= cutoff, True)
    return keep_min & keep_k & keep_p


def _fmix32(x):
    """murmur3's finalizer: a bijection on u32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(seed_lo, seed_hi, step, vocab_size: int):
    """Gumbel(0, 1) noise f32[N, V] from u32 seeds [N] and i32 steps [N]: row r depends on
    (seed_lo[r], seed_hi[r], step[r]) only."""
    u32 = jnp.uint32
    key = _fmix32(seed_lo ^ _fmix32(seed_hi ^ _fmix32(step.astype(u32) + u32(0x9E3779B9))))
    token = _fmix32(jnp.arange(vocab_size, dtype=u32) * u32(0x27D4EB2F) + u32(0x165667B1))
    bits = _fmix32(_fmix32(token[None, :] ^ key[:, None]) + key[:, None])   # [N, V]
    uniform = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -jnp.log(-jnp.log(uniform))


def sample_tokens(logits, temperature, top_k, top_p, min_p, seed_lo, seed_hi, step, *,
                  truncate: bool = True):
    """Steps 2-4 above for logits f32[N, V] (penalties already applied): the sampled tokens
    i32[N], their logprobs f32[N] and the processed logprobs f32[N, V]. Traced inside the
    step executables (`jaxrt.runtime.programs`) and inside the full sampler below, so both
    draw the same tokens.

    `truncate=False` is for batches where no random row truncates (top-k, top-p, min-p
    off; `SamplingParams.truncates`): it draws without the mask and without `lax.cond`,
    whose predicate XLA:GPU reads back to the host (a stall per call; the decode loops
    use this form). With truncation off both forms draw the same token."""
    logits = logits.astype(jnp.float32)                                  # [N, V]
    greedy = temperature <= 0.0
    temp = jnp.where(greedy, 1.0, temperature)
    scaled = logits / temp[:, None]
    logprobs = jax.nn.log_softmax(scaled, axis=-1)

    def draw(masked: bool):  # Gumbel-max over the (truncated) distribution
        if masked:
            needs_mask = jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0) | (min_p > 0.0)))
            keep = jax.lax.cond(needs_mask,
                                lambda: truncation_mask(scaled, top_k, top_p, min_p),
                                lambda: jnp.ones(scaled.shape, bool))
            scores = jnp.where(keep, scaled, -jnp.inf)
        else:
            scores = scaled
        gumbel = gumbel_noise(seed_lo, seed_hi, step, scaled.shape[-1])
        return jnp.argmax(scores + gumbel, axis=-1)

    if truncate:
        # An all-greedy batch (the common serving case) skips the [N, V] noise and masks.
        drawn = jax.lax.cond(jnp.any(~greedy), lambda: draw(True),
                             lambda: jnp.zeros(scaled.shape[:1], jnp.int32))
    else:  # the noise costs a hash per logit: less than a host round trip
        drawn = draw(False)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    token_lp = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, token_lp, logprobs


def unpack_sampling(floats, ints):
    """`SamplingBatch.packed()` arrays -> the per-row arguments of `sample_tokens`
    after `logits`: floats f32[N, 3] (temperature, top_p, min_p), ints i32[N, 4] (top_k,
    seed_lo, seed_hi, step; the seeds are u32 bits)."""
    seeds = jax.lax.bitcast_convert_type(ints[:, 1:3], jnp.uint32)
    return (floats[:, 0], ints[:, 0], floats[:, 1], floats[:, 2], seeds[:, 0], seeds[:, 1],
            ints[:, 3])


def _sample(logits, temperature, top_k, top_p, min_p, repetition, presence, frequency,
            seed_lo, seed_hi, step, prompt_mask=None, output_counts=None, *, num_top):
    logits = logits.astype(jnp.float32)                                  # [N, V]
    if output_counts is not None:
        logits = apply_penalties(logits, prompt_mask, output_counts, repetition, presence,
                                 frequency)
    tokens, token_lp, logprobs = sample_tokens(logits, temperature, top_k, top_p, min_p,
                                               seed_lo, seed_hi, step)
    top_lp, top_ids = jax.lax.top_k(logprobs, num_top)
    return tokens, token_lp, top_ids.astype(jnp.int32), top_lp


class Sampler:
    """Samples one token per logits row. `num_top` (>= max logprobs and 2 * max beam width)
    is how many top logprobs every row returns."""

    def __init__(self, vocab_size: int, num_top: int):
        self.vocab_size = vocab_size
        self.num_top = max(1, min(num_top, vocab_size))
        self.compile_seconds = 0.0
        self.compiles = 0  # compilations done by this sampler (warmup or not)

    def _key(self, num_rows: int, penalties: bool):
        return (num_rows, self.vocab_size, self.num_top, penalties)

    def is_compiled(self, num_rows: int, penalties: bool) -> bool:
        return self._key(num_rows, penalties) in _COMPILED

    def compile_for(self, num_rows: int, penalties: bool) -> float:
        key = self._key(num_rows, penalties)
        if key in _COMPILED:
            return 0.0
        n, v = num_rows, self.vocab_size
        s = jax.ShapeDtypeStruct
        args = [s((n, v), jnp.float32), s((n,), jnp.float32), s((n,), jnp.int32),
                s((n,), jnp.float32), s((n,), jnp.float32), s((n,), jnp.float32),
                s((n,), jnp.float32), s((n,), jnp.float32), s((n,), jnp.uint32),
                s((n,), jnp.uint32), s((n,), jnp.int32)]
        if penalties:
            args += [s((n, v), jnp.bool_), s((n, v), jnp.int32)]
        start = time.perf_counter()
        fn = jax.jit(_sample, static_argnames=("num_top",))
        _COMPILED[key] = fn.lower(*args, num_top=self.num_top).compile()
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        self.compiles += 1
        return seconds

    def __call__(self, logits: jax.Array, batch: SamplingBatch) -> list[SampledToken]:
        num_rows = logits.shape[0]
        if logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, vocab is "
                             f"{self.vocab_size}")
        self.compile_for(num_rows, batch.has_penalties)
        fn = _COMPILED[self._key(num_rows, batch.has_penalties)]
        tokens, token_lp, top_ids, top_lp = jax.device_get(fn(logits, *batch.arrays()))
        return [SampledToken(int(tokens[i]), float(token_lp[i]), top_ids[i], top_lp[i])
                for i in range(num_rows)]


def beam_candidates(top_ids: np.ndarray, top_logprobs: np.ndarray, cum_logprobs: np.ndarray,
                    beam_width: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2W best continuations of each beam: tokens [B, 2W] and cumulative logprobs
    [B, 2W] (beam's cumulative + token logprob), from the sampler's sorted top logprobs."""
    k = 2 * beam_width
    if top_ids.shape[-1] < k:
        raise ValueError(f"need {k} top logprobs per beam, the sampler returns "
                         f"{top_ids.shape[-1]}")
    return top_ids[:, :k], np.asarray(cum_logprobs)[:, None] + top_logprobs[:, :k]
