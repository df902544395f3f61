"""Perplexity of a token sequence under a compiled model, from its logits at every position.

Windows (Hugging Face's sliding-window rule, docs "Perplexity of fixed-length models"):
window k covers tokens [k * stride, min(k * stride + context, n)) and is run from position 0
with an empty cache; it scores the tokens after the previous window's end, each from the
window's tokens before it. With 1 <= stride < context every token but the first is scored
exactly once, with at least context - stride tokens of context once past the first
window (stride = context // 2 by default; a text that fits one window is one window).

    nll = mean over scored tokens t of -log p(token[t] | window tokens before t)
    ppl = exp(nll)

A window runs as prefill steps of `chunk` tokens through the KV cache (chunked prefill,
the same attention as one step), each returning the logits of all its tokens: one step
for a whole window would hold [context, vocab] f32 logits at once (8,192 x 49,152 x 4 B =
1.6 GB for SmolLM2). Log-softmax and the target's log-probability are taken on the
device; only one float per token comes back. Every chunk is padded to `chunk` tokens, so
one executable bucket serves the whole text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .errors import SettingError

LOGITS_BYTES_PER_STEP = 256 << 20  # cap on one step's [chunk, vocab] f32 logits


@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens: len(ids) - 1
    windows: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_json(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens,
                "windows": self.windows}


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) of each window over n tokens (module docstring)."""
    if not 1 <= stride < context:
        raise SettingError(f"stride must be in [1, context - 1] = [1, {context - 1}], "
                           f"got {stride}")
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + context, n)
        out.append((begin, max(prev_end, begin + 1), end))
        if end == n:
            return out
        prev_end, begin = end, begin + stride


def default_chunk(vocab: int, context: int, page_size: int) -> int:
    """Tokens per prefill step: logits under LOGITS_BYTES_PER_STEP, a multiple of the
    page size, at most the context."""
    chunk = max(page_size, LOGITS_BYTES_PER_STEP // (4 * vocab) // page_size * page_size)
    return min(chunk, -(-context // page_size) * page_size)


@jax.jit
def _token_nll(logits, targets):
    """-log softmax(logits)[target] per row, in f32: logits f32[C, V], targets i32[C]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def plan_windows(n: int, context: int, stride: int | None) -> list[tuple[int, int, int]]:
    """The windows over n tokens: context capped at n, stride context // 2 by default."""
    if n < 2:
        raise SettingError(f"perplexity needs at least 2 tokens, got {n}")
    if context < 2:
        raise SettingError(f"context must be >= 2 tokens, got {context}")
    context = min(context, n)
    if stride is None:
        stride = max(1, context // 2)
    elif context == n:
        stride = min(stride, context - 1)  # one window: the stride is never used
    return windows(n, context, stride)


def token_nlls(exe, ids: Sequence[int], context: int, stride: int | None = None,
               chunk: int | None = None) -> tuple[np.ndarray, int]:
    """(-log p of ids[1:], each given its window's earlier tokens, as f64[len(ids) - 1];
    the number of windows). `exe` is a StepExecutable (or anything with its `run`,
    `page_size`, `num_pages` and `vocab_size`) whose cache holds `context` tokens."""
    ids = np.asarray(ids, np.int32)
    n = len(ids)
    spans = plan_windows(n, context, stride)
    context = min(context, n)
    ps = exe.page_size
    pages = -(-context // ps)
    if pages > exe.num_pages:
        raise SettingError(f"a window of {context} tokens needs {pages} cache pages; the "
                           f"model has {exe.num_pages}")
    chunk = chunk or default_chunk(exe.vocab_size, context, ps)
    page_table = np.arange(pages, dtype=np.int32)[None]  # slot of position p is p
    pad_slot = exe.num_pages * ps
    out = np.full(n - 1, np.nan)
    for begin, first, end in spans:
        window = ids[begin:end]
        for c0 in range(0, end - begin, chunk):
            c1 = min(c0 + chunk, end - begin)
            real = c1 - c0
            tokens = np.zeros(chunk, np.int32)
            tokens[:real] = window[c0:c1]
            pos = np.zeros(chunk, np.int32)
            pos[:real] = np.arange(c0, c1)
            slots = np.full(chunk, pad_slot, np.int32)
            slots[:real] = pos[:real]
            q_index = np.full((1, chunk), chunk, np.int32)  # >= T: padding
            q_index[0, :real] = np.arange(real)
            logits = exe.run(tokens, pos, slots, page_table, np.asarray([c1], np.int32),
                             q_index, np.arange(chunk, dtype=np.int32))
            # logits at window position p predict window[p + 1]; keep the scored ones
            p = np.arange(c0, c1)
            keep = (p + 1 < end - begin) & (begin + p + 1 >= first)
            targets = np.zeros(chunk, np.int32)
            targets[:real][keep] = window[p[keep] + 1]
            nll = np.asarray(_token_nll(logits, jnp.asarray(targets)), np.float64)
            out[begin + p[keep]] = nll[:real][keep]  # index t - 1 holds token t's NLL
    if np.isnan(out).any():  # windows() scores every token; this would be a bug here
        raise AssertionError("perplexity: a token was left unscored")
    return out, len(spans)


def perplexity(exe, ids: Sequence[int], context: int, stride: int | None = None,
               chunk: int | None = None) -> Perplexity:
    nll, count = token_nlls(exe, ids, context, stride, chunk)
    return Perplexity(float(nll.mean()), len(nll), count)
