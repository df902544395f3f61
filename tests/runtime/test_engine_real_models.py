"""`Engine(alias)` with default arguments on the two real models, against transformers.

What a newcomer types: no options at all. On a CPU that means a background warm-up
(`warmup="auto"`), the KV cache sized from available memory under its CPU cap, scan
layers. Greedy tokens of a batch of prompts must equal transformers' float32 greedy
generation of each prompt alone, while the warm-up is still compiling, and again once
every bucket is compiled.
"""
from __future__ import annotations

import pytest
import torch

from jaxrt.runtime.engine import Engine, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a"]
MAX_TOKENS = 8


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                pad_token_id=0)
    return out[0, len(ids):].tolist()


def check_defaults(alias: str, hf_model) -> None:
    with Engine(alias) as engine:  # nothing but the model
        st = engine.stats()
        assert st.num_buckets > 0 and engine.max_model_len >= 2048
        prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
        expected = [hf_greedy(hf_model, ids, MAX_TOKENS) for ids in prompt_ids]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        first = engine.generate(PROMPTS, params)
        assert [o.prompt_ids for o in first] == prompt_ids
        assert [o.ids for o in first] == expected
        engine.warmup()  # whatever the background had left
        st = engine.stats()
        assert not st.warming_up and st.warmup_seconds > 0
        again = engine.generate(PROMPTS, params)
        assert [o.ids for o in again] == expected
        assert engine.stats().compiles_after_warmup == st.compiles_after_warmup


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_smollm2_defaults_match_transformers(smollm2_hf_model):
    check_defaults("smollm2-135m", smollm2_hf_model)


@pytest.mark.slow
@pytest.mark.xdist_group("gemma3")
def test_gemma3_defaults_match_transformers(gemma3_hf_model):
    check_defaults("gemma3-270m", gemma3_hf_model)
