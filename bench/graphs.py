"""Benchmark graphs built with the Builder (no model files needed).

`llama_decode_graph()` is the serving step function (docs/architecture.md) of a
Llama-3.1-8B-shaped model, with a sprinkling of primitive ops of the kind frontends emit
(identity converts, scale-by-one, transpose pairs, reshape chains, zero residuals,
duplicated subexpressions and dead debug values) so that canonicalize, cse and dce all
have work to do.
"""
from __future__ import annotations

from jaxrt.ir import Builder, DType, Module, TensorType, ops


def llama_decode_graph(num_layers: int = 32, *, hidden: int = 4096, heads: int = 32,
                       kv_heads: int = 8, head_dim: int = 128, ffn: int = 14336,
                       vocab: int = 128256, dtype: DType = DType.f32,
                       rms_eps: float = 1e-5, noise: bool = True) -> Module:
    m = Module("llama3_8b_decode", attributes={"arch": "llama", "num_layers": num_layers})

    def t(*shape, dt=dtype):
        return TensorType(tuple(shape), dt)

    i32 = DType.int32
    kv_type = t(num_layers, 2, "pages", "page_size", kv_heads, head_dim)
    b = Builder.new_function(m, "step", [
        ("tokens", t("T", dt=i32)), ("positions", t("T", dt=i32)),
        ("slot_mapping", t("T", dt=i32)), ("page_table", t("S", "MP", dt=i32)),
        ("context_lens", t("S", dt=i32)), ("q_index", t("S", "Q", dt=i32)),
        ("logit_index", t("N", dt=i32)), ("kv", kv_type)])
    tokens, positions, slots, page_table, ctx_lens, q_index, logit_index, kv = b.fn.args
    rope = dict(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position=8192)

    def w(name, *shape):
        return b.weight(name, t(*shape))

    h = b(ops.embedding, tokens, w("model.embed_tokens.weight", vocab, hidden))  # [T, H]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        if noise:
            h = b(ops.convert, h, dtype=dtype)  # identity convert
        x = b(ops.rms_norm, h, w(p + "input_layernorm.weight", hidden), eps=rms_eps)
        q = b(ops.linear, x, w(p + "self_attn.q_proj.weight", heads * head_dim, hidden))
        k = b(ops.linear, x, w(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden))
        v = b(ops.linear, x, w(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden))
        q = b(ops.reshape, q, shape=("T", heads, head_dim))  # [T, heads, head_dim]
        if noise:  # reshape chain, scale by one, transpose pair
            k = b(ops.reshape, k, shape=("T", kv_heads, 2, head_dim // 2))
            one = b(ops.constant, value=1.0, result_types=[t(1)])
            q = b(ops.mul, q, one)
            q = b(ops.transpose, q, perm=(1, 0, 2))  # [heads, T, head_dim]
            q = b(ops.transpose, q, perm=(1, 0, 2))
        k = b(ops.reshape, k, shape=("T", kv_heads, head_dim))
        v = b(ops.reshape, v, shape=("T", kv_heads, head_dim))
        q = b(ops.rope, q, positions, **rope)
        k = b(ops.rope, k, positions, **rope)
        kv = b(ops.kv_update, kv, k, v, slots, layer=i)
        a = b(ops.paged_attention, q, kv, page_table, ctx_lens, q_index, positions, layer=i,
              scale=head_dim ** -0.5)
        a = b(ops.reshape, a, shape=("T", heads * head_dim))
        h = b(ops.add, h, b(ops.linear, a, w(p + "self_attn.o_proj.weight", hidden,
                                              heads * head_dim)))
        if noise:  # zero residual, dead debug statistic
            zero = b(ops.constant, value=0.0, result_types=[t(hidden)])
            h = b(ops.add, zero, h)
            b(ops.reduce_mean, h, axes=(1,))
        post = p + "post_attention_layernorm.weight"
        x = b(ops.rms_norm, h, w(post, hidden), eps=rms_eps)
        gate = b(ops.linear, x, w(p + "mlp.gate_proj.weight", ffn, hidden))
        if noise:  # the same norm computed again from a second weight reference
            x = b(ops.rms_norm, h, w(post, hidden), eps=rms_eps)
        up = b(ops.linear, x, w(p + "mlp.up_proj.weight", ffn, hidden))
        act = b(ops.swiglu, gate, up)
        h = b(ops.add, h, b(ops.linear, act, w(p + "mlp.down_proj.weight", hidden, ffn)))
    h = b(ops.rms_norm, h, w("model.norm.weight", hidden), eps=rms_eps)
    last = b(ops.take, h, logit_index, axis=0)  # [N, H]
    logits = b(ops.logits, last, w("lm_head.weight", vocab, hidden))  # f32[N, vocab]
    b.ret(logits, kv)
    return m
