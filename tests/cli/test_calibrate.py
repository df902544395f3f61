"""jaxrt calibrate and the calibrated mode through the CLI (tiny random Llama, Hugging
Face directory): one-line errors for missing or empty data and for a calibration of
another model; calibrate -> compile --calib -> eval-ppl scores as eval-ppl --calib."""
from __future__ import annotations

import json

import pytest

from jaxrt.cli.main import main


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two tiny Llamas of different widths (the second's calibration fits the first's
    names but not its shapes)."""
    from tests.frontends.frontends_synth import tiny_hf_config, write_tiny_hf_dir
    out = []
    for hidden in (32, 48):
        config = tiny_hf_config(vocab_size=64, hidden_size=hidden, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=32)
        out.append(write_tiny_hf_dir(tmp_path_factory.mktemp(f"tiny{hidden}"), config))
    return out


def _one_line_error(capsys, message: str, command: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith(f"jaxrt {command}: error: ") and message in err, err
    assert err.count("\n") == 1, err


def test_calibrate_errors_are_one_line(tiny_dirs, tmp_path, capsys):
    tiny, _ = tiny_dirs
    (tmp_path / "empty.txt").write_text(" \n")
    for data, message in ((tmp_path / "missing.txt", "missing.txt"),
                          (tmp_path / "empty.txt", "the calibration text file is empty")):
        assert main(["calibrate", tiny, "--data", str(data), "-o", str(tmp_path / "c")]) == 2
        _one_line_error(capsys, message, "calibrate")
    for args, message in ((["--alpha", "1.5"], "--alpha must be in [0, 1]"),
                          (["--percentile", "0"], "--percentile must be in (0, 100]"),
                          (["--num-tokens", "1"], "--num-tokens must be >= 2")):
        assert main(["calibrate", tiny, "-o", str(tmp_path / "c"), *args]) == 2
        _one_line_error(capsys, message, "calibrate")
    assert main(["compile", tiny, "-o", str(tmp_path / "e"), "-q", "w8a8-smoothquant",
                 "--calib", str(tmp_path / "nothing")]) == 2
    _one_line_error(capsys, "no calibration here", "compile")


def test_calibrate_compile_and_eval_ppl(tiny_dirs, tmp_path, capsys):
    """A calibration on text compiles into an engine whose perplexity is eval-ppl's with
    the same --calib (bit-identical weights: the smoothing is folded at compile time);
    a calibration of the other model is refused in one line."""
    tiny, other = tiny_dirs
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(f"w{(i * 7) % 59 + 3}" for i in range(40)))
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{(i * 5) % 61 + 3}" for i in range(24)))
    cal = str(tmp_path / "cal")
    assert main(["calibrate", tiny, "--data", str(data), "--alpha", "0.8", "-o", cal]) == 0
    assert "14 linears in 8 input groups" in capsys.readouterr().out
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["alpha"] == 0.8
    engine = str(tmp_path / "engine")
    assert main(["compile", tiny, "-o", engine, "-q", "w8a8-smoothquant", "--calib", cal]) == 0
    assert "alpha=0.8" in capsys.readouterr().out  # the calibration's alpha
    args = ["--text", str(text), "--json", "--context", "8", "--stride", "5"]
    assert main(["eval-ppl", engine, *args]) == 0
    from_engine = json.loads(capsys.readouterr().out)
    assert main(["eval-ppl", tiny, *args, "-q", "w8a8-smoothquant", "--calib", cal]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert from_engine["nll"] == pytest.approx(direct["nll"], rel=1e-6)
    assert direct["tokens"] == 23
    assert main(["eval-ppl", other, *args, "-q", "w8a8-smoothquant", "--calib", cal]) == 2
    _one_line_error(capsys, "does not match the model", "eval-ppl")
    assert main(["eval-ppl", engine, *args, "--calib", cal]) == 2
    _one_line_error(capsys, "is an engine directory", "eval-ppl")
