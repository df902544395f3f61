"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`), with vLLM's semantics.

Prompt token p (p >= 1) gets log P(prompt[p] | prompt[:p]) = log_softmax(logits of the
token at position p - 1)[prompt[p]], its rank (the number of tokens whose logprob is >=
its own, as vLLM counts: 1 = most likely) and the top-n tokens at that position (ranks
1..n). Token 0 has none (None). The distribution is the
raw model's, as vLLM's prompt logprobs: no penalty, temperature or truncation.

How the engine gets them (docs/architecture.md, "Prompt logprobs"):
- `rows_wanted(batch)`: for each scheduled chunk of a request still missing some, the
  chunk's positions p <= len(prompt) - 2 whose entry p + 1 is missing. Under chunked
  prefill each chunk contributes its own positions, so the union over the chunks is
  every prompt position, whatever the chunk size;
- `build_step_inputs(prompt_rows=...)` puts those tokens after the sampling rows in
  `logit_index`, in a bucket with N = T logits rows (`BucketPolicy.pick(all_logits=)`);
  steps without such a request keep their usual buckets and rows: no extra cost;
- `collect` runs `top_logprobs` (log_softmax, rank, top_k) on the device over the step's
  logits, which stay there, and brings back [N, K + 2] numbers; it fills the requests'
  `prompt_logprobs` entries.
A request missing prompt logprobs does not read the prefix cache (a cached prefix has no
logits; vLLM v1 skips reading it too); once they are all computed (e.g. before a
preemption), its recompute reads the cache as any other request.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .request import Logprob
from .scheduler import ScheduledBatch, StepInputs


def rows_wanted(batch: ScheduledBatch) -> dict[int, list[int]]:
    """seq_id -> the positions of its chunk in `batch` whose logits give a missing
    prompt logprob (entry p + 1 for position p)."""
    out: dict[int, list[int]] = {}
    for s in batch.seqs:
        req = s.request
        if not req.needs_prompt_logprobs:
            continue
        last = min(s.end, len(req.prompt_ids) - 1)  # position L - 1 predicts output 0
        wanted = [p for p in range(s.start, last) if req.prompt_logprobs[p + 1] is None]
        if wanted:
            out[s.seq.seq_id] = wanted
    return out


@partial(jax.jit, static_argnames=("num_top",))
def top_logprobs(logits, targets, *, num_top: int):
    """logits f32[N, V], targets i32[N] -> the targets' logprobs f32[N] and ranks i32[N]
    (the number of tokens whose logprob is >= the target's), and the top `num_top`
    tokens i32[N, K] with their logprobs f32[N, K], best first."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)          # [N, V]
    target_lp = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]  # [N]
    rank = jnp.sum(logprobs >= target_lp[:, None], axis=-1, dtype=jnp.int32)
    top_lp, top_ids = jax.lax.top_k(logprobs, num_top)                       # [N, K]
    return target_lp, rank, top_ids.astype(jnp.int32), top_lp


def collect(logits, inputs: StepInputs, num_top: int,
            decode: Callable[[int], str] | None) -> None:
    """Fill the prompt logprobs of `inputs.prompt_rows` from this step's logits
    (f32[N, V] on the device). `num_top` >= every row's n (one compile per N);
    `decode(token)` gives `Logprob.decoded_token` (None without a tokenizer)."""
    k = len(inputs.logit_seqs)
    targets = np.zeros(inputs.bucket.N, np.int32)
    for j, (s, p) in enumerate(inputs.prompt_rows):
        targets[k + j] = s.request.prompt_ids[p + 1]
    target_lp, rank, top_ids, top_lp = jax.device_get(
        top_logprobs(logits, targets, num_top=num_top))
    names: dict[int, str | None] = {}

    def name(token: int) -> str | None:
        if decode is None:
            return None
        if token not in names:
            names[token] = decode(token)
        return names[token]

    for j, (s, p) in enumerate(inputs.prompt_rows):
        req, i = s.request, k + j
        if req.is_finished:
            continue
        token = int(targets[i])
        # vLLM's dict: the prompt token first, then the top n (a top-n entry for the same
        # token replaces it, with its top-n rank)
        entry = {token: Logprob(float(target_lp[i]), int(rank[i]), name(token))}
        for r in range(req.params.prompt_logprobs):
            t = int(top_ids[i, r])
            entry[t] = Logprob(float(top_lp[i, r]), r + 1, name(t))
        if req.prompt_logprobs[p + 1] is None:
            req.prompt_logprobs_missing -= 1
        req.prompt_logprobs[p + 1] = entry
