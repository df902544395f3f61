"""SmoothQuant (quantize{mode=w8a8-smoothquant}, jaxrt/passes/smooth_quant.py) and its
calibration (jaxrt/calibration.py): the smoothing alone leaves the float model's output
unchanged, the calibration records what the model computes and survives its file, and a
missing or mismatched calibration is refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrt.calibration import (Calibration, calibrate, read_calibration,
                               read_calibration_tensor, write_calibration)
from jaxrt.errors import InputError, SettingError
from jaxrt.ir import DType, TensorType, interpreter, ops
from jaxrt.ir.module import Module
from jaxrt.ir.ops.nn import _ref_rms_norm
from jaxrt.ir.weights import WeightDef, smooth_factors
from jaxrt.passes import PassManager, PipelineError
from jaxrt.passes.smooth_quant import Smoother, check_calibration

from tests.passes.test_quantize_pass import PLAN, _step_inputs, tiny_loaded  # noqa: F401

FUSED = "canonicalize,cse,dce,fuse-qkv,fuse-gate-up"


def _linear_weights(module: Module) -> dict[str, int]:
    """Source weights read by llm.linear -> their input width."""
    return {op.operands[1].owner.attrs.name: op.operands[1].type.shape[1]
            for fn in module.functions.values() for op in fn.ops
            if op.opdef is ops.linear and op.operands[1].owner.opdef is ops.weight}


def _random_calibration(path, module_unfused: Module, rng, spread: float) -> Calibration:
    """act_max log-uniform over 10^±spread (outlier channels), one per weight's input."""
    tensors = {}
    for w, cols in _linear_weights(module_unfused).items():
        act = (10.0 ** rng.uniform(-spread, spread, cols)).astype(np.float32)
        tensors[f"{w}.act_max"] = act
        tensors[f"{w}.act_pct"] = act * 0.5
    write_calibration(str(path), tensors, {"format": 1, "alpha": 0.5})
    return read_calibration(str(path))


def _module(loaded, pipeline: str) -> Module:
    from jaxrt.frontends.build import build_module
    m = build_module(loaded.config)
    PassManager(pipeline).run(m)
    return m


@settings(max_examples=4, deadline=None)
@given(alpha=st.floats(0.0, 1.0), spread=st.floats(0.0, 3.0), seed=st.integers(0, 99),
       fused=st.booleans())
def test_smoothing_alone_preserves_the_float_model(tiny_loaded, tmp_path_factory, alpha,
                                                   spread, seed, fused):
    """(x / s) @ (W * s)^T == x @ W^T: the smoothed float module (norm folds and explicit
    scales, fused or unfused projections) computes the same logits as the original. f32:
    s spans up to 10^±3 and every product rounds once more (x / s, W * s: 2^-24 relative
    each, summed over 64 inputs), so the logits agree to 1e-5 of their range."""
    loaded = tiny_loaded
    pipeline = FUSED if fused else "canonicalize,cse,dce"
    cal = _random_calibration(tmp_path_factory.mktemp("cal"),
                              _module(loaded, "canonicalize,cse,dce"),
                              np.random.default_rng(seed), spread)
    plain, smoothed = _module(loaded, pipeline), _module(loaded, pipeline)
    check_calibration(smoothed, cal)
    smoother = Smoother(smoothed, cal, alpha)
    fn = smoothed.functions["step"]
    linears = [op for op in fn.ops if op.opdef is ops.linear]
    picked = smoother.run(fn, linears)
    # Llama: the attention and MLP inputs fold into their norms; o_proj and down_proj
    # inputs get explicit scales
    assert (smoother.folded, smoother.scaled) == (4, 4)
    for op, w in picked.items():  # the linears read the column-scaled weights
        op.operands = [op.operands[0], _read(fn, smoothed, w, op), *op.operands[2:]]
    PassManager(PLAN).run(plain)
    PassManager(PLAN).run(smoothed)
    weights = dict(loaded.weights)
    inputs = _step_inputs()
    kv = np.zeros(plain.functions["step"].arg("kv").type.shape, np.float32)
    from jaxrt.ir.substitute import bind_dims
    want = interpreter.run(bind_dims(plain, {"pages": 8, "page_size": 4}), "step",
                           [*inputs, kv], weights)[0]
    got = interpreter.run(bind_dims(smoothed, {"pages": 8, "page_size": 4}), "step",
                          [*inputs, kv], weights)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _read(fn, module, name, before):
    """A weight read of `name` placed right before op `before`; its value."""
    from jaxrt.ir.module import make_op
    read = make_op(ops.weight, [], {"name": name}, [module.weights[name]])
    i = fn.ops.index(before)
    fn.set_ops([*fn.ops[:i], read, *fn.ops[i:]])
    return read.result


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_smooth_norm_divides_the_norm_output(offset):
    """smooth_norm(g, s) {offset}: rms_norm(x, g') == rms_norm(x, g) / s channel-wise
    (Gemma's norms multiply by 1 + g: offset 1). f32 rounding of (offset + g) / s."""
    from jaxrt.ir.weights import _DEFS
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((5, 16)).astype(np.float32), rng.standard_normal(16) \
        .astype(np.float32)
    s = (10.0 ** rng.uniform(-2, 2, 16)).astype(np.float32)
    g2 = _DEFS["smooth_norm"][3](WeightDef("smooth_norm", ("g", "s"),
                                           (("offset", offset),)), [g, s])
    attrs = ops.rms_norm.make_attrs({"eps": 1e-6, "offset": offset})
    out = [TensorType(x.shape, DType.f32)]
    want = _ref_rms_norm(x, g, attrs=attrs, out_types=out) / s
    got = _ref_rms_norm(x, g2, attrs=attrs, out_types=out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_smoothquant_without_calibration_is_refused_in_one_line():
    with pytest.raises(PipelineError) as e:
        PassManager("quantize{mode=w8a8-smoothquant}")
    assert "needs a calibration" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="calib is for mode w8a8-smoothquant"):
        PassManager("quantize{mode=w8a8 calib=x}")
    with pytest.raises(PipelineError, match=r"alpha must be in \[0, 1\]"):
        PassManager("quantize{mode=w8a8-smoothquant calib=x alpha=1.5}")
    with pytest.raises(InputError, match="no calibration here"):
        PassManager("quantize{mode=w8a8-smoothquant calib=/nonexistent}").run(Module("m"))


def test_calibration_records_the_model_and_round_trips(tiny_loaded, tmp_path):
    """calibrate on text: act_max of the first layer's q/k/v input is max|rms_norm(embed)|
    computed by hand; the percentile is below the max; the recorded factors are
    smooth_factors of those; the file reads back bit for bit, and a changed file is
    refused where the pipeline reads it."""
    from jaxrt.frontends.sources import load_model
    src = tiny_loaded.source
    text = "the quick brown fox jumps over the lazy dog " * 3
    meta = calibrate(src, str(tmp_path / "cal"), data=text, alpha=0.7, num_tokens=20)
    assert meta["tokens"] == 20 and meta["alpha"] == 0.7
    cal = read_calibration(str(tmp_path / "cal"))
    loaded = load_model(src)
    w = loaded.weights
    ids = loaded.tokenizer.encode_text(text)[:20]
    h = np.asarray(w["model.embed_tokens.weight"])[ids]
    attrs = ops.rms_norm.make_attrs({"eps": loaded.config.rms_eps, "offset": 0.0})
    x = _ref_rms_norm(h, np.asarray(w["model.layers.0.input_layernorm.weight"]),
                      attrs=attrs, out_types=[TensorType(h.shape, DType.f32)])
    get = lambda n: read_calibration_tensor(cal.file, n, cal.sha256)  # noqa: E731
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(get(f"{q}.act_max"), np.abs(x).max(axis=0), rtol=1e-5)
    assert np.all(get(f"{q}.act_pct") <= get(f"{q}.act_max"))
    qkv = [np.asarray(w[q.replace("q_proj", p)]) for p in ("q_proj", "k_proj", "v_proj")]
    np.testing.assert_array_equal(get(f"{q}.smooth"),
                                  smooth_factors(get(f"{q}.act_max"), qkv, 0.7))
    assert set(cal.act_shapes) == set(_linear_weights(_module(loaded, "canonicalize")))
    # the written tensors read back exactly
    tensors = {n: get(n) for n in (f"{q}.act_max", f"{q}.act_pct", f"{q}.smooth")}
    write_calibration(str(tmp_path / "again"), tensors, cal.meta)
    again = read_calibration(str(tmp_path / "again"))
    for n, arr in tensors.items():
        assert read_calibration_tensor(again.file, n, again.sha256).tobytes() == arr.tobytes()
    with open(again.file, "r+b") as f:  # recalibrated under a compiled pipeline's feet
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(InputError, match="changed since the pipeline read it"):
        read_calibration_tensor(again.file, f"{q}.act_max", again.sha256)


def test_a_calibration_of_another_model_is_refused(tiny_loaded, tmp_path):
    m = _module(tiny_loaded, FUSED)
    write_calibration(str(tmp_path / "a"), {"other.weight.act_max": np.ones(32, np.float32)},
                      {"format": 1, "alpha": 0.5})
    with pytest.raises(InputError, match="does not match the model: it has no weight "
                                         "other.weight"):
        check_calibration(m, read_calibration(str(tmp_path / "a")))
    q = "model.layers.0.self_attn.q_proj.weight"
    write_calibration(str(tmp_path / "b"), {f"{q}.act_max": np.ones(48, np.float32)},
                      {"format": 1, "alpha": 0.5})
    with pytest.raises(InputError, match=r"weight model.layers.0.self_attn.q_proj.weight "
                                         r"is f32\[32, 32\], the calibration's input has 48"):
        check_calibration(m, read_calibration(str(tmp_path / "b")))
    # names match but a linear's input is missing from the calibration
    write_calibration(str(tmp_path / "c"), {f"{q}.act_max": np.ones(32, np.float32)},
                      {"format": 1, "alpha": 0.5})
    with pytest.raises(InputError, match="no activation range for the input of weight"):
        PassManager(f'quantize{{mode=w8a8-smoothquant calib="{tmp_path / "c"}"}}').run(m)
    with pytest.raises(SettingError, match="no weight quantization"):
        from jaxrt.compiler import Target, default_pipeline
        default_pipeline(Target("cpu", 1 << 30, "f32"), calib=str(tmp_path / "c"))


def test_smoothquant_model_lowers_as_the_interpreter_runs_it(tiny_loaded, tmp_path):
    """The whole pipeline (fusions, smoothing, int8 codes, outline-layers,
    fuse-add-rmsnorm) through XLA equals the interpreter (1e-5 of the logit range, as
    test_quantize_pass.py); the smoothing's weight definitions round-trip in text; an
    engine directory stores the folded result; quantizing again is refused."""
    from jaxrt.compiler import Target, compile_loaded, load_engine, save_engine
    from jaxrt.ir.substitute import bind_dims
    cal = _random_calibration(tmp_path / "cal", _module(tiny_loaded, "canonicalize,cse,dce"),
                              np.random.default_rng(1), 2.0)
    pipeline = (f'{FUSED},quantize{{mode=w8a8-smoothquant calib="{tmp_path / "cal"}" '
                f'alpha=0.6}},outline-layers,fuse-add-rmsnorm,{PLAN}')
    model = compile_loaded(tiny_loaded, pipeline=pipeline, target=Target("cpu", 1 << 30, "f32"))
    q = model.module.attributes["quantization"]
    assert (q["mode"], q["alpha"], q["folded_inputs"], q["scaled_inputs"]) == \
        ("w8a8-smoothquant", 0.6, 4, 4)
    from jaxrt.ir.parser import parse
    assert str(parse(str(model.module), "smoothed.jxr")) == str(model.module)  # text form
    with pytest.raises(PipelineError, match="already quantized"):
        PassManager(f'quantize{{mode=w8a8-smoothquant calib="{cal.file}"}}').run(model.module)
    inputs = _step_inputs()
    got = np.asarray(model.executable().run(*inputs))
    m = bind_dims(model.module, {"pages": 8, "page_size": 4})
    kv = np.zeros(m.functions["step"].arg("kv").type.shape, np.float32)
    want = interpreter.run(m, "step", [*inputs, kv], dict(model.weights))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    save_engine(model, str(tmp_path / "engine"))
    again = load_engine(str(tmp_path / "engine"))
    assert not again.module.weight_defs
    np.testing.assert_array_equal(np.asarray(again.executable().run(*inputs)), got)
