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
    assert from_engine["quantize"] == "w8a8-smoothquant"  # the engine's own
    assert main(["eval-ppl", tiny, *args, "-q", "w8a8-smoothquant", "--calib", cal]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert from_engine["nll"] == pytest.approx(direct["nll"], rel=1e-6)
    assert direct["tokens"] == 23
    assert main(["eval-ppl", other, *args, "-q", "w8a8-smoothquant", "--calib", cal]) == 2
    _one_line_error(capsys, "does not match the model", "eval-ppl")
    assert main(["eval-ppl", engine, *args, "--calib", cal]) == 2
    _one_line_error(capsys, "is an engine directory", "eval-ppl")


def test_calibrate_refuses_options_it_cannot_honour(tiny_dirs, tmp_path, capsys):
    """A negative seed, GPTQ's options without --gptq, --seed with --data (nothing is
    sampled) and more tokens than the model's context (32) or the text holds: one line,
    exit 2, never a traceback, never quietly ignored or clamped."""
    tiny, _ = tiny_dirs
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(f"w{i + 3}" for i in range(12)))  # 12 tokens, no BOS
    out = ["-o", str(tmp_path / "c")]
    for args, message in (
            (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
            (["--gptq-damp", "-1"], "--gptq-damp tunes GPTQ; give --gptq MODE too"),
            (["--gptq-damp", "0.01"], "--gptq-damp tunes GPTQ"),  # even at the default
            (["--gptq-block", "64"], "--gptq-block tunes GPTQ"),
            (["--data", str(data), "--seed", "0"], "--seed seeds the data-free sampling"),
            (["--gptq", "w8a8", "--gptq-damp", "-1"], "--gptq-damp must be in (0, 1]"),
            (["--num-tokens", "33"], "--num-tokens 33 exceeds the model's context of 32"),
            (["--data", str(data), "--num-tokens", "13"],
             "--num-tokens 13 exceeds the data text's 12 tokens")):
        assert main(["calibrate", tiny, *out, *args]) == 2, args
        _one_line_error(capsys, message, "calibrate")
    assert not (tmp_path / "c").exists()


def test_compile_names_a_text_file_given_as_calibration(tiny_dirs, tmp_path, capsys):
    """The text a calibration is made from is not one: -q's --calib and -p's calib= say
    what they expected, not a safetensors header length."""
    tiny, _ = tiny_dirs
    text = tmp_path / "calib.txt"
    text.write_text("w3 w4 w5 w6 " * 50)
    for args in (["-q", "w8a8-smoothquant", "--calib", str(text)],
                 ["-p", f"canonicalize,quantize{{mode=w8a8-smoothquant calib={text}}},"
                        f"plan-kv-cache"]):
        assert main(["compile", tiny, "-o", str(tmp_path / "e"), *args]) == 2
        err = capsys.readouterr().err
        assert err == (f"jaxrt compile: error: {text}: not a calibration: expected a "
                       f"directory from `jaxrt calibrate MODEL [--data TEXT] -o DIR` "
                       f"(holding calibration.safetensors), got a file that is not one\n")


def test_eval_ppl_calibrates_on_a_text_file(tiny_dirs, tmp_path, capsys, monkeypatch):
    """`--calib FILE` (text) scores as `jaxrt calibrate --data FILE` then `--calib DIR`
    (same defaults, so bit-identical smoothing), and not as the data-free default; the
    evaluated text as --calib (the file, a copy, a calibration made on either, one whose
    calibration.json predates data_sha256) is refused in one line."""
    tiny, _ = tiny_dirs
    monkeypatch.setenv("JAXRT_CACHE_DIR", str(tmp_path / "cache"))  # the data-free one's
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(f"w{(i * 7) % 59 + 3}" for i in range(40)))
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{(i * 5) % 61 + 3}" for i in range(24)))
    copy = tmp_path / "copy.txt"
    copy.write_text(text.read_text())
    args = ["eval-ppl", tiny, "--text", str(text), "--json", "--context", "8", "--stride",
            "5", "-q", "w8a8-smoothquant"]

    def nll(*extra):
        assert main([*args, *extra]) == 0
        return json.loads(capsys.readouterr().out)["nll"]

    cal = str(tmp_path / "cal")
    assert main(["calibrate", tiny, "--data", str(data), "-o", cal]) == 0
    capsys.readouterr()
    from_text = nll("--calib", str(data))
    assert from_text == nll("--calib", cal)
    assert from_text != nll()  # the data-free calibration smooths otherwise
    on_eval = tmp_path / "on-eval"
    assert main(["calibrate", tiny, "--data", str(copy), "-o", str(on_eval)]) == 0
    capsys.readouterr()
    for calib, message in ((text, "the calibration text is the evaluated text"),
                           (copy, "the calibration text is the evaluated text"),
                           (on_eval, "the calibration was made on the evaluated text")):
        assert main([*args, "--calib", str(calib)]) == 2
        _one_line_error(capsys, message, "eval-ppl")
    meta_file = on_eval / "calibration.json"  # as written before data_sha256: by path
    meta = json.loads(meta_file.read_text())
    del meta["data_sha256"]
    meta_file.write_text(json.dumps({**meta, "data": str(text)}))
    assert main([*args, "--calib", str(on_eval)]) == 2
    _one_line_error(capsys, "the calibration was made on the evaluated text", "eval-ppl")
    meta_file.write_text(json.dumps({**meta, "data": str(data)}))  # other text: accepted
    assert main([*args, "--calib", str(on_eval)]) == 0
