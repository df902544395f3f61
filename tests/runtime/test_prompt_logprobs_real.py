"""Prompt logprobs of the real SmolLM2-135M and Gemma 3 270M (float32, CPU) against
transformers' log_softmax(model(ids).logits), through the engine with chunked prefill (a 16-token
budget splits each prompt over several steps) and a prefix cache the first request
warmed. One sequence and one output token per request: only the 16-token bucket with
every token's logits compiles.
"""
from __future__ import annotations

import pytest

from tests.runtime.test_prompt_logprobs import _check_entry

_A = "The capital of France is Paris, the capital of Germany is Berlin, and the capital of"
# B shares A's first pages: with A's prompt cached, B's prefix is recomputed, not read
PROMPTS = [_A + " Italy is", _A + " Spain is Madrid. The capital of Portugal is"]
TOP = 5
# float32 on both sides: test_parity_real.py bounds each position's logit error by 1e-4 of
# its largest |logit|; a logprob (logit - logsumexp) moves by at most twice that
LOGIT_RTOL = 1e-4


@pytest.mark.xdist_group("smollm2")
def test_smollm2_prompt_logprobs_match_transformers(smollm2, smollm2_hf_model):
    check_prompt_logprobs(smollm2, smollm2_hf_model)


@pytest.mark.xdist_group("gemma3")
def test_gemma3_prompt_logprobs_match_transformers(gemma3, gemma3_hf_model):
    check_prompt_logprobs(gemma3, gemma3_hf_model)


def check_prompt_logprobs(loaded, hf_model):
    import torch

    from jaxrt.compiler import Target, compile_loaded
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams
    model = compile_loaded(loaded, target=Target("cpu", 2 << 30, "f32"), max_model_len=64,
                           num_pages=16)
    engine = Engine(model.executable(dtype="f32"), tokenizer=loaded.tokenizer,
                    max_num_seqs=1, max_num_batched_tokens=16, max_model_len=64,
                    decode_steps=1, warmup=False, log=None)
    ids = [loaded.tokenizer.encode(p) for p in PROMPTS]
    assert all(len(i) > 16 and len(i) % 16 != 1 for i in ids)  # chunks of 16 and > 1
    outs = engine.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=TOP))
    for prompt, out in zip(ids, outs):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([prompt])).logits[0].double()
        ref = torch.log_softmax(logits, dim=-1).numpy()              # [len, V]
        bound = 2 * LOGIT_RTOL * logits.abs().max(dim=-1).values.numpy()
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for p in range(1, len(prompt)):
            # top n, ranks and values; near-ties within 2 * bound may order either way
            _check_entry(plp[p], prompt[p], ref[p - 1], TOP, bound[p - 1])
            for t, lp in plp[p].items():
                assert lp.decoded_token == loaded.tokenizer.decode([t],
                                                                   skip_special_tokens=False)
