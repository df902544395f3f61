"""Structured control flow: `scan`, a function body run `length` times.

    %x2, %kv2 = scan(%x, %kv, %positions, %w_stacked) {body = "layer", length = 30,
                                                       carried = 2, invariant = 1}

Operands are `carried` loop-carried values, then `invariant` values every iteration sees,
then stacked values whose leading axis has `length` entries (iteration i sees entry i).
The body function takes (i: i32[], *carried, *invariant, *slices) and returns the new
carried values; the op's results are the carried values after the last iteration.

The body lives in the same module; `verify.py` checks the signatures against it (an op's
own verifier sees only types). Its semantics are in `interpreter.py`, its lowering is
`jax.lax.scan` (`lowering/xla/control.py`).
"""
from __future__ import annotations

from ..opdef import AttrSpec, OpDef, Trait, VerifyError, register
from ..types import DType, TensorType


def _infer_scan(types, attrs):
    k, m = attrs.carried, attrs.invariant
    if k < 1 or m < 0 or attrs.length < 1:
        raise VerifyError(f"scan: needs carried >= 1, invariant >= 0 and length >= 1, got "
                          f"{k}, {m}, {attrs.length}")
    if len(types) < k + m:
        raise VerifyError(f"scan: {len(types)} operands for {k} carried + {m} invariant")
    for t in types[k + m:]:
        if t.rank < 1 or t.shape[0] != attrs.length:
            raise VerifyError(f"scan: stacked operand {t} must have a leading axis of "
                              f"{attrs.length}")
    return list(types[:k])


scan = register(OpDef(
    "scan", (1, None), num_results=None,  # as many as carried: inference decides
    attrs={"body": AttrSpec(str), "length": AttrSpec(int), "carried": AttrSpec(int),
           "invariant": AttrSpec(int, default=0)},
    traits=frozenset({Trait.PURE}), infer=_infer_scan,
    doc="Run function @body `length` times over carried, invariant and stacked operands."))


def slice_type(t: TensorType) -> TensorType:
    """The per-iteration type of a stacked operand."""
    return TensorType(t.shape[1:], t.dtype)


def verify_scan(op, module) -> None:
    """The body exists and its signature is (i32[], carried, invariant, slices) ->
    carried."""
    a = op.attrs
    body = module.functions.get(a.body) if module is not None else None
    if body is None:
        raise VerifyError(f"scan: no function @{a.body}")
    k, m = a.carried, a.invariant
    types = [v.type for v in op.operands]
    want = ([TensorType((), DType.int32)] + types[:k + m]
            + [slice_type(t) for t in types[k + m:]])
    got = [v.type for v in body.args]
    if got != want:
        raise VerifyError(f"scan: body @{a.body} takes ({', '.join(map(str, got))}), the "
                          f"operands need ({', '.join(map(str, want))})")
    res = [v.type for v in body.results]
    if res != types[:k]:
        raise VerifyError(f"scan: body @{a.body} returns ({', '.join(map(str, res))}), "
                          f"the carried values are ({', '.join(map(str, types[:k]))})")
    if any(o.opdef is scan for o in body.ops):
        raise VerifyError(f"scan: body @{a.body} contains a scan (not supported)")
