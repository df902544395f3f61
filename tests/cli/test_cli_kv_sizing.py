"""`jaxrt generate` on a CPU: the KV cache is sized to the request (prompt + --max-tokens,
rounded to pages), Gemma 3's 32k context no longer has to fit, and sizes that cannot be
honoured are one-line errors (exit 2) naming the option that fixes them."""
from __future__ import annotations

import json
import math

import pytest

from jaxrt.cli.main import main

PROMPT = "The capital of France is"


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.slow
@pytest.mark.xdist_group("gemma3")
def test_gemma3_generates_with_a_cache_sized_to_the_request(capsys):
    code, out, err = run_cli(["generate", "gemma3-270m", "--prompt", PROMPT, "--max-tokens", "8",
                              "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert len(got["ids"]) == 8 and got["finish_reason"] == "length"
    assert got["backend"] == "cpu"
    needed = len(got["prompt_ids"]) + 8
    assert got["kv_cache"]["num_pages"] == math.ceil(needed / 16)
    assert got["kv_cache"]["bytes"] == got["kv_cache"]["num_pages"] * 16 * 36 * 1024

    # The same greedy tokens from the Python API (a small engine: quick to warm up).
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams
    engine = Engine("gemma3-270m", max_num_seqs=1, max_model_len=64,
                    max_num_batched_tokens=16, log=None)
    (ref,) = engine.generate([got["prompt_ids"]], SamplingParams(max_tokens=8))
    assert ref.ids == got["ids"]


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_engine_cap_option_sizes_the_cache():
    from jaxrt.runtime.engine import Engine
    engine = Engine("smollm2-135m", max_num_seqs=64, max_model_len=256,
                    kv_cache_max_gib=0.05, warmup=False, log=None)
    bytes_per_token = 30 * 2 * 3 * 64 * 4  # layers * (k, v) * kv_heads * head_dim * f32
    assert engine.num_pages == int(0.05 * (1 << 30)) // (16 * bytes_per_token)
    with pytest.raises(ValueError, match=r"raise max-cache-gib \(--kv-cache-max-gib\)"):
        Engine("smollm2-135m", max_num_seqs=1, kv_cache_max_gib=0.1, warmup=False, log=None)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
@pytest.mark.parametrize("flags,needles", [
    (["--max-model-len", "4"], ["exceeds --max-model-len 4", "raise --max-model-len"]),
    (["--max-model-len", "9000"], ["--max-model-len 9000 exceeds the model's context of 8192"]),
    (["--num-pages", "1", "--max-tokens", "40"], ["num-pages=1 holds 16 tokens",
                                                  "raise num-pages (--num-pages)"]),
    (["--max-model-len", "8192", "--kv-cache-max-gib", "0.1"],
     ["one sequence of 8192 tokens needs 512 pages", "lower max-model-len (--max-model-len)",
      "raise max-cache-gib (--kv-cache-max-gib)"]),
    (["--kv-cache-memory-fraction", "0.001"], ["raise memory-fraction "
                                               "(--kv-cache-memory-fraction)"]),
])
def test_sizes_that_do_not_fit_name_the_option(capsys, flags, needles):
    code, _, err = run_cli(["generate", "smollm2-135m", "--prompt", PROMPT, *flags], capsys)
    one_line_error(code, err, *needles)


@pytest.mark.parametrize("flags,needle", [
    (["--max-model-len", "0"], "--max-model-len must be >= 1, got 0"),
    (["--num-pages", "-3"], "--num-pages must be >= 1, got -3"),
    (["--kv-cache-memory-fraction", "1.5"], "--kv-cache-memory-fraction must be in (0, 1]"),
    (["--kv-cache-max-gib", "nan"], "--kv-cache-max-gib must be a number > 0, got nan"),
    (["--kv-cache-max-gib", "0"], "--kv-cache-max-gib must be a number > 0, got 0.0"),
])
def test_impossible_cache_options_are_refused_before_loading(capsys, flags, needle):
    code, _, err = run_cli(["generate", "does-not-exist.gguf", "--prompt", "hi", *flags],
                           capsys)
    one_line_error(code, err, needle)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_engine_directory_keeps_its_planned_length_and_refuses_a_new_cap(tmp_path, capsys):
    out = tmp_path / "engine"
    code, _, err = run_cli(["compile", "smollm2-135m", "-o", str(out), "--max-model-len", "64",
                            "--max-num-seqs", "2"], capsys)
    assert code == 0, err
    from jaxrt.runtime.engine import Engine
    engine = Engine(str(out), warmup=False, log=None)
    assert (engine.num_pages, engine.max_model_len) == (8, 64)
    with pytest.raises(ValueError, match="engine directory; its KV cache was planned"):
        Engine(str(out), kv_cache_max_gib=1, warmup=False, log=None)
    code, _, err = run_cli(["generate", str(out), "--prompt", PROMPT, "--max-tokens", "60"],
                           capsys)
    one_line_error(code, err, "exceeds the engine's max-model-len of 64 tokens")
