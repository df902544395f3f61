"""Helpers shared by the pass tests: tiny graph builders, golden files, interpreter checks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxrt.ir import Builder, DType, Module, TensorType, ops
from jaxrt.ir.interpreter import run_function

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "passes"

F32, BF16, F16, I32, I1 = DType.f32, DType.bf16, DType.f16, DType.int32, DType.bool_

# Tolerances for comparing a function before and after a rewrite, by result dtype. The rules
# are exact and folding runs the ops' own numpy references, so results agree to the bit
# except where numpy's 0-d (scalar) and vectorized loops may differ by an ulp for
# transcendental functions, which folding a splat on one element can expose: f32's ulp is
# 6e-8 relative, hence 1e-6; one f32 ulp can flip the final rounding to bf16 (ulp 2^-8 =
# 4e-3) or f16 (2^-11 = 5e-4), hence 1e-2 and 2e-3. Integers must match exactly.
# allclose ignores the sign of zero: the max/min references (np.maximum/np.minimum) return
# their second operand for max(-0.0, +0.0), so swapping the operands of these COMMUTATIVE
# ops changes only the sign of a zero result (see the strategy's note on division).
RTOL = {DType.f32: 1e-6, DType.bf16: 1e-2, DType.f16: 2e-3, DType.f8e4m3: 0.13,
        DType.f8e5m2: 0.25}


def t(*shape, dtype=F32) -> TensorType:
    return TensorType(tuple(shape), dtype)


def function(args: dict[str, TensorType], body) -> Module:
    """A module with one function @f(args...) returning `body(b, *args)` (value or tuple)."""
    m = Module("test")
    b = Builder.new_function(m, "f", list(args.items()))
    out = body(b, *b.fn.args)
    b.ret(*(out if isinstance(out, tuple) else (out,)))
    return m


def const(b: Builder, value, type: TensorType):
    if isinstance(value, (list, tuple, np.ndarray)):
        value = tuple(float(x) for x in np.asarray(value).ravel())
    return b(ops.constant, value=value, result_types=[type])


def op_names(m: Module, fn: str = "f") -> list[str]:
    return [op.opdef.name for op in m.functions[fn].ops]


def random_inputs(m: Module, seed: int, fn: str = "f") -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for a in m.functions[fn].args:
        dt = a.type.dtype
        if dt.is_int:
            x = rng.integers(-6, 7, size=a.type.shape)
        elif dt == DType.bool_:
            x = rng.integers(0, 2, size=a.type.shape).astype(bool)
        else:
            x = np.asarray(rng.uniform(-3.0, 3.0, size=a.type.shape))
            if x.size > 1:  # exercise the NaN/inf/signed-zero semantics the rules promise
                mask = rng.random(x.shape) < 0.15
                x[mask] = rng.choice([np.nan, np.inf, -np.inf, -0.0, 0.0], size=int(mask.sum()))
        out.append(np.asarray(x).astype(dt.to_numpy()))
    return out


def assert_same_results(want: list[np.ndarray], got: list[np.ndarray], context: str = ""):
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        assert w.shape == g.shape and w.dtype == g.dtype, (i, w.shape, g.shape, context)
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(g, w, err_msg=context)
        else:
            rtol = RTOL[DType.from_numpy(w.dtype)]
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol,
                                       atol=0, equal_nan=True, err_msg=context)


def run(m: Module, inputs, fn: str = "f") -> list[np.ndarray]:
    with np.errstate(all="ignore"):
        return run_function(m.functions[fn], inputs)


def assert_golden(name: str, text: str) -> None:
    """Compare `text` with tests/golden/passes/<name> byte for byte.
    JAXRT_UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("JAXRT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}; run with JAXRT_UPDATE_GOLDEN=1"
    expected = path.read_text()
    assert text == expected, f"{name} differs from the golden file:\n{text}"
