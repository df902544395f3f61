"""Engine over the fake runner: end-to-end behaviour against the dense reference model."""
from __future__ import annotations

import io

import numpy as np
import pytest

from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from tests.runtime.fake_model import (EOS, FakeRunner, FakeTokenizer, reference_greedy,
                                      reference_logits)

# one configuration for most tests (and the property tests), so compiled shapes are shared
CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=48, log=None)


def make_engine(runner, **kw) -> Engine:
    return Engine(runner, **{"warmup": False, **CONFIG, **kw})


def log_softmax(x):
    x = x.astype(np.float32)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum(dtype=np.float32))


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43, 44],
           [40], list(range(2, 32))]


def test_greedy_batch_matches_reference(fake_runner):
    engine = make_engine(fake_runner)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    tok = FakeTokenizer()
    for prompt, out in zip(PROMPTS, outs):
        want = reference_greedy(prompt, 12)
        assert out.ids == want and out.prompt_ids == prompt
        assert out.finish_reason == ("stop" if want[-1] == EOS else "length")
        assert out.text == tok.decode(want)
        assert out.ttft is not None and len(out.token_times) == len(want)
        assert out.token_times == sorted(out.token_times)
    s = engine.stats()
    # all four were admitted in one step, before any page was computed: nothing to reuse
    assert s.prefix_cache_hit_rate == 0 and s.pages_in_use == 0 and s.free_pages == 64
    again = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    assert [o.ids for o in again] == [o.ids for o in outs]
    prompt_tokens = sum(map(len, PROMPTS))
    reused = sum((len(p) - 1) // 4 * 4 for p in PROMPTS)   # all full pages but the last
    assert engine.stats().prefix_cache_hit_rate == pytest.approx(reused / (2 * prompt_tokens))


def test_text_prompt_and_stop_string(fake_runner):
    engine = make_engine(fake_runner)
    tok = FakeTokenizer()
    prompt = "helloWorld"
    full = reference_greedy(tok.encode(prompt), 20, ignore_eos=True)
    text = tok.decode(full)
    stop = text[4:6]
    cut = text.find(stop)
    out = engine.generate(prompt, SamplingParams(max_tokens=20, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    assert out.ids == full[:len(out.ids)] and tok.decode(out.ids).endswith(stop)


def test_stream_matches_generate(fake_runner):
    engine = make_engine(fake_runner)
    tok = FakeTokenizer()
    full = tok.decode(reference_greedy(tok.encode("abc"), 20, ignore_eos=True))
    for params in (SamplingParams(max_tokens=15),
                   SamplingParams(max_tokens=20, ignore_eos=True, stop=[full[6:9]])):
        want = engine.generate("abc", params)[0]
        deltas = list(engine.stream("abc", params))
        assert [t for d in deltas for t in d.ids] == want.ids
        assert "".join(d.text for d in deltas) == want.text
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].finish_reason == want.finish_reason
        assert deltas[-1].output.ids == want.ids
        if params.stop:   # held-back text never leaks a stop string
            seen = ""
            for d in deltas:
                seen += d.text
                assert params.stop[0] not in seen


def test_stream_closed_early_aborts(fake_runner):
    engine = make_engine(fake_runner)
    it = engine.stream([3, 4, 5], SamplingParams(max_tokens=30, ignore_eos=True))
    next(it)
    it.close()
    assert not engine.has_unfinished() and engine.stats().pages_in_use == 0


@pytest.mark.parametrize("params, field", [
    (SamplingParams(temperature=-1.0), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(top_k=-1), "top_k"),
    (SamplingParams(min_p=2.0), "min_p"),
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(max_tokens=100), "max_tokens"),
    (SamplingParams(beam_width=0), "beam_width"),
    (SamplingParams(beam_width=3, temperature=0.5), "temperature"),
    (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    (SamplingParams(presence_penalty=3.0), "presence_penalty"),
    (SamplingParams(logprobs=-1), "logprobs"),
    (SamplingParams(logprobs=1000), "logprobs"),
    (SamplingParams(stop_token_ids=(64,)), "stop_token_ids"),
    (SamplingParams(seed=1.5), "seed"),
    (SamplingParams(stop=("",)), "stop"),
])
def test_bad_params_raise_before_scheduling(fake_runner, params, field):
    engine = make_engine(fake_runner)
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match=field):
        engine.add_request([5, 6, 7], params)
    with pytest.raises(ValueError, match=field):
        engine.generate([[8, 9], [5, 6, 7]], [SamplingParams(), params])
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.request_id for o in outs] == [rid]      # nothing else was queued
    assert outs[0].ids == reference_greedy([5, 6, 7], 10, ignore_eos=True)


@pytest.mark.parametrize("prompt, match", [([], "empty"), ([3, 64], "vocabulary"),
                                           ([3, -1], "vocabulary"), (["a"], "vocabulary")])
def test_bad_prompts_raise(fake_runner, prompt, match):
    engine = make_engine(fake_runner)
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt)
    assert not engine.has_unfinished()


def test_bad_engine_config(fake_runner):
    with pytest.raises(ValueError, match="page_size"):
        make_engine(fake_runner, page_size=16)
    with pytest.raises(ValueError, match="num_pages"):
        make_engine(fake_runner, num_pages=65)
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine(fake_runner, num_pages=4, max_model_len=48)
    # a compiled runner cannot be sharded or quantized by the Engine: refused, not ignored
    for setting in ({"tensor_parallel": 2}, {"data_parallel": 2}, {"quantize": "fp8"}):
        with pytest.raises(ValueError, match=f"{next(iter(setting))}=.*already compiled"):
            make_engine(fake_runner, **setting)
    engine = make_engine(fake_runner, num_pages=4, max_model_len=16)
    with pytest.raises(ValueError, match="KV pages"):   # 3 beams x 2 pages > 4
        engine.add_request([3, 4], SamplingParams(max_tokens=8, beam_width=3))


def test_warmup_compiles_every_shape_once():
    runner = FakeRunner(num_pages=64, page_size=4)
    log = io.StringIO()
    engine = Engine(runner, **{**CONFIG, "log": log, "strict_compiles": True})
    assert "warmup compiled" in log.getvalue() and engine.stats().warmup_seconds > 0
    prompts = [list(range(2, 2 + n)) for n in (1, 3, 17, 40, 9, 33, 2)]
    params = [SamplingParams(max_tokens=8), SamplingParams(max_tokens=5, temperature=0.8,
                                                           top_p=0.9, seed=3),
              SamplingParams(max_tokens=8, repetition_penalty=1.3, logprobs=2),
              SamplingParams(max_tokens=8, beam_width=2), SamplingParams(max_tokens=30),
              SamplingParams(max_tokens=15, frequency_penalty=0.5),
              SamplingParams(max_tokens=3, min_p=0.1, temperature=1.0)]
    engine.generate(prompts, params)
    assert engine.stats().compiles_after_warmup == 0 and runner.compiles_in_run == 0
    assert engine.stats().num_buckets == len(engine.policy.all_buckets())


def test_logprobs_are_the_processed_distribution(fake_runner):
    engine = make_engine(fake_runner)
    prompt = [7, 8, 9]
    out = engine.generate(prompt, SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True))[0]
    seq = list(prompt)
    assert len(out.logprobs) == 4
    for token, lps in zip(out.ids, out.logprobs):
        lp = log_softmax(reference_logits(seq))
        assert token in lps and len(lps) in (3, 4)
        best = np.argsort(-lp, kind="stable")[:3]
        assert set(best.tolist()) <= set(lps)
        for t, v in lps.items():
            assert v == pytest.approx(float(lp[t]), abs=1e-5)
        seq.append(token)
    assert out.cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(out.ids, out.logprobs)))


def reference_beam_search(prompt, width, max_tokens, length_penalty=1.0, ignore_eos=False):
    """HF-style beam search over the dense fake model, same tie-breaking as the engine."""
    beams, hyps = [([], 0.0)], []

    def score(ids, cum):
        return cum / len(ids) ** length_penalty

    for step in range(max_tokens):
        cands = []
        for bi, (out, cum) in enumerate(beams):
            lp = log_softmax(reference_logits(prompt + out))
            for t in np.argsort(-lp, kind="stable")[:2 * width]:
                cands.append((cum + float(lp[t]), bi, int(t)))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        live = []
        for rank, (cum, bi, t) in enumerate(cands):
            if t == EOS and not ignore_eos:
                if rank < width:
                    hyps.append((beams[bi][0] + [t], cum))
                continue
            live.append((beams[bi][0] + [t], cum))
            if len(live) == width:
                break
        if step + 1 >= max_tokens:
            hyps += live
            live = []
        if not live:
            break
        if len(hyps) >= width:
            kept = sorted((score(*h) for h in hyps), reverse=True)[width - 1]
            if kept >= max(score(ids, cum) for ids, cum in live):
                break
        beams = live
    order = sorted(range(len(hyps)), key=lambda i: (-score(*hyps[i]), i))
    return [hyps[i] for i in order[:width]]


@pytest.mark.parametrize("width, length_penalty", [(2, 1.0), (3, 0.5)])
def test_beam_search_matches_reference(fake_runner, width, length_penalty):
    engine = make_engine(fake_runner)
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    params = SamplingParams(max_tokens=10, beam_width=width, length_penalty=length_penalty)
    # beams next to an ordinary request and each other
    outs = engine.generate(prompts + [[3, 4]], [params, params, SamplingParams(max_tokens=7)])
    for prompt, out in zip(prompts, outs):
        want = reference_beam_search(prompt, width, 10, length_penalty)
        assert [b.ids for b in out.beams] == [ids for ids, _ in want]
        for b, (_, cum) in zip(out.beams, want):
            assert b.cumulative_logprob == pytest.approx(cum, abs=1e-4)
        assert out.ids == out.beams[0].ids
    assert outs[2].ids == reference_greedy([3, 4], 7)


def test_beam_width_one_is_greedy(fake_runner):
    engine = make_engine(fake_runner)
    out = engine.generate([9, 8, 7], SamplingParams(max_tokens=9, beam_width=1))[0]
    assert out.ids == reference_greedy([9, 8, 7], 9) and out.beams == []


def test_beams_share_prompt_pages(fake_runner):
    engine = make_engine(fake_runner)
    prompt = list(range(2, 12))                      # 2 full pages + 2 tokens
    rid = engine.add_request(prompt, SamplingParams(max_tokens=6, beam_width=3,
                                                    ignore_eos=True))
    req = engine._live[rid]
    engine.step()                                    # prefill: one sequence
    engine.step()                                    # first beam step forked it
    bm = engine.block_manager
    tables = [bm.page_table(s.seq_id) for s in req.seqs]
    assert len(tables) == 3
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert all(bm.refcount(p) == 3 for p in tables[0][:2])
    while engine.has_unfinished():
        engine.step()
    assert bm.pages_in_use == 0


def test_preemption_keeps_greedy_outputs(fake_runner):
    prompts = [list(range(2 + i, 12 + i)) for i in range(4)]
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    # 6 pages of 4 tokens: each request needs 6 by itself
    engine = make_engine(fake_runner, num_pages=6, max_model_len=24)
    outs = engine.generate(prompts, params)
    assert engine.stats().preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.ids == reference_greedy(prompt, 14, ignore_eos=True)
    assert any(o.num_preemptions for o in outs)


def test_seeded_sampling_is_independent_of_the_batch(fake_runner):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=77)
    alone = make_engine(fake_runner).generate([[4, 5, 6]], p)[0].ids
    others = [[9, 9, 9, 9, 9], list(range(2, 30)), [7]]
    mixed = make_engine(fake_runner).generate(
        others + [[4, 5, 6]],
        [SamplingParams(max_tokens=12, temperature=0.9)] * 3 + [p])[3].ids
    assert mixed == alone
    other_seed = make_engine(fake_runner).generate(
        [[4, 5, 6]], SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=78))[0]
    assert other_seed.ids != alone            # (true for these seeds; a sanity check)


def test_abort_returns_partial_output(fake_runner):
    engine = make_engine(fake_runner)
    a = engine.add_request([3, 4, 5], SamplingParams(max_tokens=20, ignore_eos=True))
    b = engine.add_request([6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    for _ in range(4):
        engine.step()
    out = engine.abort(a)
    assert out.finish_reason == "abort" and out.ids == \
        reference_greedy([3, 4, 5], 20, ignore_eos=True)[:len(out.ids)]
    assert engine.abort(a) is None
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.request_id for o in outs] == [b]
    assert outs[0].ids == reference_greedy([6, 7], 20, ignore_eos=True)


def test_outputs_of_other_requests_are_kept_for_step(fake_runner):
    engine = make_engine(fake_runner)
    rid = engine.add_request([3, 4], SamplingParams(max_tokens=2))
    engine.generate([[5, 6]], SamplingParams(max_tokens=6))
    assert [o.request_id for o in engine.step()] == [rid]


def test_beam_search_survives_preemption(fake_runner):
    engine = make_engine(fake_runner, num_pages=8, max_model_len=32)
    beam = SamplingParams(max_tokens=10, beam_width=2, ignore_eos=True)
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = [[2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15], [16, 17]]
    outs = engine.generate([prompts[0], *prompts[1:], [30, 31, 32, 33, 34, 35]],
                           [greedy, beam, beam, greedy, beam])
    assert engine.stats().preemptions > 0
    assert any(o.num_preemptions for o, p in zip(outs, [0, 1, 1, 0, 1]) if p)
    for prompt, out, is_beam in zip(prompts + [[30, 31, 32, 33, 34, 35]], outs,
                                    [0, 1, 1, 0, 1]):
        if is_beam:
            want = reference_beam_search(prompt, 2, 10, ignore_eos=True)
            assert [b.ids for b in out.beams] == [ids for ids, _ in want]
        else:
            assert out.ids == reference_greedy(prompt, 16, ignore_eos=True)
    assert engine.stats().pages_in_use == 0


def test_stream_interleaved_with_generate(fake_runner):
    engine = make_engine(fake_runner)
    it = engine.stream([3, 4, 5], SamplingParams(max_tokens=5, ignore_eos=True))
    first = next(it)
    # another caller runs the engine until our stream's request is done
    engine.generate([[6, 7]], SamplingParams(max_tokens=12, ignore_eos=True))
    rest = list(it)
    assert first.ids + [t for d in rest for t in d.ids] == \
        reference_greedy([3, 4, 5], 5, ignore_eos=True)
    assert rest[-1].finish_reason == "length" and engine.step() == []


def test_abort_from_another_thread_mid_step_is_safe(fake_runner):
    """abort() while a step is running (a server's disconnect handler): it waits for the
    step, the other requests' tokens are unchanged, and the pages all come back. The
    first runner call waits until the aborting thread is about to call abort(), so the
    abort lands during (or just after) that step whatever the machine's load, long
    before the victim could finish."""
    import threading
    import time as _time

    class SlowRun:
        def __init__(self, inner):
            self._inner, self.in_run = inner, threading.Event()
            self.abort_called = threading.Event()

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def _slow(self):
            if not self.in_run.is_set():
                self.in_run.set()
                assert self.abort_called.wait(30)
                _time.sleep(0.01)  # abort() blocks on the step meanwhile

        def run_sampled(self, *args, **kwargs):  # the steps the engine runs
            self._slow()
            return self._inner.run_sampled(*args, **kwargs)

        def decode(self, *args, **kwargs):
            self._slow()
            return self._inner.decode(*args, **kwargs)

    runner = SlowRun(fake_runner)
    engine = make_engine(runner)
    params = SamplingParams(max_tokens=18, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    victim, results = ids[1], {}

    aborted = threading.Event()

    def aborter():
        runner.in_run.wait()
        runner.abort_called.set()
        results["abort"] = engine.abort(victim)
        aborted.set()

    t = threading.Thread(target=aborter)
    t.start()
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
        # the abort waits on the step lock, which is not fair: stepping on at once could
        # take it first every time until the victim finished
        if runner.abort_called.is_set():
            assert aborted.wait(30)
    t.join()
    assert results["abort"] is not None and results["abort"].finish_reason == "abort"
    got = {o.request_id: o.ids for o in outs}
    assert victim not in got
    for rid, prompt in zip(ids, PROMPTS):
        if rid != victim:
            assert got[rid] == reference_greedy(prompt, 18, ignore_eos=True)
    assert engine.stats().pages_in_use == 0


def test_unseeded_sampling_differs_across_fresh_engines(fake_runner):
    """Requests without a seed: fresh engines must not repeat each other's draws; an
    engine seed makes them reproducible."""
    params = SamplingParams(max_tokens=16, temperature=1.5, ignore_eos=True)

    def draw(**kw):
        return make_engine(fake_runner, **kw).generate([[3, 4, 5]] * 2, params)

    a, b = draw(), draw()
    assert [o.ids for o in a] != [o.ids for o in b]
    assert a[0].ids != a[1].ids  # two requests of one engine differ too
    assert [o.ids for o in draw(seed=7)] == [o.ids for o in draw(seed=7)]
    with pytest.raises(ValueError, match="seed"):
        make_engine(fake_runner, seed="7")


def test_decode_loop_runs_several_steps_per_call(fake_runner):
    """Greedy and seeded requests decode `decode_steps` tokens per runner call, with the
    tokens the dense reference gives; a request asking for top-n logprobs or truncated
    sampling (which the loop does not serve) sends its batch back to one step per call."""
    engine = make_engine(fake_runner, decode_steps=4)
    runs, fed = fake_runner.runs, []
    decode = fake_runner.decode

    def spy(*args, feed=None, feed_at=None):
        fed.append(feed is not None and bool((feed_at[0] >= 0).any()))
        return decode(*args, feed=feed, feed_at=feed_at)

    fake_runner.decode = spy
    try:
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    finally:
        del fake_runner.decode
    # the second and third calls were queued before the previous one's tokens were read
    assert fed == [False, True, True]
    assert [o.ids for o in outs] == [reference_greedy(p, 12, ignore_eos=True)
                                     for p in PROMPTS]
    s = engine.stats()
    assert s.decode_loops > 0 and s.generated_tokens == 48
    # two prefill steps (53 prompt tokens, a 48-token budget), then the 10 or 11 tokens
    # left at up to 4 per call: 3 calls, 12 steps' worth in 5 runner calls
    assert fake_runner.runs - runs == 5 and s.decode_loops == 3
    sampled = SamplingParams(max_tokens=9, temperature=1.0, seed=5, ignore_eos=True)
    alone = make_engine(fake_runner, decode_steps=1).generate([PROMPTS[0]], sampled)[0]
    looped = engine.generate([PROMPTS[0], PROMPTS[2]], sampled)[0]
    assert looped.ids == alone.ids and looped.cumulative_logprob == pytest.approx(
        alone.cumulative_logprob, abs=1e-5)
    loops = engine.stats().decode_loops
    engine.generate([PROMPTS[0], PROMPTS[1]],
                    [SamplingParams(max_tokens=6), SamplingParams(max_tokens=6, logprobs=2)])
    assert engine.stats().decode_loops == loops
    # top-k/top-p/min-p rows sample in the step, whose sampler branches on them
    truncated = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=1)
    engine.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(max_tokens=6), truncated])
    assert engine.stats().decode_loops == loops


def test_decode_loop_stops_at_eos_and_max_tokens(fake_runner):
    """Tokens a loop computed past a request's end are dropped, and the pages it
    reserved are freed."""
    engine = make_engine(fake_runner, decode_steps=8)
    for prompt in PROMPTS:
        want = reference_greedy(prompt, 13)
        out = engine.generate([prompt], SamplingParams(max_tokens=13))[0]
        assert out.ids == want
        assert out.finish_reason == ("stop" if want[-1] == EOS else "length")
    assert engine.stats().pages_in_use == 0


def test_chat_needs_a_template_and_messages(fake_runner):
    from jaxrt.errors import InputError
    engine = make_engine(fake_runner, tokenizer=FakeTokenizer())
    with pytest.raises(InputError, match="no chat template"):
        engine.chat([{"role": "user", "content": "hi"}])
    engine = make_engine(fake_runner, tokenizer=FakeTokenizer(),
                         chat_template="{% for m in messages %}{{ m.content + '.' }}{% endfor %}")
    for bad, match in (("hi", "got str"), (5, "got int"),
                       ([[{"role": "user"}], [{"role": "user", "content": "hi"}]],
                        "conversation 0: chat template")):
        with pytest.raises(InputError, match=match):
            engine.chat(bad)
