"""GPTQ (jaxrt/gptq.py), its calibration (jaxrt calibrate --gptq) and quantize{method=gptq}:
GPTQ's output error below RTN's with codes RTN could produce; the calibration writes them
for every linear; the pass loads exactly those (fused or not, after cast-float, through
engine directories); every refusal is one line, and exit code 2 from the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrt.calibration import (calibrate, capture_ranges, read_calibration,
                               read_calibration_tensor, write_calibration)
from jaxrt.cli.main import main
from jaxrt.errors import InputError, SettingError
from jaxrt.gptq import Hessians, gptq_quantize, output_error
from jaxrt.ir import DType, TensorType, ops
from jaxrt.ir.ops.nn import _ref_rms_norm
from jaxrt.ir.quant import compute_scale, dequantize, quantize
from jaxrt.ir.weights import materialize
from jaxrt.passes import PassManager, PipelineError, parse_pipeline

from tests.passes.test_quantize_pass import PLAN, _step_inputs, tiny_loaded  # noqa: F401

DTYPES = (DType.int8, DType.f8e4m3)
BASE = "canonicalize,cse,dce"
FUSED = f"{BASE},fuse-qkv,fuse-gate-up"
TEXT = "the quick brown fox jumps over the lazy dog " * 3
Q = "model.layers.0.self_attn.q_proj.weight"


def _bits(codes: np.ndarray) -> np.ndarray:
    """Codes as their bytes (fp8 arrays compare as floats; bits compare exactly)."""
    return np.asarray(codes).view(np.int8)


def _correlated_inputs(rng, n: int, cols: int, dead: int) -> np.ndarray:
    """[n, cols] inputs mixing every channel (a random linear map of Gaussian noise),
    channel scales spread over e^±2, the last `dead` channels always 0."""
    x = rng.standard_normal((n, cols)) @ rng.standard_normal((cols, cols))
    x *= np.exp(rng.uniform(-2.0, 2.0, cols))
    x[:, cols - dead:] = 0.0
    return x


# ---- the algorithm -------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(rows=st.integers(4, 24), cols=st.integers(16, 48), tokens=st.integers(1, 3),
       dead=st.integers(0, 3), block=st.integers(1, 64), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES))
def test_gptq_output_error_is_below_rtn(rows, cols, tokens, dead, block, seed, dtype):
    """||X W^T - X Q^T||_F below round-to-nearest's at the same scales (1,500 seeds of
    these inputs, both dtypes: GPTQ/RTN at most 0.75, median 0.52), with every code one
    RTN could produce: RTN's scales, and each code re-quantizes to itself. Dead input
    channels get code 0."""
    rng = np.random.default_rng(seed)
    x = _correlated_inputs(rng, tokens * cols, cols, dead)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    codes, scale = gptq_quantize(w, x.T @ x / len(x), dtype, block=block)
    rtn_scale = compute_scale(w, dtype, (rows, 1))
    np.testing.assert_array_equal(scale, rtn_scale)
    assert codes.dtype == dtype.to_numpy() and codes.shape == w.shape
    np.testing.assert_array_equal(_bits(quantize(dequantize(codes, scale), scale, dtype)),
                                  _bits(codes))
    assert not np.any(_bits(codes[:, cols - dead:]))
    gptq = output_error(x, w, codes, scale)
    rtn = output_error(x, w, quantize(w, rtn_scale, dtype), rtn_scale)
    assert gptq < rtn, (gptq, rtn)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gptq_degenerate_inputs(dtype):
    """All inputs dead: every column is zeroed (code 0, no error on these inputs); an
    all-zero weight row keeps RTN's scale 1 and codes 0; one column alone is RTN."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    w[2] = 0.0
    codes, scale = gptq_quantize(w, np.zeros((8, 8)), dtype)
    assert not np.any(_bits(codes)) and scale[2, 0] == 1.0
    x = rng.standard_normal((5, 1))
    one, s = gptq_quantize(w[:, :1], x.T @ x, dtype)
    np.testing.assert_array_equal(_bits(one), _bits(quantize(w[:, :1], s, dtype)))
    with pytest.raises(ValueError, match="H is"):
        gptq_quantize(w, np.eye(7), dtype)


def test_hessians_accumulate_over_batches():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 2, 5)), rng.standard_normal((4, 5))
    h = Hessians()
    h.add("x", a)
    h.add("x", b)
    x = np.concatenate([a.reshape(-1, 5), b])
    np.testing.assert_allclose(h.get("x"), x.T @ x / len(x), rtol=1e-12)


# ---- calibrate --gptq ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def gptq_cals(tiny_loaded, tmp_path_factory):
    """Calibrations of the tiny Llama on TEXT with GPTQ codes: i8 (int8-weight) and
    e4m3fn (fp8), and one without (smoothing only)."""
    root = tmp_path_factory.mktemp("gptq")
    out = {}
    for mode in ("int8-weight", "fp8", None):
        out[mode] = str(root / (mode or "plain"))
        calibrate(tiny_loaded.source, out[mode], data=TEXT, num_tokens=20, gptq=mode)
    return out


def _linear_weights(loaded) -> list[str]:
    return [n for n in loaded.weights if n.endswith("_proj.weight")]


@pytest.mark.parametrize("mode", ["int8-weight", "fp8"])
def test_calibrate_writes_gptq_codes_of_each_input_group(tiny_loaded, gptq_cals, mode):
    """Every linear weight has codes [out, in] (i8, or e4m3fn's u8 bits) and RTN's
    per-channel scales; the codes are GPTQ's over the group's weights concatenated along
    their rows with the group input's H (X^T X / n, the first layer's q/k/v input checked
    against rms_norm(embedding) by hand); calibration.json records the settings."""
    cal = read_calibration(gptq_cals[mode])
    dtype = DType.int8 if mode == "int8-weight" else DType.f8e4m3
    gptq = cal.meta["gptq"]
    assert gptq == {"mode": mode, "dtype": dtype.value, "damp": 0.01, "block": 128,
                    "act_order": True, "tokens": 20, "seconds": gptq["seconds"]}
    assert cal.gptq_dtype == dtype
    w = {n: np.asarray(tiny_loaded.weights[n], np.float32) for n in _linear_weights(tiny_loaded)}
    assert set(cal.gptq_shapes) == set(w)
    get = lambda n: read_calibration_tensor(cal.file, n, cal.sha256)  # noqa: E731
    for name, weight in w.items():
        codes, scale = get(f"{name}.gptq_codes"), get(f"{name}.gptq_scale")
        assert codes.dtype == (np.int8 if dtype == DType.int8 else np.uint8)
        assert codes.shape == weight.shape
        np.testing.assert_array_equal(scale, compute_scale(weight, dtype, (len(weight), 1)))
    ids = tiny_loaded.tokenizer.encode_text(TEXT)[:20]
    hessians = Hessians()
    _, groups = capture_ranges(tiny_loaded, ids, 99.9, hessians)
    assert [Q, Q.replace("q_proj", "k_proj"), Q.replace("q_proj", "v_proj")] in groups
    h = np.asarray(tiny_loaded.weights["model.embed_tokens.weight"], np.float32)[ids]
    attrs = ops.rms_norm.make_attrs({"eps": tiny_loaded.config.rms_eps, "offset": 0.0})
    x = _ref_rms_norm(h, np.asarray(tiny_loaded.weights["model.layers.0.input_layernorm."
                                                        "weight"]),
                      attrs=attrs, out_types=[TensorType(h.shape, DType.f32)])
    x = x.astype(np.float64)
    # f32 activations, each rounded once differently at most: 1e-5 of H's scale
    np.testing.assert_allclose(hessians.get(Q), x.T @ x / len(x), rtol=0,
                               atol=1e-5 * np.abs(x.T @ x / len(x)).max())
    for group in groups:
        codes, _ = gptq_quantize(np.concatenate([w[n] for n in group]),
                                 hessians.get(group[0]), dtype)
        got = np.concatenate([get(f"{n}.gptq_codes") for n in group])
        np.testing.assert_array_equal(got, _bits(codes).view(got.dtype))


def test_calibration_file_checks(tmp_path):
    """Codes without the JSON's gptq entry, codes of another dtype than it says, or codes
    without scales are not a calibration."""
    act = {f"{Q}.act_max": np.ones(4, np.float32)}
    codes = {f"{Q}.gptq_codes": np.ones((2, 4), np.int8),
             f"{Q}.gptq_scale": np.ones((2, 1), np.float32)}
    cases = [({**act, **codes}, {}, "has no gptq entry"),
             ({**act, **codes}, {"gptq": {"dtype": "f8e4m3fn"}}, r"are I8 \(i8\), but "
                                                                 r"calibration.json says"),
             ({**act, f"{Q}.gptq_codes": codes[f"{Q}.gptq_codes"]}, {"gptq": {"dtype": "i8"}},
              "needs both .gptq_codes")]
    for i, (tensors, meta, message) in enumerate(cases):
        write_calibration(str(tmp_path / str(i)), tensors, {"format": 1, "alpha": 0.5, **meta})
        with pytest.raises(InputError, match=message):
            read_calibration(str(tmp_path / str(i)))


# ---- quantize{method=gptq} -----------------------------------------------------------------

def _pipeline(prefix: str, mode: str, cal: str) -> str:
    return f'{prefix},quantize{{mode={mode} method=gptq calib="{cal}"}},{PLAN}'


def _file_codes(cal: str, weight: str) -> tuple[np.ndarray, np.ndarray]:
    c = read_calibration(cal)
    return (read_calibration_tensor(c.file, f"{weight}.gptq_codes", c.sha256),
            read_calibration_tensor(c.file, f"{weight}.gptq_scale", c.sha256))


@pytest.mark.parametrize("mode", ["int8-weight", "fp8"])
def test_gptq_pass_loads_the_file_codes_fused_or_not(tiny_loaded, gptq_cals, mode, tmp_path):
    """Unfused, each linear reads its weight's codes and scales exactly as the file holds
    them; fused, the concatenation of its parts'; both compute the same logits (f32 to
    summation order, as test_fusion_passes: 1e-5 of their range). The definitions
    round-trip in text, and an engine directory stores the codes (loads with no
    calibration and runs the same)."""
    from jaxrt.compiler import Target, compile_loaded, load_engine, save_engine
    from jaxrt.ir.parser import parse
    cal = gptq_cals[mode]
    dtype = DType.int8 if mode == "int8-weight" else DType.f8e4m3
    target = Target("cpu", 1 << 30, "f32")
    logits = {}
    for prefix in (BASE, FUSED):
        model = compile_loaded(tiny_loaded, pipeline=_pipeline(prefix, mode, cal),
                               target=target)
        q = model.module.attributes["quantization"]
        assert (q["mode"], q["method"], q["weights"]) == (mode, "gptq",
                                                          14 if prefix == BASE else 8)
        loaded = materialize(model.module, model.weights)  # what the functions read
        for layer in range(2):
            p = f"model.layers.{layer}."
            groups = [[p + f"self_attn.{n}_proj.weight" for n in "qkv"],
                      [p + "self_attn.o_proj.weight"],
                      [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                      [p + "mlp.down_proj.weight"]]
            if prefix == BASE:
                groups = [[w] for group in groups for w in group]
            for group in groups:
                name = group[0] if len(group) == 1 else \
                    group[0].replace("q_proj", "qkv_proj").replace("gate_proj", "gate_up_proj")
                codes, scales = zip(*(_file_codes(cal, w) for w in group))
                got = loaded[f"{name}.{dtype.value}"]
                assert got.dtype == dtype.to_numpy()
                np.testing.assert_array_equal(_bits(got), _bits(np.concatenate(codes)))
                np.testing.assert_array_equal(loaded[f"{name}.{dtype.value}.scale"],
                                              np.concatenate(scales))
        assert str(parse(str(model.module), "gptq.jxr")) == str(model.module)
        logits[prefix] = np.asarray(model.executable().run(*_step_inputs()))
    scale = np.abs(logits[BASE]).max()
    np.testing.assert_allclose(logits[FUSED], logits[BASE], rtol=0, atol=1e-5 * scale)
    save_engine(model, str(tmp_path / "engine"))
    again = load_engine(str(tmp_path / "engine"))
    assert not again.module.weight_defs
    np.testing.assert_array_equal(np.asarray(again.executable().run(*_step_inputs())),
                                  logits[FUSED])


def test_gptq_codes_after_cast_float(tiny_loaded, gptq_cals):
    """cast-float before quantize: the bf16 weights take the codes GPTQ chose for their
    f32 sources, unchanged."""
    from jaxrt.compiler import Target, compile_loaded
    cal = gptq_cals["int8-weight"]
    model = compile_loaded(tiny_loaded, pipeline=_pipeline(f"{FUSED},cast-float{{dtype=bf16}}",
                                                           "w8a8", cal),
                           target=Target("cpu", 1 << 30, "bf16"))
    o = "model.layers.1.self_attn.o_proj.weight"
    got = materialize(model.module, model.weights, [f"{o}.bf16.i8"])[f"{o}.bf16.i8"]
    np.testing.assert_array_equal(got, _file_codes(cal, o)[0])


@pytest.mark.parametrize("pipeline, message", [
    ("quantize{mode=fp8 method=gptq}", "method=gptq needs calib=DIR"),
    ("quantize{mode=w8a8-smoothquant method=gptq calib=x}", "does not combine with "
                                                             "w8a8-smoothquant"),
    ("quantize{mode=fp8 method=gptq calib=x granularity=tensor}",
     "granularity=tensor is not available"),
    ("quantize{method=optq}", "method must be one of rtn, gptq"),
])
def test_bad_gptq_options_are_refused_at_parse(pipeline, message):
    with pytest.raises(PipelineError, match=message) as e:
        parse_pipeline(pipeline)
    assert "\n" not in str(e.value)


def test_gptq_calibration_refusals_at_run(tiny_loaded, gptq_cals, tmp_path):
    """A calibration without codes, codes of the other dtype, and codes of another model
    are refused in one line."""
    from jaxrt.frontends.build import build_module

    def run(mode, cal):
        m = build_module(tiny_loaded.config)
        PassManager(f'{BASE},quantize{{mode={mode} method=gptq calib="{cal}"}}').run(m)

    cases = [("fp8", gptq_cals[None], SettingError, "needs GPTQ codes, and calibration .* "
                                                    r"has none \(calibrate with --gptq fp8\)"),
             ("fp8-weight", gptq_cals["int8-weight"], SettingError,
              "holds i8 GPTQ codes .*made for int8-weight.*; mode fp8-weight needs f8e4m3fn"),
             ("w8a8", gptq_cals["fp8"], SettingError, "mode w8a8 needs i8 codes")]
    write_calibration(str(tmp_path / "other"), {
        f"{Q}.act_max": np.ones(32, np.float32), f"{Q}.gptq_codes": np.ones((8, 32), np.int8),
        f"{Q}.gptq_scale": np.ones((8, 1), np.float32)},
        {"format": 1, "alpha": 0.5, "gptq": {"mode": "w8a8", "dtype": "i8"}})
    cases.append(("w8a8", str(tmp_path / "other"), InputError,
                  r"does not match the model: weight .*q_proj.weight is f32\[32, 32\], its "
                  r"GPTQ codes are \[8, 32\]"))
    for mode, cal, error, message in cases:
        with pytest.raises(error, match=message) as e:
            run(mode, cal)
        assert "\n" not in str(e.value)


# ---- the command line ----------------------------------------------------------------------

def _one_line_error(capsys, message: str, command: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith(f"jaxrt {command}: error: ") and message in err, err
    assert err.count("\n") == 1, err


def test_cli_gptq(tiny_loaded, gptq_cals, tmp_path, capsys):
    """calibrate --gptq -> compile --gptq --calib DIR -> eval-ppl of the engine scores as
    eval-ppl --gptq --calib DIR, and as eval-ppl --gptq --calib TEXT (calibrating on the
    same text in a temporary directory: the same codes); data-free --gptq runs."""
    src = str(tiny_loaded.source)
    data, text = tmp_path / "calib.txt", tmp_path / "eval.txt"
    data.write_text(TEXT)
    text.write_text(" ".join(f"w{(i * 5) % 61 + 3}" for i in range(24)))
    assert main(["calibrate", src, "--data", str(data), "--num-tokens", "20", "--gptq",
                 "fp8", "--gptq-block", "16", "--gptq-damp", "0.05", "-o",
                 str(tmp_path / "c16")]) == 0
    assert "GPTQ f8e4m3fn codes for fp8" in capsys.readouterr().out
    meta = json.loads((tmp_path / "c16" / "calibration.json").read_text())["gptq"]
    assert (meta["block"], meta["damp"], meta["tokens"]) == (16, 0.05, 20)
    cal = str(tmp_path / "cal")
    assert main(["calibrate", src, "--data", str(data), "--gptq", "fp8-weight", "-o",
                 cal]) == 0
    capsys.readouterr()
    engine = str(tmp_path / "engine")
    assert main(["compile", src, "-o", engine, "-q", "fp8-weight", "--gptq", "--calib",
                 cal]) == 0
    capsys.readouterr()
    args = ["--text", str(text), "--json", "--context", "8", "--stride", "5"]
    assert main(["eval-ppl", engine, *args]) == 0
    from_engine = json.loads(capsys.readouterr().out)
    assert main(["eval-ppl", src, *args, "-q", "fp8-weight", "--gptq", "--calib", cal]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert direct["gptq"] and direct["nll"] == pytest.approx(from_engine["nll"], rel=1e-6)
    assert main(["eval-ppl", src, *args, "-q", "fp8", "--gptq", "--calib", cal]) == 0
    capsys.readouterr()
    # calibrated on the same text with the same defaults: the same codes
    assert main(["eval-ppl", src, *args, "-q", "fp8-weight", "--gptq", "--calib",
                 str(data)]) == 0
    on_text = json.loads(capsys.readouterr().out)
    assert on_text["nll"] == pytest.approx(direct["nll"], rel=1e-6)
    assert main(["eval-ppl", src, *args, "-q", "int8-weight", "--gptq"]) == 0  # data-free
    assert json.loads(capsys.readouterr().out)["tokens"] == 23


@pytest.mark.parametrize("command, message", [
    (["calibrate", "{src}", "-o", "{tmp}/c", "--gptq", "w8a8-smoothquant"],
     "SmoothQuant's smoothing changes the weights GPTQ would quantize"),
    (["calibrate", "{src}", "-o", "{tmp}/c", "--gptq", "int4"], "--gptq must be one of"),
    (["calibrate", "{src}", "-o", "{tmp}/c", "--gptq", "fp8", "--gptq-damp", "0"],
     "--gptq-damp must be in (0, 1]"),
    (["calibrate", "{src}", "-o", "{tmp}/c", "--gptq", "fp8", "--gptq-block", "0"],
     "--gptq-block must be >= 1"),
    (["eval-ppl", "{src}", "--text", "{tmp}/t.txt", "--gptq"],
     "--gptq chooses weight codes: give -q MODE"),
    (["eval-ppl", "{src}", "--text", "{tmp}/t.txt", "--gptq", "-q", "kv-int8"],
     "quantizes only the KV cache"),
    (["eval-ppl", "{src}", "--text", "{tmp}/t.txt", "--gptq", "-q", "w8a8-smoothquant"],
     "--gptq with -q w8a8-smoothquant"),
    (["eval-ppl", "{src}", "--text", "{tmp}/t.txt", "--gptq", "-q", "fp8", "--calib",
      "{int8}"], "mode fp8 needs f8e4m3fn codes"),
    (["eval-ppl", "{src}", "--text", "{tmp}/t.txt", "--gptq", "-q", "fp8", "--calib",
      "{plain}"], "needs GPTQ codes"),
    (["eval-ppl", "{src}", "--text", "{tmp}/t.txt", "-q", "int8-weight", "--calib",
      "{int8}"], "calib is for mode w8a8-smoothquant or method=gptq"),
    (["eval-ppl", "{src}", "--text", "{tmp}/t.txt", "--gptq", "-q", "fp8", "--calib",
      "{tmp}/t.txt"], "the calibration text is the evaluated text"),
    (["compile", "{src}", "-o", "{tmp}/e", "-q", "fp8", "--gptq"], "--gptq needs --calib"),
    (["compile", "{src}", "-o", "{tmp}/e", "--gptq", "--calib", "{int8}"],
     "--gptq chooses -q's weight codes"),
])
def test_cli_gptq_refusals_exit_2(tiny_loaded, gptq_cals, tmp_path, capsys, command,
                                  message):
    (tmp_path / "t.txt").write_text("w3 w4 w5 w6 w7")
    fill = {"src": str(tiny_loaded.source), "tmp": str(tmp_path),
            "int8": gptq_cals["int8-weight"], "plain": gptq_cals[None]}
    assert main([a.format(**fill) for a in command]) == 2
    _one_line_error(capsys, message, command[0])
