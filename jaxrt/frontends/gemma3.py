"""Gemma 3 text decoder.

Differences from Llama, all following transformers' Gemma3ForCausalLM:
- RMSNorm scales by (1 + w) (`rms_norm {offset = 1.0}`), also for the QK-norm over
  head_dim applied to queries and keys before RoPE;
- sandwich norms: the attention and MLP outputs are normed again before each residual add
  (post_attention_layernorm, pre/post_feedforward_layernorm);
- embeddings times sqrt(hidden), a scalar of the compute dtype (transformers casts it to
  the weight dtype, so bf16 models see the rounded value);
- GELU-tanh gating; attention scale query_pre_attn_scalar ** -0.5; optional attention and
  final logit soft-caps;
- sliding-window layers use their own RoPE base (rope_local_theta) without scaling,
  interleaved with global layers that use rope_theta and rope_scaling.
"""
from __future__ import annotations

import math

from jaxrt.errors import InputError
from ..ir import Module
from .builder import DecoderBuilder, layer_prefix
from .config import ModelConfig


def build_gemma3(config: ModelConfig) -> Module:
    if config.query_pre_attn_scalar is None:
        raise InputError("gemma3 needs query_pre_attn_scalar")
    d = DecoderBuilder(config, norm_offset=1.0, qk_norm=True)
    x = d.embed(scale=math.sqrt(config.hidden_size))  # [T, hidden]
    for layer in range(config.num_layers):
        p = layer_prefix(layer)
        a = d.attention(layer, d.rms_norm(x, p + "input_layernorm.weight"))
        x = d.add(x, d.rms_norm(a, p + "post_attention_layernorm.weight"))
        m = d.mlp(layer, d.rms_norm(x, p + "pre_feedforward_layernorm.weight"))
        x = d.add(x, d.rms_norm(m, p + "post_feedforward_layernorm.weight"))
    return d.finish(x)
