"""Pass registry, pipeline strings, the pass manager, hooks and statistics."""
import io
import json
from dataclasses import dataclass
from typing import Literal

import pytest

from jaxrt.ir import VerifyError, ops
from jaxrt.ir.printer import print_module
from jaxrt.passes import PASSES, PassManager, PipelineError, parse_pipeline
from jaxrt.passes.canonicalize import Canonicalize
from jaxrt.passes.cse import EliminateCommonSubexpressions
from jaxrt.passes.dce import EliminateDeadCode
from jaxrt.passes.manager import (DumpAfter, Pass, TimingHook, VerifyHook,
                                  format_pipeline, register_pass)

from tests.passes.passes_testutil import const, function, t


T = t(2, 3)


@dataclass(frozen=True)
class OptionsForTest(Pass):
    name = "test-options"
    page_size: int = 16
    scale: float = 1.0
    enabled: bool = False
    label: str = "x"
    mode: Literal["fast", "exact"] = "exact"

    def run(self, module, ctx):
        ctx.count("runs")


@dataclass(frozen=True)
class RequiredForTest(Pass):
    name = "test-required"
    layers: int

    def run(self, module, ctx):
        pass


@dataclass(frozen=True)
class BreakIRForTest(Pass):
    """Makes the function use a value before it is defined."""

    name = "test-break-ir"

    def run(self, module, ctx):
        fn = module.functions["f"]
        fn.ops.reverse()


TEST_PASSES = (OptionsForTest, RequiredForTest, BreakIRForTest)


@pytest.fixture(autouse=True, scope="module")
def registered_test_passes():
    """Register this module's passes only while its tests run (PASSES is global)."""
    for cls in TEST_PASSES:
        register_pass(cls)
    yield
    for cls in TEST_PASSES:
        del PASSES[cls.name]


def sample():
    return function({"x": T}, lambda b, x: b(ops.neg, b(ops.add, x, const(b, -0.0, T))))


def test_registry_holds_the_standard_passes():
    assert PASSES["canonicalize"] is Canonicalize
    assert PASSES["cse"] is EliminateCommonSubexpressions
    assert PASSES["dce"] is EliminateDeadCode


def test_parse_pipeline_passes_and_options():
    passes = parse_pipeline("canonicalize, cse,dce{prune-weights=true},"
                            "test-options{page-size=32 scale=0.5, enabled=1 label=\"a b\" "
                            "mode=fast}")
    assert passes == [Canonicalize(), EliminateCommonSubexpressions(),
                      EliminateDeadCode(prune_weights=True),
                      OptionsForTest(page_size=32, scale=0.5, enabled=True, label="a b",
                                     mode="fast")]
    assert parse_pipeline("test-options{}") == [OptionsForTest()]
    assert parse_pipeline("test-required{layers=3}") == [RequiredForTest(3)]


def test_empty_pipeline_is_valid():
    assert parse_pipeline("") == [] and parse_pipeline("   ") == []
    m = sample()
    before = print_module(m)
    PassManager("").run(m)
    assert print_module(m) == before


def test_pipeline_round_trips_through_its_spelling():
    text = 'canonicalize{fold-limit=8},cse,test-options{page-size=1 label="a,b" mode=fast}'
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == ('canonicalize{fold-limit=8},cse,'
                                       'test-options{page-size=1 label="a,b" mode=fast}')
    assert parse_pipeline(format_pipeline(passes)) == passes
    assert str(EliminateDeadCode()) == "dce"


@pytest.mark.parametrize("text, message, column", [
    ("canonicalise", "unknown pass 'canonicalise'; known passes: canonicalize, ", 1),
    ("cse,,dce", "expected a pass name, found ','", 5),
    ("cse,", "expected a pass name after ','", 5),
    ("cse dce", "expected ',' or end of pipeline after pass cse, found 'd'", 5),
    ("test-options{page-sise=4}", "pass test-options has no option 'page-sise' "
     "(options: page-size, scale, enabled, label, mode)", 14),
    ("test-options{page_size=4}", "has no option 'page_size'", 14),
    ("test-options{page-size=four}", "option page-size of test-options expects int, "
     "got 'four'", 24),
    ("test-options{page-size=1.5}", "expects int, got '1.5'", 24),
    ("test-options{scale=big}", "option scale of test-options expects float", 20),
    ("test-options{enabled=yes}", "option enabled of test-options expects bool, got 'yes'", 22),
    ("test-options{mode=slow}", "option mode of test-options must be one of "
     "['fast', 'exact'], got 'slow'", 19),
    ("test-options{page-size=4", "missing '}' after the options of test-options", 25),
    ("test-options{page-size 4}", "expected '=' after option page-size", 24),
    ("test-options{page-size=1 page-size=2}", "option page-size of test-options given twice",
     26),
    ("test-options{label=\"open}", "unterminated string", 20),
    ("test-options{=3}", "expected an option name, found '='", 14),
    ("test-required", "pass test-required: ", 1),
    ("cse;dce", "expected ',' or end of pipeline after pass cse, found ';'", 4),
])
def test_pipeline_errors(text, message, column):
    with pytest.raises(PipelineError) as err:
        parse_pipeline(text)
    assert message in str(err.value)
    assert err.value.position == column - 1
    assert f"(at column {column} of {text!r})" in str(err.value)


def test_register_pass_checks_the_declaration():
    with pytest.raises(TypeError, match="kebab-case"):
        @register_pass
        @dataclass(frozen=True)
        class Bad(Pass):
            name = "Bad_Name"

    with pytest.raises(TypeError, match="frozen dataclass"):
        @register_pass
        class NotFrozen(Pass):
            name = "test-not-frozen"

    with pytest.raises(TypeError, match="option data has type"):
        @register_pass
        @dataclass(frozen=True)
        class BadOption(Pass):
            name = "test-bad-option"
            data: list = None

    with pytest.raises(ValueError, match="already registered"):
        @register_pass
        @dataclass(frozen=True)
        class Clash(Pass):
            name = "cse"


def test_pass_manager_collects_timing_and_rule_stats():
    m = sample()
    pm = PassManager("canonicalize,cse,dce,test-options")
    pm.run(m)
    names = [p.name for p in pm.stats.passes]
    assert names == ["canonicalize", "cse", "dce", "test-options"]
    assert all(p.seconds >= 0 for p in pm.stats.passes)
    canon = pm.stats.passes[0]
    assert canon.rules["add-zero"].rewrites == 1
    assert canon.rules["neg-neg"].attempts == 1 and canon.rules["neg-neg"].rewrites == 0
    assert pm.stats.passes[3].counters == {"runs": 1}
    table = pm.stats.table(rules=True)
    assert "canonicalize" in table and "add-zero" in table and "total" in table
    assert "pass_stats" not in m.attributes  # recording is opt-in


def test_recorded_stats_are_json_like_and_accumulate():
    m = sample()
    PassManager("canonicalize,cse", record_stats=True).run(m)
    PassManager("dce", record_stats=True).run(m)
    runs = m.attributes["pass_stats"]
    assert [r["pipeline"] for r in runs] == ["canonicalize,cse", "dce"]
    assert json.loads(json.dumps(runs)) == runs
    canon = runs[0]["passes"][0]
    assert canon["pass"] == "canonicalize" and canon["rules"]["add-zero"]["rewrites"] == 1
    assert runs[1]["passes"][0]["counters"] == {"ops-removed": 0}
    assert "pass_stats" in print_module(m)  # the printer can show it


def test_verify_hook_names_the_pass_that_broke_the_ir():
    m = sample()
    with pytest.raises(VerifyError, match="after pass test-break-ir: @f op #0"):
        PassManager("cse,test-break-ir,dce", hooks=[VerifyHook()]).run(m)


def test_verify_hook_once_at_the_end_names_the_pipeline():
    """every_pass=False (a model load's): the broken result is still refused, once the
    pipeline is done, naming the pipeline; an intact run verifies the input and the
    result only."""
    m = sample()
    with pytest.raises(VerifyError, match=r"after the pipeline cse,test-break-ir,dce "):
        PassManager("cse,test-break-ir,dce", hooks=[VerifyHook(every_pass=False)]).run(m)
    from jaxrt.passes import manager
    calls = []
    real = manager.verify
    manager.verify = lambda module: calls.append(module) or real(module)
    try:
        PassManager("canonicalize,cse,dce", hooks=[VerifyHook(every_pass=False)]).run(sample())
        assert len(calls) == 2
        PassManager("canonicalize,cse,dce", hooks=[VerifyHook()]).run(sample())
        assert len(calls) == 2 + 4
    finally:
        manager.verify = real


def test_verify_hook_checks_the_input():
    m = sample()
    m.functions["f"].ops.reverse()
    with pytest.raises(VerifyError, match="before the pipeline"):
        PassManager("cse", hooks=[VerifyHook()]).run(m)


def test_dump_after_named_pass_to_stream_and_callback():
    stream = io.StringIO()
    dumps = []
    m = sample()
    PassManager("canonicalize,cse,dce", hooks=[
        DumpAfter("canonicalize", stream),
        DumpAfter(["cse", "dce"], lambda name, text: dumps.append((name, text))),
    ]).run(m)
    out = stream.getvalue()
    assert out.startswith("// ----- IR after canonicalize ----- //\nmodule @test {")
    assert out.count("IR after") == 1 and "%0 = neg(%x)" in out
    assert [name for name, _ in dumps] == ["cse", "dce"]
    assert dumps[-1][1] == print_module(m)


def test_dump_after_all_and_timing_hook():
    dumps, timing = [], io.StringIO()
    PassManager("canonicalize{fold-limit=4},dce", hooks=[
        DumpAfter("all", lambda name, text: dumps.append(name)), TimingHook(timing)]).run(sample())
    assert dumps == ["canonicalize{fold-limit=4}", "dce"]
    lines = timing.getvalue().splitlines()
    assert lines[0].split() == ["pass", "ms"] and lines[-1].startswith("total")
    assert lines[1].startswith("canonicalize{fold-limit=4}")


def test_a_pass_runs_alone_and_accepts_typed_options():
    m = sample()
    assert Canonicalize(fold_limit=4)(m) is m
    assert [op.opdef for op in m.functions["f"].ops] == [ops.neg]


def test_passes_and_analyses_never_import_jax():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, jaxrt.passes, jaxrt.ir.analysis.graph; "
            "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')); "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
