"""`scan`: verification against its body, reference semantics, XLA lowering, and the
outlined model against the unrolled one through the real lowering.

Tolerance for lowered outlined-vs-unrolled logits: 1e-5 x max|logit| in f32. Both run the
same rules on the same weights; XLA fuses a loop body differently from 30 inlined copies,
so sums may be reassociated (a few f32 ulps, ~1e-7 relative, amplified by at most the
depth of the network).
"""
from __future__ import annotations

import numpy as np
import pytest

from jaxrt.ir import Builder, DType, Module, TensorType, VerifyError, interpreter, ops, verify
from jaxrt.ir.parser import parse
from jaxrt.lowering.compile import lower_function
from jaxrt.lowering.executable import StepExecutable
from tests.passes.test_outline_layers import (pipelines, random_weights, step_inputs,
                                              tiny_config)

F32, I32 = DType.f32, DType.int32
L = 5


def scan_module(body_args=None, body_results=None) -> Module:
    """f(x[3], acc[3], bias[3]) with w: f32[5, 3] -> 5 iterations of
    x' = x * w[i] + bias + i;  acc' = acc + x."""
    m = Module("m")
    t = TensorType((3,), F32)
    m.weights["w"] = TensorType((L, 3), F32)
    bb = Builder.new_function(m, "body", body_args or [
        ("i", TensorType((), I32)), ("x", t), ("acc", t), ("bias", t), ("w", t)])
    i, x, acc, bias, w = bb.fn.args
    fi = bb(ops.convert, i, dtype=F32)
    fi = bb(ops.broadcast, fi, shape=(3,))
    nx = bb(ops.add, bb(ops.add, bb(ops.mul, x, w), bias), fi)
    bb.ret(*(body_results(bb, nx, acc, x) if body_results else (nx, bb(ops.add, acc, x))))
    b = Builder.new_function(m, "f", [("x", t), ("acc", t), ("bias", t)])
    x, acc, bias = b.fn.args
    out = b(ops.scan, x, acc, bias, b.weight("w"), body="body", length=L, carried=2,
            invariant=1)
    b.ret(*out)
    return m


def reference(x, acc, bias, w):
    for i in range(L):
        x, acc = x * w[i] + bias + i, acc + x
    return x, acc


def test_scan_reference_and_lowering_agree_with_a_plain_loop():
    m = scan_module()
    verify(m)
    assert parse(str(m)) == m
    rng = np.random.default_rng(0)
    x, acc, bias = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
    w = {"w": rng.standard_normal((L, 3)).astype(np.float32)}
    want = reference(x, acc, bias, w["w"])
    got_ref = interpreter.run(m, "f", [x, acc, bias], w)
    got_xla = lower_function(m, "f")(w, x, acc, bias)
    for a, b, c in zip(want, got_ref, got_xla):
        np.testing.assert_allclose(b, a, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(c), a, rtol=1e-6)


def test_verifier_checks_the_body():
    m = scan_module()
    m.functions["f"].ops[-1].attrs = m.functions["f"].ops[-1].attrs.replace(body="nope")
    with pytest.raises(VerifyError, match="no function @nope"):
        verify(m)
    t = TensorType((3,), F32)
    bad_args = [("i", TensorType((), I32)), ("x", t), ("acc", t), ("bias", t),
                ("w", TensorType((L, 3), F32))]  # takes the whole stack, not a slice
    with pytest.raises(VerifyError, match="body @body takes"):
        verify(scan_module(body_args=bad_args))
    with pytest.raises(VerifyError, match="body @body returns"):
        verify(scan_module(body_results=lambda bb, nx, acc, x: (nx, nx, acc)))


def test_scan_needs_stacked_operands_of_its_length():
    b = Builder.new_function(Module("m"), "f", [("x", TensorType((3,), F32)),
                                                ("s", TensorType((4, 3), F32))])
    with pytest.raises(VerifyError, match="leading axis of 5"):
        b(ops.scan, *b.fn.args, body="body", length=5, carried=1)


@pytest.mark.parametrize("config", [
    tiny_config("llama", 4),
    tiny_config("gemma3_text", 7, (["sliding_attention"] * 2 + ["full_attention"]) * 2
                + ["sliding_attention"]),
], ids=["llama", "gemma3"])
def test_outlined_executable_matches_unrolled(config):
    weights = random_weights(config)
    logits = []
    for outline in (False, True):
        module = pipelines(config, outline)
        exe = StepExecutable(module, weights, num_pages=8, page_size=4, dtype="f32")
        inputs = step_inputs(config, 6)[:-1]
        logits.append(np.asarray(exe.run(*inputs)))
        # a decode step on the filled cache: the cache threads through the scan
        one = np.zeros(1, np.int32)
        p = np.asarray([6], np.int32)
        logits.append(np.asarray(exe.run(np.asarray([3], np.int32), p, p, inputs[3],
                                         np.asarray([7], np.int32), one[None], one)))
    for a, b in ((logits[0], logits[2]), (logits[1], logits[3])):
        scale = float(np.abs(a).max())
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)
