"""jaxrt.ir.analysis.graph: networkx graph, order, liveness, peak memory, DOT."""
import re

import pytest

from jaxrt.ir import Builder, DType, Module, TensorType, ops, verify
from jaxrt.ir.analysis.graph import (Interval, UnboundDimError, liveness, peak_memory,
                                     to_dot, to_networkx, topological_order, value_names)
from jaxrt.ir.printer import print_function


def t(*shape, dtype=DType.f32):
    return TensorType(tuple(shape), dtype)


def small():
    """x:f32[4] -> a = neg x; b = exp a; c = add(a, b); return c"""
    m = Module("g")
    b = Builder.new_function(m, "f", [("x", t(4))])
    a = b(ops.neg, b.fn.args[0])
    e = b(ops.exp, a)
    b.ret(b(ops.add, a, e))
    return m, m.functions["f"]


def with_weight():
    m = Module("w")
    b = Builder.new_function(m, "f", [("x", t("T", 8))])
    w = b.weight('odd "name"', t(8, 16))
    y = b(ops.matmul, b.fn.args[0], w)  # [T, 16]
    b.ret(b(ops.tanh, y), y)
    return m, m.functions["f"]


def test_value_names_match_the_printer():
    _, fn = with_weight()
    names = value_names(fn)
    printed = re.findall(r"^\s+(%\w+) = ", print_function(fn), flags=re.M)
    assert [names[op.results[0]] for op in fn.ops] == printed == ["%0", "%1", "%2"]
    assert names[fn.args[0]] == "%x"


def test_to_networkx_nodes_and_def_use_edges():
    _, fn = small()
    g = to_networkx(fn)
    assert list(g.nodes) == ["%x", "%0", "%1", "%2", "return"]
    assert g.nodes["%x"]["kind"] == "arg" and g.nodes["%2"]["opdef"] == "add"
    assert g.nodes["%0"]["op"] is fn.ops[0] and g.nodes["return"]["kind"] == "return"
    assert sorted(g.edges) == sorted([("%x", "%0"), ("%0", "%1"), ("%0", "%2"), ("%1", "%2"),
                                      ("%2", "return")])
    edge = g.edges["%0", "%2"]
    assert edge["uses"] == [(0, "%0")] and edge["type"] == "f32[4]" and edge["value"] == "%0"


def test_one_edge_carries_repeated_uses():
    m = Module("g")
    b = Builder.new_function(m, "f", [("x", t(4))])
    b.ret(b(ops.mul, b.fn.args[0], b.fn.args[0]))
    g = to_networkx(m.functions["f"])
    assert g.edges["%x", "%0"]["uses"] == [(0, "%x"), (1, "%x")]


def test_topological_order_repairs_a_shuffled_function():
    m, fn = small()
    original = list(fn.ops)
    fn.ops.reverse()
    order = topological_order(fn)
    assert order == original
    fn.set_ops(order)
    verify(m)


def test_liveness_intervals():
    _, fn = small()
    live = liveness(fn)
    x = fn.args[0]
    a, e, c = (op.results[0] for op in fn.ops)
    assert live[x] == Interval(-1, 0)
    assert live[a] == Interval(0, 2) and live[e] == Interval(1, 2)
    assert live[c] == Interval(2, 3)  # returned: live to the end


def test_peak_memory_by_hand():
    # bytes per op index: -1: x; 0: x, a; 1: a, e; 2: a, e, c; 3: c   (16 bytes each)
    _, fn = small()
    est = peak_memory(fn)
    assert est.peak_bytes == 48 and est.op_index == 2
    assert est.names == ("%0", "%1", "%2")


def test_peak_memory_excludes_weights_and_binds_symbolic_dims():
    _, fn = with_weight()
    est = peak_memory(fn, {"T": 10})
    # x [10, 8] + y [10, 16] during the matmul (op 1); y + tanh(y) during op 2
    assert est.peak_bytes == 4 * (10 * 16 + 10 * 16) and est.op_index == 2
    assert all(v.owner is None or v.owner.opdef is not ops.weight for v in est.live)


def test_peak_memory_names_the_unbound_dim():
    _, fn = with_weight()
    with pytest.raises(UnboundDimError, match=r"symbolic dim 'T' of %x : f32\[T, 8\] is not "
                                              r"bound; pass bindings=\{'T': size, \.\.\.\}"):
        peak_memory(fn)


def test_to_dot_is_deterministic_text():
    _, fn = with_weight()
    dot = to_dot(fn)
    assert dot == to_dot(fn)
    assert dot.startswith('digraph "f" {\n')
    assert '"%x" [shape=ellipse, label="%x: f32[T, 8]"];' in dot
    assert '"%0" [label="%0 = weight @\\"odd \\\\\\"name\\\\\\"\\"\\nf32[8, 16]"];' in dot
    assert '"%x" -> "%1" [label="0"];' in dot and '"%1" -> "return" [label="1"];' in dot
    assert dot.rstrip().endswith("}")
    # every quote is balanced on every line
    assert all(line.replace('\\"', "").count('"') % 2 == 0 for line in dot.splitlines())


def test_dot_shows_attributes():
    m = Module("g")
    b = Builder.new_function(m, "f", [("x", t(2, 3))])
    b.ret(b(ops.transpose, b.fn.args[0], perm=(1, 0)))
    assert '%0 = transpose {perm = [1, 0]}\\nf32[3, 2]' in to_dot(m.functions["f"])
