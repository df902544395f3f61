"""Tensor/data parallelism on 8 fake CPU devices; run by test_tensor_parallel.py in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set
before JAX starts, so these cannot share the main pytest process). Not collected on its
own (the file name does not start with test_).
"""
from __future__ import annotations

import collections
import functools
import re
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxrt.compiler import Target, compile_loaded
from jaxrt.frontends.config import ModelConfig
from jaxrt.frontends.loaded import expected_weight_shapes
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams

PAGE_SIZE, NUM_PAGES = 4, 32
LLAMA = ModelConfig(arch="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8, max_position=64)
QWEN2 = ModelConfig(arch="llama", model_type="qwen2", vocab_size=96, hidden_size=32,
                    intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, max_position=64, qkv_bias=True, rope_theta=1e6)
GEMMA3 = ModelConfig(arch="gemma3", vocab_size=88, hidden_size=32, intermediate_size=40,
                     num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position=64, layer_types=("sliding", "full", "sliding"),
                     sliding_window=3, rope_local_theta=100.0, rope_theta=1e4,
                     query_pre_attn_scalar=24.0, attn_logit_softcap=2.0,
                     final_logit_softcap=8.0, tie_embeddings=True, hidden_act="gelu_tanh")
# (config, outline layers, [(tp, dp)]): each GQA config has a tp above its KV heads
# (replicated KV heads: llama 2 x 4, qwen2 2 x 2), and one runs on a dp x tp mesh.
CASES = {"llama": (LLAMA, False, [(8, 1), (2, 2)]),
         "qwen2": (QWEN2, True, [(4, 1)]),
         "gemma3": (GEMMA3, False, [(2, 1)])}
PROMPT, NEW_TOKENS = [5, 9, 2, 7], 5


def _weights(cfg: ModelConfig, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * (0.3 if len(s) > 1 else 0.1) + (len(s) == 1))
            .astype(np.float32) for n, s in expected_weight_shapes(cfg).items()}


@functools.cache
def executable(cfg: ModelConfig, *, tp: int = 1, dp: int = 1, outline: bool = False):
    """One executable per (config, mesh), shared by the tests (compiling dominates)."""
    loaded = SimpleNamespace(config=cfg, weights=_weights(cfg), tokenizer=None,
                             chat_template=None, source="random")
    model = compile_loaded(loaded, target=Target("cpu", 1 << 30, "f32"),
                           page_size=PAGE_SIZE, num_pages=NUM_PAGES, outline_layers=outline,
                           tensor_parallel=tp, data_parallel=dp)
    return model.executable()


def test_eight_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_equals_single_device(name):
    cfg, outline, meshes = CASES[name]
    want = greedy(executable(cfg, outline=outline), PROMPT, NEW_TOKENS)
    for tp, dp in meshes:
        exe = executable(cfg, tp=tp, dp=dp, outline=outline)
        assert exe.mesh is not None and exe.mesh.size == tp * dp
        assert greedy(exe, PROMPT, NEW_TOKENS) == want, (name, tp, dp)


def test_logits_match_and_cache_is_split():
    base, exe = executable(LLAMA), executable(LLAMA, tp=8)  # 2 KV heads, 4 copies each
    args = _prefill_args(PROMPT)
    want, got = np.asarray(base.run(*args)), np.asarray(exe.run(*args))
    # f32 throughout; the split sums the o/down/head products in another order
    # (partial sums + all-reduce): a few ulps of the largest terms, hence 1e-5 x max|logit|.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    kv = exe.kv_cache
    assert kv.shape[4] == 8 and {s.data.shape[4] for s in kv.addressable_shards} == {1}


def greedy(exe, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens, the prompt fed one token per step too: every call is the same
    one-token bucket (one compile per executable; prefill buckets are covered by the
    logits and engine tests). The sequence lives in pages 0, 1, ..."""
    table = np.arange(exe.num_pages, dtype=np.int32)[None]
    out, token = [], prompt[0]
    for pos in range(len(prompt) + new_tokens - 1):
        logits = exe.run(np.array([token], np.int32), np.array([pos], np.int32),
                         np.array([pos], np.int32), table, np.array([pos + 1], np.int32),
                         np.zeros((1, 1), np.int32), np.zeros(1, np.int32))
        if pos + 1 < len(prompt):
            token = prompt[pos + 1]
        else:
            token = int(np.argmax(np.asarray(logits)[0]))
            out.append(token)
    return out


def _prefill_args(prompt):
    n = len(prompt)
    return (np.array(prompt, np.int32), np.arange(n, dtype=np.int32),
            np.arange(n, dtype=np.int32), np.arange(8, dtype=np.int32)[None],
            np.array([n], np.int32), np.arange(n, dtype=np.int32)[None],
            np.arange(n, dtype=np.int32))


def collectives(compiled_program) -> collections.Counter:
    text = compiled_program.as_text()
    return collections.Counter(re.findall(
        r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
        r"|collective-broadcast)(?:-start)?\(", text))


def test_collectives_per_decode_step():
    """Megatron: one all-reduce after o and one after down per layer, one after the
    vocabulary-parallel embedding (each device looks up its rows, zeros the others), and
    one all-gather of the logits; nothing in attention or the sampler."""
    exe = executable(LLAMA, tp=8)
    layers = LLAMA.num_layers
    exe.compile_for(1, 1, 1, NUM_PAGES, 1)  # a decode step sampled on the device (the
    exe.compile_decode(2, NUM_PAGES, 2)     # greedy tests' bucket); the decode loop
    for key in (("step", 1, 1, 1, NUM_PAGES, 1), ("decode", 2, NUM_PAGES, 2)):
        got = collectives(exe._programs._compiled[key])
        assert got == {"all-reduce": 2 * layers + 1, "all-gather": 1}, (key, got)


def test_sharded_engine_batched_equals_alone():
    exe = executable(QWEN2, tp=4, outline=True)
    engine = Engine(exe, eos_token_ids=(), max_num_seqs=2, warmup=False)
    prompts = [PROMPT, [7, 7, 1, 3]]
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    batched = [o.ids for o in engine.generate(prompts, greedy)]
    alone = [engine.generate([p], greedy)[0].ids for p in prompts]
    assert batched == alone and all(len(ids) == 3 for ids in batched)


def test_smollm2_tp3_greedy_equals_single_device():
    """The real SmolLM2-135M: 9 heads and 3 KV heads allow tp = 3 only (of 2..8; the
    vocabulary, 49,152, also divides by 3)."""
    import dataclasses

    from jaxrt.frontends.sources import load_model
    loaded = load_model("smollm2-135m")
    loaded = dataclasses.replace(loaded, weights=dict(loaded.weights))  # dequantize once
    prompt = loaded.tokenizer.encode("The capital of France is")
    runs = []
    for tp in (1, 3):
        model = compile_loaded(loaded, target=Target("cpu", 2 << 30, "f32"), page_size=16,
                               num_pages=4, max_model_len=64, outline_layers=True,
                               tensor_parallel=tp)
        runs.append(greedy(model.executable(), prompt, 6))
    assert runs[0] == runs[1]
