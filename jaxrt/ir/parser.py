"""Parser for the text format `printer.print_module` emits (see printer.py for an example).

A regex tokenizer and a recursive-descent parser. Ops are rebuilt through `make_op`, so a
parsed module is well typed; every failure is a `ParseError` carrying the file, line and
column of the offending token. `parse(print_module(m)) == m` for every verified module, and
printing the result gives the same text back (a NaN attribute compares equal only as the
`math.nan` object, which is what the parser produces).

    module    := 'module' SYM ['attributes' dict] '{' (weight | func)* '}'
    weight    := 'weight' SYM ':' type ['=' NAME '(' [SYM {',' SYM}] ')' [dict]]
                 ['sharded' '[' NAME {',' NAME} ']']   (a mesh axis or _ per dim)
    func      := 'func' SYM '(' [VAL ':' type {',' ...}] ')' '->' '(' [type {',' type}] ')'
                 '{' op* 'return' [VAL {',' VAL}] '}'
    op        := [VAL {',' VAL} '='] ('weight' SYM | NAME '(' [VAL {',' VAL}] ')' [dict])
                 ':' (type | '(' [type {',' type}] ')')
    type      := DTYPE '[' [dim {',' dim}] ']'          dim := INT | IDENT
    dict      := '{' [key '=' value {',' ...}] '}'       key := IDENT | STRING
    value     := INT | FLOAT | inf | -inf | nan | true | false | none | STRING | DTYPE
                 | '[' [value {',' value}] ']' | dict    (dicts: module attributes only)

`//` starts a comment that runs to the end of the line.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import InputError
from .module import Function, Module, Value, make_op
from .opdef import OPS, OpDef, VerifyError
from .ops import weight as weight_op
from .types import DType, TensorType
from .sharding import ShardSpec
from .weights import WeightDef, infer_def


class ParseError(InputError):
    """Malformed or ill-typed IR text; `str(e)` is "file:line:col: message" (1-based)."""

    def __init__(self, message: str, filename: str = "<string>", line: int = 1, col: int = 1):
        self.message = message
        self.filename = filename
        self.line = line
        self.col = col
        super().__init__(f"{filename}:{line}:{col}: {message}")


# String literals (`"..."`, `@"..."`) are scanned by hand (_Tokens.string_end): a regex
# alternation repeated per character keeps backtracking state for every character (~290
# bytes each), where a scan needs none.
_TOKEN = re.compile(r"""
    (?P<skip>[ \t\r\n]+|//[^\n]*)
  | (?P<punct>->|[(){}\[\],:=])
  | (?P<num>-?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|-inf\b)
  | (?P<sym>@(?:[A-Za-z_][A-Za-z0-9_.\-]*|(?=")))
  | (?P<val>%[\w.]+)
  | (?P<str>(?="))
  | (?P<word>[^\W0-9][\w.]*)
  | (?P<bad>(?s:.))
""", re.VERBOSE)
_STRING_STOP = re.compile(r'["\\\n]')

_MAX_NESTING = 64  # attribute lists/dicts; keeps recursion far from Python's limit
_KEYWORDS = {"true": True, "false": False, "none": None, "inf": math.inf, "nan": math.nan}


def parse(text: str, filename: str = "<string>") -> Module:
    """Parse one module. Raises ParseError (and nothing else) on any malformed input."""
    return _Parser(text, filename).module()


class _Parser:
    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename
        # (kind, text, offset); kind is the text for punctuation. Read on demand: only the
        # current token is ever looked at (no backtracking), so none is kept.
        self.toks = _Window(self._tokenize())
        self.i = 0

    # ---- tokens -------------------------------------------------------------------------

    def _tokenize(self):
        """Tokens (kind, text, offset), one at a time: memory stays linear in the input."""
        text, pos, end = self.text, 0, len(self.text)
        while pos < end:
            m = _TOKEN.match(text, pos)
            kind = m.lastgroup
            if kind in ("str", "sym") and m.end() < end and text[m.end()] == '"' \
                    and (kind == "str" or m.end() == pos + 1):
                stop = self._string_end(m.end())
                tok, start, pos = text[pos:stop], pos, stop
            else:
                tok, start, pos = m.group(), m.start(), m.end()
            if kind == "skip":
                continue
            if kind == "bad":
                raise self.error(f"unexpected character {tok!r}", start)
            yield (tok if kind == "punct" else kind, tok, start)
        yield ("eof", "", end)

    def _string_end(self, start: int) -> int:
        """The offset after the string literal whose opening quote is at `start`."""
        pos = start + 1
        while True:
            m = _STRING_STOP.search(self.text, pos)
            if m is None or m.group() == "\n" or (m.group() == "\\" and
                                                   m.end() >= len(self.text)):
                raise self.error("unterminated string", start)
            if m.group() == '"':
                return m.end()
            pos = m.end() + 1  # a backslash escapes the next character

    def error(self, message: str, pos: int | None = None) -> ParseError:
        if pos is None:
            pos = self.toks[self.i][2]
        line = self.text.count("\n", 0, pos) + 1
        col = pos - self.text.rfind("\n", 0, pos)
        return ParseError(message, self.filename, line, col)

    def peek(self) -> str:
        return self.toks[self.i][0]

    def next(self) -> tuple[str, str, int]:
        tok = self.toks[self.i]
        if tok[0] != "eof":
            self.i += 1
        return tok

    def accept(self, kind: str) -> bool:
        if self.toks[self.i][0] == kind:
            self.i += 1
            return True
        return False

    def expect(self, kind: str, what: str | None = None) -> tuple[str, str, int]:
        tok = self.toks[self.i]
        if tok[0] != kind:
            raise self.error(f"expected {what or repr(kind)}, got {_describe(tok)}")
        self.i += 1
        return tok

    def keyword(self, word: str) -> tuple[str, str, int]:
        tok = self.toks[self.i]
        if tok[0] != "word" or tok[1] != word:
            raise self.error(f"expected '{word}', got {_describe(tok)}")
        self.i += 1
        return tok

    def at_keyword(self, word: str) -> bool:
        tok = self.toks[self.i]
        return tok[0] == "word" and tok[1] == word

    def comma_list(self, item, close: str) -> list:
        """`item (',' item)* close`, or just `close`; the opener is already consumed."""
        out = []
        if self.accept(close):
            return out
        while True:
            out.append(item())
            if self.accept(close):
                return out
            self.expect(",", f"',' or '{close}'")

    # ---- module structure ---------------------------------------------------------------

    def module(self) -> Module:
        self.keyword("module")
        m = Module(self.symbol())
        if self.at_keyword("attributes"):
            self.next()
            m.attributes = self.attr_dict(depth=0)
        self.expect("{")
        while not self.accept("}"):
            if self.at_keyword("weight"):
                self.weight_decl(m)
            elif self.at_keyword("func"):
                self.function(m)
            else:
                raise self.error(f"expected 'weight', 'func' or '}}', got "
                                 f"{_describe(self.toks[self.i])}")
        self.expect("eof", "end of input")
        return m

    def symbol(self) -> str:
        tok = self.expect("sym", "a symbol (@name)")
        return self.json_string(tok, tok[1][1:]) if tok[1][1:2] == '"' else tok[1][1:]

    def json_string(self, tok, text: str) -> str:
        try:
            return json.loads(text)
        except ValueError as e:
            raise self.error(f"bad string literal: {e}", tok[2]) from None

    def weight_decl(self, m: Module) -> None:
        self.next()
        name_tok = self.toks[self.i]
        name = self.symbol()
        if name in m.weights:
            raise self.error(f"weight @{name} declared twice", name_tok[2])
        self.expect(":")
        type_pos = self.toks[self.i][2]
        t = self.type()
        if not t.is_static:
            raise self.error(f"weights must have static shapes, got {t}", type_pos)
        if self.accept("="):
            self.weight_def(m, name, t, type_pos)
        m.weights[name] = t
        if self.at_keyword("sharded"):
            self.next()
            spec_pos = self.toks[self.i][2]
            self.expect("[")
            items = [tok[1] for tok in self.comma_list(
                lambda: self.expect("word", "a mesh axis name or _"), "]")]
            try:
                m.shardings[name] = ShardSpec.parse(items)
            except VerifyError as e:
                raise self.error(str(e), spec_pos) from None

    def weight_def(self, m: Module, name: str, t: TensorType, type_pos: int) -> None:
        op_tok = self.expect("word", "a weight definition (stack, concat, slice, ...)")
        self.expect("(")
        sources = []
        for tok, src in self.comma_list(lambda: (self.toks[self.i], self.symbol()), ")"):
            if src not in m.weights:
                raise self.error(f"unknown source weight @{src} (sources are declared "
                                 f"first)", tok[2])
            sources.append(src)
        attrs = self.attr_dict(depth=0) if self.peek() == "{" else {}
        if "dtype" in attrs and isinstance(attrs["dtype"], str):
            try:
                attrs["dtype"] = DType.parse(attrs["dtype"])
            except ValueError as e:
                raise self.error(str(e), op_tok[2]) from None
        d = WeightDef(op_tok[1], tuple(sources), tuple(attrs.items()))
        try:
            got = infer_def(d, [m.weights[s] for s in sources])
        except VerifyError as e:
            raise self.error(str(e), op_tok[2]) from None
        if got != t:
            raise self.error(f"weight @{name} declared {t} but {d.op} gives {got}", type_pos)
        m.weight_defs[name] = d

    def function(self, m: Module) -> None:
        self.next()
        name_tok = self.toks[self.i]
        name = self.symbol()
        if name in m.functions:
            raise self.error(f"function @{name} defined twice", name_tok[2])
        scope: dict[str, Value] = {}

        def argument() -> Value:
            tok = self.expect("val", "an argument (%name)")
            arg_name = tok[1][1:]
            if arg_name in scope:
                raise self.error(f"argument {tok[1]} defined twice", tok[2])
            if arg_name.isdigit():  # would clash with the printer's numbering of op results
                raise self.error(f"argument names may not be numbers: {tok[1]}", tok[2])
            self.expect(":")
            scope[arg_name] = Value(self.type(), None, len(scope), hint=arg_name)
            return scope[arg_name]

        self.expect("(")
        fn = Function(name, self.comma_list(argument, ")"))
        self.expect("->")
        self.expect("(")
        result_types = self.comma_list(self.located_type, ")")
        self.expect("{")
        while not self.at_keyword("return"):
            fn.ops.append(self.operation(m, scope))
        ret_tok = self.next()
        positions: list[int] = []
        while self.peek() == "val":
            positions.append(self.toks[self.i][2])
            fn.results.append(self.use(scope))
            if not self.accept(","):
                break
        if len(fn.results) != len(result_types):
            raise self.error(f"returns {len(fn.results)} values, the signature says "
                             f"{len(result_types)}", ret_tok[2])
        for v, (t, _), pos in zip(fn.results, result_types, positions):
            if v.type != t:
                raise self.error(f"returned value has type {v.type}, the signature says {t}",
                                 pos)
        self.expect("}", "'}' after return")
        m.functions[name] = fn

    def use(self, scope: dict[str, Value]) -> Value:
        tok = self.expect("val", "a value (%name)")
        v = scope.get(tok[1][1:])
        if v is None:
            raise self.error(f"undefined value {tok[1]}", tok[2])
        return v

    # ---- operations ---------------------------------------------------------------------

    def operation(self, m: Module, scope: dict[str, Value]):
        lhs: list[tuple[str, str, int]] = []  # result name tokens
        if self.peek() == "val":
            while True:
                tok = self.expect("val", "a result name (%name)")
                if tok[1][1:] in scope or any(t[1] == tok[1] for t in lhs):
                    raise self.error(f"value {tok[1]} redefined", tok[2])
                lhs.append(tok)
                if not self.accept(","):
                    break
            self.expect("=", "'=' after the result names")
        name_tok = self.expect("word", "an op name")
        if name_tok[1] == "weight":
            opdef, operands, sym_tok = weight_op, [], self.toks[self.i]
            attrs = {"name": self.symbol()}
            if attrs["name"] not in m.weights:
                raise self.error(f"unknown weight @{attrs['name']}", sym_tok[2])
        else:
            opdef = OPS.get(name_tok[1])
            if opdef is None:
                raise self.error(f"unknown op {name_tok[1]!r}", name_tok[2])
            self.expect("(")
            operands = self.comma_list(lambda: self.use(scope), ")")
            attrs = self.op_attrs(opdef) if self.peek() == "{" else {}
        self.expect(":", "':' and the result type(s)")
        if self.accept("("):
            types = self.comma_list(self.located_type, ")")
        else:
            types = [self.located_type()]
        if len(types) != len(lhs) or len(types) != (opdef.num_results or len(types)):
            raise self.error(f"{opdef.name} has {opdef.num_results} result(s); "
                             f"{len(lhs)} named, {len(types)} typed", name_tok[2])
        op = self.build(opdef, operands, attrs, [t for t, _ in types], name_tok)
        if len(op.results) != len(types):
            raise self.error(f"{opdef.name} has {len(op.results)} result(s); {len(types)} "
                             f"typed", name_tok[2])
        for r, (t, pos) in zip(op.results, types):
            if r.type != t:
                raise self.error(f"result type {t} does not match the inferred type {r.type}",
                                 pos)
        if opdef is weight_op and m.weights[attrs["name"]] != types[0][0]:
            raise self.error(f"weight @{attrs['name']} is declared {m.weights[attrs['name']]}",
                             types[0][1])
        for tok, r in zip(lhs, op.results):
            scope[tok[1][1:]] = r
        return op

    def build(self, opdef: OpDef, operands, given: dict, types, name_tok):
        try:
            attrs = opdef.make_attrs(given)  # values are checked; this reports missing ones
            return make_op(opdef, operands, attrs, types if opdef.infer is None else None)
        except VerifyError as e:
            raise self.error(str(e), name_tok[2]) from None
        except Exception as e:  # noqa: BLE001 - inference on arbitrary text (e.g. OverflowError)
            raise self.error(f"{opdef.name}: {type(e).__name__}: {e}", name_tok[2]) from None

    def op_attrs(self, opdef: OpDef) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, key_tok, value, value_tok in self.dict_items(depth=0):
            spec = opdef.attrs.get(key)
            if spec is None:
                raise self.error(f"{opdef.name} has no attribute {key!r}", key_tok[2])
            if key in out:
                raise self.error(f"attribute {key!r} given twice", key_tok[2])
            try:
                out[key] = spec.check(key, value)
            except (VerifyError, ArithmeticError, ValueError, TypeError) as e:
                raise self.error(f"{opdef.name}: {e}", value_tok[2]) from None
        return out

    # ---- types and attribute values -------------------------------------------------------

    def located_type(self) -> tuple[TensorType, int]:
        pos = self.toks[self.i][2]
        return self.type(), pos

    def type(self) -> TensorType:
        tok = self.expect("word", "a type")
        try:
            dtype = DType.parse(tok[1])
        except ValueError:
            raise self.error(f"unknown dtype {tok[1]!r}", tok[2]) from None
        self.expect("[", "'[' after the dtype")
        return TensorType(tuple(self.comma_list(self.dim, "]")), dtype)

    def dim(self) -> int | str:
        kind, text, pos = self.next()
        if kind == "num" and text.isdigit():
            try:
                return int(text)
            except ValueError as e:  # more digits than Python converts
                raise self.error(str(e), pos) from None
        if kind == "word" and text.isidentifier():
            return text
        raise self.error(f"expected a dim (a non-negative integer or a name), got "
                         f"{_describe((kind, text, pos))}", pos)

    def attr_dict(self, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, key_tok, value, _ in self.dict_items(depth):
            if key in out:
                raise self.error(f"key {key!r} given twice", key_tok[2])
            out[key] = value
        return out

    def dict_items(self, depth: int) -> list[tuple[str, tuple, Any, tuple]]:
        self.expect("{")

        def item():
            key_tok = self.next()
            if key_tok[0] == "word":
                key = key_tok[1]
            elif key_tok[0] == "str":
                key = self.json_string(key_tok, key_tok[1])
            else:
                raise self.error(f"expected a key, got {_describe(key_tok)}", key_tok[2])
            self.expect("=", "'=' after the key")
            value_tok = self.toks[self.i]
            return key, key_tok, self.value(depth), value_tok

        return self.comma_list(item, "}")

    def value(self, depth: int) -> Any:
        if depth >= _MAX_NESTING:
            raise self.error(f"attribute values nested deeper than {_MAX_NESTING}")
        kind, text, pos = tok = self.toks[self.i]
        if kind == "[":
            self.next()
            return tuple(self.comma_list(lambda: self.value(depth + 1), "]"))
        if kind == "{":
            return self.attr_dict(depth + 1)
        self.next()
        if kind == "num":
            if text == "-inf":
                return -math.inf
            if "." in text or "e" in text or "E" in text:
                value = float(text)
                if math.isinf(value):  # 1e999999: not silently infinity
                    raise self.error(f"float literal {text!r:.40} is out of range (use inf)",
                                     pos)
                return value
            try:
                return int(text)
            except ValueError as e:
                raise self.error(str(e), pos) from None
        if kind == "str":
            return self.json_string(tok, text)
        if kind == "word":
            if text in _KEYWORDS:
                return _KEYWORDS[text]
            try:
                return DType.parse(text)
            except ValueError:
                raise self.error(f"unknown attribute value {text!r}", pos) from None
        raise self.error(f"expected an attribute value, got {_describe(tok)}", pos)


class _Window:
    """`toks[i]` for a non-decreasing i over a token generator, keeping only the token at
    the current index."""

    def __init__(self, tokens):
        self._tokens = tokens
        self._index = -1
        self._tok: tuple[str, str, int] = ("eof", "", 0)

    def __getitem__(self, i: int) -> tuple[str, str, int]:
        while self._index < i:
            if self._tok[0] == "eof" and self._index >= 0:
                return self._tok
            self._tok = next(self._tokens)
            self._index += 1
        if i != self._index:
            raise IndexError(f"token {i} was already read")  # a parser bug, not input
        return self._tok


def _describe(tok: tuple[str, str, int]) -> str:
    kind, text, _ = tok
    if kind == "eof":
        return "end of input"
    return repr(text if len(text) <= 40 else text[:37] + "...")
