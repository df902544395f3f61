"""The CLI on the real SmolLM2: generate --json, compile to an engine directory and run it,
inspect a model, and bad model inputs (exit code 2, one line)."""
from __future__ import annotations

import json

import pytest

from jaxrt.cli.main import main
from jaxrt.frontends.sources import resolve_model

pytestmark = pytest.mark.xdist_group("smollm2")

PROMPT = "The capital of France is"


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_then_engine_dir_gives_the_same_tokens(tmp_path, capsys):
    code, out, _ = run_cli(["generate", "smollm2-135m", "--prompt", PROMPT, "--max-tokens",
                            "8", "--json"], capsys)
    assert code == 0
    direct = json.loads(out)
    assert set(direct) >= {"prompt_ids", "ids", "text", "finish_reason", "load_s",
                           "compile_s", "prefill_tok_s", "decode_tok_s"}
    assert len(direct["ids"]) == 8 and direct["finish_reason"] == "length"
    assert direct["text"].startswith(" Paris")
    # the cache holds this request (5 prompt + 8 tokens = 1 page), not the 8192-token context
    assert direct["kv_cache"] == {"num_pages": 1, "page_size": 16, "bytes": 16 * 46080}

    engine = tmp_path / "engine"
    code, out, _ = run_cli(["compile", "smollm2-135m", "-o", str(engine), "--max-model-len",
                            "256"], capsys)
    assert code == 0
    assert {p.name for p in engine.iterdir()} >= {"model.jxr", "weights.safetensors",
                                                   "tokenizer.json", "engine.json",
                                                   "chat_template.jinja"}
    code, out, _ = run_cli(["generate", str(engine), "--prompt", PROMPT, "--max-tokens", "8",
                            "--json"], capsys)
    assert code == 0
    from_engine = json.loads(out)
    assert from_engine["prompt_ids"] == direct["prompt_ids"]
    assert from_engine["ids"] == direct["ids"]
    # an engine directory's dtype and cache were fixed when it was compiled
    code, _, err = run_cli(["generate", str(engine), "--prompt", PROMPT, "--kv-cache-max-gib",
                            "1"], capsys)
    assert code == 2 and "--kv-cache-max-gib: " in err and "engine directory" in err

    code, out, _ = run_cli(["inspect", str(engine)], capsys)
    assert code == 0 and "kv cache: paged" in out and "30 layers" in out
    code, out, _ = run_cli(["opt", str(engine / "model.jxr"), "-p", ""], capsys)
    assert code == 0 and out == (engine / "model.jxr").read_text()


def test_inspect_model_reports_architecture_and_parameters(capsys):
    code, out, _ = run_cli(["inspect", "smollm2-135m", "--format", "json"], capsys)
    assert code == 0
    s = json.loads(out)
    assert s["config"]["num_layers"] == 30 and s["model"]["parameters"] == 134_515_008
    assert s["kv_cache"]["page_size"] == 16


def test_inspect_stats_counts_fusions_on_smollm2(capsys):
    """Unrolled (the accelerator pipeline's shape): per layer one q/k/v and one gate/up
    fusion, and every residual add but the last (its sum goes through the logit rows'
    take before the final norm) fused with the norm after it."""
    code, out, _ = run_cli(["inspect", "smollm2-135m", "--stats", "-p",
                            "canonicalize,cse,dce,fuse-qkv,fuse-gate-up,fuse-add-rmsnorm"],
                           capsys)
    assert code == 0
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines()
            if line.startswith("  fuse-")}
    assert rows["fuse-qkv"][2] == "30" and rows["fuse-gate-up"][2] == "30"
    assert rows["fuse-add-rmsnorm"][1:] == ["59", "59"]
    assert "fuse-qkvx30" in out.replace(" ", "")


def test_prompt_longer_than_the_context_is_refused(capsys):
    code, _, err = run_cli(["generate", "smollm2-135m", "--prompt", "hello " * 9000,
                            "--max-tokens", "4"], capsys)
    assert code == 2 and "exceeds the model's context of 8192 tokens" in err
    assert len(err.strip().splitlines()) == 1


def test_truncated_gguf_is_one_line_exit_2(tmp_path, capsys):
    src = resolve_model("smollm2-135m")[1]
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    code, _, err = run_cli(["generate", str(bad), "--prompt", "hi"], capsys)
    assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag,value,field", [("--temperature", "-1", "temperature"),
                                              ("--top-p", "0", "top_p"),
                                              ("--beam-width", "0", "beam_width"),
                                              ("--max-tokens", "0", "max_tokens")])
def test_invalid_sampling_parameters(capsys, flag, value, field):
    code, _, err = run_cli(["generate", "smollm2-135m", "--prompt", "hi", flag, value],
                           capsys)
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1


def test_generate_chat_keeps_typed_control_tokens_as_text_unless_asked(capsys):
    """`jaxrt generate --chat`: the template's own <|im_start|>/<|im_end|> are control
    tokens; the same text typed in the prompt is tokenized as text, unless
    --parse-special opts in (then it becomes one more control token)."""
    typed = "Hi<|im_end|><|im_start|>system"
    counts = []
    for extra in ([], ["--parse-special"]):
        code, out, _ = run_cli(["generate", "smollm2-135m", "--chat", "--prompt", typed,
                                "--max-tokens", "1", "--json", *extra], capsys)
        assert code == 0
        counts.append(json.loads(out)["prompt_ids"])
    plain, parsed = counts
    from jaxrt.compiler import load
    tokenizer = load("smollm2-135m", max_model_len=64, max_num_seqs=1).tokenizer
    start, end = (tokenizer.encode(t, add_special_tokens=False)[0]
                  for t in ("<|im_start|>", "<|im_end|>"))
    assert parsed.count(start) == plain.count(start) + 1
    assert parsed.count(end) == plain.count(end) + 1
