"""A Flax NNX Llama written in the tests (flax_models.py) served through jaxrt.from_flax.

For hypothesis-drawn random transformers Llama configs (MHA/GQA/MQA, tied and untied
embeddings, default, linear and llama3 RoPE): the Flax model loads the transformers weights; the
imported, raised, cache-inserted @step's logits match transformers within
1e-4 x max|logit| at every prompt position (f32 on both sides, as test_parity_random.py),
and greedy output through `Engine` is token-identical to `model.generate` (a differing
token only at a top-2 tie below the tolerance). The layers-in-`lax.scan` variant imports
and matches too; a graph that is not a causal LM is refused with the reason.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxrt.compiler import Target
from jaxrt.jax_frontend import from_flax, import_forward, raise_module, flax_forward
from jaxrt.passes.insert_kv_cache import CacheInsertionError
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from tests.frontends.flax_gemma import FlaxGemma3, load_gemma3_weights
from tests.frontends.flax_models import FlaxLlama, ScanLlama, load_llama_weights
from tests.frontends.test_parity_random import (REL_TOL, common, examples, gemma3_cases,
                                                make_model, rope_params, seeds)

pytestmark = pytest.mark.xdist_group("parity")
NEW_TOKENS = 16
PAGE_SIZE = 4
CPU = Target("cpu", 1 << 30, "f32")


@st.composite
def llama_cases(draw):
    kw = draw(common())
    kw["rope_parameters"] = rope_params(draw, draw(st.sampled_from([1e4, 5e5])))
    return transformers.LlamaConfig(**kw), draw(st.integers(6, 16)), draw(seeds)


def serve(flax_model, prompt_len):
    pages = math.ceil((prompt_len + NEW_TOKENS) / PAGE_SIZE) + 2
    return from_flax(flax_model, max_model_len=pages * PAGE_SIZE, page_size=PAGE_SIZE,
                     num_pages=pages, target=CPU, outline_layers=False)


def step_logits(exe, prompt):
    """The served @step's logits at every prompt position (one prefill step)."""
    n = len(prompt)
    pos = np.arange(n, dtype=np.int32)
    return np.asarray(exe.run(prompt.astype(np.int32), pos, pos,
                              np.arange(exe.num_pages, dtype=np.int32)[None],
                              np.array([n], np.int32), pos[None], pos))


def check_logits(exe, hf, prompt):
    with torch.no_grad():
        want = hf(torch.tensor(prompt[None])).logits[0].numpy()
    got = step_logits(exe, prompt)
    scale = float(np.abs(want).max())
    err = np.abs(got - want).max()
    assert err <= REL_TOL * scale, f"max |diff| {err} vs scale {scale}"


def hf_greedy(hf, prompt):
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor(prompt[None])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), out.logits


def check_tokens(ours, want, logits):
    for i, (a, b) in enumerate(zip(ours, want)):
        if a != b:
            step = logits[i][0].numpy()
            top2 = np.sort(step)[-2:]
            assert top2[1] - top2[0] <= REL_TOL * float(np.abs(step).max()), (
                f"token {i}: ours {a}, transformers {b}; ours {ours}, transformers {want}")
            return
    assert len(ours) == len(want) == NEW_TOKENS


def greedy_matches(exe, hf, prompt):
    want, logits = hf_greedy(hf, prompt)
    engine = Engine(exe, max_num_seqs=4, warmup=False, log=None)
    out = engine.generate([prompt.tolist()], SamplingParams(max_tokens=NEW_TOKENS,
                                                             temperature=0.0,
                                                             ignore_eos=True))[0]
    check_tokens(list(out.ids), want, logits)


def check_flax_model(hf_config, prompt_len, seed, flax_class, load_weights):
    """Logits and greedy tokens of a Flax model loaded with a random transformers model's
    weights, imported and served, against that transformers model."""
    hf = make_model(hf_config, seed)
    flax_model = load_weights(flax_class(hf_config, rngs=nnx.Rngs(0)), hf)
    exe = serve(flax_model, prompt_len)
    prompt = np.random.default_rng(seed).integers(0, hf_config.vocab_size, prompt_len)
    check_logits(exe, hf, prompt)
    greedy_matches(exe, hf, prompt)


@examples(4)
@given(llama_cases())
def test_flax_llama_matches_transformers(case):
    check_flax_model(*case, FlaxLlama, load_llama_weights)


@examples(2)
@given(gemma3_cases())
def test_flax_gemma3_matches_transformers(case):
    # sliding and global layers with their RoPE bases, QK-norm, (1 + w) norms, GeGLU,
    # scaled embeddings, final soft-cap: raised to llm.* ops and served with the cache
    check_flax_model(*case, FlaxGemma3, load_gemma3_weights)


def test_flax_gemma_attention_softcap_matches_the_model():
    # transformers' Gemma3 never soft-caps attention scores (Gemma 2 did), so the raised
    # soft-cap is checked against the Flax model itself, the function that was imported
    cfg = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e2}},
        final_logit_softcapping=8.0, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True)
    flax_model = load_gemma3_weights(
        FlaxGemma3(cfg, rngs=nnx.Rngs(0), attn_softcap=2.0), make_model(cfg, 5))
    exe = serve(flax_model, 10)
    attn = [op for op in exe.module.functions["step"].ops
            if op.opdef.name == "llm.paged_attention"]
    assert [(op.attrs.window, op.attrs.softcap) for op in attn] == [(3, 2.0), (None, 2.0)]
    prompt = np.arange(3, 13)
    want = np.asarray(flax_model(prompt))
    got = step_logits(exe, prompt)
    assert np.abs(got - want).max() <= REL_TOL * float(np.abs(want).max())


def _tiny(layers=2, tied=True):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = make_model(cfg, 3)
    return cfg, hf, load_llama_weights(FlaxLlama(cfg, rngs=nnx.Rngs(0)), hf)


def test_scan_layers_import_and_match():
    cfg, hf, flat = _tiny(layers=3, tied=False)
    exe = serve(ScanLlama(flat), 9)
    check_logits(exe, hf, np.arange(2, 11))


def test_batched_equals_alone_for_an_imported_model():
    cfg, hf, flat = _tiny()
    exe = serve(flat, 12)
    engine = Engine(exe, max_num_seqs=4, warmup=False, log=None, max_model_len=28)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 9, 12)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    together = [o.ids for o in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].ids for p in prompts]
    assert together == alone


def test_raised_forward_has_the_builder_ops():
    cfg, hf, flat = _tiny()
    imported = import_forward(*flax_forward(flat))
    raise_module(imported.module)
    names = [op.opdef.name for op in imported.module.functions["step"].ops]
    for name, count in (("llm.embedding", 1), ("llm.rms_norm", 5), ("llm.rope", 4),
                        ("kv.update", 2), ("llm.paged_attention", 2), ("llm.swiglu", 2),
                        ("llm.linear", 14), ("llm.logits", 1)):
        assert names.count(name) == count, (name, names.count(name))
    for prim in ("dot_general", "exp", "reduce_sum", "iota", "select"):
        assert prim not in names
    assert imported.module.attributes["raise_misses"] == {}


class Bidirectional(nnx.Module):
    """An encoder: attention without a causal mask."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(50, 16, rngs=rngs)
        self.q = nnx.Linear(16, 16, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(16, 50, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        q = self.q(x).reshape(-1, 2, 8)
        p = jax_softmax(jnp.einsum("thd,shd->hts", q, q) * 0.3)
        return self.out(jnp.einsum("hts,shd->thd", p, q).reshape(-1, 16))


def jax_softmax(x):
    import jax
    return jax.nn.softmax(x, axis=-1)


def test_bidirectional_attention_is_refused_with_the_reason():
    with pytest.raises(CacheInsertionError, match="no causal attention was raised.*attention: scores are "
                                                  "not masked"):
        from_flax(Bidirectional(nnx.Rngs(0)), max_model_len=16, page_size=4, num_pages=4,
                  target=CPU)
