"""import_function: a JAX function's jaxpr -> IR primitives; lowering the import gives what
jax.jit(fn) gives. Hypothesis draws random compositions of supported primitives."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.frontends.jax_import import JaxImportError, import_function
from jaxrt.ir.verify import verify
from jaxrt.lowering.compile import lower_function

# Unary and binary steps over a [4, 6] float tensor; each keeps the shape.
UNARY = {
    "exp": lambda x: jnp.exp(jnp.clip(x, -5, 5)), "tanh": jnp.tanh, "neg": lambda x: -x,
    "sin": jnp.sin, "cos": jnp.cos, "silu": jax.nn.silu, "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid, "square": lambda x: x ** 2, "cube": lambda x: x ** 3,
    "rsqrt": lambda x: jax.lax.rsqrt(x * x + 1.0), "softmax": lambda x: jax.nn.softmax(x, -1),
    "mean-center": lambda x: x - jnp.mean(x, axis=-1, keepdims=True),
    "max-sub": lambda x: x - jnp.max(x, axis=0, keepdims=True),
    "min-sub": lambda x: x - jnp.min(x, axis=1, keepdims=True),
    "transpose2": lambda x: jnp.transpose(x.reshape(2, 2, 6), (1, 0, 2)).reshape(4, 6),
    "roll-half": lambda x: jnp.concatenate([-x[:, 3:], x[:, :3]], axis=-1),
    "where": lambda x: jnp.where(x > 0.1, x, 0.5 * x),
    "clip": lambda x: jnp.clip(x, -1.0, 1.0),
    "iota": lambda x: x + jnp.arange(6, dtype=jnp.float32) / 6,
    "take": lambda x: jnp.take(x, jnp.array([3, 1, 0, 2]), axis=0),
    "int-roundtrip": lambda x: x + (x > 0).astype(jnp.int32).astype(jnp.float32),
    "scan-cumulative": lambda x: jax.lax.scan(lambda c, r: (c * 0.5 + r, None), x[0], x)[0]
    * jnp.ones((4, 1)),
}
BINARY = {
    "add": jnp.add, "mul": jnp.multiply, "sub": jnp.subtract, "max": jnp.maximum,
    "matmul-t": lambda x, y: (x @ y.T) @ y / 6.0,
    "einsum": lambda x, y: jnp.einsum("ij,kj->ik", x, y) @ x / 6.0,
    "div": lambda x, y: x / (y * y + 1.0),
}


@st.composite
def programs(draw):
    steps = draw(st.lists(st.one_of(st.sampled_from(sorted(UNARY)).map(lambda n: ("u", n)),
                                    st.sampled_from(sorted(BINARY)).map(lambda n: ("b", n))),
                          min_size=1, max_size=6))
    return steps


def build(steps):
    def fn(x, y):
        vals = [x, y]
        for kind, name in steps:
            if kind == "u":
                vals.append(UNARY[name](vals[-1]))
            else:
                vals.append(BINARY[name](vals[-1], vals[-2]))
        return vals[-1], vals[len(vals) // 2]
    return fn


@settings(max_examples=25, deadline=None)
@given(programs(), st.integers(0, 2**31 - 1))
def test_imported_matches_jit(steps, seed):
    fn = build(steps)
    rng = np.random.default_rng(seed)
    x, y = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2))
    module = import_function(fn, x, y)
    verify(module)
    got = lower_function(module, "forward")({}, x, y)
    want = jax.jit(fn)(x, y)
    for g, w in zip(got, want):
        # f32, same XLA ops up to how sigmoid is spelled (1/(1+exp(-x)) vs XLA's
        # logistic): a few ulps
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_symbolic_dims_stay_symbolic():
    (t,) = jax.export.symbolic_shape("T")
    module = import_function(lambda x: x * jnp.arange(x.shape[0]),
                             jax.ShapeDtypeStruct((t,), jnp.float32))
    assert module.functions["forward"].args[0].type.shape == ("T",)
    out = lower_function(module, "forward")({}, np.ones(5, np.float32))[0]
    np.testing.assert_array_equal(np.asarray(out), np.arange(5, dtype=np.float32))


def test_unsupported_primitive_names_it_and_the_source_line():
    def fn(x):
        return jnp.cumsum(x)  # the line the error must name
    with pytest.raises(JaxImportError, match=r"test_jax_import\.py:\d+.*'cum") as e:
        import_function(fn, np.ones(4, np.float32))
    assert "cannot import JAX primitive" in str(e.value)


def test_integer_division_is_refused():
    with pytest.raises(JaxImportError, match="'div'"):
        import_function(lambda a, b: a // b + jax.lax.div(a, b), np.ones(3, np.int32),
                        np.ones(3, np.int32))


def test_scan_over_stacked_layers_keeps_one_body():
    def layer(x, w):
        return jnp.tanh(x @ w), None

    def fn(x, ws):
        return jax.lax.scan(layer, x, ws)[0]

    rng = np.random.default_rng(0)
    x, ws = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(5, 8, 8)).astype(
        np.float32) / 3
    kept = import_function(fn, x, ws)
    verify(kept)
    assert list(kept.functions) == ["forward", "scan_body0"]
    unrolled = import_function(fn, x, ws, scan="unroll")
    assert list(unrolled.functions) == ["forward"]
    want = np.asarray(jax.jit(fn)(x, ws))
    for m in (kept, unrolled):
        got = np.asarray(lower_function(m, "forward")({}, x, ws)[0])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
