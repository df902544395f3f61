"""The jaxrt command line: opt/inspect on IR text, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxrt.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IR = """\
module @m {
  weight @w : f32[4]
  func @f(%x: f32[T, 4]) -> (f32[T, 4]) {
    %0 = weight @w : f32[4]
    %1 = constant() {value = 1.0} : f32[4]
    %2 = mul(%x, %1) : f32[T, 4]
    %3 = transpose(%2) {perm = [1, 0]} : f32[4, T]
    %4 = transpose(%3) {perm = [1, 0]} : f32[T, 4]
    %5 = add(%4, %0) : f32[T, 4]
    %6 = add(%4, %0) : f32[T, 4]
    %7 = mul(%5, %6) : f32[T, 4]
    return %7
  }
}
"""


@pytest.fixture
def ir_file(tmp_path):
    p = tmp_path / "m.jxr"
    p.write_text(IR)
    return str(p)


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_opt_empty_pipeline_prints_module_unchanged(ir_file, capsys):
    code, out, _ = run_cli(["opt", ir_file, "-p", ""], capsys)
    assert code == 0 and out == IR


def test_opt_pipeline_simplifies(ir_file, capsys):
    code, out, err = run_cli(["opt", ir_file, "-p", "canonicalize,cse,dce", "--stats"], capsys)
    assert code == 0
    body = out.split("func @f")[1]
    assert "transpose" not in body and body.count("add(") == 1 and "constant" not in body
    assert "mul-one" in err and "transpose-transpose" in err  # rule statistics table
    assert "pass_stats" in out  # --stats records them in the module


def test_opt_dump_after(ir_file, capsys):
    code, out, err = run_cli(["opt", ir_file, "-p", "canonicalize,cse", "--dump-after", "cse"],
                             capsys)
    assert code == 0 and "IR after cse" in err and "IR after canonicalize" not in err


def test_opt_output_is_reparseable(ir_file, tmp_path, capsys):
    out_path = tmp_path / "o.jxr"
    assert run_cli(["opt", ir_file, "-p", "canonicalize", "-o", str(out_path)], capsys)[0] == 0
    code, out, _ = run_cli(["opt", str(out_path), "-p", ""], capsys)
    assert code == 0 and out == out_path.read_text()


@pytest.mark.parametrize("fmt", ["text", "json", "dot"])
def test_inspect_formats(ir_file, capsys, fmt):
    code, out, _ = run_cli(["inspect", ir_file, "--format", fmt, "--bind", "T=8"], capsys)
    assert code == 0
    if fmt == "json":
        s = json.loads(out)
        f = s["functions"]["f"]
        assert f["op_histogram"]["add"] == 2 and f["ops"] == 8
        assert s["weights"] == {"count": 1, "defined": 0, "bytes": 16, "params": 4,
                                "by_dtype": {"f32": {"count": 1, "bytes": 16, "params": 4}}}
        assert f["peak_activation_bytes"] >= 3 * 8 * 4 * 4  # several [8, 4] f32 values live
        assert f["values"] == 9
    elif fmt == "dot":
        assert out.startswith("digraph") and "transpose" in out
    else:
        assert "func @f: 8 ops" in out and "weights: 1 tensors" in out


def test_inspect_shows_pass_stats(ir_file, tmp_path, capsys):
    out_path = tmp_path / "o.jxr"
    run_cli(["opt", ir_file, "-p", "canonicalize,cse,dce", "--stats", "-o", str(out_path)],
            capsys)
    code, out, _ = run_cli(["inspect", str(out_path)], capsys)
    assert code == 0 and "passes: canonicalize,cse,dce" in out



@pytest.mark.parametrize("name", ["default-gpu", "default-cpu"])
def test_opt_named_default_pipeline(tmp_path, capsys, name):
    """`-p default-gpu` / `default-cpu` is the compile pipeline's graph passes for that
    target (fusions, bf16 on GPUs): the same module as its expansion, with per-rule
    fusion matches in --stats."""
    from jaxrt.compiler import named_pipeline
    from jaxrt.frontends.build import build_module
    from tests.passes.test_outline_layers import tiny_config
    path = tmp_path / "llama.jxr"
    path.write_text(str(build_module(tiny_config("llama", 2))))
    code, _, err = run_cli(["opt", str(path), "-p", name, "--stats"], capsys)
    assert code == 0
    code, named, _ = run_cli(["opt", str(path), "-p", name], capsys)
    expansion = named_pipeline(name)
    assert "fuse-qkv" in expansion and "plan-kv-cache" not in expansion
    assert ("cast-float{dtype=bf16}" in expansion) == (name == "default-gpu")
    code, spelled, _ = run_cli(["opt", str(path), "-p", expansion], capsys)
    assert code == 0 and named == spelled
    for fusion in ("fuse-qkv", "fuse-gate-up", "fuse-add-rmsnorm"):
        assert fusion in err
    assert named.count("concat") >= 2  # q/k/v and gate/up weights concatenated per layer


BAD_CASES = [
    (["opt", "{ir}", "-p", "canonicalise"], "unknown pass 'canonicalise'"),
    (["opt", "{ir}", "-p", "canonicalize{fold-limt=3}"], "no option 'fold-limt'"),
    (["opt", "{ir}", "-p", "canonicalize{fold-limit=x}"], "expects int"),
    (["opt", "{ir}", "-p", "canonicalize{fold-limit=-1}"], "fold-limit must be >= 0, got -1"),
    (["opt", "{ir}", "-p", "cse", "--dump-after", "dce"], "no such pass in the pipeline"),
    (["opt", "{missing}", "-p", ""], "no such file"),
    (["opt", "{bad}", "-p", ""], ":6:18: undefined value %9"),
    (["inspect", "{bad}"], ":6:18: undefined value %9"),
    (["inspect", "{ir}", "--bind", "T=x"], "expected NAME=N"),
    (["inspect", "does-not-exist"], "not an alias"),
    (["generate", "does-not-exist.gguf", "--prompt", "hi"], "no such file"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--prompt-logprobs", "21"],
     "--prompt-logprobs: SamplingParams.prompt_logprobs=21: at most 20"),
    # structured output: refused before the model is read
    (["generate", "smollm2-135m", "--prompt", "hi", "--regex", "a(b"], "--regex: "),
    (["generate", "smollm2-135m", "--prompt", "hi", "--json-schema", "{missing}"],
     "no such file"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--json-schema", "{ir}"],
     "--json-schema: SamplingParams.json_schema="),
    (["generate", "smollm2-135m", "--prompt", "hi", "--choice", "a,,b"], "--choice: "),
    (["generate", "smollm2-135m", "--prompt", "hi", "--speculative", "{"], "--speculative"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--speculative",
      '{"method": "ngram", "num_tokens": 2, "k": 1}'], "unknown key 'k'"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--speculative",
      '{"method": "draft", "num_tokens": 2}'], "needs a model"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--tensor-parallel", "0"],
     "--tensor-parallel must be >= 1"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--tensor-parallel", "2"],
     "9 attention heads are not divisible by tp=2"),
    (["generate", "smollm2-135m", "--prompt", "hi", "-q", "int9"],
     "quantize: mode must be one of"),
    (["serve", "smollm2-135m", "--tensor-parallel", "0"], "--tensor-parallel must be >= 1"),
]


@pytest.mark.parametrize("argv,message", BAD_CASES)
def test_bad_input_is_one_line_exit_2(ir_file, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.jxr"
    bad.write_text(IR.replace("%2 = mul(%x, %1)", "%2 = mul(%x, %9)"))
    paths = {"{ir}": ir_file, "{missing}": str(tmp_path / "nope.jxr"), "{bad}": str(bad)}
    argv = [paths.get(a, a) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_subprocess_error(tmp_path):
    """The installed entry point: a malformed file gives file:line:col, exit 2, no traceback."""
    bad = tmp_path / "bad.jxr"
    bad.write_text("module @m {\n  func @f( -> () {\n")
    proc = subprocess.run([sys.executable, "-m", "jaxrt.cli.main", "opt", str(bad), "-p", ""],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert f"{bad}:2:" in proc.stderr and "Traceback" not in proc.stderr
