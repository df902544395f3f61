"""Hypothesis properties of canonicalize, cse and dce on random graphs (strategies_passes).

Soundness compares the reference interpreter before and after, with the per-dtype
tolerances justified in passes_testutil.RTOL.
"""
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from jaxrt.ir import verify
from jaxrt.ir.printer import print_module
from jaxrt.passes.canonicalize import Canonicalize
from jaxrt.passes.manager import PassManager, VerifyHook

from tests.passes.passes_testutil import assert_same_results, random_inputs, run
from tests.passes.strategies_passes import canonicalize_graphs


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)


@SETTINGS
@given(canonicalize_graphs(), SEEDS)
def test_canonicalize_preserves_interpreter_results(m, seed):
    before = print_module(m)
    note(before)
    inputs = random_inputs(m, seed)
    want = run(m, inputs)
    Canonicalize()(m)
    verify(m)
    assert_same_results(want, run(m, inputs), f"{before}\n->\n{print_module(m)}")


@SETTINGS
@given(canonicalize_graphs())
def test_canonicalize_is_idempotent(m):
    note(print_module(m))
    Canonicalize()(m)
    once = print_module(m)
    pm = PassManager([Canonicalize()])
    pm.run(m)
    assert print_module(m) == once
    assert pm.stats.passes[0].rules.steps == 0


@SETTINGS
@given(canonicalize_graphs(), SEEDS, st.booleans())
def test_pipeline_verifies_after_every_pass_and_preserves_results(m, seed, nsz):
    # no-signed-zeros only changes the sign of zeros, which these graphs never divide by
    before = print_module(m)
    note(before)
    inputs = random_inputs(m, seed)
    want = run(m, inputs)
    pipeline = f"canonicalize{{no-signed-zeros={str(nsz).lower()}}},cse,dce,canonicalize,cse"
    PassManager(pipeline, hooks=[VerifyHook()]).run(m)
    assert_same_results(want, run(m, inputs), f"{before}\n->\n{print_module(m)}")
