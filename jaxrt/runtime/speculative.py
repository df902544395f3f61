"""Speculative decoding: n-gram (prompt lookup) proposals and the shared verify rule.

    Engine(model, speculative={"method": "ngram", "num_tokens": 4, "max_ngram": 3,
                               "min_ngram": 1})
    Engine(model, speculative={"method": "draft", "model": "smollm2-135m",
                               "num_tokens": 4})

The draft-model proposer is jaxrt.runtime.draft; everything below about verification
holds for both (each is a deterministic proposer).

Each step, for every decoding sequence whose request speculation serves (`eligible`), the
proposer matches the sequence's last n tokens (n from max_ngram down to min_ngram)
against its earlier tokens (prompt + output) and proposes the up-to-k tokens that followed
the most recent match. The scheduler gives the sequence 1 + len(proposal) query tokens
in the ordinary mixed step (its last token, then the proposal), with logits at all of
them (`BucketPolicy` verify buckets, N up to max_num_seqs x (k + 1)). The sampled step
draws the target's token at every position, as plain decoding would (row j of a
sequence samples output position len(output) + j, with the request's seed), and the
scheduler accepts the longest prefix of the proposal equal to those tokens, then appends
the target's token after it (the "bonus" or the correction).

For greedy requests this is the usual rule. For sampled ones it is the standard rejection
rule for a deterministic proposer: the proposal x is accepted with probability p(x) (the
target's draw y equals x), and on rejection the output is y given y != x, i.e. p with x
removed and renormalised. Because the draws are counter-based (seed, output position),
they are the very tokens plain decoding would draw: seeded outputs are token-identical
with and without speculation, greedy or not.

KV written at rejected positions is never committed to the prefix cache (commits stop at
the last accepted position) and is overwritten when those positions are computed again;
pages the proposal needed beyond the next token's slot are given back at once.

Constrained requests (structured output) speculate too: a proposal is cut to the
tokens their grammar accepts (`LLMatcher.validate_tokens`), before a token that would
complete it, and row j of the verify step gets the mask of the grammar after the
proposal's first j tokens (`structured.step_bitmask`, which rolls the matcher back).

Penalties compose: row j of a verified proposal is penalized with the output counts of
the sequence followed by the proposal's first j tokens, the counts plain decoding has at
that position once those tokens are accepted (`sampling_rows`).

Served: every request but beam search (a beam step ranks 2W candidates of every beam, not
one token); beams decode without speculation. Speculation replaces the decode loops for
the requests it serves (a loop of K device steps cannot verify proposals).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from jaxrt.errors import SettingError

METHODS = ("ngram", "draft")
_KEYS = {"ngram": {"method", "num_tokens", "max_ngram", "min_ngram"},
         "draft": {"method", "num_tokens", "model"}}
MAX_NUM_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_tokens: int          # k: tokens proposed per step (at most)
    max_ngram: int = 3
    min_ngram: int = 1
    # "draft": the draft model, anything `Engine` accepts as a model (a name, a path, a
    # loaded runner)
    model: Any = field(default=None, compare=False)

    @classmethod
    def parse(cls, value: Any) -> "SpeculativeConfig | None":
        """`Engine(speculative=)`: None, or a dict of the fields above (SettingError
        naming the first bad key or value)."""
        if value is None:
            return None
        if isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise SettingError(f"speculative={value!r:.60}: expected a dict such as "
                               f"{{'method': 'ngram', 'num_tokens': 4}}")
        method = value.get("method")
        if method not in METHODS:
            raise SettingError(f"speculative method {method!r}: expected one of {METHODS}")
        known = _KEYS[method]
        unknown = sorted(set(map(str, value)) - known)
        if unknown:
            raise SettingError(f"speculative: unknown key {unknown[0]!r} for method "
                               f"{method!r} (known: {', '.join(sorted(known))})")
        if method == "draft":
            if value.get("model") is None:
                raise SettingError("speculative method 'draft' needs a model (a name, a "
                                   "path or a loaded model), e.g. {'method': 'draft', "
                                   "'model': 'smollm2-135m', 'num_tokens': 4}")
            if isinstance(value["model"], str) and not value["model"].strip():
                raise SettingError("speculative model: an empty name")
        if "num_tokens" not in value:
            raise SettingError("speculative: num_tokens is required")
        out = {}
        for key, least, most in (("num_tokens", 1, MAX_NUM_TOKENS), ("max_ngram", 1, 64),
                                 ("min_ngram", 1, 64)):
            if key not in known:
                continue
            v = value.get(key, getattr(cls, key, None))
            if isinstance(v, bool) or not isinstance(v, int) or not least <= v <= most:
                raise SettingError(f"speculative {key}={v!r:.40}: must be an integer in "
                                   f"[{least}, {most}]")
            out[key] = v
        if method == "draft":
            return cls(method, out["num_tokens"], model=value["model"])
        if out["min_ngram"] > out["max_ngram"]:
            raise SettingError(f"speculative min_ngram={out['min_ngram']} exceeds "
                               f"max_ngram={out['max_ngram']}")
        return cls(method, **out)


def from_cli(text: str | None) -> "SpeculativeConfig | None":
    """`--speculative '{"method": "ngram", "num_tokens": 4}'` (SettingError naming the
    option for bad JSON or a bad setting)."""
    if text is None:
        return None
    from jaxrt.errors import InputError, load_json
    try:
        value = load_json(text, "--speculative")
    except InputError as e:
        raise SettingError(str(e)) from None
    try:
        return SpeculativeConfig.parse(value)
    except SettingError as e:
        raise SettingError(f"--speculative: {e}") from None


def eligible(req: Any) -> bool:
    """Speculation serves this request: anything but beam search."""
    return not req.params.is_beam_search


def propose(config: SpeculativeConfig, req: Any, seq: Any, k: int) -> list[int]:
    """The proposal for a decoding sequence: n-gram lookup, cut to what the request's
    grammar accepts (and before a token that would complete the grammar)."""
    if not eligible(req):
        return []
    return cut_to_grammar(req, propose_ngram(seq.tokens, k, config.max_ngram,
                                             config.min_ngram))


def cut_to_grammar(req: Any, draft: list[int]) -> list[int]:
    """A proposal cut to the tokens the request's grammar accepts, and before a token
    that would complete the grammar (the target's to draw); as it is without a grammar."""
    matcher = req.grammar
    if matcher is None or not draft:
        return draft
    kept = 0
    for token in draft[:matcher.validate_tokens(draft)]:
        matcher.consume_token(token)
        if matcher.is_stopped():  # it completes the grammar: the target's to draw
            matcher.rollback(kept + 1)
            return draft[:kept]
        kept += 1
    matcher.rollback(kept)
    return draft[:kept]


def sampling_rows(seqs: Sequence[Any]) -> list:
    """`SamplingBatch.build` rows for the logit rows of a step: a verified proposal's
    j-th row samples output position len(output) + j (its seed's draw there). The
    prompt and output ids only where penalties read them: row j's output is the
    sequence's followed by the proposal's first j tokens (what precedes that position
    once they are accepted)."""
    rows, at = [], {}
    for s in seqs:
        j = at[id(s)] = at.get(id(s), -1) + 1
        seq, params = s.seq, s.request.params
        made = len(seq.tokens) - seq.prompt_len
        output = ()
        if params.uses_penalties:
            output = seq.output_ids + list(s.draft[:j]) if j else seq.output_ids
        rows.append((params, s.request.seed, made + j, s.request.prompt_ids, output))
    return rows


def by_seq(seqs: Sequence[Any], tokens: Sequence[Any]) -> dict:
    """Sampled rows by seq_id: a SampledToken, or a list for a verified proposal."""
    out: dict = {}
    for s, t in zip(seqs, tokens):
        if s.draft:
            out.setdefault(s.seq.seq_id, []).append(t)
        else:
            out[s.seq.seq_id] = t
    return out


# Candidates `propose_ngram` extends one by one before it hands the rest to numpy: the
# latest few occurrences of the last token settle nearly every real sequence; a sequence
# with thousands of short matches would cost a Python iteration each.
_SCAN_CANDIDATES = 32


def propose_ngram(tokens: Sequence[int], k: int, max_ngram: int, min_ngram: int
                  ) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest
    suffix of `tokens` (n in [min_ngram, max_ngram]); [] when none occurs.

    Every step proposes, so this is on the host's path of each speculative step: the
    latest occurrences of the last token are found by `list.index` on the reversed
    tokens (C speed) and extended backwards in Python, latest first, stopping at the
    first that matches max_ngram tokens (~3 us for a few hundred tokens, where a
    sliding-window pass per n cost ~35 us)."""
    size = len(tokens)
    if k <= 0 or size < 2:
        return []
    top = min(max_ngram, size - 1)  # a match ends before the suffix's last token
    if top < min_ngram:
        return []
    # rev[i] = tokens[size - 1 - i]: the suffix is rev[:n]
    rev = tokens[::-1] if isinstance(tokens, list) else list(tokens)[::-1]
    last = rev[0]
    best_n = best_i = 0
    i = 0
    for _ in range(_SCAN_CANDIDATES):
        try:
            i = rev.index(last, i + 1)  # an occurrence ending at size - 1 - i
        except ValueError:
            break
        n = 1
        while n < top and i + n < size and rev[i + n] == rev[n]:
            n += 1
        if n > best_n:
            best_n, best_i = n, i
            if n == top:
                break
    else:  # candidates left to look at: all at once
        best_n, best_i = _longest_match(rev, top)
    if best_n < min_ngram:
        return []
    # the k tokens after the match: tokens[size - best_i:][:k], read off `rev`
    return [int(t) for t in rev[max(best_i - k, 0):best_i][::-1]]


def _longest_match(rev: list[int], top: int) -> tuple[int, int]:
    """(n, i): the longest n <= top such that rev[i:i + n] == rev[:n] for some i >= 1,
    and the least such i (the latest occurrence); (0, 0) when rev[0] never recurs."""
    arr = np.asarray(rev, np.int64)
    hits = np.flatnonzero(arr[1:] == arr[0]) + 1  # ascending i: latest occurrence first
    if not hits.size:
        return 0, 0
    n, best = 1, int(hits[0])
    while n < top:
        hits = hits[hits + n < arr.size]
        hits = hits[arr[hits + n] == arr[n]]
        if not hits.size:
            break
        n, best = n + 1, int(hits[0])
    return n, best


def accepted_length(draft: Sequence[int], target: Sequence[int]) -> int:
    """How many proposed tokens equal the target's token at their position: target[j]
    is what the model draws after the sequence + draft[:j]."""
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return n


@dataclass
class SpeculativeStats:
    verifies: int = 0        # sequence-steps that verified a proposal
    proposed: int = 0        # proposed tokens
    accepted: int = 0        # of those, accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying sequence gains per step: accepted proposals + the target's
        own token (vLLM's "mean acceptance length")."""
        return (self.accepted + self.verifies) / self.verifies if self.verifies else 0.0
