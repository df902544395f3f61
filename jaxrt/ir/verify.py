"""Module verifier: types, definitions before use, acyclicity and attribute validity."""
from __future__ import annotations

from .module import Function, Module, make_op
from .opdef import OpDef, VerifyError
from .ops import weight
from .ops.control import scan, verify_scan
from .sharding import check_module as check_shardings
from .weights import verify_defs


def verify_function(fn: Function, module: Module | None = None) -> None:
    where = f"@{fn.name}"
    defined = set()
    names = set()
    for a, name in zip(fn.args, fn.arg_names):  # the printed names: unnamed ones are %arg<i>
        if a.owner is not None:
            raise VerifyError("argument owned by an op", where)
        if name in names:
            raise VerifyError(f"duplicate argument name %{name}", where)
        names.add(name)
        defined.add(a)
    for i, op in enumerate(fn.ops):
        at = f"{where} op #{i} ({op.opdef.name})"
        for v in op.operands:
            if v not in defined:
                raise VerifyError("operand used before definition (or cycle, or foreign "
                                  "value)", at)
        _verify_op(op.opdef, op, at)
        if op.opdef is scan:
            try:
                verify_scan(op, module)
            except VerifyError as e:
                raise VerifyError(str(e), at) from None
        if op.opdef is weight and module is not None:
            t = module.weights.get(op.attrs.name)
            if t is None:
                raise VerifyError(f"unknown weight @{op.attrs.name}", at)
            if t != op.results[0].type:
                raise VerifyError(f"weight @{op.attrs.name} is {t}, used as "
                                  f"{op.results[0].type}", at)
        for r in op.results:
            if r in defined:
                raise VerifyError("value defined twice", at)
            if r.owner is not op:
                raise VerifyError("result does not point back at its op", at)
            defined.add(r)
    for v in fn.results:
        if v not in defined:
            raise VerifyError("returned value is not defined in the function", where)


def _verify_op(opdef: OpDef, op, at: str) -> None:
    try:
        if opdef.num_results is not None and len(op.results) != opdef.num_results:  # first: op verifiers unpack the results
            raise VerifyError(f"expected {opdef.num_results} results, has {len(op.results)}")
        attrs = opdef.make_attrs(dict(op.attrs))
        if attrs != op.attrs:
            raise VerifyError("attributes are not normalized")
        expected = [r.type for r in op.results]
        rebuilt = make_op(opdef, op.operands, attrs,
                          None if opdef.infer is not None else expected)
        got = [r.type for r in rebuilt.results]
        if got != expected:
            raise VerifyError(f"result types {[str(t) for t in expected]} but inference "
                              f"gives {[str(t) for t in got]}")
    except VerifyError as e:
        raise VerifyError(str(e), at) from None


def verify(module: Module) -> None:
    """Raise VerifyError naming the function and op if any invariant is broken."""
    for t in module.weights.values():
        if not t.is_static:
            raise VerifyError(f"weights must have static shapes, got {t}")
    verify_defs(module.weights, module.weight_defs)
    for fn in module.functions.values():
        verify_function(fn, module)
    check_shardings(module)
