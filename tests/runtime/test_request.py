"""SamplingParams validation and normalization."""
from __future__ import annotations

import pytest

from jaxrt.runtime.request import SamplingParams, validate_prompt_ids


def check(params: SamplingParams, prompt_len: int = 4):
    params.validate(vocab_size=100, max_model_len=64, prompt_len=prompt_len, max_logprobs=20)


def test_defaults_are_vllm_greedy():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (16, 0.0, 0, 1.0, 0.0)
    assert p.is_greedy and not p.uses_penalties and not p.is_beam_search
    check(p)


def test_stop_is_normalized_to_tuples():
    p = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    hash(p)  # frozen and hashable


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=61), "max_tokens"),
    (dict(beam_width=0), "beam_width"), (dict(beam_width=11), "beam_width"),
    (dict(beam_width=2, temperature=1.0), "temperature"),
    (dict(beam_width=2, stop=("x",)), "stop"),
    (dict(beam_width=2, logprobs=1), "logprobs"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=-2.5), "presence_penalty"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=21), "logprobs"),
    (dict(stop_token_ids=(100,)), "stop_token_ids"),
    (dict(stop=("",)), "stop"),
    (dict(seed="7"), "seed"),
    (dict(length_penalty=float("inf")), "length_penalty"),
    (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        check(SamplingParams(**kwargs))


def test_context_and_prompt_errors():
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_tokens \(16\) exceeds "
                                         r"max_model_len \(64\)"):
        check(SamplingParams(), prompt_len=60)
    with pytest.raises(ValueError, match="empty"):
        check(SamplingParams(), prompt_len=0)
    assert validate_prompt_ids([1, 2, 99], 100) == [1, 2, 99]
    with pytest.raises(ValueError, match="index 2 is outside the vocabulary"):
        validate_prompt_ids([1, 2, 100], 100)
    with pytest.raises(ValueError, match="empty"):
        validate_prompt_ids([], 100)


def test_valid_combinations_pass():
    check(SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, seed=1,
                         stop=("\n",), stop_token_ids=(2,), logprobs=5,
                         repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5))
    check(SamplingParams(beam_width=10, length_penalty=0.0, max_tokens=60))
