"""bind_dims and set_float_dtype (jaxrt.ir.substitute) on built step modules."""
from __future__ import annotations

import pytest

from jaxrt.frontends.build import build_module
from jaxrt.frontends.config import ModelConfig
from jaxrt.ir import DType, ops, verify
from jaxrt.ir.substitute import bind_dims, set_float_dtype

CONFIG = ModelConfig(arch="gemma3", vocab_size=50, hidden_size=16, intermediate_size=24,
                     num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, max_position=64,
                     layer_types=("sliding", "full"), sliding_window=4, rope_local_theta=1e4,
                     query_pre_attn_scalar=8.0, tie_embeddings=True, hidden_act="gelu_tanh")


def all_types(module):
    fn = module.functions["step"]
    yield from (a.type for a in fn.args)
    for op in fn.ops:
        yield from (r.type for r in op.results)


def test_bind_dims_replaces_named_dims_everywhere():
    module = build_module(CONFIG)
    before = str(module)
    bound = bind_dims(module, {"pages": 6, "page_size": 4, "T": 5})
    verify(bound)
    assert str(module) == before, "the input module must not change"
    assert bound.functions["step"].arg("kv").type.shape == (2, 2, 6, 4, 1, 8)
    dims = {d for t in all_types(bound) for d in t.shape if isinstance(d, str)}
    assert dims == {"S", "MP", "Q", "N"}
    reshapes = [op for op in bound.functions["step"].ops if op.opdef is ops.reshape]
    assert reshapes and all(op.attrs.shape[0] == 5 for op in reshapes)
    assert bound.attributes == module.attributes


def test_bind_dims_rejects_bad_sizes():
    module = build_module(CONFIG)
    for bad in (-1, "4", True, 2.0):
        with pytest.raises(ValueError):
            bind_dims(module, {"pages": bad})


def test_set_float_dtype_keeps_logits_f32():
    bound = bind_dims(build_module(CONFIG), {"pages": 4, "page_size": 4})
    half = set_float_dtype(bound, DType.bf16)
    verify(half)
    # Functions read bf16 weights, each defined as a cast of the f32 source data; the
    # source entries stay f32 (that is what the file holds) and nothing else is declared.
    read = {op.attrs.name for op in half.functions["step"].ops if op.opdef is ops.weight}
    assert read and {half.weights[n].dtype for n in read} == {DType.bf16}
    for n in read:
        d = half.weight_defs[n]
        assert d.op == "cast" and half.weights[d.sources[0]] == bound.weights[d.sources[0]]
    assert set(half.weights) == read | {half.weight_defs[n].sources[0] for n in read}
    assert bound.weight_defs == {}  # the input module is untouched
    fn = half.functions["step"]
    assert fn.results[0].type.dtype == DType.f32  # llm.logits
    assert fn.results[1].type.dtype == DType.bf16  # the cache follows the compute dtype
    assert half.attributes["float_dtype"] == "bf16"
    floats = {t.dtype for t in all_types(half) if t.dtype.is_float}
    assert floats == {DType.bf16, DType.f32}
    consts = [op for op in fn.ops if op.opdef is ops.constant]
    assert consts and all(op.results[0].dtype == DType.bf16 for op in consts)


def test_keep_f32_cache_and_weight():
    bound = bind_dims(build_module(CONFIG), {"pages": 4, "page_size": 4})
    kept = set_float_dtype(bound, DType.bf16, keep_f32=("kv", "model.norm.weight"))
    verify(kept)
    fn = kept.functions["step"]
    assert fn.arg("kv").type.dtype == DType.f32
    assert fn.results[1].type.dtype == DType.f32  # kv.update accepts bf16 k/v
    assert kept.weights["model.norm.weight"].dtype == DType.f32
    converts = [op for op in fn.ops if op.opdef is ops.convert]
    assert len(converts) == 1 and converts[0].operands[0].owner.attrs.name == \
        "model.norm.weight"


def test_set_float_dtype_rejects_int():
    with pytest.raises(ValueError):
        set_float_dtype(build_module(CONFIG), DType.int32)
