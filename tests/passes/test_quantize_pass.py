"""The quantize pass: golden IR (positive and near misses), refusals, and whole models in
every mode through the pipeline, the XLA lowering, the interpreter and engine directories."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jaxrt.errors import SettingError
from jaxrt.ir import Builder, DType, Module, TensorType, interpreter, ops
from jaxrt.ir.printer import print_module
from jaxrt.ir.quant import compute_scale, dequantize, quantize
from jaxrt.ir.substitute import bind_dims
from jaxrt.ir.weights import WeightDef, infer_def, materialize
from jaxrt.passes import PassManager, PipelineError, parse_pipeline
from jaxrt.passes.manager import VerifyHook

from tests.passes.passes_testutil import assert_golden, t

I8 = DType.int8


def _projections() -> Module:
    """x -> fused qkv (a concat weight) -> o_proj; a linear on a computed operand; the
    embedding and head, which the pass never touches."""
    m = Module("proj")
    for n, shape in (("embed", (16, 8)), ("q", (8, 8)), ("k", (4, 8)), ("v", (4, 8)),
                     ("o.weight", (8, 16)), ("o.bias", (8,)), ("g", (8, 8))):
        m.weights[n] = t(*shape)
    fused = WeightDef("concat", ("q", "k", "v"), (("axis", 0),))
    m.weights["qkv"] = infer_def(fused, [m.weights[s] for s in ("q", "k", "v")])
    m.weight_defs["qkv"] = fused
    b = Builder.new_function(m, "f", [("tokens", TensorType(("T",), DType.int32))])
    table = b.weight("embed")
    h = b(ops.embedding, b.fn.args[0], table)  # [T, 8]
    qkv = b(ops.linear, h, b.weight("qkv"))  # [T, 16]
    o = b(ops.linear, qkv, b.weight("o.weight"), b.weight("o.bias"))  # [T, 8]
    mixed = b(ops.linear, o, b(ops.tanh, b.weight("g")))  # near miss: a computed weight
    b.ret(b(ops.logits, mixed, table))
    return m


def _weights(m: Module, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(t.shape).astype(np.float32) for n, t in m.weights.items()
            if n not in m.weight_defs}


def test_quantize_golden_fused_projection_and_near_misses():
    m = _projections()
    PassManager('quantize{mode=int8-weight granularity=tensor exclude="^o\\\\."}',
                hooks=[VerifyHook()]).run(m)
    # qkv quantized as one weight (one per-tensor scale over the concat); o.weight
    # excluded; the activation "weight", embedding and head left alone
    assert_golden("quantize_int8_tensor.ir", print_module(m))
    assert m.weights["qkv.i8.scale"] == TensorType((1, 1), DType.f32)
    assert m.attributes["quantization"]["excluded"] == ["o.weight"]


def test_quantized_projection_computes_its_reference():
    m = _projections()
    w = _weights(m)
    tokens = np.array([1, 5, 9], np.int32)
    PassManager("quantize{mode=w8a8 granularity=group group-size=4}",
                hooks=[VerifyHook()]).run(m)
    got = interpreter.run(m, "f", [tokens], w)[0]
    # the same computation by hand from the formats' reference math
    qkv = np.concatenate([w["q"], w["k"], w["v"]])
    s = compute_scale(qkv, I8, (16, 2))
    h = w["embed"][tokens]
    from jaxrt.ir.ops.quant import token_linear
    y = token_linear(h, quantize(qkv, s, I8), s)
    so = compute_scale(w["o.weight"], I8, (8, 4))
    o = token_linear(y, quantize(w["o.weight"], so, I8), so) + w["o.bias"]
    want = (o @ np.tanh(w["g"]).T) @ w["embed"].T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(dequantize(quantize(qkv, s, I8), s) - qkv).max() <= s.max() / 2 * 1.0001


@pytest.mark.parametrize("pipeline, error, message", [
    ("quantize{mode=w8a8-smoothquant}", PipelineError, "w8a8-smoothquant needs a calibration"),
    ("quantize{mode=int4}", PipelineError, "mode must be one of int8-weight, fp8-weight"),
    ("quantize{granularity=row}", PipelineError, "granularity must be one of tensor"),
    ("quantize{granularity=group group-size=0}", PipelineError, "group-size must be >= 1"),
    ('quantize{exclude="("}', PipelineError, "exclude is not a regular expression"),
])
def test_bad_options_are_refused_at_parse(pipeline, error, message):
    with pytest.raises(error, match=message):
        parse_pipeline(pipeline)


def test_refusals_at_run():
    m = _projections()
    PassManager("quantize").run(m)
    with pytest.raises(PipelineError, match=r"already quantized \(int8-weight\); quantizing "
                                            r"codes again would scale them twice"):
        PassManager("quantize{mode=fp8-weight}").run(m)
    with pytest.raises(PipelineError, match="run cast-float before quantize"):
        PassManager("cast-float{dtype=bf16}").run(m)
    with pytest.raises(SettingError, match=r"weight qkv f32\[16, 8\]: group size 3 does not "
                                           r"divide the input dimension 8"):
        PassManager("quantize{granularity=group group-size=3}").run(_projections())
    with pytest.raises(PipelineError, match=r"no llm.linear reads a weight to quantize "
                                            r"\(exclude='.' matched all 2\)"):
        PassManager('quantize{exclude="."}').run(_projections())


# ---- whole models --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    """A random two-layer Llama with a word-level tokenizer (Hugging Face directory)."""
    from jaxrt.frontends.sources import load_model
    from tests.frontends.frontends_synth import tiny_hf_config, write_tiny_hf_dir
    config = tiny_hf_config(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return load_model(write_tiny_hf_dir(tmp_path_factory.mktemp("tiny"), config))


PLAN = "plan-kv-cache{page-size=4 num-pages=8 max-model-len=32}"


def _step_inputs(n=9):
    toks = (np.arange(n, dtype=np.int32) * 7) % 61 + 3
    pos = np.arange(n, dtype=np.int32)
    return [toks, pos, pos, np.arange(3, dtype=np.int32)[None], np.array([n], np.int32),
            pos[None], pos]


def test_outlined_layers_are_refused(tiny_loaded):
    from jaxrt.frontends.build import build_module
    m = build_module(tiny_loaded.config)
    PassManager("outline-layers").run(m)
    with pytest.raises(PipelineError, match="run quantize before outline-layers"):
        PassManager("quantize").run(m)


@pytest.mark.parametrize("options", ["mode=int8-weight", "mode=fp8-weight granularity=group "
                                     "group-size=16", "mode=w8a8 granularity=tensor",
                                     "mode=fp8 granularity=group group-size=8"])
def test_quantized_models_lower_as_the_interpreter_runs_them(options, tiny_loaded, tmp_path):
    """XLA executable == reference interpreter on the quantized module (f32: the two differ
    in summation order only, 1e-5 of the logit range as tests/lowering/test_xla_rules.py);
    the codes survive an engine directory bit for bit."""
    from jaxrt.compiler import Target, compile_loaded, load_engine, save_engine
    loaded = tiny_loaded
    pipeline = f"canonicalize,cse,dce,quantize{{{options}}},outline-layers,{PLAN}"
    model = compile_loaded(loaded, pipeline=pipeline, target=Target("cpu", 1 << 30, "f32"))
    assert sum(op.opdef is ops.quantized_linear for fn in model.module.functions.values()
               for op in fn.ops) == 7  # per layer q, k, v, o, gate, up, down, in the scan
    inputs = _step_inputs()
    got = np.asarray(model.executable().run(*inputs))
    m = bind_dims(model.module, {"pages": 8, "page_size": 4})
    kv = np.zeros(m.functions["step"].arg("kv").type.shape, np.float32)
    want = interpreter.run(m, "step", [*inputs, kv], dict(model.weights))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    if options.startswith("mode=int8") or options.startswith("mode=fp8 "):
        save_engine(model, str(tmp_path / "engine"))
        again = load_engine(str(tmp_path / "engine"))
        codes = [n for n, ty in again.module.weights.items() if ty.dtype.itemsize == 1]
        assert codes and all(n in model.module.weights for n in codes)
        fresh = materialize(model.module, model.weights, codes)
        for n in codes:
            assert np.asarray(again.weights[n]).tobytes() == fresh[n].tobytes()
        np.testing.assert_array_equal(np.asarray(again.executable().run(*inputs)), got)


@pytest.mark.parametrize("mode", ["int8-weight", "fp8"])
def test_bf16_model_quantizes_after_cast_float(mode):
    """cast-float then quantize: codes from the bf16 weights, f32 scales, bf16 activations.
    The lowering and the interpreter both round the dequantized weight (or nothing, for
    token mode) to bf16 and the result once more: they agree to a bf16 step (2^-8
    relative) of the result's scale, as in tests/lowering/test_xla_rules.py."""
    import jax

    from jaxrt.lowering.compile import lower_function
    m = _projections()
    w = _weights(m)
    PassManager(f"cast-float{{dtype=bf16}},quantize{{mode={mode}}}",
                hooks=[VerifyHook()]).run(m)
    scales = [n for n, ty in m.weights.items() if n.endswith(".scale")]
    assert scales and all(m.weights[n].dtype == DType.f32 for n in scales)
    tokens = np.array([1, 5, 9, 2], np.int32)
    resident = materialize(m, w)
    want = interpreter.run_function(m.functions["f"], [tokens], resident, m)[0]
    got = np.asarray(jax.jit(lower_function(m, "f"))(resident, tokens)[0])
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
