"""ModelConfig: the architecture description every frontend produces and builders consume.

Readers (GGUF metadata, HF config.json) fill it; `jaxrt/frontends/<arch>.py` builders turn
it into IR. Weight names are always Hugging Face's (`model.layers.0.self_attn.q_proj.weight`),
whatever file they came from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from jaxrt.errors import InputError


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (Llama 2/3, SmolLM2, Mistral, Qwen2) or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    hidden_act: str = "silu"  # silu | gelu_tanh
    # Per-layer attention kind, "full" or "sliding"; sliding layers use `sliding_window`.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    # Gemma 3
    rope_local_theta: float | None = None  # RoPE base of sliding layers
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = ""  # the source's own name (llama, mistral, qwen2, gemma3_text...)

    def __post_init__(self):
        if not self.layer_types:
            kind = "sliding" if self.sliding_window else "full"
            object.__setattr__(self, "layer_types", (kind,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise InputError(f"{len(self.layer_types)} layer types for {self.num_layers} layers")

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)
