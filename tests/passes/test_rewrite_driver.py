"""Rules, rule sets, the worklist driver, statistics and explain."""
import pytest

from jaxrt.ir import ops, verify
from jaxrt.ir.printer import print_function
from jaxrt.passes.pattern import Any, Const, Pat
from jaxrt.passes.rewrite import (RewriteError, Rule, RuleSet, apply_rules, explain,
                                  find_rule)

from tests.passes.passes_testutil import F32, const, function, op_names, t


T = t(2, 3)

# add(x, 0) -> x
ADD_ZERO = Rule("t-add-zero", Pat(ops.add, "x", Const(0.0)), lambda rw, x: x)
# neg(neg(x)) -> x
NEG_NEG = Rule("t-neg-neg", Pat(ops.neg, Pat(ops.neg, "x")), lambda rw, x: x)


def double_to_add(rw, x):
    # mul(x, 2) -> add(x, x): builds a new op
    return rw(ops.add, x, x)


MUL_TWO = Rule("t-mul-two", Pat(ops.mul, "x", Const(2.0)), double_to_add)


def test_rule_validates_name_and_handler():
    with pytest.raises(ValueError, match="kebab-case"):
        Rule("AddZero", Pat(ops.add), lambda rw: None)
    with pytest.raises(TypeError, match=r"does not accept captures \['x'\]"):
        Rule("r", Pat(ops.add, "x", "y"), lambda rw, y: None)
    with pytest.raises(TypeError, match=r"\['z'\] are not captured"):
        Rule("r", Pat(ops.add, "x", "y"), lambda rw, x, y, z: None)
    Rule("r", Pat(ops.add, "x", "y"), lambda rw, **caps: None)  # **kwargs takes everything
    assert ADD_ZERO.location.startswith("test_rewrite_driver.py:")


def test_ruleset_index_combination_and_names():
    rs = RuleSet([ADD_ZERO, NEG_NEG])
    wildcard = Rule("t-any", Pat(None), lambda rw: None)
    both = rs + wildcard
    assert both.for_opdef(ops.add) == (ADD_ZERO, wildcard)
    assert both.for_opdef(ops.neg) == (NEG_NEG, wildcard)
    assert both.for_opdef(ops.mul) == (wildcard,)
    assert rs.for_opdef(ops.mul) == ()
    assert len(rs + RuleSet([MUL_TWO])) == 3 and "t-neg-neg" in rs
    assert rs["t-add-zero"] is ADD_ZERO
    with pytest.raises(KeyError, match="no rule 'nope'"):
        rs["nope"]
    with pytest.raises(ValueError, match="duplicate rule names"):
        rs + ADD_ZERO


def test_replacement_updates_uses_and_results():
    m = function({"x": T, "y": T}, lambda b, x, y: (
        b(ops.mul, b(ops.add, x, const(b, 0.0, T)), y), b(ops.add, y, const(b, 0.0, T))))
    stats = apply_rules(m, RuleSet([ADD_ZERO]))
    fn = m.functions["f"]
    verify(m)
    assert op_names(m) == ["mul"]  # the zero constants died with their adds
    assert fn.ops[0].operands == [fn.args[0], fn.args[1]]
    assert fn.results[1] is fn.args[1]
    assert stats["t-add-zero"].rewrites == 2 and stats.steps == 2


def test_new_ops_are_inserted_before_the_root():
    m = function({"x": T}, lambda b, x: b(ops.neg, b(ops.mul, b(ops.exp, x),
                                                      const(b, 2.0, T))))
    apply_rules(m, MUL_TWO)
    verify(m)  # the new add must come after exp and before neg
    assert op_names(m) == ["exp", "add", "neg"]


def test_preexisting_dead_ops_are_kept_but_rewrite_garbage_is_removed():
    def body(b, x):
        b(ops.exp, x)  # dead before rewriting: dce's job, not the driver's
        inner = b(ops.neg, x)
        return b(ops.neg, inner)

    m = function({"x": T}, body)
    apply_rules(m, NEG_NEG)
    assert op_names(m) == ["exp"]  # both negs went; the pre-existing dead exp stays


def test_rewrites_chain_to_a_fixed_point():
    def body(b, x):
        for _ in range(5):
            x = b(ops.neg, x)
        return x

    m = function({"x": T}, body)
    stats = apply_rules(m, NEG_NEG)
    assert op_names(m) == ["neg"] and stats.steps == 2


def test_handler_returning_none_declines():
    seen = []

    def decline(rw, x):
        seen.append(x)
        rw(ops.exp, x)  # built but not used: discarded
        return None

    m = function({"x": T}, lambda b, x: b(ops.neg, b(ops.neg, x)))
    stats = apply_rules(m, Rule("t-decline", Pat(ops.neg, Pat(ops.neg, "x")), decline))
    assert op_names(m) == ["neg", "neg"] and len(seen) == 1
    st = stats["t-decline"]
    assert (st.attempts, st.matches, st.rewrites) == (2, 1, 0)


def test_non_termination_raises_and_leaves_a_valid_function():
    # add(x, y) -> add(y, x): always applies
    swap = Rule("t-swap-forever", Pat(ops.add, "x", "y", commutative=False),
                lambda rw, x, y: rw(ops.add, y, x))
    m = function({"x": T, "y": T}, lambda b, x, y: b(ops.add, x, y))
    with pytest.raises(RewriteError, match=r"fixed point within 50 rewrites.*t-swap-forever"):
        apply_rules(m, swap, max_steps=50)
    verify(m)
    assert op_names(m) == ["add"]


def test_default_step_limit_also_catches_loops():
    grow = Rule("t-grow", Pat(ops.neg, "x"), lambda rw, x: rw(ops.neg, rw(ops.neg, rw(ops.neg, x))))
    m = function({"x": T}, lambda b, x: b(ops.neg, x))
    with pytest.raises(RewriteError, match="t-grow"):
        apply_rules(m, grow)
    verify(m)


def test_type_changing_replacement_is_an_error():
    bad = Rule("t-bad-type", Pat(ops.add, "x", "y"),
               lambda rw, x, y: rw(ops.reshape, x, shape=(6,)))
    m = function({"x": T, "y": T}, lambda b, x, y: b(ops.add, x, y))
    with pytest.raises(RewriteError, match=r"t-bad-type .* replaced a f32\[2, 3\].*f32\[6\]"):
        apply_rules(m, bad)


def test_handler_context_num_uses_and_log():
    seen = {}

    def record(rw, x):
        seen["uses"] = rw.num_uses(x)
        seen["ctx"] = rw.ctx
        seen["root"] = rw.op.opdef
        return None

    m = function({"x": T}, lambda b, x: b(ops.add, b(ops.neg, x), x))
    apply_rules(m, Rule("t-record", Pat(ops.neg, "x"), record), ctx="options")
    assert seen == {"uses": 2, "ctx": "options", "root": ops.neg}
    lines = []
    m = function({"x": T}, lambda b, x: b(ops.neg, b(ops.neg, x)))
    apply_rules(m, NEG_NEG, log=lines.append)
    assert lines == ["t-neg-neg: neg -> argument"]


def test_stats_list_every_rule_and_merge():
    m = function({"x": T}, lambda b, x: b(ops.neg, b(ops.neg, x)))
    stats = apply_rules(m, RuleSet([ADD_ZERO, NEG_NEG]))
    assert stats["t-add-zero"].attempts == 0  # visible even though never tried
    assert stats["t-neg-neg"].matches == 1
    table = stats.table()
    assert "t-add-zero" in table and "t-neg-neg" in table and "test_rewrite_driver.py:" in table
    js = stats.to_json()
    assert js["t-neg-neg"]["rewrites"] == 1 and set(js) == {"t-add-zero", "t-neg-neg"}
    stats.merge(stats)
    assert stats["t-neg-neg"].rewrites == 2 and stats.steps == 2


def test_explain_names_values_like_the_printer():
    m = function({"x": T, "y": T}, lambda b, x, y: b(ops.add, b(ops.mul, x, y),
                                                      const(b, 1e-30, T)))
    fn = m.functions["f"]
    text = print_function(fn)
    assert "%2 = add(%0, %1)" in text
    why = explain(fn, ADD_ZERO, "%2")
    assert why.startswith("rule 't-add-zero' (test_rewrite_driver.py:")
    assert "at %2 = add(%0, %1)" in why
    assert "operand 1: expected constant 0.0, found constant %1 {value = 1e-30}" in why
    assert "swapped: operand 0: expected constant 0.0, found mul %0" in why
    # by name, among all live rules
    assert explain(fn, "t-add-zero", "2") == why
    assert "expected add, found mul %0" in explain(fn, "t-add-zero", "%0")
    assert "argument %x" in explain(fn, "t-add-zero", "%x")
    with pytest.raises(KeyError, match="no value %9"):
        explain(fn, ADD_ZERO, "%9")


def test_explain_when_the_pattern_matches():
    m = function({"x": T}, lambda b, x: b(ops.mul, x, const(b, 2.0, T)))
    fn = m.functions["f"]
    assert explain(fn, MUL_TWO, "%1").endswith(
        "matches (x=%x) and rewrites it to a new add (1 new ops)")
    declining = Rule("t-declines", Pat(ops.mul, "x", Any()), lambda rw, x: None)
    assert "pattern matches (x=%x) but the handler declines" in explain(fn, declining, "%1")
    assert op_names(m) == ["constant", "mul"]  # explain changes nothing


def test_find_rule_by_name():
    assert find_rule("t-neg-neg") is NEG_NEG
    assert find_rule("t-neg-neg", RuleSet([NEG_NEG])) is NEG_NEG
    with pytest.raises(KeyError):
        find_rule("no-such-rule")
    twin = Rule("t-neg-neg", Pat(ops.neg), lambda rw: None)
    with pytest.raises(KeyError, match="2 rules are named"):
        find_rule("t-neg-neg")
    del twin


def test_rewriting_a_module_visits_every_function():
    m = function({"x": T}, lambda b, x: b(ops.neg, b(ops.neg, x)))
    from jaxrt.ir import Builder
    b = Builder.new_function(m, "g", [("x", t(4, dtype=F32))])
    b.ret(b(ops.neg, b(ops.neg, b.fn.args[0])))
    stats = apply_rules(m, NEG_NEG)
    assert stats.steps == 2 and op_names(m, "g") == []
