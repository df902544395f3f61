"""`scan`: verification against its body, reference semantics, XLA lowering, and the
outlined model against the unrolled one through the real lowering.

Tolerance for lowered outlined-vs-unrolled logits: 1e-5 x max|logit| in f32, or, for a row
whose logits are ill-conditioned, twice the spread that 1-ulp perturbations of the weights
cause in that row. Both run the same rules on the same weights; XLA fuses a loop body
differently from the inlined copies, so sums may be reassociated (a few f32 ulps). That is
~1e-7 relative, amplified by the depth of the network for most rows, but far more for a row
near a cancellation: in the gemma3 case below, the last prefill row moves by ~1.4e-4 (2x the
plain bound) when every weight moves by one ulp, under the reference interpreter as under
XLA. The bound is measured per row, so a real outlining bug (a wrong layer, window or
cache slot) still shows up as a difference far above it.
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
    inputs = step_inputs(config, 6)[:-1]

    def logits(outline, w):
        """Prefill logits, then a decode step's on the filled cache (the cache threads
        through the scan)."""
        exe = StepExecutable(pipelines(config, outline), w, num_pages=8, page_size=4,
                             dtype="f32")
        one = np.zeros(1, np.int32)
        p = np.asarray([6], np.int32)
        return (np.asarray(exe.run(*inputs)),
                np.asarray(exe.run(np.asarray([3], np.int32), p, p, inputs[3],
                                   np.asarray([7], np.int32), one[None], one)))

    unrolled, outlined = logits(False, weights), logits(True, weights)
    # each row's sensitivity to 1-ulp perturbations of every weight
    rng = np.random.default_rng(1)
    eps = np.finfo(np.float32).eps
    spread = [np.zeros(a.shape[0]) for a in unrolled]
    for _ in range(3):
        nudged = {k: (v * (1 + eps * rng.standard_normal(v.shape))).astype(np.float32)
                  for k, v in weights.items()}
        for s, a, b in zip(spread, unrolled, logits(False, nudged)):
            np.maximum(s, np.abs(b - a).max(axis=-1), out=s)
    for a, b, s in zip(unrolled, outlined, spread):
        tol = np.maximum(1e-5 * float(np.abs(a).max()), 2 * s)
        # sharp enough still: an outlining bug (a wrong layer, window or cache slot) moves
        # logits by ~1e-1 of their scale
        assert (tol <= 2e-4 * float(np.abs(a).max())).all(), "inputs too ill-conditioned"
        for row in range(a.shape[0]):
            np.testing.assert_allclose(b[row], a[row], rtol=1e-5, atol=tol[row],
                                       err_msg=f"row {row}")
