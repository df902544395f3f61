"""Issue 11, second sweep: one regression test per defect, each failing before its fix.

jax: specs blame the user's line; deeply nested JSON anywhere the user controls is one
line; structured-output text is checked and choice lists capped; eval-ppl window options;
engine directories refuse settings they cannot honour."""
from __future__ import annotations

import json
import os
import re
import shutil
import textwrap

import pytest

from tests.security.cli_checks import assert_one_line_exit_2, run_cli
from jaxrt.errors import (InputError, SettingError, check_json_depth, json_text_depth,
                          load_json, short_repr)
from jaxrt.frontends.errors import ModelFormatError
from jaxrt.runtime.request import SamplingParams
from jaxrt.runtime.structured import MAX_CHOICES

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def engine_dir(hf_dir, tmp_path_factory):
    from jaxrt.compiler import load, save_engine
    out = str(tmp_path_factory.mktemp("engine") / "e")
    save_engine(load(hf_dir, max_model_len=64), out)
    return out


# ---- 1: jax:MODULE:ATTR errors blame the user's line ----------------------------------

USER_MODULES = {
    "jx_missing_dep": "import json\nimport no_such_package_for_jaxrt_tests\n",
    "jx_syntax": "def build(:\n    pass\n",
    "jx_raises_at_import": "x = 1\nraise ValueError('at import')\n",
    "jx_exits": "import sys\n\ndef build():\n    sys.exit(3)\n",
    "jx_factory": "def helper():\n    raise RuntimeError('no weights')\n\n"
                  "def build():\n    return helper()\n",
    "jx_forward": textwrap.dedent("""\
        import jax.numpy as jnp

        def forward(p, tokens):
            x = p["e"][tokens]
            return x @ missing_name

        def build():
            return forward, {"e": jnp.ones((10, 4))}
        """),
    "jx_reshape": textwrap.dedent("""\
        import jax.numpy as jnp

        def forward(p, tokens):
            x = p["e"][tokens]
            return jnp.reshape(x, (7, 3))

        def build():
            return forward, {"e": jnp.ones((10, 4))}
        """),
    "jx_sort": textwrap.dedent("""\
        import jax
        import jax.numpy as jnp

        def forward(p, tokens):
            x = jax.lax.sort(p["e"][tokens], dimension=1)
            return x @ p["e"].T

        def build():
            return forward, {"e": jnp.ones((10, 4))}
        """),
}


@pytest.mark.parametrize("module, line, needle", [
    ("jx_missing_dep", 2, "no module named 'no_such_package_for_jaxrt_tests'"),
    ("jx_syntax", 1, "SyntaxError"),
    ("jx_raises_at_import", 2, "ValueError: at import"),
    ("jx_factory", 2, "RuntimeError: no weights"),
    ("jx_exits", 4, "SystemExit: 3"),
    ("jx_forward", 5, "NameError"),
    ("jx_reshape", 5, "reshape"),
    ("jx_sort", 5, "'sort': no import rule"),
])
def test_jax_spec_errors_blame_the_users_line(tmp_path, monkeypatch, capsys, module, line,
                                              needle):
    (tmp_path / f"{module}.py").write_text(USER_MODULES[module])
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_cli(["dump", f"jax:{module}:build"], capsys)
    assert_one_line_exit_2(code, err, needle, f"{module}.py:{line}")


# ---- 2: deeply nested JSON ----------------------------------------------------------------

def test_json_helpers_bound_nesting_without_recursing():
    assert json_text_depth('{"a": "[[[[\\" {", "b": [[1]]}') == 3
    assert json_text_depth(DEEP) == 100_000
    with pytest.raises(InputError, match="x: JSON nested more than 64 levels"):
        load_json(DEEP, "x")
    with pytest.raises(InputError, match="x: not valid JSON"):
        load_json("{1", "x")
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InputError, match="nested more than 64"):
        check_json_depth(deep, "v")
    cyclic: dict = {}
    cyclic["a"] = cyclic
    with pytest.raises(InputError, match="nested more than 64"):
        check_json_depth(cyclic, "v")
    wide = [0]
    for _ in range(30):  # 1000**30 paths, 30 distinct lists: walked once each
        wide = [wide] * 1000
    assert check_json_depth(wide, "v") is wide
    assert len(short_repr(deep)) <= 60 and len(short_repr("x" * 10**7)) <= 60


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_deep_json_in_a_model_directory(hf_dir, tmp_path, capsys, file):
    d = _copy(hf_dir, tmp_path, "m")
    with open(os.path.join(d, file), "w") as f:
        f.write('{"a": ' + DEEP + "}")
    code, _, err = run_cli(["inspect", d], capsys)
    assert_one_line_exit_2(code, err, file, "nested more than 64")


def test_deep_json_in_an_engine_directory(engine_dir, tmp_path):
    from jaxrt.compiler import load_engine
    d = _copy(engine_dir, tmp_path, "e")
    path = os.path.join(d, "engine.json")
    meta = json.load(open(path))
    text = json.dumps(meta).replace('"format"', '"x": ' + DEEP + ', "format"', 1)
    open(path, "w").write(text)
    with pytest.raises(ModelFormatError, match="engine.json: JSON nested more than 64"):
        load_engine(d)


@pytest.mark.parametrize("schema", [
    DEEP, '{"enum": ' + DEEP + "}",
    "deep dict", "deep list"])
def test_deep_json_schemas_are_refused(schema):
    if schema == "deep dict":
        schema = {}
        for _ in range(5000):
            schema = {"type": "array", "items": schema}
    elif schema == "deep list":  # llguidance crashed the process (SIGSEGV) on this one
        deep: list = []
        for _ in range(100_000):
            deep = [deep]
        schema = {"enum": deep}
    with pytest.raises(SettingError, match="json_schema=.*nested more than 64"):
        SamplingParams(json_schema=schema)


def test_json_schema_nested_64_deep_is_accepted():
    schema = '{"type": "array", "items": ' * 31 + "{}" + "}" * 31  # 32 objects deep
    assert SamplingParams(json_schema=schema).constraint is not None


def test_cli_json_schema_and_speculative_options(hf_dir, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(DEEP)
    code, _, err = run_cli(["generate", hf_dir, "--prompt", "hi", "--json-schema",
                            str(schema)], capsys)
    assert_one_line_exit_2(code, err, "--json-schema", "nested more than 64")
    code, _, err = run_cli(["generate", hf_dir, "--prompt", "hi", "--speculative", DEEP],
                           capsys)
    assert_one_line_exit_2(code, err, "--speculative", "nested more than 64")


def test_server_deep_json_is_a_400():
    import httpx

    from jaxrt.runtime.engine import Engine
    from jaxrt.serve.server import ServerThread
    from tests.runtime.fake_model import FakeRunner
    engine = Engine(FakeRunner(num_pages=64, page_size=4), max_num_seqs=2, max_model_len=64,
                    warmup=False, log=None)
    with ServerThread(engine, model_name="fake") as srv:
        url = srv.url + "/v1/completions"
        for field in ("x", "guided_json"):
            value = json.dumps(DEEP) if field == "guided_json" else DEEP
            body = '{"model": "fake", "prompt": "abc", "max_tokens": 2, "%s": %s}' % (
                field, value)
            r = httpx.post(url, content=body, timeout=60,
                           headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            assert "nest" in r.json()["error"]["message"] \
                or "recursion" in r.json()["error"]["message"]


# ---- 3: structured-output text ------------------------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("regex", "a\udcff", "undecodable byte 0xff"),
    ("regex", "\ud800", "lone surrogate"),
    ("choice", ["ok", "b\ud800"], "choice 1 is not valid Unicode"),
    ("grammar", 'start: "\ud800"', "lone surrogate"),
    ("choice", [f"c{i}" for i in range(MAX_CHOICES + 1)], f"at most {MAX_CHOICES}"),
])
def test_structured_text_is_checked(field, value, needle):
    with pytest.raises(SettingError, match=f"SamplingParams.{field}=.*{needle}"):
        SamplingParams(**{field: value})


def test_stop_strings_with_lone_surrogates_are_refused():
    with pytest.raises(SettingError, match="stop string 0 is not valid Unicode"):
        SamplingParams(stop=["\ud800"]).validate(100, 100, 3)


def test_choice_list_at_the_cap_is_accepted():
    assert SamplingParams(choice=[f"c{i}" for i in range(MAX_CHOICES)]).constraint


# ---- 4: eval-ppl windows ------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--context", "0"], "--context must be >= 2"),
    (["--context", "-3"], "--context must be >= 2"),
    (["--stride", "0"], "--stride must be >= 1"),
    (["--context", "8", "--stride", "9"], "--stride must be in [1, --context - 1]"),
    (["--stride", "1000"], "--stride must be in [1, 63]"),
])
def test_eval_ppl_window_options_are_refused(hf_dir, tmp_path, capsys, args, needle):
    text = tmp_path / "t.txt"
    text.write_text("w3 w4 w5 w6 w7 w8 w9 w10 w11 w12")
    code, _, err = run_cli(["eval-ppl", hf_dir, "--text", str(text), *args], capsys)
    assert_one_line_exit_2(code, err, needle)


# ---- 5: engine directories keep what they fixed -------------------------------------------

@pytest.mark.parametrize("options, needle", [
    (dict(pipeline="canonicalize"), "pipeline='canonicalize'"),
    (dict(dtype="bfloat16"), "dtype='bfloat16'"),
    (dict(quantize="int8-weight"), "quantize='int8-weight'"),
    (dict(max_model_len=4096), "max_model_len=4096"),
    (dict(page_size=32), "page_size=32"),
    (dict(num_pages=3), "num_pages=3"),
    (dict(tensor_parallel=2), "tensor_parallel=2"),
    (dict(outline_layers=False), "outline_layers=False"),
    (dict(memory_fraction=0.5), "memory_fraction=0.5"),
    (dict(fuse=False), "fuse=False"),
])
def test_loading_an_engine_refuses_settings_it_fixed(engine_dir, options, needle):
    from jaxrt.compiler import load
    with pytest.raises(SettingError, match="is an engine directory") as e:
        load(engine_dir, **options)
    assert needle in str(e.value)


def test_loading_an_engine_accepts_its_own_settings(engine_dir):
    from jaxrt.compiler import load
    model = load(engine_dir)
    plan = model.kv_plan
    again = load(engine_dir, pipeline=model.pipeline, dtype="float32",
                 page_size=plan["page_size"], max_model_len=32, max_num_seqs=3,
                 fuse=True)
    assert again.kv_plan == plan


def test_engine_and_cli_refuse_settings_an_engine_fixed(engine_dir, capsys):
    from jaxrt.runtime.engine import Engine
    with pytest.raises(SettingError, match="dtype='bfloat16'"):
        Engine(engine_dir, dtype="bfloat16", warmup=False, log=None)
    with pytest.raises(SettingError, match="memory_fraction=0.5"):
        Engine(engine_dir, kv_cache_memory_fraction=0.5, warmup=False, log=None)
    code, _, err = run_cli(["dump", engine_dir, "-p", "cse"], capsys)
    assert_one_line_exit_2(code, err, "pipeline='cse'", "engine directory")


# ---- the fresh sweep ------------------------------------------------------------------------

def _fake_engine(**kw):
    from jaxrt.runtime.engine import Engine
    from tests.runtime.fake_model import FakeRunner
    return Engine(FakeRunner(num_pages=64, page_size=4), warmup=False, log=None,
                  **{"max_model_len": 64, **kw})


def test_top_k_above_the_vocabulary_keeps_every_token():
    """top_k=10**12 passed validation and overflowed the int32 sampling row inside the
    engine step (OverflowError: the server's engine loop died for every client). A k
    past the vocabulary keeps every token, which is what top_k=0 does."""
    engine = _fake_engine()
    try:
        huge, off = (engine.generate(["abc"], SamplingParams(max_tokens=6, temperature=1.0,
                                                             top_k=k, seed=7))[0].ids
                     for k in (10**12, 0))
    finally:
        engine.close()
    assert huge == off


@pytest.mark.parametrize("field, value", [("temperature", 1e39),
                                          ("repetition_penalty", 1e39)])
def test_sampling_floats_must_fit_float32(field, value):
    with pytest.raises(SettingError, match=field):
        SamplingParams(**{field: value}).validate(100, 64, 3)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_model_len=10.5), "max_model_len must be an integer"),
    (dict(max_model_len=0), "max_model_len must be an integer >= 1"),
    (dict(num_pages=3.7), "num_pages must be an integer"),
    (dict(eos_token_ids=[10**12]), "eos_token_ids: 1000000000000 is not a token id"),
    (dict(eos_token_ids=[-1]), "eos_token_ids: -1"),
    (dict(chat_template=5), "chat_template must be a string"),
    (dict(dtype="bfloat16"), "dtype='bfloat16' applies when the Engine loads"),
    (dict(kv_cache_memory_fraction=2), "kv_cache_memory_fraction=2 applies"),
])
def test_engine_arguments_are_checked(kwargs, needle):
    with pytest.raises(SettingError, match=re.escape(needle)):
        _fake_engine(**kwargs)


def test_max_model_len_past_the_models_context_is_refused(hf_dir, tmp_path, capsys):
    from jaxrt.runtime.engine import Engine
    with pytest.raises(InputError, match="max-model-len=1000 exceeds the model's context "
                                         "of 64"):
        Engine(hf_dir, max_model_len=1000, warmup=False, log=None)
    code, _, err = run_cli(["compile", hf_dir, "-o", str(tmp_path / "e"),
                            "--max-model-len", "1000"], capsys)
    assert_one_line_exit_2(code, err, "exceeds the model's context of 64")


@pytest.mark.parametrize("option", ["memory-gib=1e300", "memory-gib=nan",
                                    "max-cache-gib=inf memory-gib=1"])
def test_plan_memory_options_must_be_finite(tmp_path, capsys, option):
    ir = os.path.join(os.path.dirname(__file__), "..", "golden", "passes",
                      "llama_2layer_input.ir")
    code, _, err = run_cli(["opt", ir, "-p", f"plan-kv-cache{{{option} max-model-len=64}}"],
                           capsys)
    assert_one_line_exit_2(code, err, "must be a finite number of GiB")


def test_chat_template_files_are_checked(hf_dir, tmp_path, capsys):
    d = _copy(hf_dir, tmp_path, "m")
    os.symlink("/dev/zero", os.path.join(d, "chat_template.jinja"))
    code, _, err = run_cli(["generate", d, "--prompt", "hi", "--chat"], capsys)
    assert_one_line_exit_2(code, err, "chat_template.jinja: not a regular file")
    os.remove(os.path.join(d, "chat_template.jinja"))
    path = os.path.join(d, "tokenizer_config.json")
    config = json.load(open(path))
    json.dump({**config, "chat_template": 5}, open(path, "w"))
    code, _, err = run_cli(["generate", d, "--prompt", "hi", "--chat"], capsys)
    assert_one_line_exit_2(code, err, "chat_template must be a string")
    json.dump({**config, "chat_template": "{{ messages }}"}, open(path, "w"))
    code, _, err = run_cli(["generate", d, "--prompt", "hi", "--chat", "--max-tokens", "2"],
                           capsys)
    assert_one_line_exit_2(code, err, "cannot trace")


def test_an_unusable_host_is_a_setting_error():
    from jaxrt.serve.server import serve
    engine = _fake_engine()
    try:
        with pytest.raises(SettingError, match="--host/--port: cannot listen on '999.1.1.1'"):
            serve(engine, model_name="fake", host="999.1.1.1", port=0)
        with pytest.raises(SettingError, match="--host/--port"):
            serve(engine, model_name="fake", host="\udcff", port=0)
    finally:
        engine.close()


def test_output_errors_are_one_line(hf_dir, tmp_path, capsys):
    ir = os.path.join(os.path.dirname(__file__), "..", "golden", "passes", "cse_dce.ir")
    code, _, err = run_cli(["opt", ir, "-o", "/dev/full"], capsys)
    assert_one_line_exit_2(code, err, "/dev/full: cannot write")
    existing = tmp_path / "afile"
    existing.write_text("")
    code, _, err = run_cli(["compile", hf_dir, "-o", str(existing)], capsys)
    assert_one_line_exit_2(code, err, "File exists")


def test_structured_output_messages_are_bounded():
    grammar = "start: " + "(" * 5000 + '"a"' + ")" * 5000
    with pytest.raises(SettingError) as e:
        SamplingParams(grammar=grammar)
    assert len(str(e.value)) < 500


def test_gguf_chat_template_must_be_a_string(tmp_path):
    from frontends_synth import write_tiny_gguf
    from gguf import GGUFValueType

    from jaxrt.frontends.gguf_reader import read_gguf
    path = write_tiny_gguf(tmp_path / "t.gguf", hidden=32, ff=32, extra_meta={
        "tokenizer.chat_template": (7, GGUFValueType.UINT32)})
    with pytest.raises(ModelFormatError, match="tokenizer.chat_template must be a string"):
        read_gguf(path)


def test_a_fifo_for_weights_is_refused_not_waited_on(engine_dir, tmp_path):
    """An engine directory whose weights.safetensors was a FIFO blocked in open()
    forever."""
    from jaxrt.compiler import load_engine
    d = _copy(engine_dir, tmp_path, "e")
    os.remove(os.path.join(d, "weights.safetensors"))
    os.mkfifo(os.path.join(d, "weights.safetensors"))
    with pytest.raises(ModelFormatError, match="weights.safetensors: not a regular file"):
        load_engine(d)


@pytest.mark.parametrize("args, needle", [
    (["--num-requests", "0"], "--num-requests must be >= 1"),
    (["--input-len", "-3"], "--input-len must be >= 1"),
    (["--shared-prefix", "64"], "--shared-prefix must be < --input-len (64)"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1"),
])
def test_bench_errors_name_the_option(hf_dir, capsys, args, needle):
    code, _, err = run_cli(["bench", hf_dir, *args], capsys)
    assert_one_line_exit_2(code, err, needle)


@pytest.mark.parametrize("prompt, kind", [(None, "NoneType"), (b"\x01\x02", "bytes"),
                                          ({3, 1, 2}, "set"), ({"a": 1}, "dict")])
def test_prompts_are_text_or_a_sequence_of_ids(prompt, kind):
    """bytes were taken as token ids and a set in hash order; None was a TypeError."""
    engine = _fake_engine()
    try:
        with pytest.raises(InputError, match=f"a prompt is text .* got {kind}"):
            engine.generate([prompt], SamplingParams(max_tokens=1))
    finally:
        engine.close()


def test_ir_from_stdin_is_capped():
    """`cat /dev/zero | jaxrt opt -` read stdin whole, without end."""
    import subprocess
    import sys
    import jaxrt
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(jaxrt.__file__))}
    zeros = subprocess.Popen(["head", "-c", str((256 << 20) + 2), "/dev/zero"],
                             stdout=subprocess.PIPE)
    done = subprocess.run([sys.executable, "-m", "jaxrt.cli.main", "opt", "-"],
                          stdin=zeros.stdout, capture_output=True, text=True, env=env,
                          timeout=60)
    zeros.wait()
    assert done.returncode == 2, done.stderr
    assert "<stdin>: over the 268435456-byte limit" in done.stderr
