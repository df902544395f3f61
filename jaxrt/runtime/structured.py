"""Structured output: JSON schemas, regexes, choices and grammars, through llguidance.

    SamplingParams(json_schema={...})       # a dict, or a JSON string
    SamplingParams(regex=r"[0-9]{3}-[0-9]{4}")
    SamplingParams(choice=["yes", "no"])
    SamplingParams(grammar='start: "a"+')   # Lark, or llama.cpp GBNF

At most one constraint per request. `constraint_grammar` turns it into an llguidance
grammar when the SamplingParams is built, and checks it (an invalid schema, regex or
grammar is a `SettingError` then, before anything is queued); `Grammars.matcher` builds a
request's `LLMatcher` against the engine's tokenizer when the request is added (a schema
llguidance can only reject with the vocabulary at hand fails there, still before queueing).

Per step, for each constrained row, the host fills one row of a bitmask int32[N,
ceil(V/32)] (bit v % 32 of word v // 32: token v is allowed) and the sampled step applies
it to the logits on the device before sampling (`apply_token_bitmask`: -inf outside).
After a token is sampled the host advances the request's matcher (`advance`); EOS is in
the mask only where the grammar accepts, and once the matcher has stopped (nothing may
follow) the request finishes with reason "stop". Decode steps split where the runner
allows (`Engine._dispatch_forward`): the forward is queued first, the mask is filled
while it runs, and `sample_masked` samples its logits under the mask. The next forward
is queued right behind that sample, fed its tokens on the device (vLLM V1's
asynchronous scheduling, `Engine._advance_masked`), so the host's return, bookkeeping,
token read and grammar advance of one step overlap the device's next forward.

Why llguidance and not xgrammar (bench/structured_libs.py, bench/results/
structured_libs_cpu.json; SmolLM2's 49,152 tokens, a nested JSON schema, 2-core CPU):
llguidance has no dependencies and reads a `tokenizers` JSON, which is what jaxrt's
Tokenizer is; xgrammar requires torch, transformers and triton at runtime (importing it
takes ~2.4 s, llguidance ~0.05 s) and reads a transformers tokenizer. Per token xgrammar is
faster (mask 0.02-0.05 ms vs 0.14 ms, advance ~0.004 ms both), and both are far below a
decode step; llguidance's mask cost is the one that grows with batch (64 rows ~9 ms on
one core; `LLExecutor` fills rows in parallel).
"""
from __future__ import annotations

from collections import OrderedDict

import json
import os
from typing import Any, Sequence

import numpy as np

from jaxrt.errors import (MAX_JSON_DEPTH, InputError, SettingError, check_json_depth,
                          check_text, json_text_depth, short_repr)

CONSTRAINTS = ("json_schema", "regex", "choice", "grammar")
# JSON output is laid out as Python's json.dumps does (", " and ": ", no other whitespace):
# with llguidance's default flexible whitespace a small model can emit newlines and
# indentation until max_tokens (SmolLM2 did). A schema's "x-guidance" options override it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# At most this many alternatives in a `choice` (the grammar llguidance builds grows with
# them; a request listing millions would cost seconds and memory before the first token).
MAX_CHOICES = 16384


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _first_line(message: str, limit: int = 300) -> str:
    """llguidance's message on one line, cut to `limit` characters: it quotes the
    offending source line, which may be megabytes long."""
    lines = [ln.strip() for ln in str(message).strip().splitlines()[:4] if ln.strip()]
    text = "; ".join(lines[:2]) if lines else "invalid"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def constraint_grammar(params: Any) -> str | None:
    """The llguidance grammar of `params`' one constraint (None without one), checked:
    SettingError naming the field for a bad value or more than one constraint."""
    given = [name for name in CONSTRAINTS if getattr(params, name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise SettingError(f"SamplingParams: {' and '.join(given)} are both set; give at "
                           f"most one of {', '.join(CONSTRAINTS)}")
    name = given[0]
    value = getattr(params, name)
    import llguidance

    def bad(why: str):
        e = SettingError(f"SamplingParams.{name}={short_repr(value)}: {why}")
        e.setting = name
        return e

    def text(t: str, what: str) -> str:
        try:
            return check_text(t, what)
        except InputError as e:
            raise bad(str(e)) from None

    if name == "json_schema":
        if isinstance(value, str):
            text(value, "the schema")
            if json_text_depth(value) > MAX_JSON_DEPTH:  # the decoder would recurse
                raise bad(f"nested more than {MAX_JSON_DEPTH} levels deep")
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise bad(f"not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(value, (dict, bool)):
            raise bad("a JSON schema is an object (a dict or its JSON text)")
        try:  # llguidance recurses into the object (and crashes, far too deep)
            check_json_depth(value, "the schema")
        except InputError as e:
            raise bad(str(e)) from None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                value, defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as e:
            raise bad(_first_line(str(e))) from None
    elif name == "regex":
        if not isinstance(value, str) or not value:
            raise bad("must be a non-empty string")
        text(value, "the regex")
        grammar = llguidance.LLMatcher.grammar_from_regex(value)
    elif name == "choice":
        if not isinstance(value, tuple) or not value \
                or any(not isinstance(c, str) or not c for c in value):
            raise bad("must be a non-empty list of non-empty strings")
        if len(value) > MAX_CHOICES:
            raise bad(f"{len(value)} choices; at most {MAX_CHOICES} are allowed")
        for i, c in enumerate(value):
            text(c, f"choice {i}")
        grammar = llguidance.grammar_from("choice", list(value))
    else:
        if not isinstance(value, str) or not value.strip():
            raise bad("must be a non-empty Lark or GBNF grammar")
        text(value, "the grammar")
        try:
            grammar = llguidance.grammar_from("grammar", value)
        except ValueError as e:
            raise bad(_first_line(str(e))) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise bad(_first_line(error))
    return grammar


class Grammars:
    """Matchers for one engine's vocabulary: the llguidance tokenizer is built once, on
    the first constrained request (~0.3 s for SmolLM2's 49k tokens)."""

    # Matchers built for the last this-many grammars, kept as templates: building one
    # costs ~3 ms (SmolLM2, a JSON schema), a deep copy ~0.01 ms; bounded, since grammars
    # come from requests.
    TEMPLATES = 64

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._eos = [int(t) for t in eos_token_ids]
        self._lltok = None
        self._templates: "OrderedDict[str, Any]" = OrderedDict()
        self.built = 0  # matchers built from a grammar (not copied)

    def _llg_tokenizer(self):
        if self._lltok is None:
            import llguidance
            tok = self._tokenizer
            text = None
            if hasattr(tok, "to_json_str"):
                text = tok.to_json_str()
            elif hasattr(tok, "backend"):
                text = tok.backend.to_str()
            elif hasattr(tok, "to_str"):
                text = tok.to_str()
            if text is None:
                raise InputError("structured output needs a Hugging Face `tokenizers` "
                                 "tokenizer; this engine has none")
            if not self._eos:
                raise InputError("structured output needs the model's EOS token ids")
            self._lltok = llguidance.LLTokenizer(text, n_vocab=self.vocab_size,
                                                 eos_token=self._eos)
        return self._lltok

    def matcher(self, grammar: str):
        """A fresh matcher of `grammar` (a copy of the template of a recent one)."""
        template = self._templates.get(grammar)
        if template is None:
            template = self._build(grammar)
            self._templates[grammar] = template
            if len(self._templates) > self.TEMPLATES:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(grammar)
        return template.deep_copy()

    def _build(self, grammar: str):
        import llguidance
        self.built += 1
        m = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise SettingError(f"structured output: {_first_line(m.get_error())}")
        bits = np.unpackbits(fill_bitmask([(0, m)], 1, self.vocab_size).view(np.uint8),
                             bitorder="little")[:self.vocab_size]
        bits[self._eos] = 0
        if not m.is_accepting() and not bits.any():
            raise SettingError("structured output: no token of this model's vocabulary "
                               "can start the constrained output")
        return m


_EXECUTOR = None


def _executor():
    """llguidance's thread pool for masks of several rows (one per process)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance
        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


def _unfilled_bitmask(rows: Sequence[tuple[int, Any]], num_rows: int,
                      vocab_size: int) -> np.ndarray:
    """int32[num_rows, ceil(V/32)] with every token allowed outside `rows`' rows (theirs
    are left for llguidance to fill)."""
    mask = np.empty((num_rows, bitmask_words(vocab_size)), np.int32)
    free = np.ones(num_rows, bool)
    free[[row for row, _ in rows]] = False
    mask[free] = -1
    return mask


def fill_bitmask(rows: Sequence[tuple[int, Any]], num_rows: int,
                 vocab_size: int) -> np.ndarray:
    """int32[num_rows, ceil(V/32)]: every token allowed, except in rows[i] = (row, matcher),
    which get their matcher's next-token mask. Several rows are filled in parallel
    (llguidance's `LLExecutor`): one core takes ~0.14 ms a row for SmolLM2's vocabulary."""
    import llguidance.numpy as lnp
    mask = _unfilled_bitmask(rows, num_rows, vocab_size)
    if len(rows) > 1:
        lnp.fill_next_token_bitmask_par(_executor(), [(m, row) for row, m in rows], mask)
    else:
        for row, matcher in rows:
            lnp.fill_next_token_bitmask(matcher, mask, row)
    return mask


_FILLER = None
# The split decode step fills the next masks on the grammar thread while the engine's
# bookkeeping of the last step runs (`Engine._advance_masked`); False: after it, inline.
# Off below 4 cores: on a 2-core CPU the fill and the bookkeeping share the cores and the
# thread hand-offs cost what the overlap saves (bench/profile_structured_host.py, batch
# 64: 1.58 ms a step overlapped vs 1.51 serial); GPU hosts have 16.
OVERLAP_FILL = (os.cpu_count() or 1) >= 4


class _PendingMask:
    """A bitmask being filled on the grammar thread (`fill_bitmask_async`)."""

    def __init__(self, mask: np.ndarray, future):
        self.mask, self._future = mask, future

    def result(self) -> np.ndarray:
        if self._future is not None:
            self._future.result()
        return self.mask


def fill_bitmask_async(rows: Sequence[tuple[int, Any]], num_rows: int,
                       vocab_size: int) -> _PendingMask:
    """`fill_bitmask` on a worker thread; `.result()` gives the bitmask. llguidance fills
    masks without the GIL, so the caller's Python (the engine's bookkeeping of the step
    just read) runs meanwhile; the matchers must not be touched until `.result()`. The
    caller waits until the worker has entered llguidance: a thread woken while another
    runs Python would otherwise wait out the interpreter's switch interval (5 ms) for
    the GIL, and the fill would not start before the caller blocks."""
    global _FILLER
    import threading
    mask = _unfilled_bitmask(rows, num_rows, vocab_size)
    if not rows:
        return _PendingMask(mask, None)
    if _FILLER is None:
        from concurrent.futures import ThreadPoolExecutor
        _FILLER = ThreadPoolExecutor(1, thread_name_prefix="jaxrt-grammar")
    executor, pairs = _executor(), [(m, row) for row, m in rows]
    ptr, row_bytes = mask.ctypes.data, mask.shape[1] * 4
    started = threading.Event()

    def fill():
        started.set()
        executor.unsafe_compute_mask_ptr(pairs, ptr, row_bytes, num_rows)
    future = _FILLER.submit(fill)
    started.wait()
    return _PendingMask(mask, future)


def step_bitmask(seqs: Sequence[Any], num_rows: int, vocab_size: int) -> np.ndarray | None:
    """The bitmask of a step's logit rows (`StepInputs.logit_seqs`), None when no row is
    constrained. The rows of a verified proposal repeat its sequence: row j gets the mask
    after the proposal's first j tokens (consumed, then rolled back)."""
    if not any(s.request.grammar is not None for s in seqs):
        return None
    if not any(s.draft for s in seqs):  # one row a sequence: the rows in parallel
        return fill_bitmask([(row, s.request.grammar) for row, s in enumerate(seqs)
                             if s.request.grammar is not None], num_rows, vocab_size)
    import llguidance.numpy as lnp
    mask = np.full((num_rows, bitmask_words(vocab_size)), -1, np.int32)
    consumed: dict[int, tuple[Any, int]] = {}
    for row, s in enumerate(seqs):
        matcher = s.request.grammar
        if matcher is None:
            continue
        j = consumed.get(id(s), (matcher, 0))[1]
        lnp.fill_next_token_bitmask(matcher, mask, row)
        if j < len(s.draft):  # (the proposer kept only tokens the grammar accepts)
            if not matcher.consume_token(s.draft[j]):
                raise AssertionError(f"structured output: proposed token {s.draft[j]} "
                                     f"is outside the grammar")
            consumed[id(s)] = (matcher, j + 1)
    for matcher, n in consumed.values():
        matcher.rollback(n)
    return mask


_TAKES_MASK: dict[type, bool] = {}


def takes_mask(runner: Any) -> bool:
    """The runner's sampled step applies a token bitmask (`run_sampled(token_bitmask=)`)."""
    kind = type(runner)
    if kind not in _TAKES_MASK:
        import inspect
        try:
            params = inspect.signature(runner.run_sampled).parameters
        except (TypeError, ValueError, AttributeError):
            params = {}
        _TAKES_MASK[kind] = "token_bitmask" in params
    return _TAKES_MASK[kind]


def advance(matcher: Any, token: int) -> bool:
    """Feed a sampled token to a request's matcher; True when the grammar is complete
    (nothing may follow). The mask made the token legal, so a refusal is a bug."""
    if not matcher.consume_token(int(token)):
        raise AssertionError(f"structured output: token {token} was sampled outside the "
                             f"grammar's mask ({_first_line(matcher.get_error())})")
    return matcher.is_stopped()


def apply_token_bitmask(logits, bitmask):
    """logits f32[N, V], bitmask i32[N, ceil(V/32)] -> logits with -inf where the bit is
    clear (traced inside the masked sampled step)."""
    import jax.numpy as jnp
    vocab = logits.shape[-1]
    ids = jnp.arange(vocab, dtype=jnp.int32)
    words = jnp.take(bitmask, ids // 32, axis=1)                        # [N, V]
    allowed = ((words >> (ids % 32)) & 1) != 0
    return jnp.where(allowed, logits, -jnp.inf)


_SAMPLE_MASKED = None


def sample_masked(logits, bitmask: np.ndarray, sampling: tuple[np.ndarray, np.ndarray]):
    """The tokens i32[1, S] and logprobs f32[1, S] of decode-forward logits f32[S, V]
    (on the device) under `bitmask`, sampled as the decode loops do
    (`sample_tokens(truncate=False)`; `sampling` is `SamplingBatch.packed()`): the second
    half of structured output's split decode step (`jaxrt.runtime.programs`)."""
    global _SAMPLE_MASKED
    if _SAMPLE_MASKED is None:
        import jax
        from .sampler import sample_tokens, unpack_sampling

        def run(logits, bitmask, floats, ints):
            tokens, lp, _ = sample_tokens(apply_token_bitmask(logits, bitmask),
                                          *unpack_sampling(floats, ints), truncate=False)
            return tokens[None], lp[None]
        _SAMPLE_MASKED = jax.jit(run)
    return _SAMPLE_MASKED(logits, bitmask, *sampling)


_APPLY = None


def mask_logits(logits, bitmask: np.ndarray):
    """`apply_token_bitmask` as its own device call, for runners whose sampled step takes
    no mask (the logits stay on the device)."""
    global _APPLY
    if _APPLY is None:
        import jax
        _APPLY = jax.jit(apply_token_bitmask)
    return _APPLY(logits, bitmask)
