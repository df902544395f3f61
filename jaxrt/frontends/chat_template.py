"""Chat templates, rendered as untrusted code: sandboxed, and bounded in time and memory.

A chat template is jinja2 from a model file (GGUF metadata, tokenizer_config.json or an
engine's chat_template.jinja). jinja2's `ImmutableSandboxedEnvironment` blocks escapes from
the sandbox; it does not bound the work a template does. Here:

- time: a deadline (`time_limit`, default CHAT_TEMPLATE_SECONDS) checked at every loop
  iteration, call, attribute or item lookup, operator and filter, so every path through a
  template meets a check within a bounded amount of work;
- memory: every value an operator, a filter, a method call, `~` or a captured block
  produces is refused before it is built when it would hold more than `max_output`
  characters or list items (ints: MAX_INT_BITS bits), and so is the rendered text;
- errors: whatever a template raises while parsing or rendering (ZeroDivisionError,
  TypeError, RecursionError, OverflowError, MemoryError, jinja2's own) becomes one
  `TemplateError` naming the template's source.
"""
from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime
from typing import Any, Mapping, Sequence

from ..errors import TemplateError

CHAT_TEMPLATE_SECONDS = 5.0
# Characters (or items) of any one value and of the rendered text, unless the messages
# themselves are larger (a long prompt renders to at least its own size).
CHAT_TEMPLATE_MAX_CHARS = 16 << 20
MAX_INT_BITS = 1 << 16
# All values built during one render: this many times the per-value limit.
BUDGET_FACTOR = 8

_LIMITS = threading.local()  # deadline, max_chars of the render running on this thread


class _Limit(Exception):
    """Raised inside rendering when a bound is hit (turned into a TemplateError)."""


def _check_time() -> None:
    deadline = getattr(_LIMITS, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _Limit(f"rendering took longer than the {_LIMITS.seconds:g} s limit")


def _max_chars() -> int:
    return getattr(_LIMITS, "max_chars", CHAT_TEMPLATE_MAX_CHARS)


def _check_size(n: int, what: str, *, produced: bool = False) -> None:
    """Refuse a value of `n` characters/items over the per-value limit, or one that would
    take the characters this render has built past its budget (a few times the per-value
    limit: garbage is not subtracted, so this also bounds what a loop can accumulate).
    `produced` counts it into that budget (once the value exists)."""
    if n > _max_chars():
        raise _Limit(f"{what} would hold {n} characters or items, over the "
                     f"{_max_chars()} limit")
    total = getattr(_LIMITS, "produced", 0) + n
    if total > BUDGET_FACTOR * _max_chars():
        raise _Limit(f"{what}: the template built more than {BUDGET_FACTOR * _max_chars()} "
                     f"characters or items in all, over its limit")
    if produced:
        _LIMITS.produced = total


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else None


def _check_value(x: Any, what: str) -> Any:
    n = _size(x)
    if n is not None:
        _check_size(n, what, produced=True)
    elif isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > MAX_INT_BITS:
        raise _Limit(f"{what} gives an integer of {x.bit_length()} bits, over the "
                     f"{MAX_INT_BITS}-bit limit")
    return x


def _int_bits(x: Any) -> int:
    return abs(x).bit_length() if isinstance(x, int) else 0


# printf and str.format widths/precisions: "%999999999d", "{:>999999999}"
_WIDTHS = re.compile(r"[0-9]+")


def _check_format_string(fmt: str, args: Any = ()) -> None:
    for m in _WIDTHS.finditer(fmt):
        if len(m.group()) > 9 or int(m.group()) > _max_chars():
            _check_size(int(m.group()) if len(m.group()) <= 30 else 1 << 100,
                        "a format width")
    for a in args if isinstance(args, (tuple, list)) else (args,):
        if isinstance(a, int) and not isinstance(a, bool) and a > _max_chars():
            _check_size(a, "a format argument")  # '%*d' % (10**9, 1)


def _precheck_binop(op: str, left: Any, right: Any) -> None:
    _check_time()
    if op == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * max(_int_bits(left) - 1, 1) > MAX_INT_BITS:
                raise _Limit(f"{left!r:.20} ** {right!r:.20} is over the {MAX_INT_BITS}-bit "
                             f"integer limit")
    elif op == "*":
        for seq, n in ((left, right), (right, left)):
            if _size(seq) is not None and isinstance(n, int):
                _check_size(_size(seq) * max(n, 0), "a repeated string or list")
        if isinstance(left, int) and isinstance(right, int) and \
                _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
            raise _Limit(f"a product over the {MAX_INT_BITS}-bit integer limit")
    elif op == "+":
        if _size(left) is not None and _size(right) is not None:
            _check_size(_size(left) + _size(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        _check_format_string(left, right)


# str methods that can grow a string, and how much: checked before the call
def _precheck_method(name: str, target: Any, args: tuple, kwargs: dict) -> None:
    if not isinstance(target, str):
        if name == "join" and isinstance(target, (str, bytes)):
            pass
        return
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _check_size(args[0], f"str.{name}")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _check_size(len(target) + target.count("\t") * max(tab, 0), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) \
            and isinstance(args[1], str):
        count = target.count(args[0]) if args[0] else len(target) + 1
        _check_size(len(target) + count * max(len(args[1]) - len(args[0]), 0), "str.replace")
    elif name == "join" and len(args) == 1 and isinstance(args[0], (list, tuple)):
        _check_size(sum(_size(x) or 0 for x in args[0]) + len(target) * len(args[0]),
                    "str.join")
    elif name in ("format", "format_map"):
        _check_format_string(target, args)


# Filters whose integer arguments are output widths
_WIDTH_FILTERS = {"center", "indent", "wordwrap", "truncate", "format", "tojson"}


def _guard_filter(name: str, fn):
    @functools.wraps(fn)  # keeps jinja_pass_arg
    def guarded(*args, **kwargs):
        _check_time()
        values = list(args) + list(kwargs.values())
        if name in _WIDTH_FILTERS:
            for v in values:
                if isinstance(v, int) and not isinstance(v, bool):
                    _check_size(v, f"filter {name}'s width")
        strings = [v for v in values if isinstance(v, str)]
        if name == "replace" and len(strings) >= 3:
            s, old, new = strings[:3]
            count = s.count(old) if old else len(s) + 1
            _check_size(len(s) + count * max(len(new) - len(old), 0), "filter replace")
        if name == "format" and strings:
            _check_format_string(strings[0], values)
        if name == "join":
            seq = next((v for v in values if isinstance(v, (list, tuple))), None)
            if seq is not None:
                sep = max((len(s) for s in strings), default=0)
                _check_size(sum(len(str(x)) if isinstance(x, (str, int, float)) else 0
                                for x in seq) + sep * len(seq), "filter join")
        return _check_value(fn(*args, **kwargs), f"filter {name}")
    return guarded


def _bounded_iter(iterable):
    """Every `{% for %}` iterates through this: a deadline check per item."""
    for item in iterable:
        _check_time()
        yield item


def _bounded_join(parts) -> str:
    out, n = [], 0
    for p in parts:
        p = p if isinstance(p, str) else str(p)
        n += len(p)
        _check_size(n, "the text built")
        out.append(p)
    _check_size(n, "the text built", produced=True)
    return "".join(out)


def _make_env():
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): body as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body) \
                .set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class _Bound(NodeTransformer):
        """Routes every loop's iterable and every `~` through the bounded helpers."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, "_jaxrt_iter", [], [], None, None,
                                     lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_jaxrt_concat",
                                [], [], None, None, lineno=node.lineno)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/", "-"})
        concat = staticmethod(_bounded_join)  # captured blocks, macro bodies

        def _parse(self, source, name, filename):
            return _Bound().visit(super()._parse(source, name, filename))

        def call_binop(self, context, operator, left, right):
            _precheck_binop(operator, left, right)
            return _check_value(super().call_binop(context, operator, left, right),
                                f"operator {operator}")

        def getattr(self, obj, attribute):
            _check_time()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _check_time()
            return super().getitem(obj, argument)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            fmt = value.__self__

            @functools.wraps(wrapped)
            def checked(*args, **kwargs):
                _check_format_string(fmt, args + tuple(kwargs.values()))
                return wrapped(*args, **kwargs)
            return checked

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805,B902
            _check_time()
            name = getattr(__obj, "__name__", "")
            _precheck_method(name, getattr(__obj, "__self__", None), args, kwargs)
            return _check_value(super().call(__context, __obj, *args, **kwargs),
                                f"{name or 'a call'}()")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _guard_filter(name, fn) for name, fn in env.filters.items()}
    env.filters["_jaxrt_iter"] = _bounded_iter
    env.filters["_jaxrt_concat"] = _bounded_join
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = None
_ENV_LOCK = threading.Lock()


def chat_env():
    global _ENV
    with _ENV_LOCK:
        if _ENV is None:
            _ENV = _make_env()
    return _ENV


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str | None = None,
                eos_token: str | None = None, source: str = "chat template",
                time_limit: float = CHAT_TEMPLATE_SECONDS,
                max_chars: int | None = None, **extra: Any) -> str:
    """Render a Hugging Face chat template the way `apply_chat_template(tokenize=False)`
    does: sandboxed jinja2 with trim_blocks/lstrip_blocks, loop controls, a non-escaping
    `tojson`, `raise_exception` and `strftime_now`; bounded by `time_limit` seconds and
    `max_chars` characters (default: CHAT_TEMPLATE_MAX_CHARS, or 4x the messages' size when
    larger). Any failure is a TemplateError "`source`: ..."."""
    if not isinstance(template, str):
        raise TemplateError(f"{source}: not a string ({type(template).__name__})")
    msgs = [dict(m) for m in messages]
    if max_chars is None:
        size = sum(len(v) for m in msgs for v in m.values() if isinstance(v, str))
        max_chars = max(CHAT_TEMPLATE_MAX_CHARS, 4 * size)
    env = chat_env()
    _LIMITS.seconds, _LIMITS.max_chars = time_limit, max_chars
    _LIMITS.deadline = time.monotonic() + time_limit
    _LIMITS.produced = 0
    try:
        compiled = env.from_string(template)
        return _bounded_join(_bounded_iter(compiled.generate(
            messages=msgs, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, **extra)))
    except RecursionError:
        raise TemplateError(f"{source}: recursion too deep") from None
    except MemoryError:
        raise TemplateError(f"{source}: out of memory while rendering") from None
    except Exception as e:  # noqa: BLE001 - a template is arbitrary code; all of it is input
        kind = "" if isinstance(e, _Limit) else f"{type(e).__name__}: "
        line = getattr(e, "lineno", None)
        where = f" (line {line})" if line else ""
        raise TemplateError(f"{source}{where}: {kind}{_one_line(e)}") from None
    finally:
        _LIMITS.deadline = None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
