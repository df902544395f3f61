"""SSA graph: Value, Op, Function, Module, and a Builder.

Values are immutable and anonymous; the printer names them. A Function keeps its
ops in a topological list; rewrites go through `Function.replace_uses` and
`Function.set_ops` so that order stays valid (the verifier checks it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .opdef import Attrs, OpDef, VerifyError
from .types import DType, TensorType


class Value:
    """An SSA value: a function argument (owner None) or result `index` of `owner`."""

    __slots__ = ("type", "owner", "index", "hint")

    def __init__(self, type: TensorType, owner: "Op | None" = None, index: int = 0,
                 hint: str | None = None):
        self.type = type
        self.owner = owner
        self.index = index
        self.hint = hint  # printing hint for arguments (their name); not part of identity

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    def __repr__(self) -> str:
        src = self.owner.opdef.name if self.owner else f"arg {self.hint or ''}"
        return f"<Value {self.type} from {src}>"


class Op:
    __slots__ = ("opdef", "operands", "attrs", "results")

    def __init__(self, opdef: OpDef, operands: Sequence[Value], attrs: Attrs,
                 result_types: Sequence[TensorType]):
        self.opdef = opdef
        self.operands: list[Value] = list(operands)
        self.attrs = attrs
        self.results: tuple[Value, ...] = tuple(
            Value(t, self, i) for i, t in enumerate(result_types))

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.opdef.name} has {len(self.results)} results")
        return self.results[0]

    def __repr__(self) -> str:
        return f"<Op {self.opdef.name} {dict(self.attrs)}>"


def make_op(opdef: OpDef, operands: Sequence[Value], attrs: dict[str, Any] | Attrs | None = None,
            result_types: Sequence[TensorType] | None = None) -> Op:
    """Build an op, validating arity and attrs and inferring result types."""
    if not opdef.arity_ok(len(operands)):
        raise VerifyError(f"{opdef.name}: expected {opdef.num_operands} operands, "
                          f"got {len(operands)}")
    attrs = attrs if isinstance(attrs, Attrs) else opdef.make_attrs(attrs or {})
    in_types = [v.type for v in operands]
    if result_types is None:
        if opdef.infer is None:
            raise VerifyError(f"{opdef.name}: result types must be given")
        try:
            result_types = opdef.infer(in_types, attrs)
        except VerifyError:
            raise
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise VerifyError(f"{opdef.name}: {e}") from None
    if opdef.verify is not None:
        opdef.verify(in_types, list(result_types), attrs)
    return Op(opdef, operands, attrs, result_types)


@dataclass(eq=False)
class Function:
    name: str
    args: list[Value]
    ops: list[Op] = field(default_factory=list)
    results: list[Value] = field(default_factory=list)

    @property
    def arg_names(self) -> list[str]:
        return [a.hint or f"arg{i}" for i, a in enumerate(self.args)]

    def arg(self, name: str) -> Value:
        for a in self.args:
            if a.hint == name:
                return a
        raise KeyError(f"function @{self.name} has no argument %{name}")

    def uses(self) -> dict[Value, list[tuple[Op | None, int]]]:
        """value -> [(user op, operand index)]; a user of None means a function result."""
        table: dict[Value, list[tuple[Op | None, int]]] = {}
        for op in self.ops:
            for i, v in enumerate(op.operands):
                table.setdefault(v, []).append((op, i))
        for i, v in enumerate(self.results):
            table.setdefault(v, []).append((None, i))
        return table

    def replace_uses(self, old: Value, new: Value) -> None:
        for op in self.ops:
            op.operands = [new if v is old else v for v in op.operands]
        self.results = [new if v is old else v for v in self.results]

    def set_ops(self, ops: Iterable[Op]) -> None:
        self.ops = list(ops)

    def toposort(self) -> None:
        """Reorder ops topologically, keeping the existing order where it is valid."""
        defined = set(self.args)
        pending = list(self.ops)
        ordered: list[Op] = []
        while pending:
            progress = False
            rest = []
            for op in pending:
                if all(v in defined for v in op.operands):
                    ordered.append(op)
                    defined.update(op.results)
                    progress = True
                else:
                    rest.append(op)
            if not progress:
                raise VerifyError("cycle or undefined value", f"@{self.name}")
            pending = rest
        self.ops = ordered

    def structural_key(self) -> tuple:
        """A hashable description that is equal iff the functions are the same graph."""
        ids: dict[Value, int] = {}
        for i, a in enumerate(self.args):
            ids[a] = i
        key_ops = []
        for op in self.ops:
            key_ops.append((op.opdef.name, tuple(ids.get(v, -1) for v in op.operands),
                            op.attrs, tuple(r.type for r in op.results)))
            for r in op.results:
                ids[r] = len(ids)
        # arg_names, not hints: an unnamed argument prints (and parses back) as %arg<i>
        args = tuple(zip(self.arg_names, (a.type for a in self.args)))
        return (self.name, args, tuple(key_ops), tuple(ids.get(v, -1) for v in self.results))


@dataclass(eq=False)
class Module:
    name: str = "module"
    functions: dict[str, Function] = field(default_factory=dict)
    weights: dict[str, TensorType] = field(default_factory=dict)
    # Weights computed from other weights at load (see weights.py): name -> WeightDef.
    weight_defs: dict[str, Any] = field(default_factory=dict)
    # Module-level metadata (architecture config, KV plan, ...): JSON-like values.
    attributes: dict[str, Any] = field(default_factory=dict)
    # Weight name -> ShardSpec (jaxrt/ir/sharding.py); a weight without one is replicated.
    shardings: dict[str, Any] = field(default_factory=dict)

    def add_function(self, fn: Function) -> Function:
        if fn.name in self.functions:
            raise VerifyError(f"duplicate function @{fn.name}")
        self.functions[fn.name] = fn
        return fn

    def __eq__(self, other) -> bool:
        if not isinstance(other, Module):
            return NotImplemented
        return (self.name == other.name and self.weights == other.weights
                and list(self.weights) == list(other.weights)
                and _defs_key(self.weight_defs) == _defs_key(other.weight_defs)
                and _as_tuples(self.attributes) == _as_tuples(other.attributes)
                and self.shardings == other.shardings
                and list(self.functions) == list(other.functions)
                and all(f.structural_key() == other.functions[n].structural_key()
                        for n, f in self.functions.items()))

    __hash__ = None  # mutable

    def __str__(self) -> str:
        from .printer import print_module
        return print_module(self)


def _defs_key(defs: dict) -> dict:
    return {n: (d.op, d.sources, _as_tuples(dict(d.attrs))) for n, d in defs.items()}


def _as_tuples(v: Any) -> Any:
    """Lists and tuples print alike (and parse as tuples), so equality does not tell them apart."""
    if isinstance(v, (list, tuple)):
        return tuple(_as_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _as_tuples(x) for k, x in v.items()}
    return v


class Builder:
    """Appends ops to a function: `x = b(ops.add, a, c)`; multi-result ops return tuples."""

    def __init__(self, module: Module, fn: Function):
        self.module = module
        self.fn = fn

    @classmethod
    def new_function(cls, module: Module, name: str,
                     args: Sequence[tuple[str, TensorType]]) -> "Builder":
        fn = Function(name, [Value(t, None, i, hint=n) for i, (n, t) in enumerate(args)])
        module.add_function(fn)
        return cls(module, fn)

    def __call__(self, opdef: OpDef, *operands: Value, result_types=None, **attrs):
        op = make_op(opdef, operands, attrs, result_types)
        self.fn.ops.append(op)
        return op.results[0] if len(op.results) == 1 else op.results

    def weight(self, name: str, type: TensorType | None = None) -> Value:
        """Reference a module weight by name (declaring it if `type` is given)."""
        from .ops import core
        if type is not None:
            prev = self.module.weights.get(name)
            if prev is not None and prev != type:
                raise VerifyError(f"weight @{name} redeclared as {type}, was {prev}")
            self.module.weights[name] = type
        elif name not in self.module.weights:
            raise VerifyError(f"unknown weight @{name}")
        return self(core.weight, name=name, result_types=[self.module.weights[name]])

    def define_weight(self, name: str, defn, type: TensorType | None = None) -> None:
        """Declare weight `name` as `defn` (a WeightDef) of its sources; the type is
        inferred unless given (and then checked)."""
        from .weights import infer_def
        if name in self.module.weights:
            raise VerifyError(f"weight @{name} is already declared")
        inferred = infer_def(defn, [self.module.weights[s] for s in defn.sources])
        if type is not None and type != inferred:
            raise VerifyError(f"weight @{name}: declared {type} but {defn.op} gives {inferred}")
        self.module.weights[name] = inferred
        self.module.weight_defs[name] = defn

    def ret(self, *values: Value) -> None:
        self.fn.results = list(values)
