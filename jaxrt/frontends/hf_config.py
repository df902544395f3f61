"""Hugging Face `config.json` (as a dict) -> ModelConfig.

A pure function of the dict so that the HF-directory reader and the parity tests
(`transformers` config objects, via `to_dict()`) share one mapping. Both the
transformers 5 layout (`rope_parameters`, possibly nested per layer type) and the older
one (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`)
are accepted. Features the builders cannot express raise ValueError naming the key.
"""
from __future__ import annotations

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

    hidden = int(d["hidden_size"])
    heads = int(d["num_attention_heads"])
    layers = int(d["num_hidden_layers"])
    max_position = int(d.get("max_position_embeddings") or 2048)
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
                     query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256),
                     # transformers' Gemma3Attention never applies
                     # attn_logit_softcapping (Gemma 3 replaced it by QK-norm); match it.
                     attn_logit_softcap=None,
                     final_logit_softcap=_opt_float(d.get("final_logit_softcapping")))
    else:
        rope_theta, scaling = _rope(_flat_rope_params(d), max_position, default_theta)
        extra = {}

    eos = d.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list)
                                                            else [eos]))
    return ModelConfig(
        arch=arch,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        max_position=max_position,
        rms_eps=float(d.get("rms_norm_eps") or 1e-6),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", default_tie)),
        qkv_bias=model_type == "qwen2",
        hidden_act=_ACTIVATIONS[act],
        layer_types=layer_types,
        sliding_window=window,
        bos_token_id=None if d.get("bos_token_id") is None else int(d["bos_token_id"]),
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


def _opt_float(x) -> float | None:
    return None if x is None else float(x)


def _layer_types(d: Mapping[str, Any], model_type: str,
                 layers: int) -> tuple[tuple[str, ...], int | None]:
    window = d.get("sliding_window")
    if model_type == "llama":
        return ("full",) * layers, None
    if model_type == "mistral":  # one window for every layer (null in Mistral >= v0.2)
        window = d.get("sliding_window", 4096)
        return ("sliding" if window else "full",) * layers, window or None
    names = d.get("layer_types")
    if names is None and model_type == "qwen2":
        window = window if d.get("use_sliding_window") else None
        first = int(d.get("max_window_layers", 28))
        names = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(layers)]
    elif names is None:  # gemma3: every `pattern`-th layer is global
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
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
    if not window:
        raise InputError(f"{model_type}: sliding layers without a sliding_window")
    return types, int(window)


def _flat_rope_params(d: Mapping[str, Any]) -> dict:
    params = d.get("rope_parameters")
    if params:
        return dict(params)
    return {**(d.get("rope_scaling") or {}),
            **({"rope_theta": d["rope_theta"]} if d.get("rope_theta") else {})}


def _gemma3_rope_params(d: Mapping[str, Any], default_theta: float) -> tuple[dict, dict]:
    params = d.get("rope_parameters")
    if params and ("full_attention" in params or "sliding_attention" in params):
        return dict(params.get("full_attention") or {}), dict(
            params.get("sliding_attention") or {})
    full = _flat_rope_params(d)
    local = {"rope_theta": d.get("rope_local_base_freq") or _GEMMA3_LOCAL_THETA}
    return full, local


def _rope(params: Mapping[str, Any], max_position: int,
          default_theta: float) -> tuple[float, RopeScaling]:
    theta = float(params.get("rope_theta") or default_theta)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings")
                                      or max_position))
    raise InputError(f"unsupported rope type {kind!r}")
