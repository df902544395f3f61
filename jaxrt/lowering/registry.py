"""Lowering rules, registered per (backend, OpDef).

A rule is `fn(ctx, *operands, attrs, out_types) -> array | tuple of arrays`: operands are
traced arrays, `attrs` the op's Attrs, `out_types` its result types with every symbolic
dim bound. Rules must produce exactly `out_types` (compile checks shapes and dtypes).
Backends are packages `jaxrt.lowering.<backend>` whose import registers their rules.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..ir import OPS, OpDef

LoweringRule = Callable[..., Any]

_RULES: dict[tuple[str, OpDef], LoweringRule] = {}
_LOADED: set[str] = set()


class LoweringError(Exception):
    """An op cannot be lowered (no rule, or a rule broke its result types)."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class LoweringContext:
    """What rules may read besides their operands."""

    weights: Mapping[str, Any]  # name -> array (traced inside jit)
    bindings: dict[str, int] = field(default_factory=dict)  # symbolic dim -> size
    backend: str = "xla"
    # For ops that call functions (scan): the module and the backends to lower them with.
    module: Any = None
    backends: str | Sequence[str] = "xla"


def rule(opdef: OpDef, backend: str = "xla") -> Callable[[LoweringRule], LoweringRule]:
    """Decorator: register `fn` as the `backend` lowering of `opdef`."""
    if not isinstance(opdef, OpDef):
        raise TypeError(f"rule() takes an OpDef, got {opdef!r}")

    def register(fn: LoweringRule) -> LoweringRule:
        key = (backend, opdef)
        if key in _RULES:
            raise ValueError(f"{backend} rule for {opdef.name} is already registered")
        _RULES[key] = fn
        return fn
    return register


def _load(backend: str) -> None:
    if backend not in _LOADED:
        try:
            importlib.import_module(f"{__package__}.{backend}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{backend}":
                raise
            raise LoweringError(f"unknown lowering backend {backend!r}") from None
        _LOADED.add(backend)


def lookup_rule(opdef: OpDef, backends: str | Sequence[str] = "xla") -> LoweringRule:
    """The first rule for `opdef` among `backends` (in order of preference)."""
    backends = (backends,) if isinstance(backends, str) else tuple(backends)
    for backend in backends:
        _load(backend)
        fn = _RULES.get((backend, opdef))
        if fn is not None:
            return fn
    raise LoweringError(f"no lowering rule for op {opdef.name!r} in backend(s) "
                        f"{', '.join(backends)}")


def missing_rules(backend: str = "xla") -> list[str]:
    """Names of registered ops that `backend` cannot lower."""
    _load(backend)
    return sorted(name for name, opdef in OPS.items() if (backend, opdef) not in _RULES)
