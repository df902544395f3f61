"""Op definitions: the registry every other layer keys on.

An op is an instance of an `OpDef`: a name (its spelling in text), typed frozen
attributes, operand/result arity, type inference, a verifier, traits and numpy
reference semantics. Lowering rules are registered elsewhere (jaxrt.lowering),
keyed by the OpDef object.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import InputError
from .types import DType, TensorType


class Trait(enum.Enum):
    PURE = "pure"                # no side effects: may be CSE'd, DCE'd, reordered
    ELEMENTWISE = "elementwise"  # result[i] depends on operand[i] only (after broadcast)
    COMMUTATIVE = "commutative"  # binary op, operands may be swapped
    CONSTANT_LIKE = "constant_like"  # value known at compile time (constant, iota)


class VerifyError(InputError):
    """An IR invariant is broken. `where` names the function/value when known."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Attribute kinds an AttrSpec may name. Tuples hold ints, floats or strings.
AttrValue = int | float | bool | str | DType | tuple | None


@dataclass(frozen=True, slots=True)
class AttrSpec:
    kind: type | tuple  # int, float, bool, str, DType, tuple, or a tuple of these
    default: Any = REQUIRED
    choices: tuple | None = None  # allowed values (for str enums)
    optional: bool = False  # None is a valid value

    def check(self, name: str, value: Any) -> Any:
        """Validate and normalize one attribute value; raise VerifyError if invalid."""
        if value is None:
            if self.optional:
                return None
            raise VerifyError(f"attribute {name!r} may not be none")
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, np.integer):
            value = int(value)
        if isinstance(value, np.floating):
            value = float(value)
        if float in kinds and int not in kinds and isinstance(value, int) \
                and not isinstance(value, bool):
            value = float(value)
        ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
                 for k in kinds)
        if not ok:
            want = " or ".join(k.__name__ for k in kinds)
            raise VerifyError(f"attribute {name!r} must be {want}, got {value!r}")
        if isinstance(value, tuple):
            value = tuple(float(x) if float in kinds and isinstance(x, int)
                          and not isinstance(x, bool) and int not in kinds else x
                          for x in value)
            for item in value:
                if isinstance(item, bool) or not isinstance(item, (int, float, str)):
                    raise VerifyError(f"attribute {name!r} holds {item!r}; tuples hold "
                                      "ints, floats or strings")
        if self.choices is not None and value not in self.choices:
            raise VerifyError(f"attribute {name!r} = {value!r} not in {self.choices}")
        return value


class Attrs(Mapping[str, AttrValue]):
    """Frozen, hashable attribute dict with attribute access: `op.attrs.axis`."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, AttrValue] | None = None):
        object.__setattr__(self, "_items", dict(sorted((items or {}).items())))
        object.__setattr__(self, "_hash", None)

    def __getitem__(self, key: str) -> AttrValue:
        return self._items[key]

    def __getattr__(self, key: str) -> AttrValue:
        try:
            return self._items[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        raise AttributeError("Attrs are frozen")

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(tuple(self._items.items())))
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Attrs) and self._items == other._items

    def replace(self, **changes) -> "Attrs":
        return Attrs({**self._items, **changes})

    def __repr__(self) -> str:
        return f"Attrs({self._items!r})"


InferFn = Callable[[list[TensorType], Attrs], list[TensorType]]
ReferenceFn = Callable[..., Any]


@dataclass(frozen=True, eq=False)
class OpDef:
    """A registered operation. Identity is the object; `name` is its text spelling."""

    name: str
    num_operands: int | tuple[int, int | None]  # exact, or (min, max|None) for variadic
    num_results: int | None = 1  # None: as many as `infer` returns (scan)
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    traits: frozenset[Trait] = frozenset({Trait.PURE})
    # Result types from operand types and attributes; None means the result types are
    # given at construction (constant, weight, iota) and `verify` checks them.
    infer: InferFn | None = None
    # Extra checks beyond arity, attrs and inference; raises VerifyError.
    verify: Callable[[list[TensorType], list[TensorType], Attrs], None] | None = None
    # numpy semantics: reference(*operand_arrays, attrs=Attrs) -> array | tuple of arrays
    reference: ReferenceFn | None = None
    doc: str = ""

    def has(self, trait: Trait) -> bool:
        return trait in self.traits

    def arity_ok(self, n: int) -> bool:
        if isinstance(self.num_operands, int):
            return n == self.num_operands
        lo, hi = self.num_operands
        return n >= lo and (hi is None or n <= hi)

    def make_attrs(self, given: Mapping[str, Any]) -> Attrs:
        """Fill defaults and validate; raises VerifyError on unknown/missing/bad attrs."""
        unknown = set(given) - set(self.attrs)
        if unknown:
            raise VerifyError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        out = {}
        for key, spec in self.attrs.items():
            if key in given:
                out[key] = spec.check(key, given[key])
            elif spec.default is REQUIRED:
                raise VerifyError(f"{self.name}: missing attribute {key!r}")
            else:
                out[key] = spec.default
        return Attrs(out)

    def __repr__(self) -> str:
        return f"OpDef({self.name})"

    def __hash__(self) -> int:
        return id(self)


OPS: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in OPS:
        raise ValueError(f"op {opdef.name!r} is already registered")
    OPS[opdef.name] = opdef
    return opdef


def lookup(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}") from None
