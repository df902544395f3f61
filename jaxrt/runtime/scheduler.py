"""In-flight batching scheduler and the step-array builder.

Each step, `Scheduler.schedule` picks, within `max_num_batched_tokens` tokens:
1. one decode token for every running sequence with exactly one uncomputed token;
2. prefill chunks of running sequences (whole remainders unless chunked prefill is on);
3. new requests, first come first served (stopping at the first that does not fit).
A sequence that needs a page when none is free preempts the newest running request
(recompute: its pages are freed, it goes back to the front of the queue and later
re-prefills prompt + generated tokens, mostly from the prefix cache). Steps 1-2 run in
admission order, so the oldest request is never preempted for a newer one.

`Scheduler.update` applies the sampled tokens: page commits (prefix cache), stop checks
(EOS unless ignore_eos, stop_token_ids, stop strings via `detokenize`, max_tokens) and
beam search steps.

`build_step_inputs` lays a `ScheduledBatch` out as the padded int32 arrays of the `@step`
contract (docs/architecture.md). Shapes come from `BucketPolicy`, two families:
- decode (every sequence has one token): T = S = N in powers of two up to max_num_seqs,
  Q = 1;
- mixed: T in powers of two from 16 up to the token budget, Q = `q_block`, S and N derived
  from T. A sequence's queries are split over ceil(n / q_block) rows of the batch, each
  row carrying the sequence's page table and context length (rows are independent in
  paged attention), so no [S, Q] grid grows with the longest chunk.
The page table is always MP = ceil(max_model_len / page_size) wide (padding entries 0):
paged attention loops over the pages the batch's context reaches, so a wide table costs
no attention work, and one width keeps pages out of the bucket grid. `all_buckets()`
lists every shape, |decode| + |mixed| compilations in all.
"""
from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from jaxrt.errors import SettingError
from .block_manager import BlockManager
from .detokenize import IncrementalDetokenizer
from . import structured
from .request import Request, RequestState, Sequence
from .sampler import SampledToken, beam_candidates
from .speculative import SpeculativeStats, accepted_length


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise SettingError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise SettingError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must "
                               f"be >= max_num_seqs ({self.max_num_seqs})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise SettingError(f"without chunked prefill max_num_batched_tokens "
                               f"({self.max_num_batched_tokens}) must be >= max_model_len "
                               f"({self.max_model_len})")


@dataclass(frozen=True)
class ScheduledSeq:
    request: Request
    seq: Sequence
    start: int          # first position computed this step (== seq.num_computed)
    num_tokens: int
    needs_logits: bool  # this chunk ends the sequence's known tokens: sample the next
    # speculative decoding: tokens proposed after the sequence's last one, verified in
    # this step (num_tokens = 1 + len(draft), logits at every one of them)
    draft: tuple[int, ...] = ()

    @classmethod
    def of(cls, request: Request, seq: Sequence, num_tokens: int) -> "ScheduledSeq":
        end = seq.num_computed + num_tokens
        return cls(request, seq, seq.num_computed, num_tokens, end == len(seq.tokens))

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_tokens == 1 for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 detokenize: Callable[[list[int]], str] | None = None):
        self.config = config
        self.bm = block_manager
        self.detokenize = detokenize
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []   # admission order = priority order
        self.num_preemptions = 0
        self._next_seq_id = 0
        # speculative decoding (jaxrt.runtime.speculative): proposer(request, seq, k) ->
        # up to k tokens, for the requests it serves; None: off
        self.proposer: Callable[[Request, Sequence, int], list[int]] | None = None
        self.spec_tokens = 0
        self.spec_stats = SpeculativeStats()
        # a regular step just tried to admit waiting requests: the next multi-step decode
        # call may run although requests still wait (`schedule_decode_steps`)
        self._loop_owed = False

    # ---- requests -------------------------------------------------------------------

    def _new_seq(self, tokens: list[int], prompt_len: int) -> Sequence:
        self._next_seq_id += 1
        return Sequence(self._next_seq_id, tokens, prompt_len)

    def add(self, request: Request) -> None:
        request.seqs = [self._new_seq(list(request.prompt_ids), len(request.prompt_ids))]
        request.state = RequestState.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        for req in list(self.running) + list(self.waiting):
            if req.request_id == request_id:
                self._finish(req, "abort")
                return req
        return None

    # ---- scheduling -----------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        cfg, bm = self.config, self.bm
        budget = cfg.max_num_batched_tokens
        plan: dict[str, list[ScheduledSeq]] = {}
        preempted: list[Request] = []

        def schedule_seq(req: Request, seq: Sequence, n: int) -> bool:
            """Reserve pages (preempting newer requests if needed); False if `req` itself
            had to be preempted."""
            nonlocal budget
            while not bm.append_slots(seq.seq_id, seq.num_computed + n):
                victim = self.running[-1]
                budget += sum(s.num_tokens for s in plan.pop(victim.request_id, []))
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    return False
            plan.setdefault(req.request_id, []).append(ScheduledSeq.of(req, seq, n))
            budget -= n
            return True

        for decode_pass in (True, False):
            for req in list(self.running):
                if req.state is not RequestState.RUNNING:
                    continue  # preempted earlier in this loop
                for seq in req.seqs:
                    pending = seq.num_uncomputed
                    if budget == 0 or seq.candidates is not None or pending == 0:
                        continue
                    if decode_pass != (pending == 1):
                        continue
                    n = min(pending, budget) if cfg.enable_chunked_prefill else pending
                    if n > budget:
                        continue
                    draft = self._propose(req, seq, budget) if decode_pass else ()
                    if draft:
                        plan.setdefault(req.request_id, []).append(ScheduledSeq(
                            req, seq, seq.num_computed, 1 + len(draft), True, draft))
                        budget -= 1 + len(draft)
                        continue
                    if not schedule_seq(req, seq, n):
                        break
        self._loop_owed = bool(self.waiting)
        if not preempted:  # vLLM: never admit in a step that had to preempt
            self._admit(plan, budget)
        entries = [s for req in self.running for s in plan.get(req.request_id, ())]
        return ScheduledBatch(entries, preempted)

    def _propose(self, req: Request, seq: Sequence, budget: int) -> tuple[int, ...]:
        """A proposal to verify this step, with its slots reserved, or () (no proposer,
        nothing proposed, or pages short: speculation never preempts)."""
        if self.proposer is None or len(req.seqs) != 1:
            return ()
        k = min(self.spec_tokens, budget - 1,
                req.params.max_tokens - len(seq.output_ids) - 1,
                self.config.max_model_len - len(seq.tokens))
        if k <= 0:
            return ()
        draft = tuple(self.proposer(req, seq, k))[:k]
        if not draft or not self.bm.append_slots(seq.seq_id,
                                                 seq.num_computed + 1 + len(draft)):
            return ()
        return draft

    def schedule_decode_steps(self, num_steps: int, eligible: Callable[[Request], bool],
                              min_steps: int = 2) -> list[ScheduledSeq] | None:
        """Several decode steps at once, or None for a regular `schedule()`.

        Only when every running request is `eligible` and decodes one sequence with one
        uncomputed token, and the cache has the slots: entry i then covers `num_tokens`
        steps of its sequence (at most `num_steps`, fewer where max_tokens or max_model_len
        end it sooner; some row at least `min_steps`), whose slots are reserved here. The
        caller applies the tokens with `update`, one step at a time.

        Waiting requests (a multi-step call delays their admission by its length): the
        first that max_num_seqs has room for gets a regular step first, which admits what
        the token budget and the cache allow; after such a step one multi-step call may
        run although requests still wait. So arrivals that come one by one (a server's)
        cost at most one single-token step per multi-step call, instead of every step
        decoding one token while they trickle in; and requests that cannot be admitted
        (max_num_seqs full: offline queues) never hold the running ones to one token a
        step."""
        if not self.running:
            return None
        if self.waiting and not self._loop_owed and self._admissible(self.waiting[0]):
            return None
        rows = []
        for req in self.running:
            if len(req.seqs) != 1 or req.params.is_beam_search or not eligible(req):
                return None
            seq = req.seqs[0]
            if seq.num_uncomputed != 1:
                return None
            steps = min(num_steps, req.params.max_tokens - len(seq.output_ids),
                        self.config.max_model_len - len(seq.tokens))
            rows.append(ScheduledSeq(req, seq, seq.num_computed, max(steps, 1), True))
        if max(r.num_tokens for r in rows) < min_steps:
            return None
        for r in rows:  # slots already reserved stay with their sequences
            if not self.bm.append_slots(r.seq.seq_id, r.start + r.num_tokens):
                return None
        self._loop_owed = False
        return rows

    def _slots_in_use(self) -> int:
        return sum(r.num_seq_slots for r in self.running)

    def _admissible(self, req: Request) -> bool:
        """max_num_seqs has room for `req` (the token budget and the cache decide the rest)."""
        return self._slots_in_use() + req.num_seq_slots <= self.config.max_num_seqs

    def _admit(self, plan: dict[str, list[ScheduledSeq]], budget: int) -> None:
        cfg, bm = self.config, self.bm
        slots = self._slots_in_use()
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if slots + req.num_seq_slots > cfg.max_num_seqs:
                return
            entries: list[ScheduledSeq] = []
            allocated: list[Sequence] = []
            read_cache = not req.needs_prompt_logprobs  # (vLLM's skip_reading_prefix_cache)
            for seq in req.seqs:
                cached = len(bm.cached_prefix(seq.tokens, read_cache)) * bm.page_size
                remaining = len(seq.tokens) - cached
                if cfg.enable_chunked_prefill:
                    n = min(remaining, budget)
                else:
                    n = remaining if remaining <= budget else 0
                got = None if n == 0 and not allocated else \
                    bm.allocate(seq.seq_id, seq.tokens, cached + n, read_cache)
                if got is None:
                    for s in allocated:
                        bm.free(s.seq_id)
                        s.num_computed = 0
                    return
                assert got == cached, (got, cached)
                seq.num_computed = got
                allocated.append(seq)
                if n:
                    entries.append(ScheduledSeq.of(req, seq, n))
                    budget -= n
            self.waiting.popleft()
            req.state = RequestState.RUNNING
            self.running.append(req)
            slots += req.num_seq_slots
            plan[req.request_id] = entries

    def _preempt(self, req: Request) -> None:
        for seq in req.seqs:
            if self.bm.has(seq.seq_id):
                self.bm.free(seq.seq_id)
            seq.num_computed = 0
            seq.candidates = None
        self.running.remove(req)
        req.state = RequestState.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: str) -> None:
        for seq in req.seqs:
            if self.bm.has(seq.seq_id):
                self.bm.free(seq.seq_id)
        if req.state is RequestState.RUNNING:
            self.running.remove(req)
        elif req.state is RequestState.WAITING:
            self.waiting.remove(req)
        req.state = RequestState.FINISHED
        req.finish_reason = reason

    # ---- results --------------------------------------------------------------------

    def update(self, batch: ScheduledBatch, sampled: Mapping[int, SampledToken],
               now: float) -> list[Request]:
        """Apply one step's results (`sampled` by seq_id for entries needing logits);
        returns the requests that finished."""
        for s in batch.seqs:
            if s.request.is_finished:
                continue  # aborted since it was scheduled: its pages are already freed
            if s.seq.num_computed != s.start:
                raise AssertionError(f"sequence {s.seq.seq_id} computed {s.seq.num_computed}, "
                                     f"scheduled from {s.start}")
            if s.draft:
                continue  # `_verified` commits what the target accepted
            s.seq.num_computed = s.end
            self.bm.commit(s.seq.seq_id, s.seq.tokens, s.end)
        finished = []
        for s in batch.seqs:
            req = s.request
            if not s.needs_logits or req.is_finished:
                continue
            if s.draft:
                self._verified(req, s.seq, s, sampled[s.seq.seq_id], now)
            elif req.params.is_beam_search:
                self._on_beam_logits(req, s.seq, sampled[s.seq.seq_id], now)
            else:
                self._append_token(req, s.seq, sampled[s.seq.seq_id], now)
            if req.is_finished:
                finished.append(req)
        return finished

    def _verified(self, req: Request, seq: Sequence, s: ScheduledSeq,
                  targets: list[SampledToken], now: float) -> None:
        """A proposal's verification: keep the accepted prefix and the target's token
        after it; KV past the accepted positions is neither committed nor kept in pages
        beyond the next token's slot."""
        accepted = accepted_length(s.draft, [t.token for t in targets])
        computed = s.start + 1 + accepted
        seq.num_computed = computed
        # the accepted tokens' pages are committed with those tokens in place: appended
        # for the commit and taken off again (no copy of the whole sequence a step);
        # `_append_token` appends them for good below, with its stop checks
        known = len(seq.tokens)
        seq.tokens += s.draft[:accepted]
        self.bm.commit(seq.seq_id, seq.tokens, computed)
        del seq.tokens[known:]
        self.bm.trim(seq.seq_id, computed + 1)
        for st in (self.spec_stats, req.spec_stats):  # the engine's and the request's
            st.verifies, st.proposed, st.accepted = \
                st.verifies + 1, st.proposed + len(s.draft), st.accepted + accepted
        for t in targets[:accepted + 1]:
            self._append_token(req, seq, t, now)
            if req.is_finished:
                return

    def _append_token(self, req: Request, seq: Sequence, s: SampledToken, now: float):
        p = req.params
        seq.tokens.append(s.token)
        seq.cum_logprob += s.logprob
        if p.logprobs is not None:
            seq.logprobs.append(s.top(p.logprobs))
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_times.append(now)
        reason = self._stop_reason(req, seq)
        if req.grammar is not None:
            if req.grammar_ahead:  # consumed already (`Engine._advance_masked`); the
                complete = req.grammar_ahead.pop(0)  # matcher may be busy with a mask
            else:
                complete = structured.advance(req.grammar, s.token)
            if complete and reason is None:
                reason = "stop"   # the grammar is complete: nothing may follow
        if reason:
            self._finish(req, reason)

    def _stop_reason(self, req: Request, seq: Sequence) -> str | None:
        p, token = req.params, seq.tokens[-1]
        if (not p.ignore_eos and token in req.eos_token_ids) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self.detokenize is not None:
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.detokenize, seq.prompt_len)
            before = len(seq.detok.text)
            if seq.detok.update(seq.tokens):
                # only where the new text could complete a stop string
                text = seq.detok.text
                start = max(0, before - max(len(s) for s in p.stop) + 1)
                hits = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
                if hits:
                    req.stop_text = text[:min(hits)]
                    return "stop"
        if len(seq.tokens) - seq.prompt_len >= p.max_tokens \
                or len(seq.tokens) >= self.config.max_model_len:
            return "length"
        return None

    # ---- beam search ----------------------------------------------------------------

    def _on_beam_logits(self, req: Request, seq: Sequence, s: SampledToken, now: float):
        tokens, cums = beam_candidates(s.top_ids[None], s.top_logprobs[None],
                                       np.asarray([seq.cum_logprob]), req.params.beam_width)
        seq.candidates = (tokens[0], cums[0])
        if all(q.candidates is not None for q in req.seqs):
            self._beam_step(req, now)

    def _beam_step(self, req: Request, now: float) -> None:
        """All live beams have their 2W candidates: keep the W best non-final ones (a final
        token among the W best overall completes a hypothesis), as HF/vLLM do."""
        p, width = req.params, req.params.beam_width
        cands = sorted(((float(c), bi, int(t)) for bi, q in enumerate(req.seqs)
                        for t, c in zip(*q.candidates)), key=lambda x: (-x[0], x[1], x[2]))
        out_len = len(req.seqs[0].output_ids) + 1
        live: list[tuple[int, int, float]] = []
        for rank, (cum, bi, token) in enumerate(cands):
            if (token in req.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                if rank < width:
                    req.beam_hyps.append((req.seqs[bi].output_ids + [token], cum, "stop"))
                continue
            live.append((bi, token, cum))
            if len(live) == width:
                break
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_times.append(now)
        if out_len >= p.max_tokens or len(req.prompt_ids) + out_len >= self.config.max_model_len:
            req.beam_hyps += [(req.seqs[bi].output_ids + [t], cum, "length")
                              for bi, t, cum in live]
            live = []
        if not live or self._beams_done(req, live, out_len):
            self._finish(req, req.best_beams()[0][2] if req.beam_hyps else "length")
        else:
            self._reassign_beams(req, live)

    def _beams_done(self, req: Request, live, out_len: int) -> bool:
        """HF's heuristic: W hypotheses finished and none beaten by the best live beam."""
        width = req.params.beam_width
        if len(req.beam_hyps) < width:
            return False
        best = req.best_beams()[width - 1]
        worst_kept = req.beam_score(len(best[0]), best[1])
        return worst_kept >= max(req.beam_score(out_len, cum) for _, _, cum in live)

    def _reassign_beams(self, req: Request, live) -> None:
        old, owned, new = req.seqs, set(), []
        for bi, token, cum in live:
            parent = old[bi]
            if bi in owned:  # a second child of the same beam: fork it (shared pages)
                child = self._new_seq(parent.tokens + [token], parent.prompt_len)
                child.num_computed = self.bm.fork(parent.seq_id, child.seq_id,
                                                  parent.num_computed)
                child.cum_logprob = cum
                new.append(child)
            else:
                owned.add(bi)
                new.append((parent, token, cum))
        for bi, seq in enumerate(old):
            if bi not in owned:
                self.bm.free(seq.seq_id)
        seqs = []
        for item in new:
            if isinstance(item, tuple):
                seq, token, cum = item
                seq.tokens.append(token)
                seq.cum_logprob = cum
                item = seq
            item.candidates = None
            seqs.append(item)
        req.seqs = seqs


# ---- step arrays ----------------------------------------------------------------------

# BucketPolicy field -> the Engine argument that sets it
_SETTING_NAMES = {"growth": "bucket_growth", "token_floor": "min_bucket_tokens"}


def _ladder(floor: int, cap: int, growth: int = 2) -> tuple[int, ...]:
    """floor, growth * floor, growth^2 * floor, ... below cap, then cap itself."""
    if floor < 1 or growth < 2:  # would never reach cap
        raise SettingError(f"a bucket ladder needs floor >= 1 and growth >= 2, got "
                           f"{floor}, {growth}")
    sizes, s = [], floor
    while s < cap:
        sizes.append(s)
        s *= growth
    return tuple(sizes) + (cap,)


@dataclass(frozen=True, order=True)
class Bucket:
    T: int
    S: int
    Q: int
    MP: int
    N: int

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.T, self.S, self.Q, self.MP, self.N)


@dataclass(frozen=True)
class BucketPolicy:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_pages_per_seq: int
    q_block: int = 16
    token_floor: int = 16
    # Each bucket is one compile: a larger growth factor compiles fewer buckets and pads
    # more (up to growth x the work). 2 suits CPUs; accelerators compile slowly.
    growth: int = 2
    # speculative decoding: the most logit rows a verify step needs (0: no such buckets)
    verify_logits: int = 0

    def __post_init__(self):
        # A ladder needs growth >= 2 and a floor >= 1 to end; q_block divides.
        for name, least in (("max_num_seqs", 1), ("max_num_batched_tokens", 1),
                            ("max_pages_per_seq", 1), ("q_block", 1), ("token_floor", 1),
                            ("growth", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SettingError(f"{_SETTING_NAMES.get(name, name)} must be an integer "
                                   f">= {least}, got {value!r}")

    # (cached: every step picks a bucket from them; a frozen instance never changes them)
    @functools.cached_property
    def decode_sizes(self) -> tuple[int, ...]:
        return _ladder(1, min(self.max_num_seqs, self.max_num_batched_tokens), self.growth)

    @functools.cached_property
    def token_sizes(self) -> tuple[int, ...]:
        return _ladder(min(self.token_floor, self.max_num_batched_tokens),
                       self.max_num_batched_tokens, self.growth)

    @property
    def row_cap(self) -> int:
        # rows = decodes + sum ceil(chunk / q_block) <= max_num_seqs + budget / q_block
        return self.max_num_seqs + -(-self.max_num_batched_tokens // self.q_block)

    def _decode(self, S: int) -> Bucket:
        return Bucket(S, S, 1, self.max_pages_per_seq, S)

    def _mixed(self, T: int, all_logits: bool = False) -> Bucket:
        S = min(self.row_cap, T)
        return Bucket(T, S, self.q_block, self.max_pages_per_seq,
                      T if all_logits else min(S, self.max_num_seqs))

    def _verify(self, T: int) -> Bucket:
        """A mixed bucket with logits at up to `verify_logits` tokens (speculation)."""
        b = self._mixed(T)
        return Bucket(b.T, b.S, b.Q, b.MP, max(b.N, min(T, self.verify_logits)))

    def all_buckets(self) -> list[Bucket]:
        out = [self._decode(s) for s in self.decode_sizes]
        out += [self._mixed(t) for t in self.token_sizes]
        if self.verify_logits:
            out += [self._verify(t) for t in self.token_sizes]
        return sorted(set(out))

    def pick(self, num_tokens: int, num_rows: int, decode_only: bool,
             all_logits: bool = False, num_logits: int = 0) -> Bucket:
        """The bucket of a step. `all_logits`: a mixed step whose N = T logits rows can
        cover every token (prompt logprobs; these buckets compile on first use); decode
        buckets have N = T already. `num_logits` rows past a mixed bucket's N (a
        speculative proposal's verify rows) take its verify bucket."""
        if decode_only:
            return self._decode(next(s for s in self.decode_sizes if s >= num_rows))
        b = self._mixed(next(t for t in self.token_sizes if t >= num_tokens), all_logits)
        if num_logits > b.N:
            b = self._verify(b.T)
            if num_logits > b.N:
                raise AssertionError(f"{num_logits} logit rows do not fit bucket {b}")
        if num_rows > b.S:
            raise AssertionError(f"{num_rows} rows do not fit bucket {b}")
        return b


@dataclass
class StepInputs:
    bucket: Bucket
    tokens: np.ndarray        # i32[T]
    positions: np.ndarray     # i32[T]
    slot_mapping: np.ndarray  # i32[T]
    page_table: np.ndarray    # i32[S, MP]
    context_lens: np.ndarray  # i32[S]
    q_index: np.ndarray       # i32[S, Q]
    logit_index: np.ndarray   # i32[N]
    logit_seqs: list[ScheduledSeq]  # logits row i belongs to logit_seqs[i]
    # logits row len(logit_seqs) + j is prompt_rows[j] = (seq, position p): the
    # distribution of prompt token p + 1 (`build_step_inputs(prompt_rows=)`)
    prompt_rows: list[tuple[ScheduledSeq, int]] = field(default_factory=list)

    def args(self) -> tuple[np.ndarray, ...]:
        return (self.tokens, self.positions, self.slot_mapping, self.page_table,
                self.context_lens, self.q_index, self.logit_index)


def build_step_inputs(batch: ScheduledBatch, bm: BlockManager, policy: BucketPolicy,
                      pad_slot: int, prompt_rows: Mapping[int, list[int]] | None = None
                      ) -> StepInputs:
    """Padded `@step` arguments for `batch`. Padding tokens write to `pad_slot` (outside
    the cache), padding q_index entries are T, padding rows have context length 0 and
    padding logit rows read token 0. `prompt_rows[seq_id]`: positions of that sequence's
    chunk whose logits are also wanted, after every sampling row (`StepInputs.prompt_rows`;
    the bucket then has N = T)."""
    ps = bm.page_size
    q = 1 if batch.is_decode_only else policy.q_block
    rows = sum(-(-s.num_tokens // q) for s in batch.seqs)
    max_pages = max(bm.pages_needed(s.end) for s in batch.seqs)
    if max_pages > policy.max_pages_per_seq:
        raise AssertionError(f"a sequence needs {max_pages} pages; the page table holds "
                             f"{policy.max_pages_per_seq}")
    prompt_rows = prompt_rows or {}
    num_logits = sum(s.num_tokens if s.draft else 1 for s in batch.seqs if s.needs_logits)
    b = policy.pick(batch.num_tokens, rows, batch.is_decode_only, bool(prompt_rows),
                    num_logits)
    i32 = np.int32
    tokens, positions = np.zeros(b.T, i32), np.zeros(b.T, i32)
    slots = np.full(b.T, pad_slot, i32)
    page_table, context_lens = np.zeros((b.S, b.MP), i32), np.zeros(b.S, i32)
    q_index, logit_index = np.full((b.S, b.Q), b.T, i32), np.zeros(b.N, i32)
    logit_seqs: list[ScheduledSeq] = []
    extra: list[tuple[ScheduledSeq, int]] = []
    extra_index: list[int] = []
    t = r = 0
    for s in batch.seqs:
        n = s.num_tokens
        table = np.asarray(bm.page_table(s.seq.seq_id)[:bm.pages_needed(s.end)], i32)
        pos = np.arange(s.start, s.end, dtype=i32)
        tokens[t:t + n] = [s.seq.tokens[s.start], *s.draft] if s.draft \
            else s.seq.tokens[s.start:s.end]
        positions[t:t + n] = pos
        slots[t:t + n] = table[pos // ps] * ps + pos % ps
        for j in range(0, n, q):
            m = min(q, n - j)
            page_table[r, :len(table)] = table
            context_lens[r] = s.end
            q_index[r, :m] = np.arange(t + j, t + j + m, dtype=i32)
            r += 1
        if s.draft:  # a proposal to verify: logits at every one of its tokens
            logit_index[len(logit_seqs):len(logit_seqs) + n] = np.arange(t, t + n)
            logit_seqs += [s] * n
        elif s.needs_logits:
            logit_index[len(logit_seqs)] = t + n - 1
            logit_seqs.append(s)
        for p in prompt_rows.get(s.seq.seq_id, ()):
            assert s.start <= p < s.end, (p, s.start, s.end)
            extra.append((s, p))
            extra_index.append(t + p - s.start)
        t += n
    k = len(logit_seqs)
    if k + len(extra) > b.N:
        raise AssertionError(f"{k + len(extra)} logits rows do not fit bucket {b}")
    logit_index[k:k + len(extra)] = extra_index
    return StepInputs(b, tokens, positions, slots, page_table, context_lens, q_index,
                      logit_index, logit_seqs, extra)

