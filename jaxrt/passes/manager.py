"""Passes, the pass registry, pipeline strings and the pass manager.

    @register_pass
    @dataclass(frozen=True)
    class PlanKVCache(Pass):
        name = "plan-kv-cache"
        page_size: int = 16          # spelled page-size in pipelines
        def run(self, module, ctx): ...

    passes = parse_pipeline("canonicalize,cse,dce,plan-kv-cache{page-size=16}")
    pm = PassManager(passes, hooks=[VerifyHook(), DumpAfter("cse", sys.stderr)])
    pm.run(module)             # pm.stats: seconds per pass, per-rule statistics
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal, Sequence, TextIO

from jaxrt.errors import InputError
from jaxrt.ir.module import Module
from jaxrt.ir.opdef import VerifyError
from jaxrt.ir.verify import verify

from .rewrite import RuleSet, apply_rules
from .stats import PassStats, PipelineStats


class PipelineError(InputError):
    """A malformed pipeline string, unknown pass or option, or a bad option value."""

    def __init__(self, message: str, text: str = "", position: int | None = None):
        self.message, self.text, self.position = message, text, position
        where = f" (at column {position + 1} of {text!r})" if position is not None else ""
        super().__init__(message + where)


_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_OPTION_TYPES = (int, float, bool, str)


@dataclass
class PassContext:
    """Handed to `Pass.run`: the place to record statistics."""

    stats: PassStats

    def count(self, counter: str, n: int = 1) -> None:
        self.stats.counters[counter] = self.stats.counters.get(counter, 0) + n


class Pass:
    """Base class of passes: frozen dataclasses whose fields are their options."""

    name: ClassVar[str]

    def run(self, module: Module, ctx: PassContext) -> None:
        raise NotImplementedError

    def __call__(self, module: Module) -> Module:
        """Run this pass alone (no hooks); returns the module, changed in place."""
        self.run(module, PassContext(PassStats(str(self))))
        return module

    def __str__(self) -> str:
        opts = [f"{_kebab(f.name)}={_format_option(getattr(self, f.name))}"
                for f in dataclasses.fields(self)
                if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default]
        return self.name + ("{" + " ".join(opts) + "}" if opts else "")


class RewritePass(Pass):
    """A pass that applies `rules` to every function; the pass instance is `rw.ctx`."""

    rules: ClassVar[RuleSet]
    max_steps: ClassVar[int | None] = None

    def run(self, module: Module, ctx: PassContext) -> None:
        apply_rules(module, self.rules, ctx=self, stats=ctx.stats.rules,
                    max_steps=self.max_steps)


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator (above @dataclass(frozen=True)) adding a pass to the registry."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _KEBAB.match(name):
        raise TypeError(f"{cls.__name__}.name must be a kebab-case string, got {name!r}")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"pass {name}: {cls.__name__} must be a frozen dataclass")
    if name in PASSES and PASSES[name] is not cls:
        raise ValueError(f"pass {name!r} is already registered by {PASSES[name].__name__}")
    for f, t in _option_types(cls).items():
        if t not in _OPTION_TYPES and typing.get_origin(t) is not Literal:
            raise TypeError(f"pass {name}: option {f} has type {t}; options are int, float, "
                            "bool, str or Literal[...]")
    PASSES[name] = cls
    return cls


def _option_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _kebab(field_name: str) -> str:
    return field_name.replace("_", "-")


def _format_option(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9_.\-+]+", v):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)


def format_pipeline(passes: Iterable[Pass]) -> str:
    """The pipeline string that `parse_pipeline` turns back into `passes`."""
    return ",".join(str(p) for p in passes)


# ---- pipeline parsing -------------------------------------------------------------------------

class _Scanner:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def error(self, message: str, pos: int | None = None) -> PipelineError:
        return PipelineError(message, self.text, self.pos if pos is None else pos)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def word(self, what: str) -> tuple[str, int]:
        self.skip_space()
        m = re.compile(r"[A-Za-z0-9_\-]+").match(self.text, self.pos)
        if not m:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of input"
            raise self.error(f"expected {what}, found {got}")
        self.pos = m.end()
        return m.group(), m.start()

    def value(self) -> tuple[str, int]:
        self.skip_space()
        start = self.pos
        if self.peek() == '"':
            m = re.compile(r'"((?:[^"\\]|\\.)*)"').match(self.text, self.pos)
            if not m:
                raise self.error("unterminated string")
            self.pos = m.end()
            return re.sub(r"\\(.)", r"\1", m.group(1)), start
        m = re.compile(r"[^\s,{}=\"]+").match(self.text, self.pos)
        if not m:
            raise self.error("expected an option value")
        self.pos = m.end()
        return m.group(), start


def parse_pipeline(text: str) -> list[Pass]:
    """`"canonicalize,cse,dce,plan-kv-cache{page-size=16}"` -> pass instances; '' -> [].

    Options go in braces after a pass name, separated by spaces or commas; values are
    bare words or double-quoted strings.
    """
    s = _Scanner(text)
    passes: list[Pass] = []
    if s.at_end():
        return passes
    while True:
        name, at = s.word("a pass name")
        cls = PASSES.get(name)
        if cls is None:
            raise s.error(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}",
                          at)
        options: dict[str, Any] = {}
        if s.peek() == "{":
            s.pos += 1
            options = _parse_options(s, cls)
        try:
            passes.append(cls(**options))
        except (TypeError, ValueError) as e:  # a required option is missing, or invalid
            raise s.error(f"pass {name}: {e}", at) from None
        if s.at_end():
            return passes
        if s.peek() != ",":
            raise s.error(f"expected ',' or end of pipeline after pass {name}, "
                          f"found {s.peek()!r}")
        s.pos += 1
        if s.at_end():
            raise s.error("expected a pass name after ','")


def _parse_options(s: _Scanner, cls: type[Pass]) -> dict[str, Any]:
    types = _option_types(cls)
    options: dict[str, Any] = {}
    while True:
        if s.peek() == "}":
            s.pos += 1
            return options
        if s.peek() == "":
            raise s.error(f"missing '}}' after the options of {cls.name}")
        key, at = s.word("an option name")
        field_name = key.replace("-", "_")
        if field_name not in types or "_" in key:
            known = ", ".join(_kebab(f) for f in types) or "none"
            raise s.error(f"pass {cls.name} has no option {key!r} (options: {known})", at)
        if field_name in options:
            raise s.error(f"option {key} of {cls.name} given twice", at)
        if s.peek() != "=":
            raise s.error(f"expected '=' after option {key}")
        s.pos += 1
        raw, vat = s.value()
        options[field_name] = _convert(raw, types[field_name], f"option {key} of {cls.name}",
                                       s, vat)
        if s.peek() == ",":
            s.pos += 1


def _convert(raw: str, t, what: str, s: _Scanner, at: int):
    if typing.get_origin(t) is Literal:
        for choice in typing.get_args(t):
            if str(choice) == raw:
                return choice
        raise s.error(f"{what} must be one of {list(typing.get_args(t))}, got {raw!r}", at)
    try:
        if t is bool:
            return {"true": True, "false": False, "1": True, "0": False}[raw.lower()]
        if t is int:
            return int(raw, 10)
        if t is float:
            return float(raw)
        return raw
    except (KeyError, ValueError):
        raise s.error(f"{what} expects {t.__name__}, got {raw!r}", at) from None


# ---- the pass manager ---------------------------------------------------------------------------

class Hook:
    """Called around passes. Override what you need."""

    def before_pipeline(self, module: Module) -> None:
        pass

    def after_pass(self, pass_: Pass, module: Module, stats: PassStats) -> None:
        pass

    def after_pipeline(self, module: Module, stats: PipelineStats) -> None:
        pass


class VerifyHook(Hook):
    """Verify the input and the module after every pass; errors name the pass.
    `every_pass=False`: the input and the pipeline's result only (what a model load runs:
    a verify of SmolLM2's module takes ~40 ms on the 2-core CPU host, and the default
    pipeline has 6-8 passes); an error then names the pipeline, and `jaxrt opt -p` with
    it finds the pass."""

    def __init__(self, every_pass: bool = True):
        self.every_pass = every_pass
        self._spelling = ""

    def before_pipeline(self, module):
        try:
            verify(module)
        except VerifyError as e:
            raise VerifyError(str(e), "before the pipeline") from None

    def after_pass(self, pass_, module, stats):
        if not self.every_pass:
            self._spelling += ("," if self._spelling else "") + str(pass_)
            return
        try:
            verify(module)
        except VerifyError as e:
            raise VerifyError(str(e), f"after pass {pass_}") from None

    def after_pipeline(self, module, stats):
        if self.every_pass:
            return
        spelling, self._spelling = self._spelling, ""
        try:
            verify(module)
        except VerifyError as e:
            raise VerifyError(str(e), f"after the pipeline {spelling} (`jaxrt opt -p` "
                                      f"verifies after each pass)") from None


class DumpAfter(Hook):
    """Print the module after the named passes ("all" for every pass) to a stream, or call
    `sink(pass_spelling, ir_text)`."""

    def __init__(self, passes: str | Iterable[str] = "all",
                 sink: TextIO | Callable[[str, str], None] | None = None):
        self.passes = None if passes == "all" else (
            {passes} if isinstance(passes, str) else set(passes))
        self.sink = sink if sink is not None else sys.stderr

    def after_pass(self, pass_, module, stats):
        if self.passes is not None and pass_.name not in self.passes:
            return
        text = str(module)
        if callable(self.sink):
            self.sink(str(pass_), text)
        else:
            self.sink.write(f"// ----- IR after {pass_} ----- //\n{text}")


class TimingHook(Hook):
    """Write the per-pass timing table when the pipeline ends."""

    def __init__(self, stream: TextIO | None = None, rules: bool = False):
        self.stream, self.rules = stream, rules

    def after_pipeline(self, module, stats):
        (self.stream or sys.stderr).write(stats.table(rules=self.rules) + "\n")


class PassManager:
    """Runs passes in order with hooks between them; `stats` describes the last run.

    record_stats=True appends `stats.to_json()` to `module.attributes["pass_stats"]`
    (off by default: timings would make printed IR nondeterministic).
    """

    def __init__(self, passes: str | Sequence[Pass] = (), hooks: Sequence[Hook] = (), *,
                 record_stats: bool = False):
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.hooks = list(hooks)
        self.record_stats = record_stats
        self.stats = PipelineStats(format_pipeline(self.passes))

    def run(self, module: Module) -> Module:
        self.stats = PipelineStats(format_pipeline(self.passes))
        for h in self.hooks:
            h.before_pipeline(module)
        for p in self.passes:
            ps = PassStats(str(p))
            start = time.perf_counter()
            p.run(module, PassContext(ps))
            ps.seconds = time.perf_counter() - start
            self.stats.passes.append(ps)
            for h in self.hooks:
                h.after_pass(p, module, ps)
        for h in self.hooks:
            h.after_pipeline(module, self.stats)
        if self.record_stats:
            module.attributes["pass_stats"] = list(module.attributes.get("pass_stats", [])) + [
                self.stats.to_json()]
        return module
