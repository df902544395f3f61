"""Graph analyses of one Function: def-use graph (networkx), order, liveness, memory, DOT.

Values are named as the printer names them (`%tokens`, `%12`), so what these functions
report can be looked up in `print_function` output. Op indices are positions in `fn.ops`;
arguments are defined at index -1 and function results are used at index len(fn.ops).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import networkx as nx

from ..module import Function, Op, Value
from ..ops import scan, weight
from ..printer import format_attr_dict, format_symbol


def value_names(fn: Function) -> dict[Value, str]:
    """value -> printed name, numbered exactly as `jaxrt.ir.printer` numbers them."""
    names = {a: "%" + n for a, n in zip(fn.args, fn.arg_names)}
    counter = 0
    for op in fn.ops:
        for r in op.results:
            names[r] = f"%{counter}"
            counter += 1
    return names


def _op_key(op: Op, index: int, names: dict[Value, str]) -> str:
    return names[op.results[0]] if op.results else f"op#{index}"


RETURN = "return"  # the node standing for the function's results


def to_networkx(fn: Function) -> nx.DiGraph:
    """Nodes: one per argument (kind="arg"), per op (kind="op", keyed by its first result's
    name) and a "return" node. Edges: producer -> consumer, with `uses` = [(operand index,
    value name)], and `value`/`type` of the first use."""
    names = value_names(fn)
    g = nx.DiGraph(name=fn.name)
    node_of: dict[Value, str] = {}
    for a in fn.args:
        g.add_node(names[a], kind="arg", index=-1, value=a, type=str(a.type))
        node_of[a] = names[a]
    for i, op in enumerate(fn.ops):
        key = _op_key(op, i, names)
        g.add_node(key, kind="op", index=i, op=op, opdef=op.opdef.name,
                   results=[names[r] for r in op.results],
                   types=[str(r.type) for r in op.results])
        for r in op.results:
            node_of[r] = key
    g.add_node(RETURN, kind="return", index=len(fn.ops))

    def use(v: Value, dst: str, slot: int):
        src = node_of[v]
        if g.has_edge(src, dst):
            g.edges[src, dst]["uses"].append((slot, names[v]))
        else:
            g.add_edge(src, dst, uses=[(slot, names[v])], value=names[v], type=str(v.type))

    for i, op in enumerate(fn.ops):
        for slot, v in enumerate(op.operands):
            use(v, _op_key(op, i, names), slot)
    for slot, v in enumerate(fn.results):
        use(v, RETURN, slot)
    return g


def topological_order(fn: Function) -> list[Op]:
    """Ops in a dependency order, as close to the current order as possible."""
    g = to_networkx(fn)
    order = nx.lexicographical_topological_sort(g, key=lambda n: (g.nodes[n]["index"], n))
    return [g.nodes[n]["op"] for n in order if g.nodes[n]["kind"] == "op"]


@dataclass(frozen=True, slots=True)
class Interval:
    start: int  # op index that defines the value (-1: argument)
    end: int    # last op index that reads it (len(fn.ops): returned; == start: unused)


def liveness(fn: Function) -> dict[Value, Interval]:
    """value -> [definition, last use] over op indices, for every argument and result."""
    start: dict[Value, int] = {a: -1 for a in fn.args}
    end: dict[Value, int] = {a: -1 for a in fn.args}
    for i, op in enumerate(fn.ops):
        for v in op.operands:
            end[v] = i
        for r in op.results:
            start[r] = end[r] = i
    for v in fn.results:
        end[v] = len(fn.ops)
    return {v: Interval(s, end[v]) for v, s in start.items()}


class UnboundDimError(ValueError):
    """A symbolic dim needs a size for a byte count."""


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    op_index: int               # first op index where the peak is reached (-1: at entry)
    live: tuple[Value, ...]     # the values live there
    names: tuple[str, ...]      # their printed names


def peak_memory(fn: Function, bindings: dict[str, int] | None = None, *,
                exclude=None, module=None) -> MemoryEstimate:
    """Bytes of values live at once, maximized over ops; weights excluded, arguments included.

    A value occupies memory from its definition to its last use, both inclusive (an op's
    operands and results coexist while it runs), as if every buffer, arguments included,
    is freed right after its last reader. Symbolic dims are sized by `bindings`. With
    `module`, a scan op also holds its body's peak while it runs (counting the body's
    arguments again: an overestimate by at most one copy of the carried values).
    """
    bindings = bindings or {}
    names = value_names(fn)
    live = liveness(fn)
    n = len(fn.ops)
    delta = [0] * (n + 3)  # index k + 1 stands for op index k, k in [-1, n]
    sized: list[tuple[Value, Interval, int]] = []
    for v, iv in live.items():
        if v.owner is not None and v.owner.opdef is weight:
            continue
        if exclude is not None and exclude(v):  # e.g. the KV cache, accounted for apart
            continue
        try:
            nbytes = v.type.nbytes(bindings)
        except KeyError as e:
            raise UnboundDimError(
                f"peak_memory(@{fn.name}): symbolic dim {e.args[0]!r} of {names[v]} : "
                f"{v.type} is not bound; pass bindings={{{e.args[0]!r}: size, ...}}") from None
        sized.append((v, iv, nbytes))
        delta[iv.start + 1] += nbytes
        delta[iv.end + 2] -= nbytes
    if module is not None:
        for k, op in enumerate(fn.ops):
            body = module.functions.get(op.attrs.get("body")) if op.opdef is scan else None
            if body is not None and body is not fn:
                inner = peak_memory(body, bindings, exclude=exclude, module=module).peak_bytes
                delta[k + 1] += inner
                delta[k + 2] -= inner
    best, best_at, running = 0, -1, 0
    for k in range(n + 2):
        running += delta[k]
        if running > best:
            best, best_at = running, k - 1
    at_peak = tuple(v for v, iv, _ in sized if iv.start <= best_at <= iv.end) if best else ()
    return MemoryEstimate(best, best_at, at_peak, tuple(names[v] for v in at_peak))


def _dot_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a valid DOT string: quotes, \\ escaped


def to_dot(fn: Function) -> str:
    """Graphviz DOT text for the def-use graph. Written by hand (deterministic, and no
    pydot/pygraphviz dependency)."""
    names = value_names(fn)
    lines = [f"digraph {_dot_quote(fn.name)} {{", "  rankdir=TB;",
             '  node [shape=box, fontname="monospace"];']
    for a in fn.args:
        lines.append(f"  {_dot_quote(names[a])} [shape=ellipse, "
                     f"label={_dot_quote(f'{names[a]}: {a.type}')}];")
    for i, op in enumerate(fn.ops):
        res = ", ".join(names[r] for r in op.results)
        head = f"{res} = {op.opdef.name}"
        if op.opdef is weight:
            head += " " + format_symbol(op.attrs.name)
        elif op.attrs:
            head += " " + format_attr_dict(dict(op.attrs))
        types = ", ".join(str(r.type) for r in op.results)
        lines.append(f"  {_dot_quote(_op_key(op, i, names))} "
                     f"[label={_dot_quote(head + chr(10) + types)}];")
    lines.append(f"  {_dot_quote(RETURN)} [shape=plaintext];")
    g = to_networkx(fn)
    for src, dst, data in g.edges(data=True):
        label = ",".join(str(slot) for slot, _ in data["uses"])
        lines.append(f"  {_dot_quote(src)} -> {_dot_quote(dst)} [label={_dot_quote(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
