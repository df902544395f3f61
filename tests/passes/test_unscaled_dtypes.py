"""cast-float and plan-kv-cache refuse dtypes that need scales (int, fp8): a plain cast to
them silently gives wrong tokens. Allowed: f32, bf16, f16 (and plan-kv-cache's auto)."""
from __future__ import annotations

import pytest

from jaxrt.frontends.build import build_module
from jaxrt.frontends.config import ModelConfig
from jaxrt.passes import PassManager, PipelineError, parse_pipeline
from jaxrt.passes.plan_kv_cache import KVPlanError

SCALED = ["i8", "i32", "f8e4m3fn", "f8e5m2"]
PLAIN = ["f32", "bf16", "f16"]


@pytest.mark.parametrize("dtype", SCALED)
def test_plan_kv_cache_refuses_scaled_dtypes_at_parse(dtype):
    with pytest.raises(PipelineError, match=rf"dtype {dtype} needs a scaled \(quantized\) "
                                            rf"cache; run quantize-kv-cache\{{dtype=int8\|fp8\}} "
                                            rf"before plan-kv-cache"):
        parse_pipeline(f"plan-kv-cache{{dtype={dtype}}}")


@pytest.mark.parametrize("dtype", SCALED)
def test_cast_float_refuses_scaled_dtypes_at_parse(dtype):
    with pytest.raises(PipelineError, match=rf"dtype {dtype} needs scaled \(quantized\) "
                                            rf"weights and activations; use the quantize "
                                            rf"pass \(quantize\{{mode=int8-weight"):
        parse_pipeline(f"cast-float{{dtype={dtype}}}")


@pytest.mark.parametrize("dtype", PLAIN)
def test_plain_float_dtypes_are_accepted(dtype):  # near misses of the refusals above
    assert parse_pipeline(f"plan-kv-cache{{dtype={dtype}}}")[0].dtype == dtype
    assert parse_pipeline(f"cast-float{{dtype={dtype}}}")[0].dtype == dtype
    assert parse_pipeline("plan-kv-cache{dtype=auto}")[0].dtype == "auto"


@pytest.mark.parametrize("text,message", [("i1", "dtype i1 is not a number type"),
                                          ("int8", "unknown dtype 'int8'"),
                                          ("F32", "unknown dtype 'F32'"),
                                          ("auto", "unknown dtype 'auto'")])
def test_other_spellings_are_refused_with_their_reason(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(f"cast-float{{dtype={text}}}")


def _tiny():
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, max_position=64)
    m = build_module(cfg)
    m.attributes["config"] = cfg.to_dict()
    return m


def test_auto_cache_dtype_refuses_a_scaled_module_dtype_at_run():
    m = _tiny()
    m.attributes["float_dtype"] = "f8e4m3fn"  # as a (future) fp8 cast would record it
    with pytest.raises(KVPlanError, match="plan-kv-cache: dtype f8e4m3fn needs a scaled"):
        PassManager("plan-kv-cache{memory-gib=1}").run(m)


def test_auto_cache_dtype_follows_a_plain_module_dtype():
    m = _tiny()
    PassManager("cast-float{dtype=f16},plan-kv-cache{memory-gib=1}").run(m)
    assert m.attributes["kv_cache"]["dtype"] == "f16"
