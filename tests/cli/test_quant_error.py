"""jaxrt inspect --quant-error (jaxrt/quant_error.py) on a tiny random Llama (Hugging Face
directory): the probe reads exactly zero error for the float model against itself, a
quantized model and its engine directory report one row per layer, and bad settings are
one-line errors (exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxrt.cli.main import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.frontends.frontends_synth import tiny_hf_config, write_tiny_hf_dir
    config = tiny_hf_config(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("qe")
    (root / "text.txt").write_text(" ".join(f"w{i % 11}" for i in range(40)))
    return write_tiny_hf_dir(root / "hf", config), str(root / "text.txt")


def _one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("jaxrt inspect: error: ") and message in err, err
    assert err.count("\n") == 1, err


def test_the_probe_reads_zero_for_float_against_itself(tiny):
    from jaxrt.quant_error import models_for, quant_error
    float_model, quant, mode = models_for(tiny[0], "int8-weight")
    ids = list(range(1, 30))
    same = quant_error(float_model, float_model, ids)
    assert [r["query_rel_error"] for r in same["layers"]] == [0.0] * 3
    assert same["logits_rel_error"] == 0.0 and same["top1_agreement"] == 1.0
    assert abs(same["mean_kl"]) < 1e-12
    q = quant_error(float_model, quant, ids)
    errors = [r["query_rel_error"] for r in q["layers"]]
    assert [r["layer"] for r in q["layers"]] == [0, 1, 2] and mode == "int8-weight"
    assert all(0 < e < 0.2 for e in errors), errors   # int8 per channel: ~1e-2 a layer
    assert 0 < q["logits_rel_error"] < 0.5 and q["mean_kl"] > 0


def test_model_with_a_mode_and_its_engine_directory(tiny, tmp_path, capsys):
    hf, text = tiny
    assert main(["inspect", hf, "--quant-error", "-q", "int8-weight+kv-int8", "--data", text,
                 "--format", "json"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert direct["mode"] == "int8-weight+kv-int8" and len(direct["layers"]) == 3
    engine = str(tmp_path / "engine")
    assert main(["compile", hf, "-o", engine, "-q", "int8-weight+kv-int8",
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main(["inspect", engine, "--quant-error", "--data", text, "--format",
                 "json"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["mode"] == direct["mode"] and compiled["tokens"] == direct["tokens"]
    # the same quantization (per-channel scales do not change when fused or outlined): the
    # same errors up to f32 summation order
    np.testing.assert_allclose([r["query_rel_error"] for r in compiled["layers"]],
                               [r["query_rel_error"] for r in direct["layers"]], rtol=1e-3)
    assert main(["inspect", engine, "--quant-error", "--data", text]) == 0
    out = capsys.readouterr().out
    assert "int8-weight+kv-int8 against float" in out and "top-1 agreement" in out


@pytest.mark.parametrize("args, message", [
    (["--quant-error"], "needs a quantized engine directory or -q MODE"),
    (["--quant-error", "-q", "int4"], "mode must be one of"),
    (["--quant-error", "-q", "int8-weight", "--num-tokens", "1"], "--num-tokens"),
    (["-q", "int8-weight"], "go with --quant-error"),
    (["--quant-error", "-q", "int8-weight", "--data", "/nonexistent/t.txt"], "t.txt"),
])
def test_bad_settings_are_one_line_errors(tiny, capsys, args, message):
    assert main(["inspect", tiny[0], *args]) == 2
    _one_line_error(capsys, message)
