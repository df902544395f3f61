"""A Gemma-3-style model written the way the Gemma Flax codebase (google-deepmind/gemma)
writes it, never for jaxrt, and a loader that copies a transformers Gemma3 model into it.

Its Gemma spellings: embeddings scaled by sqrt(hidden); RMSNorm with `(1 + scale)` in
float32, also on queries and keys; the query scaled by query_pre_attn_scalar**-0.5 before
the scores; scores optionally soft-capped by `tanh(s / cap) * cap` (Gemma 2 did; Gemma 3
replaced it by the QK-norm and transformers' Gemma3 never applies attn_logit_softcapping,
so `attn_softcap` is a separate argument, for tests that check the raising of the spelling
against the model itself); sliding-window layers whose mask
is the causal mask `&` a window of positions; local and global RoPE bases; a GeGLU MLP
(tanh GELU); norms after attention and the MLP; final logits soft-capped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tests.frontends.flax_models import _t, apply_rope, rope_frequencies

K_MASK = -2.3819763e38  # the Gemma codebase's fill for masked scores


class GemmaRMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * (1 + self.scale)


class GemmaAttention(nnx.Module):
    def __init__(self, cfg, sliding: bool, rngs, softcap=None):
        h, nh, kvh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, \
            cfg.head_dim
        self.nh, self.kvh, self.d = nh, kvh, d
        self.q = nnx.Linear(h, nh * d, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(h, kvh * d, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(h, kvh * d, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(nh * d, h, use_bias=False, rngs=rngs)
        self.q_norm = GemmaRMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, cfg.rms_norm_eps)
        self.query_scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = softcap
        self.window = cfg.sliding_window if sliding else None
        rope = cfg.rope_parameters["sliding_attention" if sliding else "full_attention"]
        self.inv_freq = rope_frequencies(d, rope["rope_theta"], rope.get("factor", 1.0)
                                         if rope["rope_type"] == "linear" else 1.0)

    def __call__(self, x, positions):
        t = x.shape[0]
        q = self.q_norm(self.q(x).reshape(t, self.nh, self.d))
        k = self.k_norm(self.k(x).reshape(t, self.kvh, self.d))
        v = self.v(x).reshape(t, self.kvh, self.d)
        q = apply_rope(q, positions, self.inv_freq) * self.query_scale
        k = apply_rope(k, positions, self.inv_freq)
        k = jnp.repeat(k, self.nh // self.kvh, axis=1)
        v = jnp.repeat(v, self.nh // self.kvh, axis=1)
        logits = jnp.einsum("thd,shd->hts", q, k)
        if self.softcap is not None:
            logits = jnp.tanh(logits / self.softcap) * self.softcap
        mask = positions[:, None] >= positions[None, :]
        if self.window is not None:
            mask = mask & (positions[:, None] - positions[None, :] < self.window)
        logits = jnp.where(mask[None], logits, K_MASK)
        probs = jax.nn.softmax(logits, axis=-1)
        return self.o(jnp.einsum("hts,shd->thd", probs, v).reshape(t, self.nh * self.d))


class GemmaBlock(nnx.Module):
    def __init__(self, cfg, sliding: bool, rngs, attn_softcap=None):
        h, i, eps = cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps
        self.pre_attention_norm = GemmaRMSNorm(h, eps)
        self.attn = GemmaAttention(cfg, sliding, rngs, attn_softcap)
        self.post_attention_norm = GemmaRMSNorm(h, eps)
        self.pre_ffw_norm = GemmaRMSNorm(h, eps)
        self.gate = nnx.Linear(h, i, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(h, i, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(i, h, use_bias=False, rngs=rngs)
        self.post_ffw_norm = GemmaRMSNorm(h, eps)

    def __call__(self, x, positions):
        x = x + self.post_attention_norm(self.attn(self.pre_attention_norm(x), positions))
        h = self.pre_ffw_norm(x)
        h = self.down(jax.nn.gelu(self.gate(h), approximate=True) * self.up(h))
        return x + self.post_ffw_norm(h)


class FlaxGemma3(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, attn_softcap: float | None = None):
        self.cfg = cfg
        self.embedder = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([GemmaBlock(cfg, kind == "sliding_attention", rngs,
                                           attn_softcap)
                                for kind in cfg.layer_types])
        self.final_norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tied = cfg.tie_word_embeddings
        if not self.tied:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                      rngs=rngs)
        self.final_softcap = cfg.final_logit_softcapping

    def __call__(self, tokens):
        x = self.embedder(tokens) * jnp.sqrt(jnp.float32(self.cfg.hidden_size))
        positions = jnp.arange(tokens.shape[0])
        for layer in self.layers:
            x = layer(x, positions)
        x = self.final_norm(x)
        logits = self.embedder.attend(x) if self.tied else self.lm_head(x)
        if self.final_softcap is not None:
            logits = jnp.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def load_gemma3_weights(model: FlaxGemma3, hf_model) -> FlaxGemma3:
    """Copy a transformers Gemma3ForCausalLM's weights in (nnx.Linear kernels are [in, out])."""
    sd = hf_model.state_dict()
    model.embedder.embedding.set_value(_t(sd, "model.embed_tokens.weight"))
    model.final_norm.scale.set_value(_t(sd, "model.norm.weight"))
    if not model.tied:
        model.lm_head.kernel.set_value(_t(sd, "lm_head.weight").T)
    norms = {"pre_attention_norm": "input_layernorm",
             "post_attention_norm": "post_attention_layernorm",
             "pre_ffw_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for ours, theirs in norms.items():
            getattr(layer, ours).scale.set_value(_t(sd, p + theirs + ".weight"))
        a = layer.attn
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                             ("o", "o_proj")):
            getattr(a, ours).kernel.set_value(_t(sd, p + f"self_attn.{theirs}.weight").T)
        a.q_norm.scale.set_value(_t(sd, p + "self_attn.q_norm.weight"))
        a.k_norm.scale.set_value(_t(sd, p + "self_attn.k_norm.weight"))
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            getattr(layer, ours).kernel.set_value(_t(sd, p + f"mlp.{theirs}.weight").T)
    return model
