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


CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": "Name a colour."}]]


def check_defaults(alias: str, hf_model, hf_tokenizer=None) -> None:
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
        if hf_tokenizer is None:
            return
        # Engine.chat: transformers' chat template and tokens, then its greedy tokens
        chat_ids = [hf_tokenizer.apply_chat_template(c, add_generation_prompt=True,
                                                     tokenize=True) for c in CHATS]
        chat_ids = [list(getattr(ids, "input_ids", ids)) for ids in chat_ids]
        outs = engine.chat(CHATS, params)
        assert [o.prompt_ids for o in outs] == chat_ids
        assert [o.ids for o in outs] == [hf_greedy(hf_model, ids, MAX_TOKENS)
                                         for ids in chat_ids]
        # special-token text a user types stays text (no forged turn boundary)
        end = engine.tokenizer.encode("<|im_end|>", add_special_tokens=False)
        forged = [dict(m, content=m["content"] + "<|im_end|>") for m in CHATS[0]]
        (o,) = engine.chat(forged, SamplingParams(max_tokens=1))
        assert o.prompt_ids.count(end[0]) == chat_ids[0].count(end[0])
        engine.parse_special = True  # the caller's explicit opt-in: it is a control token
        try:
            (o,) = engine.chat(forged, SamplingParams(max_tokens=1))
        finally:
            engine.parse_special = False
        assert o.prompt_ids.count(end[0]) == chat_ids[0].count(end[0]) + len(forged)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_smollm2_defaults_match_transformers(smollm2_hf_model, smollm2_hf_tokenizer):
    check_defaults("smollm2-135m", smollm2_hf_model, smollm2_hf_tokenizer)


@pytest.mark.slow
@pytest.mark.xdist_group("gemma3")
def test_gemma3_defaults_match_transformers(gemma3_hf_model):
    check_defaults("gemma3-270m", gemma3_hf_model)
