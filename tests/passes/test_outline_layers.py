"""outline-layers: the repeated layers of a decoder become one scan over stacked weights.

Soundness is checked with the numpy reference interpreter: the outlined module computes
bit-for-bit what the unrolled one computes (the same reference ops run on the same data
in the same order; only the weights arrive through a stack and a slice), for random
Llama-family and Gemma 3 configs, including layer counts that are not a whole number of
Gemma's sliding/global periods. Lowered XLA parity is in tests/lowering/test_scan.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrt.frontends.build import build_module
from jaxrt.frontends.hf_config import config_from_hf_dict
from jaxrt.frontends.loaded import expected_weight_shapes
from jaxrt.ir import interpreter, ops, verify
from jaxrt.ir.parser import parse
from jaxrt.ir.substitute import bind_dims
from jaxrt.passes import PassManager
from jaxrt.passes.manager import VerifyHook
from jaxrt.passes.outline_layers import stacked_name

PAGE, PAGES = 4, 8


def tiny_config(model_type: str, layers: int, layer_types=None, **extra):
    d = {"model_type": model_type, "vocab_size": 32, "hidden_size": 16,
         "intermediate_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
         "hidden_act": "silu", **extra}
    if model_type == "gemma3_text":
        d.update(hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=8, sliding_window=3,
                 rope_local_base_freq=10.0, layer_types=layer_types,
                 final_logit_softcapping=None, attn_logit_softcapping=None)
    return config_from_hf_dict(d)


def pipelines(config, outline: bool):
    module = build_module(config)
    passes = "canonicalize,cse,dce" + (",outline-layers" if outline else "")
    PassManager(passes, [VerifyHook()]).run(module)
    return module


def random_weights(config, seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * (0.3 if len(s) > 1 else 0.1) + (len(s) == 1))
            .astype(np.float32) for n, s in expected_weight_shapes(config).items()}


def step_inputs(config, n: int, seed=0):
    """One sequence prefilling n tokens, logits at every position; a zero cache."""
    rng = np.random.default_rng(seed)
    i32 = np.int32
    pos = np.arange(n, dtype=i32)
    kv = np.zeros((config.num_layers, 2, PAGES, PAGE, config.num_kv_heads, config.head_dim),
                  np.float32)
    return [rng.integers(0, config.vocab_size, n).astype(i32), pos, pos,
            np.arange(PAGES, dtype=i32)[None], np.asarray([n], i32), pos[None], pos, kv]


def run(module, config, inputs, weights):
    bound = bind_dims(module, {"pages": PAGES, "page_size": PAGE})
    return interpreter.run(bound, "step", inputs, weights)


def scans(module):
    return [op for op in module.functions["step"].ops if op.opdef is ops.scan]


llama_like = st.builds(
    lambda t, layers: tiny_config(t, layers, **({"sliding_window": 3} if t == "mistral"
                                                 else {})),
    st.sampled_from(["llama", "mistral", "qwen2"]), st.integers(1, 5))


@st.composite
def gemma_configs(draw):
    period = draw(st.integers(2, 4))  # (period - 1) sliding layers, then one global
    layers = draw(st.integers(1, 3 * period + 2))
    types = [("full_attention" if (i + 1) % period == 0 else "sliding_attention")
             for i in range(layers)]
    return tiny_config("gemma3_text", layers, types)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(llama_like, gemma_configs()), st.integers(1, 7))
def test_outlined_module_computes_exactly_what_the_unrolled_one_does(config, n):
    unrolled = pipelines(config, outline=False)
    outlined = pipelines(config, outline=True)
    verify(outlined)
    assert parse(str(outlined)) == outlined  # the scan and its body round-trip
    loops = scans(outlined)
    assert len(loops) <= 1
    if config.num_layers >= 2 and len(set(config.layer_types)) == 1:
        (loop,) = loops  # identical layers: all of them in one scan
        assert loop.attrs.length == config.num_layers
    weights = random_weights(config)
    inputs = step_inputs(config, n)
    want = run(unrolled, config, inputs, weights)
    got = run(outlined, config, inputs, weights)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_llama_layers_become_one_scan_with_stacked_weights():
    config = tiny_config("llama", 4)
    m = pipelines(config, outline=True)
    (loop,) = scans(m)
    assert (loop.attrs.length, loop.attrs.carried) == (4, 2)
    body = m.functions[loop.attrs.body]
    assert [a.hint for a in body.args[:3]] == ["i", "c0", "kv"]
    stacked = {n: d for n, d in m.weight_defs.items() if d.op == "stack"}
    name = "model.layers.0:4.self_attn.q_proj.weight"
    assert stacked[name].sources == tuple(f"model.layers.{i}.self_attn.q_proj.weight"
                                          for i in range(4))
    assert m.weights[name].shape == (4, 32, 16)
    assert len(stacked) == 9  # 2 norms + q, k, v, o + gate, up, down
    # the step itself keeps only the embedding, the scan and the head
    names = [op.opdef.name for op in m.functions["step"].ops]
    assert "llm.paged_attention" not in names and names.count("scan") == 1
    # per-layer ops read the layer from the iteration: layer attr 0 plus base i
    kv_ops = [op for op in body.ops if op.opdef in (ops.kv_update, ops.paged_attention)]
    assert kv_ops and all(op.attrs.layer == 0 and op.operands[-1] is body.args[0]
                          for op in kv_ops)


def test_gemma_groups_sliding_and_global_layers_into_one_period():
    types = (["sliding_attention"] * 2 + ["full_attention"]) * 3 + ["sliding_attention"]
    m = pipelines(tiny_config("gemma3_text", 10, types), outline=True)
    (loop,) = scans(m)
    assert loop.attrs.length == 3  # three periods of three layers; layer 9 unrolled
    body = m.functions[loop.attrs.body]
    windows = [op.attrs.window for op in body.ops if op.opdef is ops.paged_attention]
    assert windows == [3, 3, None]
    layers = [op.attrs.layer for op in body.ops if op.opdef is ops.kv_update]
    assert layers == [0, 1, 2]  # plus base = i * 3
    assert any(op.opdef is ops.mul for op in body.ops)
    step_layers = [op.attrs.layer for op in m.functions["step"].ops
                   if op.opdef is ops.kv_update]
    assert step_layers == [9]
    assert "model.layers.1:10:3.mlp.up_proj.weight" in m.weight_defs


def test_nothing_repeats_nothing_changes():
    for config in (tiny_config("llama", 1),
                   tiny_config("gemma3_text", 2, ["sliding_attention", "full_attention"])):
        before = str(pipelines(config, outline=False))
        after = pipelines(config, outline=True)
        assert not scans(after) and str(after) == before


def test_outlining_twice_is_a_no_op():
    m = pipelines(tiny_config("llama", 3), outline=True)
    text = str(m)
    PassManager("outline-layers", [VerifyHook()]).run(m)
    assert str(m) == text


def test_stacked_names():
    names = [f"model.layers.{i}.mlp.w" for i in (1, 4, 7)]
    assert stacked_name(names, {}) == "model.layers.1:10:3.mlp.w"
    assert stacked_name(["a.0.x", "a.1.x"], {"a.0:2.x": 1}) == "a.0:2.x.s"
    assert stacked_name(["foo", "bar"], {}) == "stack.foo"
    assert stacked_name(["l.0.a.0", "l.1.a.1"], {}) == "stack.l.0.a.0"  # two fields differ


@pytest.mark.parametrize("options", ["outline-layers{max-carried=0}",
                                     "outline-layers{min-repeats=1}"])
def test_bad_options_are_refused(options):
    from jaxrt.passes import PipelineError
    with pytest.raises((PipelineError, ValueError)):
        PassManager(options)
