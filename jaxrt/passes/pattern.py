"""Declarative patterns over op definitions.

    Pat(ops.add, "x", Const(0.0))                    # add(x, 0) in either operand order
    Pat(ops.transpose, Pat(ops.transpose, "x", name="inner"))
    Pat((ops.reshape, ops.broadcast), Any("x", where=is_float), attrs={"shape": (4, 4)})
    Or(Pat(ops.maximum, "x", "x"), Pat(ops.minimum, "x", "x"))

A pattern matches a Value. Named parts capture it (`name=`, or a bare string operand as
shorthand for `Any(name)`); a name that appears twice must bind the same Value both times.
Ops with Trait.COMMUTATIVE are matched in both operand orders.

`pattern.match(value)` returns the captures (name -> Value; the op is `value.owner`) or
None. With `explain=True` a failure is returned as a falsy `MatchFailure` whose message is
built only when it is read ("operand 1: expected constant 0.0, found mul %5"), so the fast
path of the rewrite driver never formats strings.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Iterable, Mapping

import numpy as np

from jaxrt.ir.module import Value
from jaxrt.ir.opdef import OpDef, Trait
from jaxrt.ir.ops import constant
from jaxrt.ir.types import DType, TensorType

Namer = Callable[[Value], str]
Captures = dict[str, Value]


def _default_namer(v: Value) -> str:
    return f"%{v.hint}" if v.owner is None and v.hint else "%?"


def describe_value(v: Value, name: Namer) -> str:
    """`mul %5`, `constant %2 {value = 1.0}`, `argument %x`."""
    if v.owner is None:
        return f"argument {name(v)}"
    op = v.owner
    if op.opdef is constant:
        return f"constant {name(v)} {{value = {_short(op.attrs.value)}}}"
    return f"{op.opdef.name} {name(v)}"


def _short(x) -> str:
    if isinstance(x, tuple):
        return "[" + ", ".join(map(repr, x[:4])) + (", ...]" if len(x) > 4 else "]")
    return repr(x)


def describe_predicate(fn: Callable) -> str:
    """A predicate's name and where it is defined: `is_identity_perm (canonicalize.py:40)`."""
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})" if code else ""
    return f"{getattr(fn, '__name__', repr(fn))}{where}"


class MatchFailure:
    """Why a pattern did not match; falsy. The message is built on first read."""

    __slots__ = ("path", "build")

    def __init__(self, build: Callable[[Namer], str], path: tuple[str, ...] = ()):
        self.build = build
        self.path = path

    def under(self, step: str) -> "MatchFailure":
        return MatchFailure(self.build, (step,) + self.path)

    def render(self, namer: Namer | None = None) -> str:
        return ": ".join(self.path + (self.build(namer or _default_namer),))

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"MatchFailure({self.render()!r})"

    def __bool__(self) -> bool:
        return False


class _Explain:
    """Holder for the failure of the current attempt (explain mode only)."""

    __slots__ = ("failure",)

    def __init__(self):
        self.failure: MatchFailure | None = None

    def fail(self, build: Callable[[Namer], str]) -> bool:
        self.failure = MatchFailure(build)
        return False

    def wrap(self, step: str) -> bool:
        if self.failure is not None:
            self.failure = self.failure.under(step)
        return False


class Pattern:
    """Base class. Subclasses implement `_match(value, captures, explain) -> bool`."""

    __slots__ = ()
    name: str | None

    def match(self, value: Value, *, explain: bool = False) -> Captures | MatchFailure | None:
        caps: Captures = {}
        ex = _Explain() if explain else None
        if self._match(value, caps, ex):
            return caps
        return ex.failure if ex is not None else None

    def _match(self, v: Value, caps: Captures, ex: _Explain | None) -> bool:
        raise NotImplementedError

    def _bind(self, v: Value, caps: Captures, ex: _Explain | None) -> bool:
        """Bind `self.name` to v; a name already bound must be bound to v itself."""
        name = self.name
        prev = caps.get(name)
        if prev is None:
            caps[name] = v
            return True
        if prev is v:
            return True
        return ex is not None and ex.fail(
            lambda n: f"capture {name!r} is bound to {n(prev)} but here is {n(v)}")

    def capture_names(self) -> set[str]:
        raise NotImplementedError

    def root_opdefs(self) -> frozenset[OpDef] | None:
        """The op definitions a matched value can come from; None means any (or arguments)."""
        return None


def as_pattern(p: "Pattern | str") -> Pattern:
    if isinstance(p, Pattern):
        return p
    if isinstance(p, str):
        return Any(p)
    raise TypeError(f"expected a Pattern or a capture name, got {p!r}")


class Any(Pattern):
    """Any value, function arguments included; `where` is a predicate on its TensorType."""

    __slots__ = ("name", "where")

    def __init__(self, name: str | None = None, where: Callable[[TensorType], bool] | None = None):
        self.name = name
        self.where = where

    def _match(self, v, caps, ex):
        where = self.where
        if where is not None and not where(v.type):
            return ex is not None and ex.fail(
                lambda n: f"{n(v)} : {v.type} fails type predicate {describe_predicate(where)}")
        return self.name is None or self._bind(v, caps, ex)

    def capture_names(self):
        return {self.name} if self.name else set()

    def __repr__(self):
        return self.name or "_"


def _in_dtype(x: float, dtype: DType) -> float:
    """x as stored in `dtype` (1e-30 is 0 in f16, 1.0000001 is 1 in bf16)."""
    # the sign is part of the key: 0.0 == -0.0 (and they hash alike), so a cache keyed on
    # the value alone would answer for -0.0 with +0.0's entry
    return _in_dtype_cached(x, math.copysign(1.0, x), dtype)


@lru_cache(maxsize=4096)
def _in_dtype_cached(x: float, sign: float, dtype: DType) -> float:
    with np.errstate(all="ignore"):
        return float(np.asarray(x, dtype=np.float64).astype(dtype.to_numpy()))


def splat_value(v: Value) -> float | None:
    """The single value of a `constant` whose elements are all equal (as stored), else None."""
    op = v.owner
    if op is None or op.opdef is not constant:
        return None
    raw = op.attrs.value
    dt = v.type.dtype
    if not isinstance(raw, tuple):
        return _in_dtype(raw, dt)
    if not raw:
        return None
    first = _in_dtype(raw[0], dt)
    for x in raw[1:]:
        if not _same_number(_in_dtype(x, dt), first):
            return None
    return first


def _same_number(a: float, b: float) -> bool:
    """Equal as IEEE values: the sign of zero counts (1/x tells them apart); NaN is NaN."""
    if a == b:
        return a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b)
    return math.isnan(a) and math.isnan(b)


class Const(Pattern):
    """A `constant` op. With a value: every element, as stored in the constant's dtype, is
    that value (the sign of zero counts: Const(0.0) does not match -0.0 in a float tensor;
    integer zeros have no sign; NaN matches NaN). Without a value: any constant."""

    __slots__ = ("value", "name", "where")

    def __init__(self, value: float | None = None, name: str | None = None,
                 where: Callable[[Value], bool] | None = None):
        self.value = None if value is None else float(value)
        self.name = name
        self.where = where

    def _match(self, v, caps, ex):
        op = v.owner
        if op is None or op.opdef is not constant:
            return ex is not None and ex.fail(
                lambda n: f"expected {self._what()}, found {describe_value(v, n)}")
        if self.value is not None:
            got = splat_value(v)
            if got is None or not _same_number(got, _in_dtype(self.value, v.type.dtype)):
                return ex is not None and ex.fail(
                    lambda n: f"expected {self._what()}, found {describe_value(v, n)}")
        where = self.where
        if where is not None and not where(v):
            return ex is not None and ex.fail(
                lambda n: f"{describe_value(v, n)} fails predicate {describe_predicate(where)}")
        return self.name is None or self._bind(v, caps, ex)

    def _what(self) -> str:
        return "a constant" if self.value is None else f"constant {self.value!r}"

    def capture_names(self):
        return {self.name} if self.name else set()

    def root_opdefs(self):
        return frozenset({constant})

    def __repr__(self):
        inner = "" if self.value is None else repr(self.value)
        return f"const({inner})" + (f" as {self.name}" if self.name else "")


AttrCheck = Mapping[str, object] | Callable[..., bool]


class Pat(Pattern):
    """An op from `opdefs` (one OpDef, a tuple of them, or None for any op) whose operands
    match `operands` (all of them, in order; omitted means unconstrained).

    attrs: {attr name: expected value or predicate on the value}, or a predicate on the Attrs.
    where: predicate on the matched Value (its op is `value.owner`).
    commutative: try both operand orders; defaults to whether every opdef is COMMUTATIVE.
    """

    __slots__ = ("opdefs", "operands", "name", "attrs", "where", "commutative")

    def __init__(self, opdefs: OpDef | Iterable[OpDef] | None, *operands: Pattern | str,
                 name: str | None = None, attrs: AttrCheck | None = None,
                 where: Callable[[Value], bool] | None = None, commutative: bool | None = None):
        if opdefs is None:
            self.opdefs = None
        elif isinstance(opdefs, OpDef):
            self.opdefs = frozenset({opdefs})
        else:
            self.opdefs = frozenset(opdefs)
            if not self.opdefs or not all(isinstance(o, OpDef) for o in self.opdefs):
                raise TypeError(f"Pat expects OpDefs, got {opdefs!r}")
        self.operands = tuple(as_pattern(p) for p in operands) if operands else None
        self.name = name
        if isinstance(attrs, Mapping):
            attrs = {k: tuple(x) if isinstance(x, list) else x for k, x in attrs.items()}
        self.attrs = attrs
        self.where = where
        if commutative is None:
            commutative = (self.opdefs is not None and self.operands is not None
                           and len(self.operands) == 2
                           and all(o.has(Trait.COMMUTATIVE) for o in self.opdefs))
        self.commutative = commutative

    def _match(self, v, caps, ex):
        op = v.owner
        if op is None or (self.opdefs is not None and op.opdef not in self.opdefs):
            return ex is not None and ex.fail(
                lambda n: f"expected {self._ops()}, found {describe_value(v, n)}")
        if self.attrs is not None and not self._match_attrs(v, op.attrs, ex):
            return False
        if self.operands is not None:
            if len(op.operands) != len(self.operands):
                return ex is not None and ex.fail(
                    lambda n: f"{describe_value(v, n)} has {len(op.operands)} operands, "
                              f"pattern has {len(self.operands)}")
            if not self._match_operands(op.operands, caps, ex):
                return False
        where = self.where
        if where is not None and not where(v):
            return ex is not None and ex.fail(
                lambda n: f"{describe_value(v, n)} fails predicate {describe_predicate(where)}")
        return self.name is None or self._bind(v, caps, ex)

    def _match_operands(self, values, caps, ex) -> bool:
        pats = self.operands
        if not self.commutative:
            return self._match_in_order(pats, values, range(len(values)), caps, ex)
        saved = dict(caps)
        if self._match_in_order(pats, values, (0, 1), caps, ex):
            return True
        first = ex.failure if ex is not None else None
        caps.clear()
        caps.update(saved)
        if self._match_in_order(pats, values, (1, 0), caps, ex):
            return True
        if ex is not None:
            second = ex.failure
            ex.failure = MatchFailure(
                lambda n: f"neither operand order matches ({first.render(n)}; swapped: "
                          f"{second.render(n)})")
        return False

    @staticmethod
    def _match_in_order(pats, values, order, caps, ex) -> bool:
        for p, i in zip(pats, order):
            if not p._match(values[i], caps, ex):
                return ex is not None and ex.wrap(f"operand {i}")
        return True

    def _match_attrs(self, v, attrs, ex) -> bool:
        check = self.attrs
        if callable(check):
            if check(attrs):
                return True
            return ex is not None and ex.fail(
                lambda n: f"attributes of {describe_value(v, n)} fail predicate "
                          f"{describe_predicate(check)}")
        for key, want in check.items():
            if key not in attrs:
                return ex is not None and ex.fail(
                    lambda n, key=key: f"{describe_value(v, n)} has no attribute {key!r}")
            got = attrs[key]
            ok = want(got) if callable(want) else got == want
            if not ok:
                return ex is not None and ex.fail(
                    lambda n, key=key, want=want, got=got: (
                        f"attribute {key} = {got!r} of {describe_value(v, n)} "
                        + (f"fails predicate {describe_predicate(want)}" if callable(want)
                           else f"is not {want!r}")))
        return True

    def _ops(self) -> str:
        if self.opdefs is None:
            return "an op"
        return " or ".join(sorted(o.name for o in self.opdefs))

    def capture_names(self):
        names = {self.name} if self.name else set()
        for p in self.operands or ():
            names |= p.capture_names()
        return names

    def root_opdefs(self):
        return self.opdefs

    def __repr__(self):
        ops = "|".join(sorted(o.name for o in self.opdefs)) if self.opdefs else "*"
        args = "(" + ", ".join(map(repr, self.operands)) + ")" if self.operands else "(...)"
        return ops + args + (f" as {self.name}" if self.name else "")


class Or(Pattern):
    """The first alternative that matches. Every alternative must capture the same names,
    so a rule's handler always receives the same keyword arguments."""

    __slots__ = ("alternatives", "name")

    def __init__(self, *alternatives: Pattern | str):
        if len(alternatives) < 2:
            raise ValueError("Or needs at least two alternatives")
        self.alternatives = tuple(as_pattern(p) for p in alternatives)
        self.name = None
        names = [p.capture_names() for p in self.alternatives]
        if any(n != names[0] for n in names):
            raise ValueError(f"Or alternatives capture different names: {names}")

    def _match(self, v, caps, ex):
        saved = dict(caps)
        failures = []
        for p in self.alternatives:
            if p._match(v, caps, ex):
                return True
            if ex is not None:
                failures.append(ex.failure)
            caps.clear()
            caps.update(saved)
        return ex is not None and ex.fail(
            lambda n: "no alternative matches: " + "; ".join(
                f"({i + 1}) {f.render(n)}" for i, f in enumerate(failures)))

    def capture_names(self):
        return self.alternatives[0].capture_names()

    def root_opdefs(self):
        roots: set[OpDef] = set()
        for p in self.alternatives:
            r = p.root_opdefs()
            if r is None:
                return None
            roots |= r
        return frozenset(roots)

    def __repr__(self):
        return "Or(" + ", ".join(map(repr, self.alternatives)) + ")"


# ---- predicates on types, for Any(where=...) --------------------------------------------

def is_int(t: TensorType) -> bool:
    """Integer (i8, i32) tensors: exact arithmetic, no NaN or inf."""
    return t.dtype.is_int


def is_float(t: TensorType) -> bool:
    return t.dtype.is_float


def is_static(t: TensorType) -> bool:
    return t.is_static
