"""Issue 11: one regression test per defect found by treating every input as hostile.

Each failed before its fix (a traceback, a hang, gigabytes, or a silently changed result).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import tracemalloc

import pytest
from frontends_synth import tiny_hf_config, write_tiny_hf_dir

from tests.security.cli_checks import assert_one_line_exit_2, run_cli
from jaxrt.errors import InputError, SettingError, TemplateError
from jaxrt.frontends.chat_template import render_chat
from jaxrt.frontends.errors import ModelFormatError
from jaxrt.frontends.hf_reader import read_hf_dir
from jaxrt.ir.parser import ParseError, parse
from jaxrt.runtime.request import SamplingParams
from jaxrt.runtime.scheduler import BucketPolicy

MESSAGES = [{"role": "user", "content": "hi"}]


# ---- 1, 2: chat templates ------------------------------------------------------------

@pytest.mark.parametrize("template, message", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ 'a' + 1 }}", "TypeError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    ("{{ range(10**9) }}", "OverflowError"),
    ("{{ x.y.z }", "TemplateSyntaxError"),
])
def test_template_runtime_errors_are_template_errors(template, message):
    with pytest.raises(TemplateError, match=message) as e:
        render_chat(template, MESSAGES, source="model.gguf: chat template")
    assert str(e.value).startswith("model.gguf: chat template")


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for x in ['a'] * 100000 %}{% for y in ['a'] * 100000 %}{{ '' }}{% endfor %}{% endfor %}",
    "{{ (9**(9**9)) > 1 }}",
    "{{ 'x' * 10**9 }}",
    "{{ 'x'|center(10**9) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ ('a' * 1000).replace('a', 'b' * 100000) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "{% set n = namespace(v=3) %}{% for i in range(60) %}{% set n.v = n.v * n.v %}"
    "{% endfor %}{{ n.v }}",
    "{% set x %}{% for i in range(100000) %}{{ 'y' * 1000000 ~ i }}{% endfor %}{% endset %}"
    "{{ x|length }}",
])
def test_templates_are_bounded_in_time_and_memory(template):
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(TemplateError, match="limit"):
            render_chat(template, MESSAGES, time_limit=1.0, max_chars=1 << 20)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - start < 5.0
    assert peak < 64 << 20, peak


def test_template_limits_leave_real_templates_alone():
    from jaxrt.frontends.tokenizer import GEMMA3_CHAT_TEMPLATE
    long = "word " * 200_000  # a 1 MB prompt renders in full
    out = render_chat(GEMMA3_CHAT_TEMPLATE, [{"role": "user", "content": long}],
                      bos_token="<bos>")
    assert out == f"<bos><start_of_turn>user\n{long.strip()}<end_of_turn>\n" \
                  f"<start_of_turn>model\n"


def test_cli_chat_template_error_is_one_line(tmp_path, capsys):
    root = write_tiny_hf_dir(tmp_path / "m", tokenizer_config={
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ 1/0 }}"})
    code, _, err = run_cli(["generate", root, "--chat", "--prompt", "w3"], capsys)
    assert_one_line_exit_2(code, err, "chat template", "ZeroDivisionError")


# ---- 3, 10: IR parser --------------------------------------------------------------------

def test_parser_memory_is_linear_in_string_literals():
    n = 5 << 20
    text = 'module @m attributes {s = "' + "x" * n + '"} {\n}\n'
    tracemalloc.start()
    try:
        m = parse(text)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert m.attributes["s"] == "x" * n
    assert peak < 4 * n + (1 << 20), f"{peak / n:.1f} bytes per character"  # was ~290


@pytest.mark.parametrize("text, message", [
    ("module @m attributes {x = 1e999999} {\n}", "out of range"),
    ("module @m attributes {x = -1e400} {\n}", "out of range"),
    ('module @m attributes {x = "abc} {\n}', "unterminated string"),
    ('module @"a\\', "unterminated string"),
])
def test_parser_refuses_overflowing_floats_and_open_strings(text, message):
    with pytest.raises(ParseError, match=message):
        parse(text)


def test_parser_keeps_infinity_keywords():
    m = parse("module @m attributes {a = inf, b = -inf, c = 1e308} {\n}")
    assert m.attributes == {"a": float("inf"), "b": float("-inf"), "c": 1e308}


# ---- 4: prompts that are not valid Unicode -------------------------------------------------

def test_invalid_utf8_prompt_on_the_command_line(hf_dir, capsys):
    prompt = os.fsdecode(b"\xff\xfehi")  # what Python makes of those argv bytes
    code, _, err = run_cli(["generate", hf_dir, "--prompt", prompt], capsys)
    assert_one_line_exit_2(code, err, "--prompt", "UTF-8", "0xff")


def test_lone_surrogate_text_names_what_it_was(hf_dir):
    tok = read_hf_dir(hf_dir).tokenizer
    with pytest.raises(InputError, match="prompt is not valid Unicode"):
        tok.encode("\ud800 w3", what="prompt")


# ---- 5: Hugging Face config.json ---------------------------------------------------------

@pytest.mark.parametrize("model_type, overrides, key", [
    ("llama", {"rms_norm_eps": -1}, "rms_norm_eps"),
    ("llama", {"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ("llama", {"rope_theta": -10000}, "rope_theta"),
    ("llama", {"rope_theta": 0}, "rope_theta"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8,
                                "low_freq_factor": -1}}, "low_freq_factor"),
    ("mistral", {"sliding_window": -1}, "sliding_window"),
    ("mistral", {"sliding_window": 0}, "sliding_window"),
    ("llama", {"hidden_size": 8.9}, "hidden_size"),
    ("llama", {"vocab_size": "16"}, "vocab_size"),
    ("llama", {"max_position_embeddings": -5}, "max_position_embeddings"),
    ("llama", {"num_key_value_heads": True}, "num_key_value_heads"),
    ("llama", {"eos_token_id": [2, -1]}, "eos_token_id"),
])
def test_hf_config_values_are_validated(tmp_path, model_type, overrides, key):
    config = tiny_hf_config(model_type)
    root = write_tiny_hf_dir(tmp_path / "m", config)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({**config, **overrides}, f)
    with pytest.raises(ModelFormatError) as e:
        read_hf_dir(root)
    assert "config.json" in str(e.value) and key in str(e.value), str(e.value)


def test_hf_config_null_window_is_full_attention(tmp_path):
    model = read_hf_dir(write_tiny_hf_dir(tmp_path / "m", tiny_hf_config(
        "mistral", sliding_window=None)))
    assert model.config.layer_types == ("full",) and model.config.sliding_window is None


# ---- 6, 8: engine directories ------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_dir(hf_dir, tmp_path_factory):
    from jaxrt.compiler import load, save_engine
    out = str(tmp_path_factory.mktemp("engine") / "e")
    save_engine(load(hf_dir), out)
    return out


def _tampered(engine_dir, tmp_path, edit):
    dst = str(tmp_path / "tampered")
    shutil.copytree(engine_dir, dst)
    edit(dst)
    return dst


def _meta(change):
    def edit(d):
        path = os.path.join(d, "engine.json")
        with open(path) as f:
            meta = json.load(f)
        change(meta)
        with open(path, "w") as f:
            json.dump(meta, f)
    return edit


def _replace(name, old, new):
    def edit(d):
        path = os.path.join(d, name)
        with open(path, "rb") as f:
            data = f.read()
        assert old in data
        with open(path, "wb") as f:
            f.write(data.replace(old, new))
    return edit


def _to_dev_zero(d):
    os.remove(os.path.join(d, "model.jxr"))
    os.symlink("/dev/zero", os.path.join(d, "model.jxr"))


def _many_pages(d):
    for name in ("model.jxr", "engine.json"):
        path = os.path.join(d, name)
        with open(path) as f:
            text = f.read()
        pages = json.load(open(os.path.join(d, "engine.json")))["kv_cache"]["num_pages"]
        text = text.replace(f"num_pages = {pages},", "num_pages = 30000000,").replace(
            f'"num_pages": {pages},', '"num_pages": 30000000,').replace(
            f", {pages}, 16,", ", 30000000, 16,")
        with open(path, "w") as f:
            f.write(text)


@pytest.mark.parametrize("edit, file, message", [
    (_meta(lambda m: m.pop("config")), "engine.json", "missing key config"),
    (_meta(lambda m: m["config"].pop("vocab_size")), "engine.json", "config.vocab_size"),
    (_meta(lambda m: m.update(surprise=1)), "engine.json", "unexpected key surprise"),
    (_meta(lambda m: m.update(tokenizer="x")), "engine.json", "tokenizer must be an object"),
    (_meta(lambda m: m["tokenizer"].update(eos_ids=5)), "engine.json", "eos_ids"),
    (_meta(lambda m: m["config"].update(vocab_size=10)), "engine.json", "vocab_size = 10"),
    (_meta(lambda m: m["config"].update(rms_eps=-1)), "engine.json", "config.rms_eps"),
    (_meta(lambda m: m["config"].update(hidden_size="8")), "engine.json", "hidden_size"),
    (_replace("engine.json", b'"format"', b'"\xff\xfeformat"'), "engine.json", "UTF-8"),
    (_replace("model.jxr", b"weight @lm_head.weight : f32[16, 8]\n",
              b"weight @lm_head.weight : i32[16, 8]\n"), "model.jxr", "i32"),
    (_many_pages, "model.jxr", "GiB"),
    (_to_dev_zero, "model.jxr", "not a regular file"),
])
def test_engine_directories_are_validated(engine_dir, tmp_path, capsys, edit, file, message):
    from jaxrt.compiler import load_engine
    bad = _tampered(engine_dir, tmp_path, edit)
    with pytest.raises(InputError) as e:
        load_engine(bad)
    assert os.path.join(bad, file) in str(e.value) and message in str(e.value), str(e.value)
    code, _, err = run_cli(["inspect", bad], capsys)
    assert_one_line_exit_2(code, err, file, message)


def test_engine_weight_dtype_must_match_the_ir(engine_dir, tmp_path):
    from jaxrt.compiler import load_engine
    bad = _tampered(engine_dir, tmp_path, _replace(
        "weights.safetensors", b'"dtype":"F32"', b'"dtype":"I32"'))
    with pytest.raises(ModelFormatError, match="IR says"):
        load_engine(bad)


def test_untampered_engine_loads(engine_dir):
    from jaxrt.compiler import load_engine
    model = load_engine(engine_dir)
    assert model.config.vocab_size == 16


def test_opt_dev_zero_is_refused(capsys):
    code, _, err = run_cli(["opt", "/dev/zero"], capsys)
    assert_one_line_exit_2(code, err, "/dev/zero", "not a regular file")


# ---- 7: bucket and engine settings ---------------------------------------------------------

@pytest.mark.parametrize("kw, name", [
    ({"growth": 1}, "bucket_growth"), ({"growth": 0}, "bucket_growth"),
    ({"growth": -2}, "bucket_growth"), ({"token_floor": 0}, "min_bucket_tokens"),
    ({"q_block": 0}, "q_block"), ({"max_num_seqs": 0}, "max_num_seqs"),
])
def test_bucket_policy_refuses_settings_that_never_end(kw, name):
    args = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "max_pages_per_seq": 4, **kw}
    with pytest.raises(SettingError, match=name):
        BucketPolicy(**args).all_buckets()


@pytest.mark.parametrize("flag, value", [("--bucket-growth", "1"), ("--bucket-growth", "0"),
                                         ("--max-num-seqs", "0")])
def test_bench_settings_are_refused_before_loading(engine_dir, capsys, flag, value):
    code, _, err = run_cli(["bench", engine_dir, flag, value], capsys)
    assert_one_line_exit_2(code, err, flag)


# ---- 9: messages that say what to fix ------------------------------------------------------

def test_bind_with_a_non_ascii_digit_names_the_option(tmp_path, capsys):
    path = tmp_path / "m.jxr"
    path.write_text("module @m {\n}\n")
    code, _, err = run_cli(["inspect", str(path), "--bind", "T=²"], capsys)
    assert_one_line_exit_2(code, err, "--bind")


@pytest.mark.parametrize("flag, value", [("--seed", str(2**70)), ("--seed", "-1"),
                                         ("--beam-width", "10000")])
def test_sampling_errors_name_the_option(hf_dir, capsys, flag, value):
    code, _, err = run_cli(["generate", hf_dir, "--prompt", "w3", "--max-tokens", "4", flag,
                            value], capsys)
    assert_one_line_exit_2(code, err, flag)


# ---- 10: seeds ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [2**64, 2**70, -1])
def test_seeds_outside_64_bits_are_refused(seed):
    with pytest.raises(SettingError, match=r"seed"):
        SamplingParams(seed=seed).validate(16, 64, 1)


def test_largest_seed_is_accepted():
    SamplingParams(seed=2**64 - 1).validate(16, 64, 1)


# ---- one place decides what a user error is ------------------------------------------------

def test_a_bug_is_reported_as_one(monkeypatch, capsys):
    import jaxrt.cli.opt as opt

    def broken(args):
        raise ValueError("internal invariant")  # a plain ValueError is not input's fault
    monkeypatch.setattr(opt, "run", broken)
    code, _, err = run_cli(["opt", "-"], capsys)
    assert code == 1
    assert "Traceback" in err and "internal error (a bug in jaxrt" in err.splitlines()[-1]


def test_project_errors_are_input_errors():
    from jaxrt.cli.main import CliError
    from jaxrt.ir.opdef import VerifyError
    from jaxrt.passes.manager import PipelineError
    from jaxrt.passes.plan_kv_cache import KVPlanError
    for cls in (ModelFormatError, ParseError, VerifyError, PipelineError, KVPlanError,
                CliError, TemplateError, SettingError):
        assert issubclass(cls, InputError) and issubclass(cls, ValueError)


def test_engine_names_an_invalid_prompt_and_a_dict_of_params():
    from jaxrt.runtime.engine import Engine
    from tests.runtime.fake_model import FakeRunner
    with Engine(FakeRunner(num_pages=16, page_size=4), max_num_seqs=2,
                max_num_batched_tokens=16, max_model_len=16, warmup=False, log=None) as engine:
        with pytest.raises(InputError, match="prompt is not valid UTF-8"):
            engine.generate("\udcffab")
        with pytest.raises(SettingError, match=r"SamplingParams\(\*\*d\)"):
            engine.generate(["ab"], {"max_tokens": 2})
