"""raise-llm-ops rules: each has a positive case (the spelling JAX code produces, imported)
and a near miss that must not be raised, with the reason recorded."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.frontends.jax_import import import_function, import_jax
from jaxrt.ir.interpreter import run
from jaxrt.ir.ops.nn import rope_inv_freq
from jaxrt.passes import PassManager

PIPE = "canonicalize,cse,dce,raise-llm-ops,canonicalize,cse,dce"
(T,) = jax.export.symbolic_shape("T")


def raised(fn, *args):
    m = import_function(fn, *args)
    PassManager(PIPE).run(m)
    return m, [op.opdef.name for op in m.functions["forward"].ops]


def f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def rms(x, w, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + eps) * w


def test_rms_norm_and_gemma_offset():
    m, names = raised(lambda x, w: rms(x, w) + rms(x, 1.0 + w, 1e-5), f32(T, 8), f32(8))
    assert names.count("llm.rms_norm") == 2
    offsets = sorted(op.attrs.offset for op in m.functions["forward"].ops
                     if op.opdef.name == "llm.rms_norm")
    assert offsets == [0.0, 1.0]


def layer_norm_two_pass(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * w + b


@pytest.mark.parametrize("form", ["two-pass", "flax"])
def test_layer_norm_both_variance_forms(form):
    from flax import nnx
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(5, 8)) * 3 + 1).astype(np.float32)
    if form == "flax":  # nnx.LayerNorm: E[x^2] - E[x]^2 clamped at 0, rsqrt times scale
        ln = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
        ln.scale.set_value(jnp.asarray(rng.normal(size=8), jnp.float32))
        ln.bias.set_value(jnp.asarray(rng.normal(size=8), jnp.float32))
        graphdef, params, rest = nnx.split(ln, nnx.Param, ...)
        fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)  # noqa: E731
    else:
        params = {"scale": rng.normal(size=8).astype(np.float32),
                  "bias": rng.normal(size=8).astype(np.float32)}
        fn = lambda p, x: layer_norm_two_pass(x, p["scale"], p["bias"])  # noqa: E731
    imported, names = _with_weights(fn, params, f32(T, 8))
    assert names.count("llm.layer_norm") == 1 and "reduce_sum" not in names
    np.testing.assert_allclose(run(imported.module, "forward", [x], imported.weights)[0],
                               np.asarray(jax.jit(fn)(params, x)), rtol=1e-5, atol=1e-5)


def test_layer_norm_near_miss_variance_of_another_tensor():
    def wrong(x, z, w, b):  # normalised by z's spread, not x's
        mu, muz = x.mean(-1, keepdims=True), z.mean(-1, keepdims=True)
        var = ((z - muz) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * w + b
    _, names = raised(wrong, f32(T, 8), f32(T, 8), f32(8), f32(8))
    assert "llm.layer_norm" not in names


def test_rms_norm_near_miss_wrong_divisor():
    m, names = raised(lambda x, w: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) / 7.0
                                                     + 1e-6) * w, f32(T, 8), f32(8))
    assert "llm.rms_norm" not in names
    assert "not 8" in m.attributes["raise_misses"]["rms-norm"]


def test_silu_swiglu_and_near_miss():
    _, names = raised(lambda g, u: jax.nn.silu(g) * u, f32(T, 8), f32(T, 8))
    assert "llm.swiglu" in names and "exp" not in names
    _, names = raised(lambda g: g * jax.nn.sigmoid(2.0 * g), f32(T, 8))  # not silu(g)
    assert "llm.silu" not in names


def test_gelu_tanh_geglu_and_near_miss():
    m, names = raised(lambda g, u: jax.nn.gelu(g) * u, f32(T, 8), f32(T, 8))
    assert "llm.geglu" in names and "tanh" not in names
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(run(m, "forward", list(x))[0],
                               np.asarray(jax.nn.gelu(x[0]) * x[1]), rtol=1e-5, atol=1e-6)
    # jax.nn.gelu's spelling with 0.8 for sqrt(2/pi)
    m, names = raised(lambda x: x * (0.5 * (1 + jnp.tanh(0.8 * (x + 0.044715 * x ** 3)))),
                      f32(T, 8))
    assert "llm.gelu" not in names
    assert "sqrt(2/pi)" in m.attributes["raise_misses"]["gelu-tanh"]


def test_softmax_and_near_miss():
    _, names = raised(lambda s: jax.nn.softmax(s, axis=-1), f32(4, T))
    assert names == ["llm.softmax"]
    m, names = raised(lambda s: jnp.exp(s - jnp.max(s, 0, keepdims=True))
                      / jnp.sum(jnp.exp(s - jnp.max(s, 0, keepdims=True)), -1, keepdims=True),
                      f32(4, 6))
    assert "llm.softmax" not in names
    assert "max over the last axis" in m.attributes["raise_misses"]["softmax"]


def rope_half(x, pos, inv):
    f = pos[:, None].astype(jnp.float32) * inv[None, :]
    e = jnp.concatenate([f, f], -1)
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], -1)
    return x * jnp.cos(e)[:, None, :] + rot * jnp.sin(e)[:, None, :]


def test_rope_theta_fitted_and_matches_reference():
    inv = 1.0 / (5e5 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
    fn = lambda x: rope_half(x, jnp.arange(x.shape[0]), jnp.asarray(inv))  # noqa: E731
    m, names = raised(fn, f32(T, 2, 8))
    (op,) = [o for o in m.functions["forward"].ops if o.opdef.name == "llm.rope"]
    assert op.attrs.theta == pytest.approx(5e5, rel=1e-5) and op.attrs.scaling == "none"
    x = np.random.default_rng(0).normal(size=(5, 2, 8)).astype(np.float32)
    got = run(m, "forward", [x])[0]
    np.testing.assert_allclose(got, np.asarray(jax.jit(fn)(x)), rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(theta=st.sampled_from([1e4, 5e5]), factor=st.sampled_from([2.0, 8.0, 32.0]),
       high=st.sampled_from([2.0, 4.0]), orig=st.sampled_from([16, 64, 8192]),
       head_dim=st.sampled_from([16, 64, 128]))
def test_llama3_scaled_rope_is_fitted(theta, factor, high, orig, head_dim):
    # frequencies as transformers computes them for Llama 3.x; the fitted attrs must give
    # back the same frequencies (rope_inv_freq), whichever equivalent (low, high, orig)
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
            "low_freq_factor": 1.0, "high_freq_factor": high,
            "original_max_position_embeddings": orig}
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      rope_parameters=rope, max_position_embeddings=4 * orig)
    inv = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].numpy()
    m, names = raised(lambda x: rope_half(x, jnp.arange(x.shape[0]), jnp.asarray(inv)),
                      f32(T, 2, head_dim))
    (op,) = [o for o in m.functions["forward"].ops if o.opdef.name == "llm.rope"]
    np.testing.assert_allclose(rope_inv_freq(head_dim, op.attrs), inv, rtol=1e-5)
    assert op.attrs.theta == pytest.approx(theta, rel=1e-5)
    assert op.attrs.scaling in ("llama3", "linear", "none")  # bands may be empty


def rope_interleaved(x, pos, inv, sign=1.0):
    """GPT-J / Meta-Llama style: pairs (x[2i], x[2i+1]) rotated, written with strided
    slices and jnp.stack (on a symbolic T: a gather and JAX's stack primitive)."""
    freqs = pos[:, None].astype(jnp.float32) * inv[None, :]
    cos, sin = jnp.cos(freqs)[:, None, :], jnp.sin(freqs)[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, sign * x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape)


def test_interleaved_rope_raised_and_matches_reference():
    inv = jnp.asarray(1.0 / (1e4 ** (np.arange(0, 8, 2, dtype=np.float32) / 8)))
    fn = lambda x: rope_interleaved(x, jnp.arange(x.shape[0]), inv)  # noqa: E731
    m, names = raised(fn, f32(T, 2, 8))
    (op,) = [o for o in m.functions["forward"].ops if o.opdef.name == "llm.rope"]
    assert op.attrs.style == "interleaved" and op.attrs.theta == pytest.approx(1e4, rel=1e-5)
    assert names.count("take") == 0 and "concat" not in names
    x = np.random.default_rng(5).normal(size=(6, 2, 8)).astype(np.float32)
    np.testing.assert_allclose(run(m, "forward", [x])[0], np.asarray(jax.jit(fn)(x)),
                               rtol=1e-5, atol=1e-5)


def test_interleaved_rope_near_miss_wrong_sign():
    inv = jnp.asarray(1.0 / (1e4 ** (np.arange(0, 8, 2, dtype=np.float32) / 8)))
    fn = lambda x: rope_interleaved(x, jnp.arange(x.shape[0]), inv, sign=-1.0)  # noqa: E731
    m, names = raised(fn, f32(T, 2, 8))
    assert "llm.rope" not in names
    x = np.random.default_rng(6).normal(size=(5, 2, 8)).astype(np.float32)
    np.testing.assert_allclose(run(m, "forward", [x])[0], np.asarray(jax.jit(fn)(x)),
                               rtol=1e-5, atol=1e-5)  # imported as primitives, still exact


def test_rope_near_miss_random_frequencies():
    inv = np.array([1.0, 0.3, 0.2, 0.01], np.float32)  # no theta gives these
    m, names = raised(lambda x: rope_half(x, jnp.arange(x.shape[0]), jnp.asarray(inv)),
                      f32(T, 2, 8))
    assert "llm.rope" not in names
    assert "theta" in m.attributes["raise_misses"]["rope"]


def attn(q, k, v, causal=True):
    s = jnp.einsum("thd,shd->hts", q, jnp.repeat(k, 2, axis=1)) * 0.25
    if causal:
        pos = jnp.arange(q.shape[0])
        s = jnp.where((pos[:, None] >= pos[None, :])[None], s, -jnp.inf)
    return jnp.einsum("hts,shd->thd", jax.nn.softmax(s, -1), jnp.repeat(v, 2, axis=1))


def test_causal_gqa_attention_matches_reference():
    m, names = raised(attn, f32(T, 4, 8), f32(T, 2, 8), f32(T, 2, 8))
    assert "llm.attention" in names and "dot_general" not in names
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((6, 4, 8), (6, 2, 8), (6, 2, 8)))
    np.testing.assert_allclose(run(m, "forward", [q, k, v])[0],
                               np.asarray(jax.jit(attn)(q, k, v)), rtol=1e-5, atol=1e-5)


def test_attention_near_miss_anticausal_mask():
    def anti(q, k, v):
        s = jnp.einsum("thd,shd->hts", q, k)
        pos = jnp.arange(q.shape[0])
        s = jnp.where((pos[:, None] <= pos[None, :])[None], s, -jnp.inf)  # future only
        return jnp.einsum("hts,shd->thd", jax.nn.softmax(s, -1), v)
    m, names = raised(anti, f32(T, 2, 8), f32(T, 2, 8), f32(T, 2, 8))
    assert "llm.attention" not in names
    assert "not causal" in m.attributes["raise_misses"]["attention"]


def gemma_attn(q, k, v, window=3, cap=2.0, cap_in=None, order="window-last"):
    """Gemma's spelling: scores soft-capped, a causal mask `&` a sliding window."""
    s = jnp.einsum("thd,shd->hts", q * 0.25, jnp.repeat(k, 2, axis=1))
    s = jnp.tanh(s / (cap if cap_in is None else cap_in)) * cap
    pos = jnp.arange(q.shape[0])
    causal = pos[:, None] >= pos[None, :]
    near = pos[:, None] - pos[None, :] < window
    mask = causal & near if order == "window-last" else near & causal
    s = jnp.where(mask[None], s, -2.3819763e38)
    return jnp.einsum("hts,shd->thd", jax.nn.softmax(s, -1), jnp.repeat(v, 2, axis=1))


@pytest.mark.parametrize("order", ["window-last", "window-first"])
def test_sliding_window_and_softcap_attention_matches_reference(order):
    fn = lambda q, k, v: gemma_attn(q, k, v, order=order)  # noqa: E731
    m, names = raised(fn, f32(T, 4, 8), f32(T, 2, 8), f32(T, 2, 8))
    (op,) = [op for op in m.functions["forward"].ops if op.opdef.name == "llm.attention"]
    assert (op.attrs.window, op.attrs.softcap, op.attrs.scale) == (3, 2.0, 0.25)
    assert "tanh" not in names and "compare" not in names
    rng = np.random.default_rng(4)
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((7, 4, 8), (7, 2, 8), (7, 2, 8)))
    np.testing.assert_allclose(run(m, "forward", [q, k, v])[0],
                               np.asarray(jax.jit(fn)(q, k, v)), rtol=1e-5, atol=1e-5)


def test_softcap_near_miss_mismatched_constants():
    # tanh(s / 3) * 2 is not a soft-cap: left alone, attention not raised
    fn = lambda q, k, v: gemma_attn(q, k, v, cap=2.0, cap_in=3.0)  # noqa: E731
    m, names = raised(fn, f32(T, 4, 8), f32(T, 2, 8), f32(T, 2, 8))
    assert "llm.attention" not in names and "tanh" in names
    assert "dot_general" in m.attributes["raise_misses"]["attention"]


def test_window_near_miss_is_not_a_window():
    def wrong(q, k, v):  # keys at most 3 ahead: anti-causal window & causal = only self
        s = jnp.einsum("thd,shd->hts", q, k)
        pos = jnp.arange(q.shape[0])
        mask = (pos[:, None] >= pos[None, :]) & (pos[None, :] - pos[:, None] < 3)
        s = jnp.where(mask[None], s, -jnp.inf)
        return jnp.einsum("hts,shd->thd", jax.nn.softmax(s, -1), v)
    m, names = raised(wrong, f32(T, 2, 8), f32(T, 2, 8), f32(T, 2, 8))
    assert "llm.attention" not in names
    assert "window" in m.attributes["raise_misses"]["attention"]


def _with_weights(fn, weights, *args):
    imported = import_jax(fn, weights, *args, weight_argnums=(0,))
    PassManager(PIPE).run(imported.module)
    return imported, [op.opdef.name for op in imported.module.functions["forward"].ops]


def test_linear_and_embedding():
    rng = np.random.default_rng(2)
    w = {"table": rng.normal(size=(50, 8)).astype(np.float32),
         "kernel": rng.normal(size=(8, 16)).astype(np.float32)}
    fn = lambda p, ids: jnp.take(p["table"], ids, axis=0) @ p["kernel"]  # noqa: E731
    imported, names = _with_weights(fn, w, jax.ShapeDtypeStruct((T,), jnp.int32))
    assert names.count("llm.embedding") == 1 and names.count("llm.linear") == 1
    m = imported.module
    assert m.weight_defs["kernel.T"].op == "transpose"  # Flax [in, out] -> [out, in]
    ids = np.array([3, 0, 49, 7], np.int32)
    np.testing.assert_allclose(run(m, "forward", [ids], imported.weights)[0],
                               np.asarray(fn(w, ids)), rtol=1e-5, atol=1e-5)


def test_linear_near_miss_contracting_the_token_axis():
    w = {"kernel": np.ones((6, 16), np.float32)}
    fn = lambda p, x: jax.lax.dot_general(x, p["kernel"], (((0,), (0,)), ((), ())))  # noqa
    imported, names = _with_weights(fn, w, f32(6, 8))
    assert "llm.linear" not in names
    assert "last axis" in imported.module.attributes["raise_misses"]["linear"]


def test_linear_bias_folded_and_near_misses():
    rng = np.random.default_rng(3)
    w = {"k": rng.normal(size=(8, 16)).astype(np.float32),
         "b": rng.normal(size=16).astype(np.float32)}
    fn = lambda p, x: x @ p["k"] + p["b"]  # noqa: E731
    imported, names = _with_weights(fn, w, f32(T, 8))
    assert names.count("llm.linear") == 1 and "add" not in names
    x = rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(run(imported.module, "forward", [x], imported.weights)[0],
                               np.asarray(fn(w, x)), rtol=1e-5, atol=1e-5)
    # near misses: the product is used without its bias too; the addend is an activation
    both = lambda p, x: (x @ p["k"] + p["b"]) * (x @ p["k"])  # noqa: E731
    imported, names = _with_weights(both, w, f32(T, 8))
    assert "add" in names
    assert "other uses" in imported.module.attributes["raise_misses"]["linear-bias"]
    _, names = _with_weights(lambda p, x, y: x @ p["k"] + y, w, f32(T, 8), f32(T, 16))
    assert "add" in names and names.count("llm.linear") == 1


# GQA by reshape (gpt-fast, MaxText): q[T, H, D] -> [T, KVH, G, D], batched with k's kv
# heads. H = 6, KVH = 2, G = 3 unless the sizes are made equal on purpose.

def grouped_attn(q, k, v, *, kvh=2, kv_major=True, spec=("tkgd,skd->kgts", "kgts,skd->tkgd"),
                 scale_q=False):
    t, h, d = q.shape
    g = h // kvh
    qg = q.reshape(t, kvh, g, d) if kv_major else q.reshape(t, g, kvh, d)
    if scale_q:
        qg = qg * 0.25
    s = jnp.einsum(spec[0], qg, k)
    if not scale_q:
        s = s * 0.25
    pos = jnp.arange(t)
    s = jnp.where(pos[:, None] >= pos[None, :], s, -jnp.inf)
    o = jnp.einsum(spec[1], jax.nn.softmax(s, -1), v)
    return o.reshape(t, h, d)


GROUPED = {
    "kv-major": dict(),
    "heads-swapped-scores": dict(spec=("tkgd,skd->gkts", "gkts,skd->tkgd"), scale_q=True),
    "output-transposed": dict(spec=("tkgd,skd->kgts", "kgts,skd->tgkd")),
    "group-major": dict(kv_major=False, spec=("tgkd,skd->kgts", "kgts,skd->tgkd")),
    # equal sizes: only the batch axis tells kv heads from groups (a wrong layout would
    # pair head h with kv h // 2 instead of h % 2 and differ from jax.jit)
    "group-major-equal-sizes": dict(kv_major=False, spec=("tgkd,skd->kgts",
                                                          "kgts,skd->tgkd")),
}


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_gqa_by_reshape_raised_and_matches_jit(name):
    kw = GROUPED[name]
    h = 4 if name.endswith("equal-sizes") else 6
    fn = lambda q, k, v: grouped_attn(q, k, v, **kw)  # noqa: E731
    m, names = raised(fn, f32(T, h, 8), f32(T, 2, 8), f32(T, 2, 8))
    assert names.count("llm.attention") == 1 and "dot_general" not in names, names
    (op,) = [op for op in m.functions["forward"].ops if op.opdef.name == "llm.attention"]
    assert op.attrs.scale == 0.25 and op.attrs.causal
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((7, h, 8), (7, 2, 8), (7, 2, 8)))
    np.testing.assert_allclose(run(m, "forward", [q, k, v])[0],
                               np.asarray(jax.jit(fn)(q, k, v)), rtol=1e-5, atol=1e-5)


def test_gqa_by_broadcast_to_raised_and_matches_jit():
    def fn(q, k, v):
        t = q.shape[0]
        k = jnp.broadcast_to(k[:, :, None, :], (t, 2, 3, 8)).reshape(t, 6, 8)
        v = jnp.broadcast_to(v[:, :, None, :], (t, 2, 3, 8)).reshape(t, 6, 8)
        return attn_repeated(q, k, v)
    m, names = raised(fn, f32(T, 6, 8), f32(T, 2, 8), f32(T, 2, 8))
    assert names.count("llm.attention") == 1 and "broadcast" not in names
    rng = np.random.default_rng(6)
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((5, 6, 8), (5, 2, 8), (5, 2, 8)))
    np.testing.assert_allclose(run(m, "forward", [q, k, v])[0],
                               np.asarray(jax.jit(fn)(q, k, v)), rtol=1e-5, atol=1e-5)


def attn_repeated(q, k, v):
    s = jnp.einsum("thd,shd->hts", q, k) * 0.25
    pos = jnp.arange(q.shape[0])
    s = jnp.where((pos[:, None] >= pos[None, :])[None], s, -jnp.inf)
    return jnp.einsum("hts,shd->thd", jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize("spec,why", [
    # values batched with the group axis, not the kv heads the keys used (equal sizes)
    (("tkgd,skd->kgts", "kgts,sgd->tkgd"), "batch the kv heads"),
    # probabilities contracted over the queries, not the keys
    (("tkgd,skd->kgts", "kgts,tkd->skgd"), "contract the keys"),
])
def test_gqa_by_reshape_near_misses(spec, why):
    fn = lambda q, k, v: grouped_attn(q, k, v, spec=spec)  # noqa: E731
    m, names = raised(fn, f32(T, 4, 8), f32(T, 2, 8), f32(T, 2, 8))
    assert "llm.attention" not in names
    assert why in m.attributes["raise_misses"]["attention"]
