"""The real models against Hugging Face transformers (torch CPU, float32, the same GGUF).

For SmolLM2-135M and Gemma 3 270M, raw and chat prompts:
- logits agree at every prompt position: max |ours - theirs| <= 1e-4 * max |theirs|;
- greedy continuations are token-identical for 32 tokens.

Both sides get the same prompt ids (our tokenizer's; tokenizer parity is tested apart), and
the reference continuation is a plain argmax loop with no logits processors, so EOS can be
chosen like any other token on both sides.
"""
from __future__ import annotations

import numpy as np
import pytest

from jaxrt.frontends.tokenizer import render_chat
from tests.conftest import f32_executable

NEW_TOKENS = 32
RAW = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a"]
CHAT = ["What is 2 + 2? Answer briefly.", "Name three colors."]

# float32 on both sides; the residual is summation order across 30 / 18 layers. 1e-4 of the
# logit range is the bound, and about 10x the worst error seen.
LOGIT_RTOL = 1e-4


def _prompts(loaded):
    tok = loaded.tokenizer
    out = [tok.encode(p) for p in RAW]
    for text in CHAT:
        rendered = render_chat(loaded.chat_template, [{"role": "user", "content": text}],
                               add_generation_prompt=True, bos_token=tok.bos_token or "",
                               eos_token=tok.eos_token or "")
        out.append(tok.encode(rendered, add_special_tokens=False))
    return out


def _table(exe):
    # one full-width page table (pages 0, 1, ...; slot of position p is p) for every
    # prompt, as the Engine's buckets use: one decode shape, one compile per prompt length
    return np.arange(exe.num_pages, dtype=np.int32)[None]


def _all_logits(exe, ids):
    """Logits at every prompt position; the prompt's K/V stay in the cache."""
    n = len(ids)
    pos = np.arange(n, dtype=np.int32)
    return np.asarray(exe.run(np.asarray(ids, np.int32), pos, pos, _table(exe),
                              np.asarray([n], np.int32), pos[None], pos))


def _greedy_after_prefill(exe, ids, last_logits, count):
    """Greedy continuation of a prompt `_all_logits` just prefilled: decode steps from the
    cache it wrote (the argmax runs on the host, in float32)."""
    n, out, one = len(ids), [], np.zeros(1, np.int32)
    token = int(np.argmax(last_logits))
    while True:
        out.append(token)
        if len(out) == count:
            return out
        p = np.asarray([n], np.int32)
        logits = exe.run(np.asarray([token], np.int32), p, p, _table(exe),
                         np.asarray([n + 1], np.int32), one[None], one)
        token, n = int(np.argmax(np.asarray(logits)[0])), n + 1


def _torch_greedy(hf, ids, n):
    import torch
    seq = torch.tensor([ids])
    out = []
    with torch.no_grad():
        past = None
        x = seq
        for _ in range(n):
            res = hf(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            x = torch.tensor([[token]])
    return out


def _check(loaded, hf, exe):
    import torch
    for ids in _prompts(loaded):
        ours = _all_logits(exe, ids)
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert ours.shape == theirs.shape
        err = np.abs(ours - theirs).max(axis=-1)  # per position
        bound = LOGIT_RTOL * np.abs(theirs).max(axis=-1)
        assert (err <= bound).all(), (f"prompt {ids[:8]}...: worst position "
                                      f"{int(np.argmax(err / bound))}, err {err.max():.3g} vs "
                                      f"bound {bound.min():.3g}")
        ours_greedy = _greedy_after_prefill(exe, ids, ours[-1], NEW_TOKENS)
        theirs_greedy = _torch_greedy(hf, ids, NEW_TOKENS)
        assert ours_greedy == theirs_greedy, (ids, ours_greedy, theirs_greedy)


@pytest.mark.xdist_group("smollm2")
def test_smollm2_matches_transformers(smollm2, smollm2_hf_model, smollm2_f32_exe):
    _check(smollm2, smollm2_hf_model, smollm2_f32_exe)


@pytest.mark.xdist_group("gemma3")
def test_gemma3_matches_transformers(gemma3, gemma3_hf_model):
    _check(gemma3, gemma3_hf_model, f32_executable(gemma3))
