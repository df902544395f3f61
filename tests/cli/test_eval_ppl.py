"""jaxrt eval-ppl and jaxrt/perplexity.py: the window rule, the NLL against a direct
computation on a tiny random model (reference interpreter, every window from position 0),
the CLI's output and errors, and SmolLM2 against transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.cli.main import main
from jaxrt.errors import SettingError
from jaxrt.ir import interpreter
from jaxrt.ir.substitute import bind_dims
from jaxrt.perplexity import perplexity, plan_windows, token_nlls, windows


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 200), st.integers(2, 64), st.data())
def test_windows_score_every_token_once_with_context(n, context, data):
    stride = data.draw(st.integers(1, context - 1))
    scored = []
    for begin, first, end in windows(n, context, stride) if context < n else \
            plan_windows(n, context, stride):
        assert end - begin <= context and begin < first <= end
        scored += range(first, end)
        if begin > 0:  # past the first window: at least context - stride tokens of context
            assert first - begin >= context - stride
    assert scored == list(range(1, n))


@pytest.mark.parametrize("context, stride, message", [
    (1, None, "context must be >= 2 tokens"), (8, 8, r"stride must be in \[1, context - 1\]"),
    (8, 0, r"stride must be in \[1, context - 1\] = \[1, 7\], got 0")])
def test_bad_windows_are_refused(context, stride, message):
    with pytest.raises(SettingError, match=message):
        plan_windows(20, context, stride)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.frontends.frontends_synth import tiny_hf_config, write_tiny_hf_dir
    config = tiny_hf_config(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=32)
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny"), config)


def _direct_nlls(model, ids, context, stride):
    """Each window through the reference interpreter in one step, from position 0;
    -log_softmax in float64."""
    pages = -(-context // 4)
    m = bind_dims(model.module, {"pages": pages, "page_size": 4})
    out, scale = np.full(len(ids) - 1, np.nan), 0.0
    for begin, first, end in plan_windows(len(ids), context, stride):
        w = np.asarray(ids[begin:end], np.int32)
        pos = np.arange(len(w), dtype=np.int32)
        kv = np.zeros(m.functions["step"].arg("kv").type.shape, np.float32)
        logits = interpreter.run(m, "step", [w, pos, pos, np.arange(pages, dtype=np.int32)[None],
                                             np.array([len(w)], np.int32), pos[None], pos, kv],
                                 dict(model.weights))[0].astype(np.float64)
        m_ = logits.max(axis=-1, keepdims=True)
        logp = logits - m_ - np.log(np.exp(logits - m_).sum(axis=-1, keepdims=True))
        for t in range(first, end):
            out[t - 1] = -logp[t - begin - 1, ids[t]]
        scale = max(scale, float(np.abs(logits).max()))
    return out, scale


def test_nll_equals_a_direct_computation(tiny_dir):
    """Windows of 12 every 5 tokens over 24 tokens (4 windows), run in chunks of 4 tokens
    through the cache. f32 on both sides, differing in summation order: logits agree to
    1e-5 of their largest magnitude (tests/lowering/test_xla_rules.py's f32 bound), and
    -log softmax moves by at most twice the logits' largest error: 2e-5 x max |logit|."""
    from jaxrt.compiler import Target, compile_loaded
    from jaxrt.frontends.sources import load_model
    ids = [int(x) for x in (np.arange(24) * 11) % 61 + 3]
    model = compile_loaded(load_model(tiny_dir), target=Target("cpu", 1 << 30, "f32"),
                           page_size=4, num_pages=3, max_model_len=12)
    got, count = token_nlls(model.executable(), ids, context=12, stride=5, chunk=4)
    assert count == 4
    want, max_logit = _direct_nlls(model, ids, 12, 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max_logit)
    res = perplexity(model.executable(), ids, context=12, stride=5, chunk=8)
    assert res.tokens == 23 and res.ppl == pytest.approx(np.exp(got.mean()), rel=1e-6)


def test_cli_errors_are_one_line(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("w3 w4 w5")
    (tmp_path / "empty.txt").write_text(" \n")
    for path, message in ((tmp_path / "missing.txt", "missing.txt"),
                          (tmp_path / "empty.txt", "the text file is empty")):
        assert main(["eval-ppl", tiny_dir, "--text", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxrt eval-ppl: error: ") and message in err
        assert err.count("\n") == 1
    for args, message in ((["--context", "33"], "--context 33 exceeds the model's context of 32"),
                          (["--context", "2", "--stride", "2"], "stride must be in")):
        assert main(["eval-ppl", tiny_dir, "--text", str(text), *args]) == 2
        assert message in capsys.readouterr().err


def test_quantized_engine_directory_scores_as_the_model(tiny_dir, tmp_path, capsys):
    """jaxrt compile -q w8a8 stores codes and scales; eval-ppl on the engine directory gives
    the NLL of eval-ppl -q w8a8 on the model (same weights bit for bit, same windows)."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 5) % 61 + 3}" for i in range(24)))
    engine = str(tmp_path / "engine")
    assert main(["compile", tiny_dir, "-o", engine, "-q", "w8a8"]) == 0
    assert "quantize{mode=w8a8}" in capsys.readouterr().out
    assert main(["eval-ppl", engine, "--text", str(text), "--json", "--stride", "5",
                 "--context", "8"]) == 0
    from_engine = json.loads(capsys.readouterr().out)
    assert from_engine["quantize"] == "w8a8" and from_engine["gptq"] is False  # its own
    assert main(["eval-ppl", tiny_dir, "--text", str(text), "--json", "-q", "w8a8",
                 "--stride", "5", "--context", "8"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert from_engine["tokens"] == direct["tokens"] == 23  # 24 words, no BOS: 23 scored
    assert direct["windows"] == 5 and direct["quantize"] == "w8a8"
    assert direct["ppl"] == pytest.approx(np.exp(direct["nll"])) and direct["nll"] > 0
    assert from_engine["nll"] == pytest.approx(direct["nll"], rel=1e-6)
    assert main(["eval-ppl", engine, "--text", str(text), "-q", "fp8"]) == 2
    assert "is an engine directory" in capsys.readouterr().err
    assert main(["compile", tiny_dir, "-o", engine, "-q", "fp8", "-p", "dce"]) == 2


def test_engine_directory_reports_its_quantization(tiny_dir, tmp_path, capsys):
    """--json's quantize for an engine directory is what it was compiled with (its
    module's quantization and kv_quantization attributes), not the absent -q (null); so
    is the plain output's."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 5) % 61 + 3}" for i in range(12)))
    engine = str(tmp_path / "engine")
    assert main(["compile", tiny_dir, "-o", engine, "-q", "int8-weight+kv-int8"]) == 0
    capsys.readouterr()
    assert main(["eval-ppl", engine, "--text", str(text), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantize"] == "int8-weight+kv-int8" and out["gptq"] is False
    assert main(["eval-ppl", engine, "--text", str(text)]) == 0
    assert f"{engine} (int8-weight+kv-int8): perplexity" in capsys.readouterr().out


ENGLISH = ("The old lighthouse stood at the end of a narrow spit of land, where the river met "
           "the sea. For more than a century its keepers had climbed the spiral stairs each "
           "evening to light the lamp, and each morning they had climbed them again to trim "
           "the wick and polish the glass.")


@pytest.mark.xdist_group("smollm2")
def test_smollm2_nll_matches_transformers(smollm2, smollm2_hf_model, smollm2_f32_exe):
    """float32 both sides, one window. Logits agree to 1e-4 of each position's max |logit|
    (tests/frontends/test_parity_real.py); -log softmax moves by at most twice the logits'
    max error, so each token's NLL, and their mean, agree within 2e-4 x max |logit|."""
    import torch
    ids = smollm2.tokenizer.encode_text(ENGLISH)
    ours = perplexity(smollm2_f32_exe, ids, context=len(ids))
    with torch.no_grad():
        logits = smollm2_hf_model(input_ids=torch.tensor([ids])).logits[0]
        theirs = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))
    bound = 2e-4 * float(logits.abs().max())
    assert ours.tokens == len(ids) - 1 and ours.windows == 1
    assert abs(ours.nll - theirs) <= bound, (ours.nll, theirs, bound)
