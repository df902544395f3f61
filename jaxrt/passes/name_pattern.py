"""Name patterns: the regular expressions pass options match weight names with
(`quantize{exclude=...}`), matched in time linear in the name, whatever the pattern.

Python's `re` backtracks: `(a+)+$` against a long run of `a`s takes exponential time, and
a pipeline is text a user (or a file) hands jaxrt. So a pattern here is compiled to a
Thompson NFA and simulated one character at a time over the set of live states (Pike /
Thompson, "Regular Expression Matching Can Be Simple And Fast"): O(len(name) x
len(pattern)) steps, never more. `regex` and `re` are not linear; RE2 would be, but is
not a dependency.

The syntax is the common subset of Python's `re` (matching means `re.search`: anywhere
in the name, unless anchored):

    literals, `.` (not newline), escapes `\\.` `\\d` `\\D` `\\w` `\\W` `\\s` `\\S`
    classes `[a-z_]`, `[^0-9]` (with the escapes above inside)
    groups `( )` and `(?: )`, alternation `|`
    `*` `+` `?` `{m}` `{m,}` `{m,n}` (and their lazy forms: the same yes/no answer)
    anchors `^` (start) and `$` (end, or before a final newline)

Backreferences, lookaround, inline flags and `\\b` are refused (a `SettingError` from
`compile_name_pattern`), as is a pattern whose expansion (counted repeats) would exceed
MAX_STATES states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxrt.errors import SettingError, short_repr

MAX_PATTERN_CHARS = 1000
MAX_STATES = 10_000  # NFA states after expanding {m,n}: bounds the per-character work

# \d \w \s as Python's re has them for str patterns (Unicode): decimal digits (Nd),
# alphanumerics and `_`, whitespace
_CLASSES = {"d": str.isdecimal, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}
_CLASS_ESCAPES = {k: (k, False) for k in _CLASSES} | {k.upper(): (k, True) for k in _CLASSES}
_LITERAL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}


@dataclass(frozen=True)
class _Chars:
    """A set of characters: ranges and classes (`\\d`, `\\W`: a _CLASSES key, negated or
    not), the whole set possibly negated."""
    ranges: tuple[tuple[str, str], ...] = ()
    classes: tuple[tuple[str, bool], ...] = ()
    negated: bool = False
    dot: bool = False  # `.`: anything but a newline

    def __contains__(self, c: str) -> bool:
        if self.dot:
            return c != "\n"
        hit = any(lo <= c <= hi for lo, hi in self.ranges) or any(
            _CLASSES[name](c) != neg for name, neg in self.classes)
        return hit != self.negated


# AST: ("chars", _Chars) | ("bol",) | ("eol",) | ("empty",) | ("cat", [nodes])
#      | ("alt", [nodes]) | ("repeat", node, min, max or None)

class _Parser:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def error(self, why: str) -> SettingError:
        return SettingError(f"{why} (at character {self.pos})")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def take(self) -> str:
        c = self.text[self.pos]
        self.pos += 1
        return c

    def parse(self):
        node = self.alternation(0)
        if self.pos != len(self.text):
            raise self.error("unbalanced parenthesis")
        return node

    def alternation(self, depth: int):
        if depth > 100:
            raise self.error("groups nested more than 100 deep")
        branches = [self.concatenation(depth)]
        while self.peek() == "|":
            self.take()
            branches.append(self.concatenation(depth))
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self, depth: int):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repeat(self.atom(depth)))
        return ("cat", items) if items else ("empty",)

    def atom(self, depth: int):
        c = self.take()
        if c == "(":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.peek() == "?":
                raise self.error("lookaround, named groups and inline flags are not "
                                 "supported in name patterns")
            node = self.alternation(depth + 1)
            if self.peek() != ")":
                raise self.error("missing ), unterminated subpattern")
            self.take()
            return node
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == ".":
            return ("chars", _Chars(dot=True))
        if c == "[":
            return ("chars", self.char_class())
        if c == "\\":
            return ("chars", self.escape(in_class=False))
        if c in "*+?":
            raise self.error("nothing to repeat")
        if c == "{" and self.counted() is not None:
            raise self.error("nothing to repeat")
        return ("chars", _Chars(ranges=((c, c),)))

    def escape(self, in_class: bool) -> _Chars:
        if self.peek() is None:
            raise self.error("bad escape (end of pattern)")
        c = self.take()
        if c in _CLASS_ESCAPES:
            return _Chars(classes=(_CLASS_ESCAPES[c],))
        if c in _LITERAL_ESCAPES:
            c = _LITERAL_ESCAPES[c]
            return _Chars(ranges=((c, c),))
        if c.isascii() and not c.isalnum():  # an escaped punctuation character
            return _Chars(ranges=((c, c),))
        if c.isdigit():
            raise self.error("backreferences are not supported in name patterns")
        raise self.error(f"bad or unsupported escape \\{c}")

    def char_class(self) -> _Chars:
        negated = self.peek() == "^"
        if negated:
            self.take()
        ranges, classes = [], []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character set")
            if c == "]" and not first:
                self.take()
                break
            first = False
            self.take()
            if c == "\\":
                item = self.escape(in_class=True)
                if item.classes:
                    classes += item.classes
                    continue
                lo = item.ranges[0][0]
            else:
                lo = c
            hi = lo
            if self.peek() == "-" and self.pos + 1 < len(self.text) \
                    and self.text[self.pos + 1] != "]":
                self.take()
                h = self.take()
                if h == "\\":
                    item = self.escape(in_class=True)
                    if item.classes:
                        raise self.error("bad character range")
                    h = item.ranges[0][0]
                if h < lo:
                    raise self.error(f"bad character range {lo}-{h}")
                hi = h
            ranges.append((lo, hi))
        return _Chars(tuple(ranges), tuple(classes), negated)

    def counted(self) -> tuple[int, int | None] | None:
        """m}, m,}, m,n} after a `{` at the cursor (consumed), or None (the `{` was a
        literal)."""
        text, i = self.text, self.pos
        j = text.find("}", i)
        if j < 0:
            return None
        body = text[i:j]
        lo, comma, hi = body.partition(",")
        if not (lo.isdigit() or (comma and not lo)) or (hi and not hi.isdigit()) \
                or not lo.isascii() or not hi.isascii():
            return None
        self.pos = j + 1
        m = int(lo) if lo else 0
        n = (int(hi) if hi else None) if comma else m
        if n is not None and n < m:
            raise self.error("min repeat greater than max repeat")
        if m > MAX_STATES or (n or 0) > MAX_STATES:
            raise self.error(f"repeat counts above {MAX_STATES} are not supported")
        return m, n

    def repeat(self, node):
        while True:
            c = self.peek()
            if c == "*":
                self.take()
                node = ("repeat", node, 0, None)
            elif c == "+":
                self.take()
                node = ("repeat", node, 1, None)
            elif c == "?":
                self.take()
                node = ("repeat", node, 0, 1)
            elif c == "{":
                save = self.pos
                self.take()
                counted = self.counted()
                if counted is None:  # a literal `{`
                    self.pos = save
                    return node
                node = ("repeat", node, *counted)
            else:
                return node
            inner = node[1]
            if inner[0] in ("bol", "eol"):
                raise self.error("nothing to repeat")
            if inner[0] == "repeat":
                raise self.error("multiple repeat")
            if self.peek() == "?":  # lazy: the same set of matches
                self.take()
            elif self.peek() == "+":
                raise self.error("possessive repeats are not supported")


# NFA states: ("chars", _Chars, next) | ("split", a, b) | ("bol", next) | ("eol", next)
#             | ("match",). Built back to front: each node compiles given its successor.

@dataclass
class _Builder:
    states: list = field(default_factory=list)

    def add(self, state) -> int:
        if len(self.states) >= MAX_STATES:
            raise SettingError(f"more than {MAX_STATES} states after expanding repeats")
        self.states.append(state)
        return len(self.states) - 1

    def build(self, node, nxt: int) -> int:
        kind = node[0]
        if kind == "chars":
            return self.add(["chars", node[1], nxt])
        if kind in ("bol", "eol"):
            return self.add([kind, nxt])
        if kind == "empty":
            return nxt
        if kind == "cat":
            for item in reversed(node[1]):
                nxt = self.build(item, nxt)
            return nxt
        if kind == "alt":
            starts = [self.build(b, nxt) for b in node[1]]
            start = starts[-1]
            for s in reversed(starts[:-1]):
                start = self.add(["split", s, start])
            return start
        _, inner, lo, hi = node
        if hi is None:  # inner{lo,}: lo copies, then inner*
            loop = self.add(["split", -1, nxt])
            body = self.build(inner, loop)
            self.states[loop][1] = body
            start = loop
        else:  # inner{lo,hi}: lo copies, then hi - lo optional ones
            start = nxt
            for _ in range(hi - lo):  # each optional copy may skip to the end
                body = self.build(inner, start)
                start = self.add(["split", body, nxt])
        for _ in range(lo):
            start = self.build(inner, start)
        return start


@dataclass(frozen=True)
class NamePattern:
    """A compiled name pattern; `search(name)` as `re.search(pattern, name) is not None`."""
    text: str
    states: tuple
    start: int

    def search(self, name: str) -> bool:
        states, n = self.states, len(name)
        current: list[int] = []
        seen: set[int] = set()

        def add(i: int, pos: int, into: list[int], mark: set[int]) -> bool:
            """Follow epsilon edges from state i at position pos; True on a match."""
            stack = [i]
            while stack:
                s = stack.pop()
                if s in mark:
                    continue
                mark.add(s)
                st = states[s]
                kind = st[0]
                if kind == "match":
                    return True
                if kind == "split":
                    stack += (st[2], st[1])
                elif kind == "bol":
                    if pos == 0:
                        stack.append(st[1])
                elif kind == "eol":
                    if pos == n or (pos == n - 1 and name[pos] == "\n"):
                        stack.append(st[1])
                else:
                    into.append(s)
            return False

        for pos in range(n + 1):
            if add(self.start, pos, current, seen):  # search: a match may start here
                return True
            if pos == n:
                return False
            c = name[pos]
            nxt: list[int] = []
            mark: set[int] = set()
            for s in current:
                st = states[s]
                if c in st[1] and add(st[2], pos + 1, nxt, mark):
                    return True
            current, seen = nxt, mark
        return False


def compile_name_pattern(text: str, what: str = "name pattern") -> NamePattern:
    """Compile `text` (the subset in the module docstring); SettingError naming `what`
    for a pattern that is malformed, unsupported or too large."""
    if not isinstance(text, str):
        raise SettingError(f"{what}: must be a string, got {type(text).__name__}")
    if len(text) > MAX_PATTERN_CHARS:
        raise SettingError(f"{what}: {len(text)} characters; at most {MAX_PATTERN_CHARS}")
    try:
        tree = _Parser(text).parse()
        b = _Builder()
        match = b.add(["match"])
        start = b.build(tree, match)
    except SettingError as e:
        raise SettingError(f"{what}={short_repr(text)}: {e}") from None
    return NamePattern(text, tuple(tuple(s) for s in b.states), start)


__all__ = ["MAX_PATTERN_CHARS", "MAX_STATES", "NamePattern", "compile_name_pattern"]
