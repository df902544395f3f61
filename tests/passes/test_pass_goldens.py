"""Golden IR files: inputs built in code, printed outputs compared byte for byte with
tests/golden/passes/*.ir (JAXRT_UPDATE_GOLDEN=1 rewrites them)."""
from bench.graphs import llama_decode_graph
from jaxrt.ir import DType, ops, verify
from jaxrt.ir.printer import print_module
from jaxrt.passes.manager import PassManager, VerifyHook

from tests.passes.passes_testutil import (BF16, I32, assert_golden, assert_same_results, const,
                                          function, random_inputs, run, t)


def mixed(b, x, y):
    """Most canonicalize rules at once, interacting."""
    F = t(4, 6)
    z = b(ops.add, const(b, -0.0, F), x)                         # add-zero (zero on the left)
    z = b(ops.mul, z, const(b, 1.0, t(6)))                       # mul-one (broadcast const)
    z = b(ops.transpose, b(ops.transpose, z, perm=(1, 0)), perm=(1, 0))  # -> z
    r = b(ops.reshape, b(ops.reshape, z, shape=(24,)), shape=(2, 12))    # one reshape
    two = b(ops.add, const(b, 1.5, F), const(b, 0.5, F))          # folds to 2.0
    w = b(ops.mul, two, y)                                       # constant moves right
    w = b(ops.neg, b(ops.neg, w))                                # -> w
    w = b(ops.convert, b(ops.convert, b(ops.convert, w, dtype=BF16), dtype=DType.f32),
          dtype=BF16)                                            # f32->bf16->f32->bf16
    i = b(ops.convert, x, dtype=I32)
    zero = b(ops.mul, b(ops.sub, i, i), const(b, 7.0, t(4, 6, dtype=I32)))  # 0 * 7 -> 0
    sq = b(ops.mul, x, x)                                        # left alone
    return r, w, zero, sq


def test_canonicalize_golden():
    F = t(4, 6)
    m = function({"x": F, "y": F}, mixed)
    inputs = random_inputs(m, seed=3)
    want = run(m, inputs)
    PassManager("canonicalize", hooks=[VerifyHook()]).run(m)
    assert_golden("canonicalize_mixed.ir", print_module(m))
    assert_same_results(want, run(m, inputs))


def test_cse_dce_golden():
    F = t(4)

    def body(b, x, y):
        a1 = b(ops.add, x, y)
        a2 = b(ops.add, y, x)                # same as a1 (commutative)
        e1 = b(ops.exp, a1)
        e2 = b(ops.exp, a2)                  # same as e1 once a2 is merged
        b(ops.tanh, e1)                      # dead
        c1 = const(b, 2.0, F)
        c2 = const(b, 2.0, F)                # same constant
        return b(ops.mul, b(ops.add, e1, c1), b(ops.add, e2, c2))

    m = function({"x": F, "y": F}, body)
    PassManager("cse,dce", hooks=[VerifyHook()]).run(m)
    assert_golden("cse_dce.ir", print_module(m))


def test_llama_pipeline_golden():
    m = llama_decode_graph(num_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16,
                                  ffn=96, vocab=128)
    verify(m)
    assert_golden("llama_2layer_input.ir", print_module(m))
    PassManager("canonicalize,cse,dce{prune-weights=true}", hooks=[VerifyHook()]).run(m)
    assert_golden("llama_2layer_canonicalize_cse_dce.ir", print_module(m))


def test_llama_32_layers_stays_valid():
    m = llama_decode_graph()
    pm = PassManager("canonicalize,cse,dce", hooks=[VerifyHook()])
    pm.run(m)
    counters = {p.name: p.counters for p in pm.stats.passes}
    # cse: per layer the repeated norm weight and norm, and all but one zero constant
    assert counters["cse"] == {"ops-merged": 32 + 32 + 31}
    assert counters["dce"] == {"ops-removed": 32}  # the unused debug means
    # per layer: convert-identity, reshape-reshape, mul-one, transpose-transpose and
    # constant-to-right (0.0 + h -> h + 0.0, which stays: it would change signed zeros)
    assert pm.stats.passes[0].rules.steps == 5 * 32
