"""Draft-model speculative decoding: a small model proposes, the target verifies.

    Engine("llama-3.1-8b", speculative={"method": "draft", "model": "llama-3.2-1b",
                                        "num_tokens": 4})

The draft is any model the Engine accepts (a name, a path, a loaded runner) with the
target's vocabulary. It runs its own compiled step programs on its own KV cache, but
through the target's pages: the cache has the target's page size and at least the
engine's page count, so a sequence's page table (jaxrt.runtime.block_manager) indexes
both caches, and the draft needs no block manager of its own.

Each step the scheduler reserves a verify entry of 1 + k tokens for every sequence the
proposer serves (`placeholder`: k PENDING tokens, slots reserved as for n-gram
proposals). `DraftProposer.fill` then, before the target's step:
1. catches the draft's cache up with the tokens it has not seen but the last (the
   tokens accepted before the last one; a new sequence's whole prompt), in the draft's
   own steps within the token budget (lazily: only sequences about to verify are caught
   up; usually there is nothing to do: a rejection leaves only the target's last token
   unseen, a full acceptance one more);
2. runs one decode loop of k greedy steps over all of them (the runner's `decode`, as
   the engine's decode loops: each step's argmax is fed back on the device, so k
   proposals cost one call and one read), from each sequence's last token;
   a runner without `decode` takes k single steps instead;
3. puts them in the verify entries, cut to what a constrained request's grammar accepts.
The target verifies them in its ordinary step (jaxrt.runtime.speculative: accept the
longest prefix equal to the target's draws, then the target's token). The proposer is
deterministic, so greedy outputs are token-identical to plain decoding and sampled ones
keep exactly the target's distribution (seeded: the very same tokens).

Which draft K/V is valid is tracked per sequence: the tokens the draft's cache holds
for it at positions 0.. and its page table then, plus, per page, the sequence that last
wrote draft K/V there. Page i of a sequence is valid where that writer still has the
page at index i and recorded the same tokens through it: the sequence's own pages until
they change (trimmed and reallocated, preempted) or another sequence writes them, and
pages shared from the prefix cache whose sharer's draft wrote them (a shared prompt is
not prefilled twice). Two rows of one catch-up step never write the same page (the
second waits a chunk, then finds it valid). Rejected positions are simply overwritten by
the next catch-up. Output never depends on the draft's cache, only acceptance does.

`force_acceptance` is a benchmark-only hook (bench/bench_spec_draft.py): called with
(request, sequence, proposal) after drafting, it may replace proposed tokens (the
benchmark substitutes the target's own greedy tokens at a chosen rate).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxrt.errors import SettingError
from .programs import greedy_sampling, unpack_sampled
from .scheduler import BucketPolicy, ScheduledBatch, ScheduledSeq, build_step_inputs
from . import speculative as spec

PENDING = -1   # a placeholder proposal token: `fill` replaces it before the step runs


@dataclass(frozen=True)
class _Row:
    """What `build_step_inputs` reads of a sequence: its id (page table) and tokens
    (the sequence's own, then the draft's proposals so far)."""
    seq_id: int
    tokens: list[int]


@dataclass
class _Record:
    tokens: list[int]   # tokens whose K/V the draft's cache holds at positions 0..
    pages: list[int]    # the sequence's page table when they were written


def check_compatible(runner: Any, *, vocab_size: int, page_size: int, num_pages: int,
                     max_model_len: int, tokenizer: Any, target: Any,
                     draft_tokenizer: Any = None) -> None:
    """SettingError naming what the draft cannot honour. `tokenizer`: the target's;
    `draft_tokenizer`: the draft's (default: the runner's `tokenizer`, if any)."""
    if runner is target:
        raise SettingError("speculative draft: the draft is the target runner itself; it "
                           "needs its own KV cache (pass another instance, or the model's "
                           "name or path)")
    for attr in ("vocab_size", "page_size", "num_pages"):
        if not hasattr(runner, attr):
            raise SettingError(f"speculative draft: {type(runner).__name__} is not a model "
                               f"(no {attr}); pass a name, a path or a loaded runner")
    if not (callable(getattr(runner, "run_sampled", None))
            or callable(getattr(runner, "run", None))):
        raise SettingError(f"speculative draft: {type(runner).__name__} has no run method")
    if int(runner.vocab_size) != vocab_size:
        raise SettingError(f"speculative draft: vocabulary of {runner.vocab_size} tokens, "
                           f"the target's has {vocab_size}")
    if int(runner.page_size) != page_size:
        raise SettingError(f"speculative draft: KV pages of {runner.page_size} tokens, the "
                           f"target's are {page_size}; both caches share the page tables")
    if int(runner.num_pages) < num_pages:
        raise SettingError(f"speculative draft: its KV cache has {runner.num_pages} pages, "
                           f"the engine uses {num_pages}; both caches share the page tables")
    draft_len = getattr(runner, "max_model_len", None)
    if draft_len is not None and int(draft_len) < max_model_len:
        raise SettingError(f"speculative draft: max_model_len {draft_len} is below the "
                           f"engine's {max_model_len}")
    draft_tok = draft_tokenizer if draft_tokenizer is not None \
        else getattr(runner, "tokenizer", None)
    ours, theirs = _token_map(tokenizer), _token_map(draft_tok)
    if ours is not None and theirs is not None and ours != theirs:
        raise SettingError("speculative draft: its tokenizer maps tokens to ids differently "
                           "from the target's; draft and target must share the tokenizer")


def _token_map(tokenizer: Any) -> dict | None:
    """A tokenizer's token -> id map where it has one (jaxrt's Tokenizer, tokenizers);
    None where it has none (nothing to compare)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend", tokenizer)
    vocab = getattr(backend, "get_vocab", None)
    if callable(vocab):
        try:
            return vocab(with_added_tokens=True)
        except TypeError:
            return vocab()
    return None


class DraftProposer:
    """Proposals of a draft model for the sequences the scheduler verifies.

    `run_lock` guards the draft runner's cache (a background warm-up runs it too);
    `ensure_compiled(task)` is called before a program runs, with ("draft", bucket) or
    ("draft-decode", S) (the engine compiles it if needed and counts compiles on the
    request path)."""

    def __init__(self, runner: Any, *, num_tokens: int, policy: BucketPolicy,
                 run_lock: Any = None,
                 ensure_compiled: Callable[[tuple], None] | None = None):
        self.runner, self.num_tokens = runner, num_tokens
        # the target's shapes without its verify buckets: the draft samples one row per
        # sequence
        self.policy = dataclasses.replace(policy, verify_logits=0)
        self.pad_slot = int(runner.num_pages) * int(runner.page_size)
        self._lock = run_lock
        self._ensure = ensure_compiled
        self._records: dict[int, _Record] = {}
        self._writer: dict[int, int] = {}   # page -> seq_id that last wrote draft K/V there
        self.steps = 0                      # draft runner calls
        self.catch_up_tokens = 0            # tokens fed to catch the draft's cache up
        self.force_acceptance: Callable[[Any, Any, list[int]], list[int]] | None = None

    def buckets(self) -> list:
        return self.policy.all_buckets()

    @property
    def loops(self) -> bool:
        """Proposals come from one decode loop call (the runner has `decode`)."""
        return callable(getattr(self.runner, "decode", None))

    def loop_sizes(self) -> list[int]:
        return list(self.policy.decode_sizes) if self.loops else []

    @staticmethod
    def placeholder(req: Any, k: int) -> list[int]:
        """The scheduler's proposal: k PENDING tokens (slots reserved), filled by `fill`."""
        return [PENDING] * k if spec.eligible(req) else []

    # ---- drafting ----------------------------------------------------------------------

    def fill(self, batch: ScheduledBatch, bm: Any, running: Sequence[Any]) -> ScheduledBatch:
        """`batch` with every PENDING proposal replaced by the draft's tokens."""
        pending = [s for s in batch.seqs if s.draft and s.draft[0] == PENDING]
        if not pending:
            return batch
        self._prune({q.seq_id for r in running for q in r.seqs})
        proposals = self._draft(pending, bm)
        out = []
        for s in batch.seqs:
            if not (s.draft and s.draft[0] == PENDING):
                out.append(s)
                continue
            tokens = proposals[s.seq.seq_id]
            if self.force_acceptance is not None:
                tokens = list(self.force_acceptance(s.request, s.seq, list(tokens)))
            tokens = spec.cut_to_grammar(s.request, tokens)
            if len(tokens) < len(s.draft):  # pages the cut proposal no longer needs
                bm.trim(s.seq.seq_id, s.start + 1 + len(tokens))
            out.append(dataclasses.replace(s, num_tokens=1 + len(tokens),
                                           draft=tuple(tokens)) if tokens
                       else ScheduledSeq(s.request, s.seq, s.start, 1, True))
        return ScheduledBatch(out, batch.preempted)

    def _draft(self, entries: list[ScheduledSeq], bm: Any) -> dict[int, list[int]]:
        want = {}
        for s in entries:
            if s.start + 1 != len(s.seq.tokens):
                raise AssertionError(f"sequence {s.seq.seq_id}: a proposal after position "
                                     f"{s.start}, but it has {len(s.seq.tokens)} tokens")
            want[s.seq.seq_id] = len(s.draft)
        props: dict[int, list[int]] = {s.seq.seq_id: [] for s in entries}
        # 1. catch up: with a loop, to each sequence's last token (the loop's first step
        #    feeds it); else through it, its logits giving the first proposal. Chunks
        #    within the token budget; a page another row of the step writes (a prefix
        #    both share) waits for the next chunk, where it is valid already.
        last = 1 if self.loops else 0
        ps, pending = bm.page_size, list(entries)
        while pending:
            budget, rows, claimed, later = self.policy.max_num_batched_tokens, [], set(), []
            for s in pending:
                table = bm.page_table(s.seq.seq_id)
                start, stop = self._valid(s.seq, bm), len(s.seq.tokens) - last
                end = min(stop, start + budget)
                for i in range(start // ps, -(-end // ps)):
                    if table[i] in claimed:
                        end = min(end, i * ps)
                        break
                if start < stop and (end <= start or end < stop):
                    later.append(s)
                if end <= start:
                    continue
                budget -= end - start
                claimed.update(table[start // ps:-(-end // ps)])
                rows.append(ScheduledSeq(s.request, _Row(s.seq.seq_id, s.seq.tokens),
                                         start, end - start, not last and end == stop))
            if not rows:
                break
            tokens = self._run(ScheduledBatch(rows, []), bm)
            self.catch_up_tokens += sum(r.num_tokens for r in rows)
            for row, token in zip([r for r in rows if r.needs_logits], tokens):
                props[row.seq.seq_id].append(token)
            self._wrote(rows, bm)
            for r in rows:  # valid now through the chunk
                self._record(r.seq.seq_id, r.seq.tokens[:r.end], bm.page_table(r.seq.seq_id))
            pending = later
        if self.loops:
            self._loop(entries, want, props, bm)
            return props
        # 2. (no loop) k - 1 decode steps: feed proposal j, its logits give proposal j + 1
        for j in range(1, max(want.values())):
            rows = []
            for s in entries:
                sid = s.seq.seq_id
                if want[sid] > j:
                    tokens = s.seq.tokens + props[sid]
                    rows.append(ScheduledSeq(s.request, _Row(sid, tokens), s.start + j, 1,
                                             True))
            for row, token in zip(rows, self._run(ScheduledBatch(rows, []), bm)):
                props[row.seq.seq_id].append(token)
            self._wrote(rows, bm)
        self._records_after(entries, want, props, bm)
        return props

    def _loop(self, entries: list[ScheduledSeq], want: dict[int, int],
              props: dict[int, list[int]], bm: Any) -> None:
        """2. one decode loop: row i feeds sequence i's last token at its position and
        runs want[i] greedy steps; their tokens are the proposals."""
        S = next(n for n in self.policy.decode_sizes if n >= len(entries))
        mp, i32 = self.policy.max_pages_per_seq, np.int32
        if self._ensure is not None:
            self._ensure(("draft-decode", S))
        tokens, positions = np.zeros(S, i32), np.zeros(S, i32)
        page_table, steps_left = np.zeros((S, mp), i32), np.zeros(S, i32)
        rows = []
        for i, s in enumerate(entries):
            sid = s.seq.seq_id
            table = bm.page_table(sid)
            tokens[i], positions[i] = s.seq.tokens[-1], s.start
            page_table[i, :len(table)] = table
            steps_left[i] = want[sid]
            rows.append(ScheduledSeq(s.request, _Row(sid, []), s.start, want[sid], False))
        with self._lock if self._lock is not None else contextlib.nullcontext():
            out, _ = self.runner.decode(tokens, positions, page_table, steps_left,
                                        self.num_tokens, greedy_sampling(S))
            out = np.asarray(jax.device_get(out))                          # [k, S]
        self.steps += 1
        for i, s in enumerate(entries):
            sid = s.seq.seq_id
            props[sid] = out[:want[sid], i].tolist()
        self._wrote(rows, bm)
        self._records_after(entries, want, props, bm)

    def _records_after(self, entries, want, props, bm) -> None:
        for s in entries:  # what the draft's cache now holds for each sequence
            sid = s.seq.seq_id
            self._record(sid, s.seq.tokens + props[sid][:want[sid] - 1], bm.page_table(sid))

    def _prune(self, live: set[int]) -> None:
        """Keep the records of live sequences and of the max_num_seqs most recent others
        whose draft K/V is still in some page (a later request may share those pages
        from the prefix cache)."""
        owners = set(self._writer.values())
        dead = [i for i in self._records if i not in live and i in owners]
        keep = live | set(dead[len(dead) - self.policy.max_num_seqs:])
        self._records = {i: r for i, r in self._records.items() if i in keep}

    def _record(self, seq_id: int, tokens: list[int], pages: list[int]) -> None:
        self._records.pop(seq_id, None)   # (re)inserted last: the most recent
        self._records[seq_id] = _Record(tokens, pages)

    def _valid(self, seq: Any, bm: Any) -> int:
        """How many leading positions of `seq` hold the right K/V in the draft's cache
        (at most all but its last token: its logits give the first proposal). Page i is
        trusted where the sequence that last wrote draft K/V there (`_writer`) still has
        it at index i of its recorded table and recorded the same tokens through it: a
        page shared from the prefix cache counts when its sharer's draft wrote it."""
        pages, ps, limit = bm.page_table(seq.seq_id), bm.page_size, len(seq.tokens) - 1
        agree: dict[int, int] = {}   # writer -> tokens its record shares with `seq`
        valid = 0
        for i, page in enumerate(pages):
            writer = self._writer.get(page)
            rec = self._records.get(writer)
            if i * ps >= limit or rec is None or i >= len(rec.pages) or rec.pages[i] != page:
                break
            if writer not in agree:
                n, most = 0, min(len(rec.tokens), limit)
                while n < most and rec.tokens[n] == seq.tokens[n]:
                    n += 1
                agree[writer] = n
            valid = max(valid, min((i + 1) * ps, agree[writer]))
            if valid < (i + 1) * ps:
                break
        return valid

    def _wrote(self, rows: list[ScheduledSeq], bm: Any) -> None:
        ps = bm.page_size
        for r in rows:
            table = bm.page_table(r.seq.seq_id)
            for i in range(r.start // ps, (r.end - 1) // ps + 1):
                self._writer[table[i]] = r.seq.seq_id

    def _run(self, batch: ScheduledBatch, bm: Any) -> list[int]:
        """One draft step; the greedy tokens of its logit rows."""
        inputs = build_step_inputs(batch, bm, self.policy, self.pad_slot)
        if self._ensure is not None:
            self._ensure(("draft", inputs.bucket))
        n = len(inputs.logit_seqs)
        with self._lock if self._lock is not None else contextlib.nullcontext():
            if callable(getattr(self.runner, "run_sampled", None)):
                sampled = self.runner.run_sampled(*inputs.args(),
                                                  greedy_sampling(inputs.bucket.N))[0]
                tokens = unpack_sampled(sampled)[0]
            else:
                tokens = np.argmax(np.asarray(self.runner.run(*inputs.args())), axis=-1)
        self.steps += 1
        return [int(t) for t in tokens[:n]]
