"""Hugging Face `config.json` (as a dict) -> ModelConfig.

A pure function of the dict so that the HF-directory reader and the parity tests
(`transformers` config objects, via `to_dict()`) share one mapping. Both the
transformers 5 layout (`rope_parameters`, possibly nested per layer type) and the older
one (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`)
are accepted. Features the builders cannot express raise ValueError naming the key.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from jaxrt.errors import InputError
from .config import ModelConfig, RopeScaling

# model_type -> (builder arch, default rope theta, default tie_word_embeddings)
_FAMILIES: dict[str, tuple[str, float, bool]] = {
    "llama": ("llama", 10000.0, False),
    "mistral": ("llama", 10000.0, False),
    "qwen2": ("llama", 10000.0, False),
    "gemma3_text": ("gemma3", 1_000_000.0, True),
}
_GEMMA3_LOCAL_THETA = 10000.0
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def config_from_hf(hf_config: Any) -> ModelConfig:
    """From a transformers `PretrainedConfig` object."""
    return config_from_hf_dict(hf_config.to_dict())


def config_from_hf_dict(d: Mapping[str, Any]) -> ModelConfig:
    """From the parsed `config.json` of a Hugging Face checkpoint."""
    d = dict(d)
    if d.get("model_type") == "gemma3" and isinstance(d.get("text_config"), Mapping):
        d = {"model_type": "gemma3_text", **d["text_config"]}  # multimodal wrapper
    model_type = d.get("model_type", "")
    if model_type not in _FAMILIES:
        raise InputError(f"unsupported model_type {model_type!r}; known: {sorted(_FAMILIES)}")
    arch, default_theta, default_tie = _FAMILIES[model_type]
    _reject_unsupported(d, model_type)

    hidden = _size(d, "hidden_size")
    heads = _size(d, "num_attention_heads")
    layers = _size(d, "num_hidden_layers")
    max_position = _size(d, "max_position_embeddings", 2048)
    act_key = "hidden_activation" if d.get("hidden_activation") else "hidden_act"
    act = d.get(act_key) or "silu"
    if act not in _ACTIVATIONS:
        raise InputError(f"unsupported {act_key} {act!r}")
    layer_types, window = _layer_types(d, model_type, layers)

    if arch == "gemma3":
        full, local = _gemma3_rope_params(d, default_theta)
        rope_theta, scaling = _rope(full, max_position, default_theta)
        local_theta, local_scaling = _rope(local, max_position, _GEMMA3_LOCAL_THETA)
        if local_scaling.kind != "none":
            raise InputError("rope scaling on sliding-attention layers is not supported")
        extra = dict(rope_local_theta=local_theta,
                     query_pre_attn_scalar=_positive(d, "query_pre_attn_scalar", 256.0),
                     # transformers' Gemma3Attention never applies
                     # attn_logit_softcapping (Gemma 3 replaced it by QK-norm); match it.
                     attn_logit_softcap=None,
                     final_logit_softcap=_positive(d, "final_logit_softcapping", None))
    else:
        rope_theta, scaling = _rope(_flat_rope_params(d), max_position, default_theta)
        extra = {}

    eos = d.get("eos_token_id")
    eos_ids = () if eos is None else tuple(
        _size({"eos_token_id": e}, "eos_token_id", minimum=0)
        for e in (eos if isinstance(eos, list) else [eos]))
    return ModelConfig(
        arch=arch,
        vocab_size=_size(d, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_size(d, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_size(d, "num_key_value_heads", heads),
        head_dim=_size(d, "head_dim", hidden // heads or _REQUIRED),
        max_position=max_position,
        rms_eps=_positive(d, "rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", default_tie)),
        qkv_bias=model_type == "qwen2",
        hidden_act=_ACTIVATIONS[act],
        layer_types=layer_types,
        sliding_window=window,
        bos_token_id=_size(d, "bos_token_id", None, minimum=0),
        eos_token_ids=eos_ids,
        model_type=model_type,
        **extra,
    )


def _reject_unsupported(d: Mapping[str, Any], model_type: str) -> None:
    # Llama/Gemma's attention_bias also biases o_proj, which ModelConfig cannot express.
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if d.get(key):
            raise InputError(f"{model_type}: {key}=true is not supported")
    prf = d.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        raise InputError(f"{model_type}: partial_rotary_factor={prf} is not supported")


_REQUIRED = object()


def _size(d: Mapping[str, Any], key: str, default: Any = _REQUIRED, *,
          minimum: int = 1) -> Any:
    """An integer-valued key (a JSON int, never a string, a bool or a fraction), at least
    `minimum`; null or absent gives `default`."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise InputError(f"{key} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{key} = {value!r:.40} must be an integer")
    if value < minimum:
        raise InputError(f"{key} = {value} must be >= {minimum}")
    return value


def _positive(params: Mapping[str, Any], key: str, default: Any) -> Any:
    """A positive finite number (int or float in JSON); null or absent gives `default`."""
    value = params.get(key)
    if value is None:
        if default is _REQUIRED:
            raise InputError(f"{key} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not value > 0:
        raise InputError(f"{key} = {value!r:.40} must be a positive finite number")
    return float(value)


def _layer_types(d: Mapping[str, Any], model_type: str,
                 layers: int) -> tuple[tuple[str, ...], int | None]:
    window = d.get("sliding_window")
    if model_type == "llama":
        return ("full",) * layers, None
    if model_type == "mistral":  # one window for every layer (null in Mistral >= v0.2)
        window = _size(d, "sliding_window", None) if "sliding_window" in d else 4096
        return ("sliding" if window else "full",) * layers, window
    names = d.get("layer_types")
    if names is None and model_type == "qwen2":
        window = window if d.get("use_sliding_window") else None
        first = _size(d, "max_window_layers", 28, minimum=0)
        names = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(layers)]
    elif names is None:  # gemma3: every `pattern`-th layer is global
        pattern = _size(d, "sliding_window_pattern", None) or _size(
            d, "_sliding_window_pattern", 6)
        window = d.get("sliding_window", 4096)
        names = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(layers)]
    unknown = sorted({n for n in names if n not in _LAYER_TYPES})
    if unknown:
        raise InputError(f"{model_type}: unsupported layer types {unknown}")
    if len(names) != layers:
        raise InputError(f"{model_type}: {len(names)} layer_types for {layers} layers")
    types = tuple(_LAYER_TYPES[n] for n in names)
    if "sliding" not in types:
        return types, None
    if window is None:
        raise InputError(f"{model_type}: sliding layers without a sliding_window")
    return types, _size({"sliding_window": window}, "sliding_window")


def _flat_rope_params(d: Mapping[str, Any]) -> dict:
    params = d.get("rope_parameters")
    if params:
        return dict(params)
    return {**(d.get("rope_scaling") or {}),
            **({"rope_theta": d["rope_theta"]} if d.get("rope_theta") is not None else {})}


def _gemma3_rope_params(d: Mapping[str, Any], default_theta: float) -> tuple[dict, dict]:
    params = d.get("rope_parameters")
    if params and ("full_attention" in params or "sliding_attention" in params):
        return dict(params.get("full_attention") or {}), dict(
            params.get("sliding_attention") or {})
    full = _flat_rope_params(d)
    local = {"rope_theta": _positive(d, "rope_local_base_freq", _GEMMA3_LOCAL_THETA)}
    return full, local


def _rope(params: Mapping[str, Any], max_position: int,
          default_theta: float) -> tuple[float, RopeScaling]:
    theta = _positive(params, "rope_theta", default_theta)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling("linear", factor=_positive(params, "factor", _REQUIRED))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", factor=_positive(params, "factor", _REQUIRED),
            low_freq_factor=_positive(params, "low_freq_factor", 1.0),
            high_freq_factor=_positive(params, "high_freq_factor", 4.0),
            original_max_position=_size(params, "original_max_position_embeddings",
                                        max_position))
    raise InputError(f"unsupported rope type {kind!r}")
