"""What every reader returns: config, lazily materialized f32 weights, tokenizer.

Weight names are Hugging Face's and weight values follow transformers' semantics (Gemma
norms are stored as `w` with the model computing `1 + w`, Llama Q/K rows in HF order),
whatever file they came from. `expected_weight_shapes(config)` is the one list of names and
shapes both readers check a checkpoint against.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

Shape = tuple[int, ...]


class LazyWeights(Mapping[str, np.ndarray]):
    """name -> f32 array, read (and dequantized) from the file on each access.

    Nothing is cached: a builder that wants a weight twice should keep the array. `shape`
    answers without reading any data.
    """

    def __init__(self, entries: Mapping[str, tuple[Shape, Callable[[], np.ndarray]]]):
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> np.ndarray:
        shape, load = self._entries[name]
        array = np.ascontiguousarray(load(), dtype=np.float32)
        if array.shape != shape:  # a loader bug, not a file problem: the header was checked
            raise AssertionError(f"{name}: loaded {array.shape}, declared {shape}")
        return array

    def __contains__(self, name: object) -> bool:
        return name in self._entries  # Mapping's default would read (dequantize) it

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> Shape:
        return self._entries[name][0]

    def shapes(self) -> dict[str, Shape]:
        return {name: shape for name, (shape, _) in self._entries.items()}


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: Mapping[str, np.ndarray]  # f32, HF names; a LazyWeights from the readers
    tokenizer: "Tokenizer"
    chat_template: str | None
    source: str  # the file or directory it was read from


def expected_weight_shapes(config: ModelConfig) -> dict[str, Shape]:
    """Every weight a model of `config` needs, HF name -> shape (lm_head only when untied)."""
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                "model.norm.weight": (c.hidden_size,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        shapes.update({
            a + "q_proj.weight": (q_out, c.hidden_size),
            a + "k_proj.weight": (kv_out, c.hidden_size),
            a + "v_proj.weight": (kv_out, c.hidden_size),
            a + "o_proj.weight": (c.hidden_size, q_out),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
        })
        if c.qkv_bias:
            shapes.update({a + "q_proj.bias": (q_out,), a + "k_proj.bias": (kv_out,),
                           a + "v_proj.bias": (kv_out,)})
        if c.arch == "gemma3":
            shapes.update({
                a + "q_norm.weight": (c.head_dim,),
                a + "k_norm.weight": (c.head_dim,),
                p + "pre_feedforward_layernorm.weight": (c.hidden_size,),
                p + "post_feedforward_layernorm.weight": (c.hidden_size,),
            })
    return shapes


# Present in some checkpoints, never needed: RoPE tables are recomputed from the config.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def check_weight_shapes(path: str, config: ModelConfig, found: Mapping[str, Shape]) -> set[str]:
    """Raise ModelFormatError unless `found` has exactly the weights `config` needs with
    their shapes. Returns the names to ignore (a tied lm_head, rotary tables)."""
    expected = expected_weight_shapes(config)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ModelFormatError(path, f"{len(missing)} weights missing for the config, "
                                     f"e.g. {missing[:3]}")
    ignored = {n for n in found if _IGNORED.search(n)}
    if config.tie_embeddings and "lm_head.weight" in found:
        ignored.add("lm_head.weight")
    unexpected = sorted(set(found) - set(expected) - ignored)
    if unexpected:
        raise ModelFormatError(path, f"{len(unexpected)} weights the config does not use, "
                                     f"e.g. {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise ModelFormatError(path, f"weight {name} has shape {tuple(found[name])}, "
                                         f"the config implies {shape}")
    return ignored
