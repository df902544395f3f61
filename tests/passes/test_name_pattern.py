"""Name patterns (jaxrt/passes/name_pattern.py): the same answers as `re.search` on the
supported subset, linear time on patterns that make `re` backtrack exponentially, and
the unsupported or malformed ones refused with a SettingError."""
from __future__ import annotations

import re
import signal
import time

import pytest
from hypothesis import given, reject, settings, strategies as st

from jaxrt.errors import SettingError
from jaxrt.passes import PassManager
from jaxrt.passes.manager import PipelineError
from jaxrt.passes.name_pattern import MAX_PATTERN_CHARS, compile_name_pattern


def _patterns():
    """Random patterns of the supported subset over a small alphabet (so they match)."""
    atom = st.sampled_from(["a", "b", ".", r"\.", r"\d", r"\w", r"\W", "[ab]", "[^a]",
                            "[0-9]", "_", "1", "[a-c_]", r"[\d.]"])
    quant = st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "*?", "+?"])

    def extend(inner):
        piece = st.builds(lambda a, q: a + q, inner, quant)
        concat = st.lists(piece, min_size=1, max_size=3).map("".join)
        alt = st.lists(concat, min_size=1, max_size=3).map("|".join)
        return st.builds(lambda kind, body: kind + body + ")",
                         st.sampled_from(["(", "(?:"]), alt)

    body = st.lists(st.builds(lambda a, q: a + q, st.recursive(atom, extend, max_leaves=6),
                              quant), min_size=1, max_size=4).map("".join)
    return st.builds(lambda a, alts, z: a + "|".join(alts) + z, st.sampled_from(["", "^"]),
                     st.lists(body, min_size=1, max_size=2), st.sampled_from(["", "$"]))


class _OracleTimeout(Exception):
    pass


def _re_search(pattern: str, name: str, seconds: float = 2.0) -> bool | None:
    """re.search(pattern, name) is not None, or None where `re` backtracks past `seconds`
    (nested quantifiers can make it exponential even on 12 characters; the C matcher
    checks for signals, so a timer interrupts it)."""
    def expire(*_):
        raise _OracleTimeout()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return re.search(pattern, name) is not None
    except _OracleTimeout:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=200, deadline=None)
@given(_patterns(), st.lists(st.text("ab1._\n é²٣\t", max_size=12), min_size=1, max_size=4))
def test_search_agrees_with_re(pattern, names):
    compiled = compile_name_pattern(pattern)
    for name in names:
        want = _re_search(pattern, name)
        if want is None:  # the oracle cannot answer in time (ours is linear; see below)
            reject()
        assert compiled.search(name) == want, (pattern, name)


def test_the_oracle_gives_up_on_backtracking_instead_of_hanging():
    start = time.perf_counter()
    assert _re_search("(a+)+$", "a" * 40 + "!", seconds=0.2) is None
    assert time.perf_counter() - start < 5
    assert _re_search("a+$", "aa") is True and _re_search("^b", "ab") is False


@pytest.mark.parametrize("pattern, name, want", [
    (r"^o\.", "o.weight", True), (r"^o\.", "xo.weight", False),
    ("down_proj", "layers.0.mlp.down_proj", True), (r"layers\.1[0-9]\.", "layers.12.q", True),
    (r"layers\.1[0-9]\.", "layers.1.q", False), ("a{2,3}b", "aab", True),
    ("a{2,3}b", "ab", False), ("x$", "ax\n", True), ("a{", "a{", True), ("", "any", True)])
def test_examples(pattern, name, want):
    assert compile_name_pattern(pattern).search(name) is want


@pytest.mark.parametrize("pattern", ["(a+)+$", "^(a|a)*$", "(a*)*b", "(.*a){12}$"])
def test_backtracking_patterns_run_in_linear_time(pattern):
    """re.search('(a+)+$', 'a' * 30 + '!') takes minutes; here 4,000 characters take a
    fraction of a second, and twice the characters about twice the time."""
    compiled = compile_name_pattern(pattern)
    times = []
    for n in (2000, 4000):
        start = time.perf_counter()
        assert compiled.search("a" * n + "!") is False
        times.append(time.perf_counter() - start)
    assert times[1] < 2.0
    assert times[1] < 4 * times[0] + 0.05  # linear, not exponential or quadratic


@pytest.mark.parametrize("pattern, message", [
    ("(", "missing \\)"), (")", "unbalanced parenthesis"), ("a**", "multiple repeat"),
    ("*a", "nothing to repeat"), ("[a", "unterminated character set"),
    ("[z-a]", "bad character range"), ("a{3,2}", "min repeat greater than max"),
    (r"(a)\1", "backreferences are not supported"), ("(?=a)b", "lookaround"),
    ("(?i)a", "inline flags"), (r"\bx", "unsupported escape"), ("a++", "possessive"),
    ("(a{100}){200}", "states after expanding"), ("a" * (MAX_PATTERN_CHARS + 1), "at most"),
])
def test_unsupported_or_malformed_patterns_are_refused(pattern, message):
    with pytest.raises(SettingError, match=message):
        compile_name_pattern(pattern)


def test_quantize_exclude_refuses_backreferences_and_is_linear():
    with pytest.raises(PipelineError, match="backreferences are not supported"):
        PassManager(r'quantize{exclude="(a)\\1"}')
    # ReDoS in a pipeline: the pass compiles; matching is linear in the weight names
    PassManager('quantize{exclude="(a+)+$"}')
