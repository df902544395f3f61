"""quantize-kv-cache: the packed row format (round trip within the format's bound, XLA
within it too), the pass's rewrite and the plan it leaves, attention
over a quantized cache within a bound derived from the format, the batching Engine
(batched == alone, prefix caching on == off), engine directories, and refusals."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxrt.errors import SettingError
from jaxrt.frontends.build import build_module
from jaxrt.frontends.config import ModelConfig
from jaxrt.ir import Builder, DType, Module, TensorType, interpreter, ops
from jaxrt.ir.quant import KV_SCALE_ELEMS, QMAX, pack_kv, unpack_kv
from jaxrt.passes import PassManager, PipelineError, parse_pipeline
from jaxrt.passes.manager import VerifyHook
from jaxrt.passes.plan_kv_cache import KVPlanError

I32, F32 = DType.int32, DType.f32
CODES = {"int8": DType.int8, "fp8": DType.f8e4m3}


def _bound(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Per-element error bound of a packed row: int8 half a step (absmax/127/2); e4m3fn
    half an ulp, 2^-4 of |x| in its normal range, or half a subnormal step (2^-10 of the
    scale) below it. Plus one f32 rounding of code * scale (2^-24 relative)."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = amax / QMAX[dtype]
    if dtype == DType.int8:
        err = scale / 2
    else:
        err = np.maximum(np.abs(x) * 2.0 ** -4, scale * 2.0 ** -10)
    return err + np.abs(x) * 2.0 ** -23


def _normal(x: np.ndarray) -> np.ndarray:
    """Zero the values too small for a normal f32 scale (max|row| / qmax >= 2^-126; K/V
    are never this small): there the scale loses bits (jaxrt/ir/quant.py)."""
    return np.where(np.abs(x) < 1e-30, np.float32(0), x).astype(np.float32)


rows = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1,
                                                max_side=9),
                  elements=st.floats(-1e4, 1e4, width=32)).map(_normal)


@settings(max_examples=60, deadline=None)
@given(x=rows, dtype=st.sampled_from(list(CODES.values())), mag=st.sampled_from([1e-6, 1.0, 3e3]))
def test_round_trip_within_the_format_bound(x, dtype, mag):
    x = _normal(x * np.float32(mag))
    packed = pack_kv(x, dtype)
    assert packed.dtype == dtype.to_numpy() and packed.shape == x.shape[:-1] + (
        x.shape[-1] + KV_SCALE_ELEMS,)
    back = unpack_kv(packed)
    assert np.all(np.abs(back - x) <= _bound(x, dtype))
    # never past the row's max, but for the f32 roundings of the scale and of code * scale
    assert np.all(np.abs(back) <= np.abs(x).max(axis=-1, keepdims=True) * (1 + 2.0 ** -22))


@settings(max_examples=20, deadline=None)
@given(x=rows, dtype=st.sampled_from(list(CODES.values())))
def test_xla_packing_follows_the_reference(x, dtype):
    """Reading is exact. Writing may differ from numpy in the scale's last bit (XLA's CPU
    compiler divides by the constant qmax as a multiplication by its reciprocal), so a
    code may land one step away at a rounding tie: still within the format's bound, with
    the scale's ulp added (2^-23 relative, times qmax codes)."""
    import jax

    from jaxrt.lowering.xla.attention import pack_rows, unpack_rows
    packed = np.asarray(jax.jit(lambda a: pack_rows(a, dtype))(x))
    want = pack_kv(x, dtype)
    assert packed.dtype == want.dtype and packed.shape == want.shape
    np.testing.assert_array_equal(np.asarray(unpack_rows(want, np.float32)), unpack_kv(want))
    amax = np.abs(x).max(axis=-1, keepdims=True)
    assert np.all(np.abs(unpack_kv(packed) - x) <= _bound(x, dtype) + amax * 2.0 ** -22)


def test_a_zeroed_cache_reads_as_zeros():
    assert not unpack_kv(np.zeros((3, 2, 8 + KV_SCALE_ELEMS), np.int8)).any()


# ---- the pass -------------------------------------------------------------------------------

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position=64)


def _tiny() -> Module:
    m = build_module(CFG)
    m.attributes["config"] = CFG.to_dict()
    return m


PLAN = "plan-kv-cache{memory-gib=1 max-cache-gib=0.0001}"  # the cache cap decides the pages


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_pass_rewrites_the_cache_and_the_plan_fits_more_pages(dtype):
    m = _tiny()
    PassManager(f"outline-layers,quantize-kv-cache{{dtype={dtype}}},{PLAN}",
                hooks=[VerifyHook()]).run(m)
    float_m = _tiny()
    PassManager(f"outline-layers,{PLAN}").run(float_m)
    pages, fpages = (x.attributes["kv_cache"]["num_pages"] for x in (m, float_m))
    kv = m.functions["step"].arg("kv").type
    # [layers, 2, pages, page_size, kv_heads, head_dim + 4 scale bytes], one-byte codes
    assert kv == TensorType((2, 2, pages, 16, 2, 8 + 4), CODES[dtype])
    plan = m.attributes["kv_cache"]
    assert plan["dtype"] == CODES[dtype].value
    assert plan["bytes_per_token"] == 2 * 2 * 2 * (8 + 4) == 96  # vs 2*2*2*8*4 = 256 in f32
    assert float_m.attributes["kv_cache"]["bytes_per_token"] == 256
    assert pages == int(0.0001 * 2**30 // (16 * 96)) and fpages == int(0.0001 * 2**30 //
                                                                         (16 * 256))
    assert m.attributes["kv_quantization"]["mode"] == f"kv-{dtype}"
    # every cache op reads the quantized cache (in the layer scan's body too)
    cache_ops = [op for fn in m.functions.values() for op in fn.ops
                 if op.opdef in (ops.kv_update, ops.paged_attention)]
    assert cache_ops and all(op.operands[1 if op.opdef is ops.paged_attention else 0].dtype
                             == CODES[dtype] for op in cache_ops)


def test_refusals():
    with pytest.raises(PipelineError, match="dtype must be one of int8, fp8, got 'int4'"):
        parse_pipeline("quantize-kv-cache{dtype=int4}")
    with pytest.raises(PipelineError, match="already quantized \\(kv-int8\\); quantizing its "
                                            "codes again would scale them twice"):
        PassManager("quantize-kv-cache,quantize-kv-cache{dtype=fp8}").run(_tiny())
    with pytest.raises(PipelineError, match="before plan-kv-cache"):
        PassManager(f"{PLAN},quantize-kv-cache").run(_tiny())
    with pytest.raises(KVPlanError, match="dtype=bf16 for a quantized cache"):
        PassManager("quantize-kv-cache,plan-kv-cache{memory-gib=1 dtype=bf16}").run(_tiny())
    from jaxrt.compiler import Target, default_pipeline
    with pytest.raises(SettingError, match="must be one of kv-int8, kv-fp8, got 'kv-int4'"):
        default_pipeline(Target("cpu", 1 << 30, "f32"), quantize="kv-int4")
    pipe = default_pipeline(Target("cpu", 1 << 30, "bf16"), quantize="kv-fp8")
    assert "quantize-kv-cache{dtype=fp8},plan-kv-cache" in pipe and "quantize{" not in pipe


# ---- attention over a quantized cache ---------------------------------------------------------

T, H, KVH, D, PS, PAGES = 6, 4, 2, 8, 4, 4
SCALE = D ** -0.5


def _cache_step(kv_type: TensorType) -> Module:
    """kv.update of T tokens, then paged attention of their queries over one sequence."""
    m = Module("cache")
    b = Builder.new_function(m, "f", [
        ("kv", kv_type), ("k", TensorType((T, KVH, D), F32)), ("v", TensorType((T, KVH, D), F32)),
        ("slots", TensorType((T,), I32)), ("q", TensorType((T, H, D), F32)),
        ("table", TensorType((1, PAGES), I32)), ("ctx", TensorType((1,), I32)),
        ("q_index", TensorType((1, T), I32)), ("pos", TensorType((T,), I32))])
    kv, k, v, slots, q, table, ctx, q_index, pos = b.fn.args
    kv = b(ops.kv_update, kv, k, v, slots, layer=0)
    out = b(ops.paged_attention, q, kv, table, ctx, q_index, pos, layer=0, scale=SCALE,
            causal=True)
    b.ret(out, kv)
    return m


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(list(CODES)),
       mag=st.sampled_from([0.1, 1.0, 4.0]))
def test_attention_over_a_quantized_cache_is_within_the_format_bound(seed, dtype, mag):
    """The reference's and XLA's outputs within the bound the format implies (XLA's also
    within f32 summation order, 1e-5): with |dK|, |dV| <= e (the row bound above),
    every score moves by at most SCALE * |q|_1 * e, softmax moves probabilities by at most
    twice that in L1, and a dequantized value never exceeds its row's max, so
    |d out| <= 2 * SCALE * |q|_1 * e_K * max|v| + e_V."""
    import jax

    from jaxrt.lowering.compile import lower_function
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((T, KVH, D)).astype(np.float32) * mag for _ in range(2))
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    slots = rng.permutation(PAGES * PS)[:T].astype(np.int32)
    table = np.arange(PAGES, dtype=np.int32)[None]
    # the tokens' positions are their slots (the table is the identity)
    pos = slots.copy()
    args = [k, v, slots, q, table, np.array([PAGES * PS], np.int32),
            np.arange(T, dtype=np.int32)[None], pos]
    code = CODES[dtype]
    qt = TensorType((1, 2, PAGES, PS, KVH, D + KV_SCALE_ELEMS), code)
    ft = TensorType((1, 2, PAGES, PS, KVH, D), F32)
    mq, mf = _cache_step(qt), _cache_step(ft)
    kv0 = np.zeros(qt.shape, code.to_numpy())
    ref_out, ref_kv = interpreter.run(mq, "f", [kv0, *args], {})
    float_out, _ = interpreter.run(mf, "f", [np.zeros(ft.shape, np.float32), *args], {})
    got_out, got_kv = jax.jit(lower_function(mq, "f"))({}, kv0, *args)
    amax = max(np.abs(k).max(), np.abs(v).max())
    # the scale's last bit may differ in XLA (test_xla_packing_follows_the_reference)
    e_k, e_v = (_bound(x, code).max() + amax * 2.0 ** -22 for x in (k, v))
    q1 = np.abs(q).sum(axis=-1).max()
    bound = 2 * SCALE * q1 * e_k * np.abs(v).max() * (1 + 2.0 ** -22) + e_v
    assert np.abs(ref_out - float_out).max() <= bound
    assert np.abs(np.asarray(got_out) - float_out).max() <= bound * (1 + 1e-5)


# ---- through the Engine -----------------------------------------------------------------------

# (batched vs alone and caching on vs off for kv-int8, kv-fp8 and w8a8+kv-fp8:
# tests/runtime/test_engine_quantized.py)


def test_engine_directory_records_kv_quantization(tmp_path):
    from jaxrt.compiler import (Target, check_engine_settings, compile_loaded, load_engine,
                                save_engine)
    from jaxrt.frontends.sources import load_model
    from tests.frontends.frontends_synth import tiny_hf_config, write_tiny_hf_dir
    config = tiny_hf_config(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    loaded = load_model(write_tiny_hf_dir(tmp_path / "hf", config))
    model = compile_loaded(loaded, target=Target("cpu", 1 << 30, "f32"), page_size=4,
                           num_pages=8, max_model_len=32, quantize="kv-int8")
    save_engine(model, str(tmp_path / "engine"))
    again = load_engine(str(tmp_path / "engine"))
    assert again.module.attributes["kv_quantization"]["mode"] == "kv-int8"
    assert again.executable().kv_dtype == DType.int8
    check_engine_settings(again, "engine", quantize="kv-int8")  # as compiled
    with pytest.raises(SettingError, match="quantize='kv-fp8'.*quantize='kv-int8'"):
        check_engine_settings(again, "engine", quantize="kv-fp8")


def test_a_weight_mode_and_a_kv_mode_combine(tmp_path):
    from jaxrt.compiler import (Target, check_engine_settings, compile_loaded, default_pipeline,
                                load_engine, quantize_mode, save_engine)
    from jaxrt.frontends.sources import load_model
    from tests.frontends.frontends_synth import tiny_hf_config, write_tiny_hf_dir
    target = Target("cpu", 1 << 30, "f32")
    pipe = default_pipeline(target, quantize="int8-weight+kv-int8").split(",")
    assert "quantize{mode=int8-weight}" in pipe
    assert pipe.index("quantize-kv-cache{dtype=int8}") == len(pipe) - 2  # before the plan
    for bad in ("kv-int8+kv-fp8", "int8-weight+fp8", "int8-weight+", "+kv-int8"):
        with pytest.raises(SettingError, match="one weight mode, one KV-cache mode"):
            default_pipeline(target, quantize=bad)
    config = tiny_hf_config(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    loaded = load_model(write_tiny_hf_dir(tmp_path / "hf", config))
    model = compile_loaded(loaded, target=target, page_size=4, num_pages=8, max_model_len=32,
                           quantize="int8-weight+kv-int8")
    assert quantize_mode(model.module) == "int8-weight+kv-int8"
    save_engine(model, str(tmp_path / "engine"))
    again = load_engine(str(tmp_path / "engine"))
    check_engine_settings(again, "engine", quantize="int8-weight+kv-int8")  # as compiled
    with pytest.raises(SettingError, match="quantize='kv-int8'"):
        check_engine_settings(again, "engine", quantize="kv-int8")
