"""Scheduler: chunked prefill, token budget, decode-first order, preemption, abort, stop
conditions; and the step-array builder (contract checked by the fake runner's checker)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrt.runtime.block_manager import BlockManager
from jaxrt.runtime.request import Request, RequestState, SamplingParams
from jaxrt.runtime.sampler import SampledToken
from jaxrt.runtime.scheduler import (Bucket, BucketPolicy, Scheduler, SchedulerConfig,
                                     build_step_inputs)
from tests.runtime.fake_model import check_step_inputs

EOS = 1


def make(num_pages=64, page_size=4, max_num_seqs=4, budget=16, max_model_len=64,
         chunked=True, caching=True, detokenize=None):
    bm = BlockManager(num_pages, page_size, caching)
    cfg = SchedulerConfig(max_num_seqs, budget, max_model_len, chunked)
    return Scheduler(cfg, bm, detokenize)


def req(rid, prompt, **params):
    return Request(str(rid), list(prompt), SamplingParams(**params), 0.0, 0, (EOS,))


def next_token(seq) -> int:
    """A deterministic stand-in for the model: depends on the whole sequence."""
    return 2 + (sum((i + 1) * t for i, t in enumerate(seq.tokens)) % 50)


def step(sch: Scheduler, tokens=None):
    batch = sch.schedule()
    sampled = {}
    for s in batch.seqs:
        if s.needs_logits:
            tok = tokens.pop(0) if tokens else next_token(s.seq)
            sampled[s.seq.seq_id] = SampledToken(tok, -0.5, np.array([tok]), np.array([-0.5]))
    return batch, sch.update(batch, sampled, 0.0)


def run_all(sch: Scheduler, limit=500):
    steps = []
    while sch.has_unfinished():
        steps.append(step(sch)[0])
        assert len(steps) < limit
    return steps


def test_long_prompt_is_chunked_within_budget():
    sch = make(budget=16)
    r = req(0, range(2, 42), max_tokens=3)        # 40 prompt tokens
    sch.add(r)
    sizes = []
    for _ in range(3):
        batch, _ = step(sch)
        (s,) = batch.seqs
        sizes.append(s.num_tokens)
        assert s.needs_logits == (s.end == 40)
    assert sizes == [16, 16, 8] and len(r.output_ids) == 1


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sch = make(budget=64, chunked=False, max_model_len=64)
    for i in range(3):
        sch.add(req(i, [3 + i, 4], max_tokens=6, ignore_eos=True))
    step(sch)
    sch.add(req(3, range(2, 64), max_tokens=2))  # 62 tokens: more than 64 - 3 decodes
    seen = []
    while sch.has_unfinished():
        batch, _ = step(sch)
        seen.append([(s.request.request_id, s.num_tokens) for s in batch.seqs])
    first = next(i for i, b in enumerate(seen) if ("3", 62) in b)
    assert first == 5                             # once requests 0-2 finished
    assert all(n == 1 for b in seen for _, n in b if (_, n) != ("3", 62))


def test_decodes_first_then_prefill_chunks():
    sch = make(budget=8)
    sch.add(req(0, [5, 6, 7], max_tokens=10))
    step(sch)                                     # prefill of request 0
    sch.add(req(1, range(2, 30), max_tokens=2))
    batch, _ = step(sch)
    assert [(s.request.request_id, s.num_tokens) for s in batch.seqs] == [("0", 1), ("1", 7)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       max_tokens=st.integers(1, 12), budget=st.sampled_from([4, 7, 16]),
       max_num_seqs=st.integers(1, 4), chunked=st.booleans())
def test_budget_and_seq_limits_always_hold(prompts, max_tokens, budget, max_num_seqs,
                                           chunked):
    max_len = 64
    budget = max(budget, max_num_seqs) if chunked else max_len
    sch = make(budget=budget, max_num_seqs=max_num_seqs, chunked=chunked, num_pages=16,
               max_model_len=max_len)
    reqs = [req(i, range(2, 2 + n), max_tokens=max_tokens, ignore_eos=True)
            for i, n in enumerate(prompts)]
    for r in reqs:
        sch.add(r)
    for batch in run_all(sch):
        assert 0 < batch.num_tokens <= budget
        assert len(batch.seqs) <= max_num_seqs
        assert len({s.seq.seq_id for s in batch.seqs}) == len(batch.seqs)
        assert sum(r.num_seq_slots for r in sch.running) <= max_num_seqs
    assert all(len(r.output_ids) == max_tokens and r.finish_reason == "length" for r in reqs)
    assert sch.bm.free_pages == 16


def test_preemption_recomputes_newest_request():
    # 6 pages of 4: two requests of 4 + 14 tokens need 2 x 5 pages in the end
    sch = make(num_pages=6, budget=16, max_num_seqs=2, max_model_len=24)
    old, new = req(0, [3, 4, 5, 6], max_tokens=14, ignore_eos=True), \
        req(1, [7, 8, 9, 10], max_tokens=14, ignore_eos=True)
    sch.add(old)
    sch.add(new)
    preempted_at = None
    for i in range(100):
        batch, _ = step(sch)
        if batch.preempted:
            assert batch.preempted == [new] and preempted_at is None
            preempted_at = i
            assert new.state is RequestState.WAITING and sch.waiting[0] is new
            assert not sch.bm.has(new.seqs[0].seq_id)
            assert new.seqs[0].num_computed == 0 and new.num_preemptions == 1
            assert all(s.request is old for s in batch.seqs)
        if not sch.has_unfinished():
            break
    assert preempted_at is not None and sch.num_preemptions >= 1
    assert old.finish_reason == new.finish_reason == "length"
    # same tokens as without any preemption
    ref = make(num_pages=64)
    a, b = req(0, [3, 4, 5, 6], max_tokens=14, ignore_eos=True), \
        req(1, [7, 8, 9, 10], max_tokens=14, ignore_eos=True)
    ref.add(a)
    ref.add(b)
    run_all(ref)
    assert (old.output_ids, new.output_ids) == (a.output_ids, b.output_ids)
    assert sch.bm.free_pages == 6


def test_no_admission_in_a_step_that_preempted():
    sch = make(num_pages=4, page_size=2, budget=16, max_num_seqs=3, max_model_len=8)
    sch.add(req(0, [3, 4, 5], max_tokens=5, ignore_eos=True))
    sch.add(req(1, [6, 7, 8], max_tokens=5, ignore_eos=True))
    for _ in range(50):
        batch, _ = step(sch)
        if batch.preempted:
            assert all(s.request not in batch.preempted for s in batch.seqs)
            assert not any(s.start == 0 for s in batch.seqs if s.request.request_id == "1")
        if not sch.has_unfinished():
            break
    assert sch.num_preemptions > 0


def test_abort_waiting_and_running():
    sch = make()
    a, b, c = req(0, [3, 4], max_tokens=5), req(1, [5, 6], max_tokens=5), \
        req(2, [7, 8], max_tokens=5)
    for r in (a, b):
        sch.add(r)
    step(sch)
    sch.add(c)
    assert sch.abort("1") is b and b.finish_reason == "abort" and b.is_finished
    assert sch.abort("2") is c and c.finish_reason == "abort" and not sch.waiting
    assert sch.abort("nope") is None
    run_all(sch)
    assert a.finish_reason == "length" and sch.bm.free_pages == 64
    assert len(b.output_ids) == 1 and c.output_ids == []


def test_stop_token_ids_eos_and_ignore_eos():
    for params, tokens, reason, n in (
            (dict(), [9, EOS, 9], "stop", 2),
            (dict(ignore_eos=True, max_tokens=3), [9, EOS, 9], "length", 3),
            (dict(stop_token_ids=(9,)), [8, 9, 7], "stop", 2),
            (dict(max_tokens=2), [5, 6, 7], "length", 2)):
        sch = make()
        r = req(0, [3, 4], **params)
        sch.add(r)
        script = list(tokens)
        while sch.has_unfinished():
            step(sch, script)
        assert (r.finish_reason, len(r.output_ids)) == (reason, n), params
        assert r.output_ids == tokens[:n]


def test_stop_string_truncates_text():
    alphabet = "..abcdefghijklmnopqrstuvwxyz"
    sch = make(detokenize=lambda ids: "".join(alphabet[i] for i in ids))
    r = req(0, [3, 4], stop=("xyz", "never"), max_tokens=20)
    sch.add(r)
    script = [alphabet.index(c) for c in "abxxyzq"]
    while sch.has_unfinished():
        step(sch, script)
    assert r.finish_reason == "stop" and r.stop_text == "abx"
    assert len(r.output_ids) == 6                 # generation stopped at the 'z'


def test_bucket_policy_covers_every_batch():
    policy = BucketPolicy(max_num_seqs=8, max_num_batched_tokens=48, max_pages_per_seq=10)
    buckets = policy.all_buckets()
    assert Bucket(1, 1, 1, 10, 1) in buckets and Bucket(8, 8, 1, 10, 8) in buckets
    assert policy.token_sizes == (16, 32, 48)
    # one page-table width: pages never multiply the grid
    assert {b.MP for b in buckets} == {10}
    assert len(buckets) == len(policy.decode_sizes) + len(policy.token_sizes)
    assert policy.pick(3, 3, decode_only=True) == Bucket(4, 4, 1, 10, 4)
    b = policy.pick(40, 11, decode_only=False)
    assert (b.T, b.Q, b.MP) == (48, 16, 10) and b.S >= 11 and b.N <= 8
    assert all(b in buckets for b in (policy.pick(n, min(n, 8), False)
                                      for n in range(1, 49)))


def test_engine_default_bucket_count():
    # Engine defaults: 32 sequences, 512 batched tokens, 8192 tokens of pages of 16. With a
    # ladder of page-table widths (4..512 pages) this was (6 + 6) x 8 = 96 compiles.
    policy = BucketPolicy(max_num_seqs=32, max_num_batched_tokens=512,
                          max_pages_per_seq=8192 // 16)
    buckets = policy.all_buckets()
    assert policy.decode_sizes == (1, 2, 4, 8, 16, 32)
    assert policy.token_sizes == (16, 32, 64, 128, 256, 512)
    assert len(buckets) == 12 and all(b.MP == 512 for b in buckets)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=st.lists(st.integers(1, 30), min_size=1, max_size=6),
       budget=st.sampled_from([4, 9, 32]), page_size=st.sampled_from([2, 4]),
       shared_prefix=st.integers(0, 12))
def test_step_arrays_honor_the_contract(prompts, budget, page_size, shared_prefix):
    num_pages, max_len = 48, 48
    sch = make(num_pages=num_pages, page_size=page_size, budget=max(budget, 4),
               max_model_len=max_len)
    policy = BucketPolicy(4, max(budget, 4), -(-max_len // page_size), q_block=4)
    pad = (num_pages + 3) * page_size              # runners may have more pages than used
    written = np.zeros(pad, bool)
    for i, n in enumerate(prompts):
        sch.add(req(i, ([9] * shared_prefix + list(range(2, 2 + n)))[:40], max_tokens=6))
    while sch.has_unfinished():
        batch = sch.schedule()
        inputs = build_step_inputs(batch, sch.bm, policy, pad)
        assert inputs.bucket in policy.all_buckets()
        assert inputs.page_table.shape[1] == policy.max_pages_per_seq  # always full width
        used = -(-inputs.context_lens // page_size)  # pages each row's context reaches
        assert not np.where(np.arange(policy.max_pages_per_seq) >= used[:, None],
                            inputs.page_table, 0).any(), "padding entries are page 0"
        check_step_inputs(inputs.args(), num_pages=num_pages + 3, page_size=page_size,
                          written=written)
        real = inputs.slot_mapping < pad
        written[inputs.slot_mapping[real]] = True
        assert [s.seq.seq_id for s in inputs.logit_seqs] == \
            [s.seq.seq_id for s in batch.seqs if s.needs_logits]
        sampled = {s.seq.seq_id: SampledToken(next_token(s.seq), 0.0, np.array([0]),
                                              np.array([0.0])) for s in inputs.logit_seqs}
        sch.update(batch, sampled, 0.0)


def test_config_rejects_inconsistent_limits():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4, max_model_len=64)
    with pytest.raises(ValueError, match="chunked prefill"):
        SchedulerConfig(4, 32, 64, enable_chunked_prefill=False)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_abort_between_schedule_and_update_is_safe(data):
    """Abort any request at any point, including after schedule() and before update():
    no error, its pages are freed exactly once, and the other requests' tokens equal a
    run where it was never there."""
    prompts = data.draw(st.lists(st.lists(st.integers(2, 60), min_size=1, max_size=30),
                                 min_size=2, max_size=4))
    victim = data.draw(st.integers(0, len(prompts) - 1))
    abort_at = data.draw(st.integers(0, 12))

    def run(with_victim: bool):
        sch = make(num_pages=64, budget=16)
        reqs = [req(i, p, max_tokens=6, ignore_eos=True) for i, p in enumerate(prompts)
                if with_victim or i != victim]
        for r in reqs:
            sch.add(r)
        n = 0
        aborted = False
        while sch.has_unfinished():
            batch = sch.schedule()
            sampled = {s.seq.seq_id: SampledToken(next_token(s.seq), -0.5,
                                                  np.array([next_token(s.seq)]),
                                                  np.array([-0.5]))
                       for s in batch.seqs if s.needs_logits}
            if with_victim and n == abort_at and not reqs[victim].is_finished:
                assert sch.abort(str(victim)) is reqs[victim]
                aborted = True
            sch.update(batch, sampled, 0.0)
            n += 1
            assert n < 500
        assert sch.bm.free_pages == sch.bm.num_pages  # nothing leaked, nothing freed twice
        return {r.request_id: r.output_ids for r in reqs}, aborted

    with_abort, aborted = run(True)
    alone, _ = run(False)
    if aborted:
        assert with_abort[str(victim)] is not None
        del with_abort[str(victim)]
        assert with_abort == alone


def test_multi_step_decode_runs_while_requests_wait_for_a_seat():
    """max_num_seqs full: the waiting request cannot be admitted, so it must not hold the
    running ones to one token a step (an offline queue's whole first wave did)."""
    sch = make(max_num_seqs=2, budget=32)
    for i in range(3):
        sch.add(req(i, [5, 6, 7], max_tokens=10))
    step(sch)  # admits two: their prompts, first tokens
    assert len(sch.running) == 2 and len(sch.waiting) == 1
    rows = sch.schedule_decode_steps(8, lambda r: True)
    assert rows is not None and [r.num_tokens for r in rows] == [8, 8]


def test_arrivals_get_one_admission_step_per_multi_step_call():
    """Admissible waiting requests get a regular step first; after it one multi-step call
    runs although another waits (it arrived during the step, as from a server), then
    the next regular step admits it."""
    sch = make(max_num_seqs=8, budget=32)
    sch.add(req(0, [5, 6, 7], max_tokens=30))
    step(sch)
    assert sch.schedule_decode_steps(4, lambda r: True) is not None  # nothing waits
    sch.add(req(1, [8, 9], max_tokens=30))
    assert sch.schedule_decode_steps(4, lambda r: True) is None  # admit it first
    step(sch)
    assert len(sch.running) == 2 and not sch.waiting
    sch.add(req(2, [10, 11], max_tokens=30))  # arrived during the admission step
    rows = sch.schedule_decode_steps(4, lambda r: True)  # owed: the running ones advance
    assert rows is not None and len(rows) == 2 and len(sch.waiting) == 1
    assert sch.schedule_decode_steps(4, lambda r: True) is None  # then req 2's turn
    batch, _ = step(sch)
    assert len(sch.running) == 3 and not sch.waiting
