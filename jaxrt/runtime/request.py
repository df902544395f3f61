"""Typed requests: `SamplingParams` (vLLM names), the scheduler's `Request` / `Sequence`
state, and what the engine hands back, `RequestOutput`.

A `Request` owns one `Sequence` (or up to `beam_width` of them under beam search); a
sequence is the token list whose KV lives in the paged cache: prompt + generated tokens,
of which the first `num_computed` have their K/V written.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Sequence as Seq

import numpy as np

from jaxrt.errors import InputError, SettingError, check_text
from .speculative import SpeculativeStats

FINISH_REASONS = ("stop", "length", "abort")  # RequestOutput.finish_reason once finished
# Sampling settings travel to the device as float32: a larger "finite" value would arrive
# as inf (and the logits as nan).
F32_MAX = float(np.finfo(np.float32).max)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
        and math.isfinite(float(x))


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. Defaults are vLLM's (greedy, 16 tokens).

    `logprobs=n` returns, for each generated token, the n most likely tokens plus the
    sampled one with their log-probabilities under the *processed* distribution: the
    log-softmax of the logits after repetition/presence/frequency penalties and temperature
    (temperature 0 counts as 1), before top-k/top-p/min-p truncation. (vLLM returns raw
    model logprobs by default; ours equal those when no penalty is set and T is 0 or 1.)
    Token ids of a stop (EOS, `stop_token_ids`) are kept in `RequestOutput.ids`; the text
    leaves them out and is cut before the first stop string.

    `prompt_logprobs=n` returns `RequestOutput.prompt_logprobs` (vLLM's semantics): None
    for the first prompt token, then for each later one a dict token id -> `Logprob` with
    that token and the n most likely ones at its position, under the *raw* model
    distribution (log-softmax of the logits: no penalty or temperature, as vLLM's prompt
    logprobs). Such a request does not read the prefix cache until they are computed.
    """
    max_tokens: int = 16
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None   # top-n per generated token
    prompt_logprobs: int | None = None  # top-n per prompt token (raw distribution)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    beam_width: int = 1
    length_penalty: float = 1.0
    ignore_eos: bool = False
    # structured output (jaxrt.runtime.structured), at most one: a JSON schema (dict or
    # JSON text), a regex, a list of choices, or a Lark/GBNF grammar
    json_schema: Any = field(default=None, hash=False)
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self):
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise SettingError(f"SamplingParams.{name}={value!r:.60}: must be a list "
                                   f"(or None)")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        # checked now: an invalid schema, regex or grammar never reaches a queue
        from .structured import constraint_grammar
        object.__setattr__(self, "_grammar", constraint_grammar(self))

    @property
    def constraint(self) -> str | None:
        """The llguidance grammar of the structured-output constraint, or None."""
        return self._grammar

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def truncates(self) -> bool:
        """Random sampling from a truncated distribution (top-k, top-p or min-p)."""
        return not self.is_greedy and (self.top_k > 0 or self.top_p < 1.0
                                       or self.min_p > 0.0)

    @property
    def is_beam_search(self) -> bool:
        return self.beam_width > 1

    def validate(self, vocab_size: int, max_model_len: int, prompt_len: int, *,
                 max_logprobs: int | None = None) -> None:
        """Raise ValueError naming the first bad field (nothing is scheduled before this)."""
        def bad(name, why):
            e = SettingError(f"SamplingParams.{name}={getattr(self, name)!r:.60}: {why}")
            e.setting = name
            raise e

        if not _is_int(prompt_len) or prompt_len <= 0:
            raise InputError("the prompt is empty: at least one token is required")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            bad("max_tokens", "must be an integer >= 1")
        if prompt_len + self.max_tokens > max_model_len:
            bad("max_tokens", f"the prompt ({prompt_len} tokens) + max_tokens "
                              f"({self.max_tokens}) exceeds max_model_len ({max_model_len}): "
                              f"lower max_tokens or raise the engine's max_model_len")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= F32_MAX:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # never taken mod 2**64
            bad("seed", "must be in [0, 2**64)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        for i, s in enumerate(self.stop):
            try:  # a lone surrogate can never appear in decoded text: it would never stop
                check_text(s, f"stop string {i}")
            except InputError as e:
                bad("stop", str(e))
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t < vocab_size:
                bad("stop_token_ids", f"token id {t!r} is outside the vocabulary "
                                      f"[0, {vocab_size})")
        if self.logprobs is not None:
            if not _is_int(self.logprobs) or self.logprobs < 0:
                bad("logprobs", "must be None or an integer >= 0")
            limit = min(vocab_size, max_logprobs if max_logprobs is not None else vocab_size)
            if self.logprobs > limit:
                bad("logprobs", f"at most {limit} log-probabilities per token are returned")
        if self.prompt_logprobs is not None:
            if not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0:
                bad("prompt_logprobs", "must be None or an integer >= 0")
            limit = min(vocab_size, max_logprobs if max_logprobs is not None else vocab_size)
            if self.prompt_logprobs > limit:
                bad("prompt_logprobs", f"at most {limit} log-probabilities per token are "
                                       f"returned")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty <= F32_MAX:
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2.0 <= v <= 2.0:
                bad(name, "must be in [-2, 2] (0 = off)")
        if not _is_int(self.beam_width) or self.beam_width < 1:
            bad("beam_width", "must be an integer >= 1 (1 = no beam search)")
        if not _is_real(self.length_penalty):
            bad("length_penalty", "must be a finite number")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            bad("ignore_eos", "must be a bool")
        if self.beam_width > 1:
            if self.temperature != 0.0:
                bad("temperature", "beam search is deterministic: set temperature=0")
            if self.stop:
                bad("stop", "stop strings are not supported with beam search")
            if self.logprobs is not None:
                bad("logprobs", "beam search returns each beam's cumulative logprob only")
            if self.constraint is not None:
                bad("beam_width", "beam search does not take structured-output constraints")
            limit = min(vocab_size, max_logprobs if max_logprobs is not None else vocab_size)
            if 2 * self.beam_width > limit:
                bad("beam_width", f"beam search ranks 2 * beam_width candidates per beam; "
                                  f"at most {limit} are available")


def validate_prompt_ids(ids: Seq[int], vocab_size: int) -> list[int]:
    """The prompt as a list of ints, or ValueError naming the first id outside the vocab.
    Only an ordered sequence of ids is a prompt: bytes would be taken as ids, a set in
    any order, None or a dict not at all."""
    from collections.abc import Sequence as _Sequence
    if isinstance(ids, (str, bytes, bytearray)) or not (
            isinstance(ids, _Sequence) or (isinstance(ids, np.ndarray) and ids.ndim == 1)):
        raise InputError(f"a prompt is text (str) or a list of token ids, got "
                         f"{type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise InputError(f"prompt token id {t!r} at index {i} is outside the vocabulary "
                             f"[0, {vocab_size})")
        out.append(int(t))
    if not out:
        raise InputError("the prompt is empty: at least one token is required")
    return out


class RequestState(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and queued again (holds no pages)
    RUNNING = "running"      # admitted: its sequences hold pages
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens whose K/V go into the paged cache; the block manager keys pages by seq_id."""
    seq_id: int
    tokens: list[int]
    prompt_len: int
    num_computed: int = 0           # tokens whose K/V are in the cache
    cum_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    # beam search: (token ids [2W], logprobs [2W]) once this beam's logits are in, waiting
    # for the other beams of its request to catch up
    candidates: tuple[np.ndarray, np.ndarray] | None = None
    # stop strings: the output's text so far, decoded incrementally (scheduler)
    detok: Any = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass(frozen=True, slots=True)
class Logprob:
    """One entry of a prompt position's logprobs (vLLM's `Logprob`)."""
    logprob: float
    rank: int                       # 1 = most likely; ties count against the token
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(frozen=True)
class BeamOutput:
    ids: list[int]
    text: str
    cumulative_logprob: float
    score: float                    # cumulative_logprob / len(ids) ** length_penalty
    finish_reason: str


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seed: int                       # params.seed, or one the engine drew for it
    eos_token_ids: tuple[int, ...] = ()
    state: RequestState = RequestState.WAITING
    seqs: list[Sequence] = field(default_factory=list)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # absolute, one per step with output
    finish_reason: str | None = None
    stop_text: str | None = None    # the text cut at a stop string, when one matched
    num_preemptions: int = 0
    # beam search: finished hypotheses (output ids, cumulative logprob, finish reason)
    beam_hyps: list[tuple[list[int], float, str]] = field(default_factory=list)
    # params.prompt_logprobs: entry p for prompt token p, filled as chunks are computed
    # (entry 0 stays None); None when not asked
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_missing: int = 0  # entries still to compute
    # speculative decoding: this request's proposals (jaxrt.runtime.speculative)
    spec_stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    def __post_init__(self):
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)
            self.prompt_logprobs_missing = len(self.prompt_ids) - 1

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked and some are not computed yet: every prompt token's
        logits are needed, so the prefix cache is not read."""
        return self.prompt_logprobs_missing > 0
    grammar: Any = None             # structured output: the request's llguidance matcher
    # tokens the matcher has consumed ahead of `Scheduler._append_token` (the split decode
    # step advances it as soon as a token is read, to fill the next mask meanwhile): for
    # each, whether the grammar was complete after it
    grammar_ahead: list = field(default_factory=list)

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def num_seq_slots(self) -> int:
        """Sequences this request may hold at once (counts against max_num_seqs)."""
        return self.params.beam_width

    @property
    def output_ids(self) -> list[int]:
        if self.beam_hyps and self.is_finished:
            return list(self.best_beams()[0][0])
        return self.seqs[0].output_ids if self.seqs else []

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        if self.params.logprobs is None or not self.seqs:
            return None
        return self.seqs[0].logprobs

    def beam_score(self, output_len: int, cum_logprob: float) -> float:
        return cum_logprob / max(output_len, 1) ** self.params.length_penalty

    def best_beams(self) -> list[tuple[list[int], float, str]]:
        """Finished hypotheses, best first by length-penalized score (ties: older first)."""
        order = sorted(range(len(self.beam_hyps)), key=lambda i: (
            -self.beam_score(len(self.beam_hyps[i][0]), self.beam_hyps[i][1]), i))
        return [self.beam_hyps[i] for i in order]


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str | None       # "stop" | "length" | "abort"; None while running
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    ttft: float | None = None       # seconds from arrival to the first token
    token_times: list[float] = field(default_factory=list)  # seconds from arrival, per token
    beams: list[BeamOutput] = field(default_factory=list)   # beam search: best first
    num_preemptions: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # SamplingParams.prompt_logprobs
    # speculative decoding: proposed / accepted tokens, acceptance rate and mean accepted
    # length of this request; None where no proposal of it was verified
    speculative: SpeculativeStats | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StreamDelta:
    """What `Engine.stream` yields: tokens new since the last delta and the text they
    complete; the last delta has `finish_reason` and the full `output`."""
    request_id: str
    ids: list[int]
    text: str
    finish_reason: str | None = None
    output: RequestOutput | None = None
    logprobs: list[dict[int, float]] | None = None  # one per id in `ids`, when asked
    # SamplingParams.prompt_logprobs: on the request's first delta
    prompt_logprobs: PromptLogprobs | None = None
