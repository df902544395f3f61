"""plan-kv-cache: page size option, budget arithmetic, recorded plan, and clear failures."""
from __future__ import annotations

import math

import pytest

from jaxrt.ir.weights import resident_weights

from jaxrt.frontends.build import build_module
from jaxrt.frontends.config import ModelConfig
from jaxrt.ir import DType, verify
from jaxrt.ir.analysis.summary import format_summary, module_summary
from jaxrt.passes import PassManager, PipelineError, parse_pipeline
from jaxrt.passes.plan_kv_cache import KVPlanError

GIB = 1 << 30


def tiny_module(layers=2, kv_heads=2, head_dim=16, max_position=256):
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=layers, num_heads=4, num_kv_heads=kv_heads,
                      head_dim=head_dim, max_position=max_position)
    m = build_module(cfg)
    m.attributes["config"] = cfg.to_dict()
    return m


def plan(module, pipeline):
    PassManager(pipeline).run(module)
    verify(module)
    return module.attributes["kv_cache"]


def test_plan_sizes_pages_from_the_budget():
    m = tiny_module()
    weight_bytes = sum(t.nbytes() for t in m.weights.values())
    p = plan(m, "plan-kv-cache{page-size=32 memory-gib=0.05 memory-fraction=0.5 "
                "max-num-seqs=1000}")
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * f32
    assert p["bytes_per_token"] == bytes_per_token
    budget = p["budget"]
    free = 0.05 * GIB * 0.5 - weight_bytes - budget["activation_bytes"]
    assert budget["weight_bytes"] == weight_bytes and budget["activation_bytes"] > 0
    assert p["num_pages"] == int(free // (32 * bytes_per_token))
    assert p["max_concurrent_tokens"] == p["num_pages"] * 32
    kv = m.functions["step"].arg("kv").type
    assert kv.shape == (2, 2, p["num_pages"], 32, 2, 16) and kv.dtype == DType.f32


def test_pages_are_capped_by_max_num_seqs():
    m = tiny_module(max_position=256)
    p = plan(m, "plan-kv-cache{page-size=16 memory-gib=4 max-num-seqs=3}")
    assert p["num_pages"] == 3 * math.ceil(256 / 16)


def test_cache_dtype_option_and_inspect():
    m = tiny_module()
    p = plan(m, "plan-kv-cache{page-size=16 dtype=bf16 num-pages=40}")
    assert p["dtype"] == "bf16" and p["num_pages"] == 40
    assert m.functions["step"].arg("kv").type.dtype == DType.bf16
    text = format_summary(module_summary(m))
    assert "kv cache: paged, page size 16, 40 pages, bf16" in text
    assert "max concurrent tokens 640" in text


def test_one_max_length_sequence_must_fit():
    m = tiny_module(max_position=4096)
    with pytest.raises(KVPlanError) as e:
        plan(m, "plan-kv-cache{page-size=16 memory-gib=0.0001}")
    msg = str(e.value)
    assert "one sequence of 4096 tokens needs 256 pages" in msg and "weights" in msg


@pytest.mark.parametrize("size", [1, 3, 48, 512])
def test_page_size_must_be_a_power_of_two_in_range(size):
    with pytest.raises(PipelineError, match="power of two"):
        parse_pipeline(f"plan-kv-cache{{page-size={size}}}")


@pytest.mark.parametrize("size", [2, 16, 256])
def test_valid_page_sizes(size):
    p = plan(tiny_module(), f"plan-kv-cache{{page-size={size} memory-gib=1}}")
    assert p["page_size"] == size


def test_unknown_memory_is_an_error_not_a_guess():
    with pytest.raises(KVPlanError, match="device memory is unknown"):
        plan(tiny_module(), "plan-kv-cache")


def test_target_attribute_supplies_device_memory():
    m = tiny_module()
    m.attributes["target"] = {"backend": "cpu", "device_memory_bytes": GIB}
    assert plan(m, "plan-kv-cache")["budget"]["device_bytes"] == GIB


def test_planning_twice_is_an_error():
    m = tiny_module()
    plan(m, "plan-kv-cache{memory-gib=1}")
    with pytest.raises(KVPlanError, match="already planned"):
        plan(m, "plan-kv-cache{memory-gib=1}")


def test_plan_after_cast_float_sizes_a_bf16_cache():
    m = tiny_module()
    p = plan(m, "cast-float{dtype=bf16},plan-kv-cache{memory-gib=1}")
    assert p["dtype"] == "bf16" and p["bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert all(m.weights[n].dtype == DType.bf16 for n in resident_weights(m))


# ---- the cache cap (max-cache-gib, target kv_cache_cap_bytes) -------------------------------

BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny_module: layers * (k, v) * kv_heads * head_dim * f32


def test_max_cache_gib_caps_the_pages_below_the_memory_budget():
    p = plan(tiny_module(), "plan-kv-cache{memory-gib=1 max-num-seqs=1000 max-cache-gib=0.01}")
    assert p["num_pages"] == int(0.01 * GIB // (16 * BYTES_PER_TOKEN))
    assert p["cache_bytes"] <= 0.01 * GIB and p["budget"]["cache_cap_bytes"] == int(0.01 * GIB)


def test_target_cap_applies_when_the_option_is_zero_and_the_option_overrides_it():
    m = tiny_module()
    m.attributes["target"] = {"backend": "cpu", "device_memory_bytes": 8 * GIB,
                              "kv_cache_cap_bytes": GIB // 100}
    assert plan(m, "plan-kv-cache{max-num-seqs=1000}")["num_pages"] == \
        GIB // 100 // (16 * BYTES_PER_TOKEN)
    m = tiny_module()
    m.attributes["target"] = {"backend": "cpu", "device_memory_bytes": 8 * GIB,
                              "kv_cache_cap_bytes": GIB // 100}
    assert plan(m, "plan-kv-cache{max-num-seqs=1000 max-cache-gib=0.02}")["num_pages"] == \
        int(0.02 * GIB // (16 * BYTES_PER_TOKEN))


def test_no_cap_near_miss_sizes_from_the_budget_alone():
    m = tiny_module()
    m.attributes["target"] = {"backend": "gpu", "device_memory_bytes": GIB // 10,
                              "kv_cache_cap_bytes": 0}
    p = plan(m, "plan-kv-cache{max-num-seqs=1000}")
    assert "cache_cap_bytes" not in p["budget"]
    assert p["num_pages"] == p["budget"]["cache_budget_bytes"] // (16 * BYTES_PER_TOKEN)


def test_a_cap_below_one_sequence_names_the_option():
    m = tiny_module(max_position=4096)  # 4096 tokens x 512 bytes = 2 MiB of cache
    with pytest.raises(KVPlanError) as e:
        plan(m, "plan-kv-cache{memory-gib=1 max-cache-gib=0.0019}")
    msg = str(e.value)
    assert "one sequence of 4096 tokens needs 256 pages" in msg
    assert "raise max-cache-gib (--kv-cache-max-gib)" in msg
    assert "lower max-model-len (--max-model-len)" in msg
    # near miss: a cap that holds exactly one sequence is enough
    m = tiny_module(max_position=4096)
    assert plan(m, "plan-kv-cache{memory-gib=1 max-cache-gib=0.001953125}")["num_pages"] == 256


def test_budget_and_num_pages_failures_name_their_options():
    with pytest.raises(KVPlanError) as e:
        plan(tiny_module(max_position=4096), "plan-kv-cache{memory-gib=0.0001}")
    assert "raise memory-fraction (--kv-cache-memory-fraction)" in str(e.value)
    assert "--max-model-len" in str(e.value)
    with pytest.raises(KVPlanError) as e:
        plan(tiny_module(max_position=4096), "plan-kv-cache{num-pages=255}")
    assert "num-pages=255 holds 4080 tokens" in str(e.value)
    assert "raise num-pages (--num-pages)" in str(e.value)
    assert plan(tiny_module(max_position=4096), "plan-kv-cache{num-pages=256}")["num_pages"] \
        == 256


def test_negative_cap_is_refused():
    with pytest.raises(PipelineError, match="max-cache-gib must be >= 0"):
        parse_pipeline("plan-kv-cache{max-cache-gib=-1}")


def test_one_full_context_gemma3_270m_sequence_fits_the_default_cpu_cap():
    """Gemma 3 270M's cache geometry (18 layers, 1 KV head of 256, 32,768 tokens: 36 KB a
    token in f32, 1.125 GiB a sequence) under CPU_KV_CACHE_CAP_GIB."""
    from jaxrt.compiler import CPU_KV_CACHE_CAP_GIB
    m = tiny_module(layers=18, kv_heads=1, head_dim=256, max_position=32768)
    m.attributes["target"] = {"backend": "cpu", "device_memory_bytes": 16 * GIB,
                              "kv_cache_cap_bytes": int(CPU_KV_CACHE_CAP_GIB * GIB)}
    p = plan(m, "plan-kv-cache{max-num-seqs=32}")
    assert p["bytes_per_token"] == 36 * 1024 and p["num_pages"] >= 2048
    assert p["cache_bytes"] <= CPU_KV_CACHE_CAP_GIB * GIB


def test_a_companion_cache_and_reserved_memory_share_the_budget():
    # A speculative draft keeps a cache of the same page ids and holds its weights beside
    # it: each page costs both caches' bytes, and the reserve leaves the budget first.
    base = plan(tiny_module(), "plan-kv-cache{page-size=32 memory-gib=0.05 "
                               "memory-fraction=0.5 max-num-seqs=1000}")
    m = tiny_module()
    p = plan(m, "plan-kv-cache{page-size=32 memory-gib=0.05 memory-fraction=0.5 "
                "max-num-seqs=1000 reserve-gib=0.002 companion-bytes-per-token=256}")
    b = p["budget"]
    free = 0.05 * GIB * 0.5 - b["weight_bytes"] - b["activation_bytes"] - 0.002 * GIB
    assert b["reserve_bytes"] == int(0.002 * GIB) and b["companion_bytes_per_token"] == 256
    assert p["num_pages"] == int(free // (32 * (p["bytes_per_token"] + 256)))
    assert p["num_pages"] < base["num_pages"]
    assert "reserve_bytes" not in base["budget"]
    with pytest.raises(PipelineError, match="reserve-gib must be >= 0"):
        plan(tiny_module(), "plan-kv-cache{memory-gib=1 reserve-gib=-1}")
    with pytest.raises(KVPlanError, match="reserved"):  # the reserve named in the failure
        plan(tiny_module(), "plan-kv-cache{page-size=16 memory-gib=0.05 reserve-gib=0.05}")
