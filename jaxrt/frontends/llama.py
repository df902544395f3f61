"""Llama-family decoders: Llama 2/3 (incl. llama3 RoPE scaling), SmolLM2, Mistral, Qwen2.

Pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x)). The family differences are all
config: Mistral's sliding window (every layer "sliding"), Qwen2's q/k/v biases, tied
embeddings (SmolLM2, Llama 3.2 1B), RoPE scaling.
"""
from __future__ import annotations

from ..ir import Module
from .builder import DecoderBuilder, layer_prefix
from .config import ModelConfig


def build_llama(config: ModelConfig) -> Module:
    d = DecoderBuilder(config)
    x = d.embed()  # [T, hidden]
    for layer in range(config.num_layers):
        p = layer_prefix(layer)
        x = d.add(x, d.attention(layer, d.rms_norm(x, p + "input_layernorm.weight")))
        x = d.add(x, d.mlp(layer, d.rms_norm(x, p + "post_attention_layernorm.weight")))
    return d.finish(x)
