"""`SamplingParams(prompt_logprobs=n)`: the log-softmax of a full-sequence forward at every
prompt position, whatever the chunk size, prefix caching, preemption or batch, while the
requests beside it are unchanged and requests that do not ask cost no extra logits rows.

Two tiny models: the fake runner (bit-exact integer "attention", reference computed
densely in numpy) and a random two-layer Llama through the real frontend, passes and
lowering (reference: one full step over the whole prompt with every token's logits).
The real SmolLM2 against transformers is in test_prompt_logprobs_real.py.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrt.errors import SettingError
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import Logprob, SamplingParams
from tests.runtime.fake_model import FakeRunner, reference_greedy, reference_logits

MAX_LEN = 48
# Every fake-runner engine here has max_num_seqs=2, max_model_len=48 and a budget of 5 or
# 16 tokens (prompts are up to 30): 6 step shapes (2 of them with every token's logits)
# compile in all.
SEQS, BUDGETS = 2, (5, 16)
# the fake model's logits are multiples of 1/4096 in [0, 16): the float32 log-softmax
# of 64 of them is within a few ulps of 16 (2**-20 each) of float64's
FAKE_ATOL = 1e-5
def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _check_entry(entry: dict[int, Logprob], target: int, ref: np.ndarray, n: int,
                 atol: float) -> None:
    """One prompt position against the reference logprobs `ref` [V] (float64): vLLM's
    dict holds the top n (ranks 1..n) and the prompt token, with its own rank when it is
    not one of them. Near-ties (within 2 * atol) may order either way."""
    assert target in entry
    if len(entry) == n:   # the prompt token is one of the top n
        top = sorted(entry, key=lambda t: entry[t].rank)
    else:
        assert len(entry) == n + 1
        top = sorted((t for t in entry if t != target), key=lambda t: entry[t].rank)
        rank = entry[target].rank  # the tokens at least as likely as it
        assert rank > n
        assert int((ref >= ref[target] + 2 * atol).sum()) + 1 <= rank \
            <= int((ref >= ref[target] - 2 * atol).sum())
    assert [entry[t].rank for t in top] == list(range(1, n + 1))
    best = np.sort(ref)[::-1]
    for r, t in enumerate(top):
        assert abs(ref[t] - best[r]) <= 2 * atol  # the (r+1)-th best, up to near-ties
    for t, lp in entry.items():
        assert abs(lp.logprob - ref[t]) <= atol, (t, lp, ref[t])


def _prompts(draw, alphabet):
    token = st.sampled_from(alphabet)
    root = draw(st.lists(token, min_size=1, max_size=14))
    return [(root + draw(st.lists(token, min_size=0, max_size=16)))[:30] for _ in range(3)]


# ---- the fake runner: exact ------------------------------------------------------------

@examples(15)
@given(data=st.data())
def test_fake_prompt_logprobs_match_dense_reference(fake_runner, data):
    prompts = _prompts(data.draw, list(range(2, 8)))  # few tokens: shared prefixes
    n = data.draw(st.integers(0, 4), label="n")
    budget = data.draw(st.sampled_from(BUDGETS), label="budget")
    caching = data.draw(st.booleans(), label="prefix caching")
    pages = data.draw(st.sampled_from([64, 14]), label="pages")  # 14: preemptions
    who = data.draw(st.sets(st.integers(0, 2), min_size=1), label="asking")
    engine = Engine(fake_runner, max_num_seqs=SEQS, max_num_batched_tokens=budget,
                    max_model_len=MAX_LEN, enable_prefix_caching=caching, num_pages=pages,
                    decode_steps=1, warmup=False, log=None)
    params = [SamplingParams(max_tokens=6, ignore_eos=True,
                             prompt_logprobs=n if i in who else None) for i in range(3)]
    # the first request warms the prefix cache for the others (a cached prefix must be
    # recomputed for prompt logprobs)
    outs = engine.generate(prompts[:1], params[:1]) + engine.generate(prompts[1:], params[1:])
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.ids == reference_greedy(prompt, 6, ignore_eos=True)  # unchanged
        if i not in who:
            assert out.prompt_logprobs is None
            continue
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for p in range(1, len(prompt)):
            ref = _log_softmax(reference_logits(prompt[:p]))
            _check_entry(plp[p], prompt[p], ref, n, FAKE_ATOL)
            logits = reference_logits(prompt[:p])
            if len(plp[p]) == n + 1:  # the fake's logits are exact in float32: exact rank
                assert plp[p][prompt[p]].rank == int((logits >= logits[prompt[p]]).sum())


def test_fake_prompt_logprobs_do_not_depend_on_chunks(fake_runner):
    """Bit-identical values for every chunk size and with the prefix cache on or off."""
    prompt = [3, 4, 5, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6]
    seen = []
    for budget in BUDGETS:
        for caching in (False, True):
            engine = Engine(fake_runner, max_num_seqs=SEQS, max_num_batched_tokens=budget,
                            max_model_len=MAX_LEN, enable_prefix_caching=caching,
                            decode_steps=1, warmup=False, log=None)
            engine.generate([prompt], SamplingParams(max_tokens=1))   # cache the prompt
            out = engine.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=3))
            seen.append(out[0].prompt_logprobs)
            engine.generate([prompt], SamplingParams(max_tokens=1))
            # the prompt was cached all along; only the request with prompt logprobs
            # did not read it
            assert (engine.stats().prefix_cache_hit_rate > 0) == caching
    assert all(s == seen[0] for s in seen)


def test_prompt_rows_in_decode_only_steps(fake_runner):
    """A 2-token budget beside a decoding request leaves one prompt token per step: the
    prompt logprob rows then ride in decode buckets (N = T there already)."""
    rec = _Recorder(fake_runner)
    engine = Engine(rec, max_num_seqs=SEQS, max_num_batched_tokens=2, max_model_len=MAX_LEN,
                    decode_steps=1, warmup=False, log=None)
    short, long = [2, 3], [4, 5, 6, 7, 2, 3, 4, 5, 6, 7, 3, 3]
    outs = engine.generate([short, long], [SamplingParams(max_tokens=12, ignore_eos=True),
                                           SamplingParams(max_tokens=2, ignore_eos=True,
                                                          prompt_logprobs=2)])
    assert outs[0].ids == reference_greedy(short, 12, ignore_eos=True)
    assert outs[1].ids == reference_greedy(long, 2, ignore_eos=True)
    # B's first chunks are single tokens beside A's decodes: decode buckets (Q = 1)
    assert (2, 2, 1) in rec.shapes
    for p in range(1, len(long)):
        _check_entry(outs[1].prompt_logprobs[p], long[p],
                     _log_softmax(reference_logits(long[:p])), 2, FAKE_ATOL)


class _Recorder:
    """A runner proxy recording each step's (T, N, Q)."""

    def __init__(self, runner):
        self._runner, self.shapes = runner, []

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def run_sampled(self, tokens, *args):
        self.shapes.append((len(tokens), len(args[5]), args[4].shape[1]))
        return self._runner.run_sampled(tokens, *args)


def test_no_extra_logits_rows_without_prompt_logprobs(fake_runner):
    rec = _Recorder(fake_runner)
    engine = Engine(rec, max_num_seqs=SEQS, max_num_batched_tokens=BUDGETS[1],
                    max_model_len=MAX_LEN, decode_steps=1, warmup=False, log=None)
    usual = {(b.T, b.N, b.Q) for b in engine.policy.all_buckets()}
    prompts = [[2, 3, 4, 5, 6, 7] * 4, [3, 4, 5] * 3]
    engine.generate(prompts, SamplingParams(max_tokens=4))
    assert rec.shapes and set(rec.shapes) <= usual
    rec.shapes.clear()
    engine.generate(prompts, [SamplingParams(max_tokens=4, prompt_logprobs=1),
                              SamplingParams(max_tokens=4)])
    assert any(n == t and (t, n, q) not in usual for t, n, q in rec.shapes)


# ---- validation ------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "2"])
def test_bad_prompt_logprobs_are_refused(fake_runner, value):
    engine = Engine(fake_runner, max_num_seqs=SEQS, max_num_batched_tokens=BUDGETS[1],
                    max_model_len=MAX_LEN, max_logprobs=20, warmup=False, log=None)
    with pytest.raises(SettingError, match="prompt_logprobs") as e:
        engine.add_request([2, 3, 4], SamplingParams(prompt_logprobs=value))
    assert e.value.setting == "prompt_logprobs"
    assert not engine.has_unfinished()


def test_strict_compiles_refuses_prompt_logprobs(fake_runner):
    engine = Engine(fake_runner, max_num_seqs=SEQS, max_num_batched_tokens=BUDGETS[1],
                    max_model_len=MAX_LEN, warmup=False, strict_compiles=True, log=None)
    with pytest.raises(SettingError, match="prompt_logprobs"):
        engine.add_request([2, 3, 4], SamplingParams(prompt_logprobs=1))


def test_one_token_prompt_has_only_none(fake_runner):
    engine = Engine(fake_runner, max_num_seqs=SEQS, max_num_batched_tokens=BUDGETS[1],
                    max_model_len=MAX_LEN, decode_steps=1, warmup=False, log=None)
    out = engine.generate([[5]], SamplingParams(max_tokens=2, prompt_logprobs=3))[0]
    assert out.prompt_logprobs == [None]


# ---- a random Llama through the real compiler ------------------------------------------

# float32 throughout; chunked vs whole-prompt attention only reorders sums (a few ulps
# of logprobs up to ~14, ulp ~1e-6, through two layers). Measured worst |difference|:
# 1.0e-6 over 6 random mixes; 1e-4 leaves a 100x margin
LLAMA_ATOL = 1e-4
PAD_T = 32


@pytest.fixture(scope="module")
def tiny_llama():
    from tests.runtime.conftest import _tiny_llama
    return _tiny_llama().make()


def _full_step_logprobs(exe, prompt: list[int]) -> np.ndarray:
    """Every position's next-token logprobs [len, V] from one step over the prompt
    (padded to PAD_T tokens, so one shape compiles)."""
    n, i32 = len(prompt), np.int32
    tokens, pos = np.zeros(PAD_T, i32), np.arange(PAD_T, dtype=i32)
    tokens[:n] = prompt
    slots = np.where(pos < n, pos, exe.num_pages * exe.page_size).astype(i32)
    q_index = np.where(pos < n, pos, PAD_T).astype(i32)[None]
    pages = np.arange(PAD_T // exe.page_size, dtype=i32)[None]
    logits = exe.run(tokens, pos, slots, pages, np.asarray([n], i32), q_index, pos)
    return _log_softmax(np.asarray(jax.device_get(logits))[:n])


@examples(4)
@given(data=st.data())
def test_llama_prompt_logprobs_match_full_step(tiny_llama, data):
    """Floating point through the real lowering; one budget (8 tokens: every prompt is
    chunked) and one output token keep the compiled shapes to a few."""
    prompts = _prompts(data.draw, list(range(3, 9)))
    n = data.draw(st.integers(0, 3), label="n")
    caching = data.draw(st.booleans(), label="prefix caching")
    engine = Engine(tiny_llama, max_num_seqs=2, max_num_batched_tokens=8,
                    max_model_len=MAX_LEN, enable_prefix_caching=caching, decode_steps=1,
                    warmup=False, log=None)
    params = [SamplingParams(max_tokens=1, prompt_logprobs=n), SamplingParams(max_tokens=1),
              SamplingParams(max_tokens=1, prompt_logprobs=n)]
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        if out.prompt_logprobs is None:
            continue
        ref = _full_step_logprobs(tiny_llama, prompt)
        assert out.prompt_logprobs[0] is None
        for p in range(1, len(prompt)):
            _check_entry(out.prompt_logprobs[p], prompt[p], ref[p - 1], n, LLAMA_ATOL)
