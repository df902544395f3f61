"""Models written the way Flax NNX codebases write them (never for jaxrt), and loaders that
copy a transformers model's weights into them.

`FlaxLlama` follows the Flax NNX / MaxText Llama: RMSNorm in float32, rotate-half RoPE with
frequencies computed in the model, GQA by `jnp.repeat`, a causal mask from positions,
`jax.nn.softmax`, a SwiGLU MLP, tied or untied logits. `ScanLlama` is the same model with
its layers stacked and run by `nnx.scan`-style `jax.lax.scan` over the stacked parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def rope_frequencies(head_dim: int, theta: float, factor: float = 1.0) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    return (inv / factor).astype(np.float32)


def llama3_frequencies(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                       high_freq_factor: float, original_max_position_embeddings: int):
    """MaxText's / Meta's Llama 3.1 frequency scaling, in numpy."""
    inv = rope_frequencies(head_dim, theta).astype(np.float64)
    low_wl = original_max_position_embeddings / low_freq_factor
    high_wl = original_max_position_embeddings / high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < high_wl:
            out.append(f)
        elif wavelen > low_wl:
            out.append(f / factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.asarray(out, np.float32)


def apply_rope(x, positions, inv_freq):
    """x[T, heads, head_dim], positions[T]: rotate-half RoPE."""
    freqs = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # [T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, D]
    cos, sin = jnp.cos(emb)[:, None, :], jnp.sin(emb)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 ** 2, axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * self.weight


class Attention(nnx.Module):
    def __init__(self, cfg, rngs):
        h, nh, kvh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, \
            cfg.head_dim
        self.nh, self.kvh, self.d = nh, kvh, d
        self.q_proj = nnx.Linear(h, nh * d, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(h, kvh * d, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(h, kvh * d, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(nh * d, h, use_bias=False, rngs=rngs)
        self.scale = d ** -0.5

    def __call__(self, x, positions, inv_freq):
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, self.nh, self.d)
        k = self.k_proj(x).reshape(t, self.kvh, self.d)
        v = self.v_proj(x).reshape(t, self.kvh, self.d)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k = jnp.repeat(k, self.nh // self.kvh, axis=1)
        v = jnp.repeat(v, self.nh // self.kvh, axis=1)
        scores = jnp.einsum("thd,shd->hts", q, k) * self.scale
        mask = positions[:, None] >= positions[None, :]
        scores = jnp.where(mask[None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("hts,shd->thd", probs, v)
        return self.o_proj(out.reshape(t, self.nh * self.d))


class MLP(nnx.Module):
    def __init__(self, cfg, rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nnx.Linear(h, i, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(h, i, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(i, h, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, inv_freq):
        x = x + self.self_attn(self.input_layernorm(x), positions, inv_freq)
        return x + self.mlp(self.post_attention_layernorm(x))


class FlaxLlama(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tied = cfg.tie_word_embeddings
        if not self.tied:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                      rngs=rngs)
        rope = cfg.rope_parameters
        if rope["rope_type"] == "llama3":
            self.inv_freq = llama3_frequencies(
                cfg.head_dim, rope["rope_theta"], rope["factor"], rope["low_freq_factor"],
                rope["high_freq_factor"], rope["original_max_position_embeddings"])
        else:
            self.inv_freq = rope_frequencies(cfg.head_dim, rope["rope_theta"],
                                             rope.get("factor", 1.0)
                                             if rope["rope_type"] == "linear" else 1.0)

    def __call__(self, tokens):
        x = self.embed_tokens(tokens)  # [T, hidden]
        positions = jnp.arange(tokens.shape[0])
        for layer in self.layers:
            x = layer(x, positions, self.inv_freq)
        x = self.norm(x)
        return self.embed_tokens.attend(x) if self.tied else self.lm_head(x)


# ---- weights from transformers ----------------------------------------------------------------

def _t(sd, name):
    w = sd[name]
    return jnp.asarray(w.detach().numpy() if hasattr(w, "detach") else w)


def load_llama_weights(model: FlaxLlama, hf_model) -> FlaxLlama:
    """Copy a transformers Llama's weights in (nnx.Linear kernels are [in, out]); or from a
    dict of HF-named arrays."""
    sd = hf_model if isinstance(hf_model, dict) else hf_model.state_dict()
    model.embed_tokens.embedding.set_value(_t(sd, "model.embed_tokens.weight"))
    model.norm.weight.set_value(_t(sd, "model.norm.weight"))
    if not model.tied:
        model.lm_head.kernel.set_value(_t(sd, "lm_head.weight").T)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.input_layernorm.weight.set_value(_t(sd, p + "input_layernorm.weight"))
        layer.post_attention_layernorm.weight.set_value(
            _t(sd, p + "post_attention_layernorm.weight"))
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, n).kernel.set_value(
                _t(sd, p + f"self_attn.{n}.weight").T)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, n).kernel.set_value(_t(sd, p + f"mlp.{n}.weight").T)
    return model


class ScanLlama(nnx.Module):
    """FlaxLlama with its layers' parameters stacked [L, ...] and run by `jax.lax.scan`
    (the MaxText `scan_layers` style)."""

    def __init__(self, flat: FlaxLlama):
        self.cfg, self.tied, self.inv_freq = flat.cfg, flat.tied, flat.inv_freq
        self.embed_tokens, self.norm = flat.embed_tokens, flat.norm
        if not self.tied:
            self.lm_head = flat.lm_head
        self.graphdef = nnx.split(flat.layers[0], nnx.Param, ...)[0]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[nnx.state(layer, nnx.Param) for layer in flat.layers])
        self.stacked = nnx.data(stacked)
        self.rest = nnx.split(flat.layers[0], nnx.Param, ...)[2]

    def __call__(self, tokens):
        x = self.embed_tokens(tokens)
        positions = jnp.arange(tokens.shape[0])

        def body(h, params):
            layer = nnx.merge(self.graphdef, params, self.rest)
            return layer(h, positions, self.inv_freq), None

        x, _ = jax.lax.scan(body, x, self.stacked)
        x = self.norm(x)
        return self.embed_tokens.attend(x) if self.tied else self.lm_head(x)
