"""The shard pass: golden IR (Megatron roles; KV heads replicated past their count),
near misses that must stay replicated, divisibility errors naming the numbers, the text
round-trip and per-device KV planning. Runs on this process's single CPU device; the
multi-device lowering is tested in tests/lowering/mesh_cases.py."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrt.compiler import Target, default_pipeline
from jaxrt.errors import SettingError
from jaxrt.frontends.build import build_module
from jaxrt.frontends.builder import DecoderBuilder, layer_prefix
from jaxrt.frontends.config import ModelConfig
from jaxrt.ir import verify
from jaxrt.ir.opdef import VerifyError
from jaxrt.ir.parser import ParseError, parse
from jaxrt.ir.printer import print_module
from jaxrt.ir.sharding import ShardSpec
from jaxrt.ir.weights import WeightDef, materialize
from jaxrt.passes.manager import PassManager, VerifyHook

from tests.passes.passes_testutil import assert_golden


def config(**overrides) -> ModelConfig:
    base = dict(arch="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, max_position=32)
    return ModelConfig(**{**base, **overrides})


def sharded(cfg: ModelConfig, pipeline: str):
    m = build_module(cfg)
    PassManager(pipeline, [VerifyHook()]).run(m)
    return m


def test_golden_tp2_megatron_roles():
    """q/k/v, gate/up split by output rows, o/down by input columns, embedding and head by
    vocabulary rows, norms replicated; the cache split by KV heads."""
    m = sharded(config(num_layers=1, qkv_bias=True), "canonicalize,cse,dce,shard{tp=2}")
    assert_golden("llama_1layer_shard_tp2.ir", print_module(m))


def test_golden_outlined_kv_heads_replicated():
    """tp=4 over 2 KV heads after outline-layers: stacked k/v become repeat definitions
    (each head twice), split on their non-leading dims; the cache has 4 KV heads."""
    m = sharded(config(tie_embeddings=True),
                "canonicalize,cse,dce,outline-layers,shard{tp=4}")
    assert_golden("llama_outlined_shard_tp4.ir", print_module(m))
    kv = m.functions["step"].arg("kv").type
    assert kv.shape[4] == 4 and m.attributes["shard"]["kv_replicas"] == 2


def test_near_miss_linear_in_no_role_stays_replicated():
    """A projection on the residual stream that feeds neither attention nor a gated MLP
    is not split (splitting it would need a collective the pass does not plan)."""
    cfg = config(num_layers=1)
    d = DecoderBuilder(cfg)
    x = d.embed()
    p = layer_prefix(0)
    x = d.add(x, d.attention(0, d.rms_norm(x, p + "input_layernorm.weight")))
    x = d.add(x, d.linear(x, "extra", cfg.hidden_size, cfg.hidden_size))
    m = d.finish(x)
    PassManager("shard{tp=2}", [VerifyHook()]).run(m)
    assert "extra.weight" not in m.shardings
    assert m.shardings["model.layers.0.self_attn.q_proj.weight"] == ShardSpec(("tp", None))
    assert m.shardings["model.layers.0.self_attn.o_proj.weight"] == ShardSpec((None, "tp"))


@pytest.mark.parametrize("overrides, tp, message", [
    (dict(num_heads=4, num_kv_heads=2), 3, "4 attention heads are not divisible by tp=3"),
    (dict(num_heads=6, num_kv_heads=2, head_dim=4), 3,
     "2 KV heads neither divide by tp=3 nor divide it"),
    (dict(num_heads=4, num_kv_heads=4, intermediate_size=30), 4,
     "intermediate size 30 is not divisible by tp=4"),
    (dict(vocab_size=66), 4, "vocabulary 66 is not divisible by tp=4"),
])
def test_indivisible_counts_are_refused(overrides, tp, message):
    with pytest.raises(SettingError, match=message) as e:
        sharded(config(**overrides), f"shard{{tp={tp}}}")
    assert "\n" not in str(e.value)


def test_verifier_checks_printed_shardings():
    text = print_module(sharded(config(num_layers=1), "shard{tp=2}"))
    bad = text.replace("shard = {heads = 4,", "shard = {heads = 3,", 1)
    assert bad != text
    with pytest.raises(VerifyError, match="heads = 3 is not divisible by tp = 2"):
        verify(parse(bad))
    # q_proj is [16, 16]: its rows do not split over a tp of 32
    odd = text.replace("mesh = {dp = 1, tp = 2}", "mesh = {dp = 1, tp = 32}") \
        .replace("shard = {", "shard_was = {")
    with pytest.raises(VerifyError, match=r"q_proj.weight: dim 0 of f32\[16, 16\] \(16\) "
                                          r"is not divisible by tp=32"):
        verify(parse(odd))
    with pytest.raises(ParseError, match="mesh axis name or _"):
        parse(text.replace("sharded [tp, _]", "sharded [2, _]", 1))
    with pytest.raises(VerifyError, match="names axis 'pp'"):
        verify(parse(text.replace("sharded [tp, _]", "sharded [pp, _]", 1)))


@settings(max_examples=8, deadline=None)
@given(tp=st.sampled_from([1, 2, 4]), dp=st.sampled_from([1, 2]), outline=st.booleans(),
       kv_heads=st.sampled_from([1, 2, 4]), bias=st.booleans())
def test_round_trip(tp, dp, outline, kv_heads, bias):
    pipe = "canonicalize,cse,dce" + (",outline-layers" if outline else "") + \
        f",shard{{tp={tp} dp={dp}}}"
    m = sharded(config(num_kv_heads=kv_heads, qkv_bias=bias), pipe)
    back = parse(print_module(m))
    verify(back)
    assert back == m and print_module(back) == print_module(m)
    assert m.attributes["mesh"] == {"dp": dp, "tp": tp}
    assert m.functions["step"].arg("kv").type.shape[4] == max(kv_heads, tp)


def test_repeat_definition_copies_heads_in_place():
    m = sharded(config(num_layers=1, num_kv_heads=1), "shard{tp=2}")
    name = "model.layers.0.self_attn.k_proj.weight"
    assert m.weight_defs[name + ".rep2"] == WeightDef(
        "repeat", (name,), (("axis", 0), ("block", 4), ("times", 2)))
    k = np.arange(4 * 16, dtype=np.float32).reshape(4, 16)  # one head of 4 rows
    rng = np.random.default_rng(0)
    src = {n: rng.standard_normal(t.shape).astype(np.float32)
           for n, t in m.weights.items() if n not in m.weight_defs}
    src[name] = k
    out = materialize(m, src, [name + ".rep2"])
    np.testing.assert_array_equal(out[name + ".rep2"], np.concatenate([k, k]))


def test_plan_is_per_device():
    plan = "plan-kv-cache{page-size=4 memory-gib=1 max-model-len=32 max-num-seqs=4}"
    whole = sharded(config(), "canonicalize,cse,dce," + plan).attributes["kv_cache"]
    split = sharded(config(), "canonicalize,cse,dce,shard{tp=2}," + plan) \
        .attributes["kv_cache"]
    assert split["bytes_per_token"] == whole["bytes_per_token"]
    assert split["device_bytes_per_token"] * 2 == whole["bytes_per_token"]
    assert split["budget"]["weight_bytes"] < whole["budget"]["weight_bytes"]
    assert split["budget"]["per_device"] is True


def test_tp1_pipeline_is_unchanged():
    target = Target("cpu", 1 << 30, "f32")
    assert default_pipeline(target) == default_pipeline(target, tensor_parallel=1)
    assert "shard" not in default_pipeline(target)
    assert "shard{tp=2 dp=1}" in default_pipeline(target, tensor_parallel=2)


def test_too_few_devices_is_a_setting_error():
    from jaxrt.lowering.mesh import StepMesh
    m = sharded(config(), "shard{tp=2}")
    with pytest.raises(SettingError, match="sharded over 2 devices"):
        StepMesh.of(m)  # this process has one CPU device


def test_inspect_reports_per_device_bytes(tmp_path, capsys):
    from jaxrt.cli.main import main
    m = sharded(config(), "canonicalize,cse,dce,shard{tp=2},plan-kv-cache{page-size=4 "
                          "memory-gib=1 max-model-len=32 max-num-seqs=2}")
    path = tmp_path / "m.jxr"
    path.write_text(print_module(m))
    assert main(["inspect", str(path), "--format", "json"]) == 0
    import json
    sh = json.loads(capsys.readouterr().out)["sharding"]
    whole = sum(t.nbytes() for n, t in m.weights.items() if n not in m.weight_defs)
    norms = 5 * 16 * 4  # 2 x 2 layer norms and the final norm, f32[16], replicated
    assert sh["device_weight_bytes"] == (whole - norms) // 2 + norms
    assert sh["device_kv_heads"] == 1 and sh["mesh"] == {"dp": 1, "tp": 2}
    plan = m.attributes["kv_cache"]
    assert sh["device_kv_cache_bytes"] == plan["cache_bytes"] // 2
    assert main(["inspect", str(path)]) == 0
    assert "per device: weights" in capsys.readouterr().out


def test_engine_kv_budget_is_per_device():
    from jaxrt.engine_format import check_kv_budget
    from jaxrt.errors import ResourceLimitError
    plan = "plan-kv-cache{page-size=4 memory-gib=1 max-model-len=32 max-num-seqs=2 num-pages=16}"
    m = sharded(config(), "shard{tp=2}," + plan)
    whole = m.functions["step"].arg("kv").type.nbytes()
    check_kv_budget(m, "m.jxr", whole // 2)   # one device holds half the KV heads
    with pytest.raises(ResourceLimitError, match="needs"):
        check_kv_budget(m, "m.jxr", whole // 2 - 1)
