"""Raising the forward of the built-in Llama builder reproduces the IR the builder emits.

`builder_forward(config)` is what `build_llama(config)` computes, written as a plain JAX
whole-sequence forward with no cache (the builder's math: RMSNorm, rotate-half RoPE with
the builder's frequencies, GQA by `jnp.repeat`, a causal (windowed) mask, softmax, SwiGLU,
tied or untied head), taking HF-named weights. Imported, raised and cache-inserted
(`jaxrt.jax_frontend.RAISE_PIPELINE`), its @step must be the builder's @step after the same
canonicalize,cse,dce: the same graph up to value naming and op order (networkx
isomorphism on op names, attributes, result types and operand positions; arguments by
name and weights by name, which here are the HF names on both sides).

Float attributes compare as float32: the imported constants are float32 (the attention
scale 8 ** -0.5 is 0.35355338 there, 0.3535533905932738 in the builder), and float32 is
what the lowering computes with. Everything else compares exactly.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest

from jaxrt.frontends.build import build_module
from jaxrt.frontends.config import ModelConfig, RopeScaling
from jaxrt.frontends.loaded import expected_weight_shapes
from jaxrt.ir.ops.nn import rope_inv_freq
from jaxrt.jax_frontend import import_forward, raise_module
from jaxrt.passes import PassManager


def builder_forward(c: ModelConfig, *, swap_gate_up: bool = False):
    """fn(params, tokens[T]) -> logits[T, V]: build_llama(c)'s computation without a cache.
    `swap_gate_up` computes silu(up) * gate instead (a near miss of the builder)."""
    rs = c.rope_scaling
    inv_freq = rope_inv_freq(c.head_dim, SimpleNamespace(
        theta=c.rope_theta, scaling=rs.kind, factor=rs.factor,
        low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
        original_max_position=rs.original_max_position)).astype(np.float32)

    def norm(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + c.rms_eps) * w

    def linear(x, p, name, bias=False):
        y = x @ p[name + ".weight"].T  # HF weights are [out, in]
        return y + p[name + ".bias"] if bias else y

    def rope(x, positions):  # x[T, heads, head_dim]
        f = positions[:, None].astype(jnp.float32) * inv_freq  # [T, D/2]
        e = jnp.concatenate([f, f], -1)
        cos, sin = jnp.cos(e)[:, None], jnp.sin(e)[:, None]
        h = x.shape[-1] // 2
        return x * cos + jnp.concatenate([-x[..., h:], x[..., :h]], -1) * sin

    def attention(i, x, p, positions):
        t, a = x.shape[0], f"model.layers.{i}.self_attn."
        q = linear(x, p, a + "q_proj", c.qkv_bias).reshape(t, c.num_heads, c.head_dim)
        k = linear(x, p, a + "k_proj", c.qkv_bias).reshape(t, c.num_kv_heads, c.head_dim)
        v = linear(x, p, a + "v_proj", c.qkv_bias).reshape(t, c.num_kv_heads, c.head_dim)
        q, k = rope(q, positions), rope(k, positions)
        group = c.num_heads // c.num_kv_heads
        k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
        s = jnp.einsum("thd,shd->hts", q, k) * c.attn_scale
        mask = positions[:, None] >= positions[None, :]
        if c.layer_types[i] == "sliding":
            mask = mask & (positions[:, None] - positions[None, :] < c.sliding_window)
        s = jnp.where(mask[None], s, -jnp.inf)
        out = jnp.einsum("hts,shd->thd", jax.nn.softmax(s, -1), v)  # [T, H, D]
        return linear(out.reshape(t, -1), p, a + "o_proj")

    def mlp(i, x, p):
        m = f"model.layers.{i}.mlp."
        gate, up = linear(x, p, m + "gate_proj"), linear(x, p, m + "up_proj")
        if swap_gate_up:
            gate, up = up, gate
        return linear(jax.nn.silu(gate) * up, p, m + "down_proj")

    def forward(p, tokens):
        positions = jnp.arange(tokens.shape[0])
        x = jnp.take(p["model.embed_tokens.weight"], tokens, axis=0)  # [T, hidden]
        for i in range(c.num_layers):
            pre = f"model.layers.{i}."
            x = x + attention(i, norm(x, p[pre + "input_layernorm.weight"]), p, positions)
            x = x + mlp(i, norm(x, p[pre + "post_attention_layernorm.weight"]), p)
        x = norm(x, p["model.norm.weight"])
        return x @ p["model.embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"].T
    return forward


def _attr(v):
    if isinstance(v, float):
        return float(np.float32(v))
    return tuple(_attr(x) for x in v) if isinstance(v, tuple) else v


def step_graph(module) -> nx.DiGraph:
    """@step as a labelled graph: ops by (name, attrs, result types), arguments by name,
    weights by name (their op attr), edges by operand position."""
    fn = module.functions["step"]
    g = nx.DiGraph()
    for a in fn.args:
        g.add_node(a, label=("arg", a.hint, str(a.type)))
    for op in fn.ops:
        attrs = tuple(sorted((k, _attr(v)) for k, v in dict(op.attrs).items()))
        g.add_node(op, label=(op.opdef.name, attrs, tuple(str(r.type) for r in op.results)))
        for i, v in enumerate(op.operands):
            g.add_edge(v.owner or v, op, label=(i, v.index))
    for i, r in enumerate(fn.results):
        g.add_node(("return", i), label=("return", i))
        g.add_edge(r.owner or r, ("return", i), label=(0, r.index))
    return g


def raised_and_built(config: ModelConfig, **forward_options):
    params = {n: np.zeros(s, np.float32) for n, s in expected_weight_shapes(config).items()}
    imported = import_forward(builder_forward(config, **forward_options), params)
    raise_module(imported.module)
    built = build_module(config)
    PassManager("canonicalize,cse,dce").run(built)
    return imported.module, built


def labels(g: nx.DiGraph) -> Counter:
    return Counter(d["label"] for _, d in g.nodes(data=True))


def same_graph(a: nx.DiGraph, b: nx.DiGraph) -> bool:
    return nx.is_isomorphic(a, b, node_match=lambda x, y: x["label"] == y["label"],
                            edge_match=lambda x, y: x["label"] == y["label"])


BASE = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position=64,
                   rope_theta=1e4, tie_embeddings=True)
CONFIGS = {
    "gqa-tied": BASE,
    "mha-untied": replace(BASE, num_kv_heads=4, tie_embeddings=False, rope_theta=5e5),
    "qwen2-qkv-bias": replace(BASE, qkv_bias=True, rope_theta=1e6),
    "mistral-window": replace(BASE, sliding_window=5, layer_types=()),
    "llama3-mqa": replace(BASE, num_kv_heads=1, rope_theta=5e5,
                          rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    "linear-rope": replace(BASE, rope_scaling=RopeScaling("linear", 4.0), rms_eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_raised_builder_forward_is_the_builders_ir(name):
    config = CONFIGS[name]
    imported, built = raised_and_built(config)
    gi, gb = step_graph(imported), step_graph(built)
    # the op multiset first, so a failure names the ops that differ
    li, lb = labels(gi), labels(gb)
    assert li == lb, f"only imported: {li - lb}; only built: {lb - li}"
    assert same_graph(gi, gb)
    assert imported.weights == built.weights  # same names and types
    # the attributes the serving kernels read, exactly (eps, theta are written shortest)
    for kind in ("llm.rms_norm", "llm.rope"):
        got = {op.attrs for op in imported.functions["step"].ops if op.opdef.name == kind}
        want = {op.attrs for op in built.functions["step"].ops if op.opdef.name == kind}
        assert got == want, kind
    n_attn = sum(op.opdef.name == "llm.paged_attention" for op in built.functions["step"].ops)
    assert n_attn == config.num_layers


def test_a_different_forward_is_a_different_graph():
    """Near miss: silu(up) * gate has the same op multiset as the builder's
    silu(gate) * up, and must still not compare equal (operand positions count)."""
    imported, built = raised_and_built(BASE, swap_gate_up=True)
    gi, gb = step_graph(imported), step_graph(built)
    assert labels(gi) == labels(gb)
    assert not same_graph(gi, gb)
