"""Engine directories are input: everything in one is validated before it is used.

`engine.json` must match its schema exactly (no missing, extra or mistyped key); the
config it records must be a valid ModelConfig; the IR (`model.jxr`) must agree with it
(vocabulary, KV cache plan) and declare only float weights (or the i8 / fp8 codes of
quantized projections); the KV cache it declares must fit this device's memory budget
before anything is allocated. Text files are read capped (`jaxrt.errors.read_text_file`). Every failure is a `ModelFormatError` naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from .errors import InputError, ResourceLimitError, load_json, read_text_file
from .frontends.config import ModelConfig, RopeScaling
from .frontends.errors import ModelFormatError

ENGINE_KEYS = {"format", "jaxrt_version", "source", "pipeline", "config", "kv_cache",
               "tokenizer"}
TOKENIZER_KEYS = {"bos_id", "eos_ids"}
# A tokenizer.json is JSON text; the largest real ones are tens of MB.
MAX_TOKENIZER_BYTES = 256 << 20
_FLOAT_WEIGHT_DTYPES = {"f32", "bf16", "f16"}
# Codes of quantized weights (quant.linear operands); their scales are f32.
_QUANT_WEIGHT_DTYPES = {"i8", "f8e4m3fn"}


def read_engine_meta(path: str, engine_format: int) -> dict[str, Any]:
    """engine.json, parsed and checked against its schema."""
    meta_path = os.path.join(path, "engine.json")
    try:
        meta = load_json(read_text_file(meta_path, "engine.json"), meta_path)
    except InputError as e:
        raise ModelFormatError(meta_path, _strip(str(e), meta_path)) from None
    if not isinstance(meta, dict):
        raise ModelFormatError(meta_path, f"not a JSON object ({type(meta).__name__})")
    if meta.get("format") != engine_format:
        raise ModelFormatError(meta_path, f"unsupported engine format {meta.get('format')!r} "
                                          f"(this jaxrt reads format {engine_format})")
    fail = lambda message: ModelFormatError(meta_path, message)  # noqa: E731
    _exact_keys(meta, ENGINE_KEYS, "", fail)
    for key in ("jaxrt_version", "source", "pipeline"):
        if not isinstance(meta[key], str):
            raise fail(f"{key} must be a string, got {meta[key]!r:.40}")
    if meta["kv_cache"] is not None and not isinstance(meta["kv_cache"], dict):
        raise fail(f"kv_cache must be an object or null, got {meta['kv_cache']!r:.40}")
    tok = meta["tokenizer"]
    if not isinstance(tok, dict):
        raise fail(f"tokenizer must be an object, got {tok!r:.40}")
    _exact_keys(tok, TOKENIZER_KEYS, "tokenizer.", fail)
    if tok["bos_id"] is not None and not _is_index(tok["bos_id"]):
        raise fail(f"tokenizer.bos_id must be a token id or null, got {tok['bos_id']!r:.40}")
    if not isinstance(tok["eos_ids"], list) or not all(_is_index(i) for i in tok["eos_ids"]):
        raise fail(f"tokenizer.eos_ids must be a list of token ids, got "
                   f"{tok['eos_ids']!r:.40}")
    meta["config"] = config_from_engine(meta["config"], fail)
    for i in [tok["bos_id"]] * (tok["bos_id"] is not None) + tok["eos_ids"]:
        if i >= meta["config"].vocab_size:
            raise fail(f"tokenizer special token id {i} is outside the vocabulary of "
                       f"{meta['config'].vocab_size}")
    return meta


def config_from_engine(d: Any, fail) -> ModelConfig:
    """A ModelConfig from its `to_dict()` form, every field checked by type and range."""
    if not isinstance(d, dict):
        raise fail(f"config must be an object, got {d!r:.40}")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    _exact_keys(d, set(fields), "config.", fail)  # save_engine writes every field
    out: dict[str, Any] = {}
    for name, value in d.items():
        where = f"config.{name}"
        if name == "rope_scaling":
            out[name] = _rope_scaling(value, fail)
        elif name in ("arch", "hidden_act", "model_type"):
            if not isinstance(value, str):
                raise fail(f"{where} must be a string, got {value!r:.40}")
            out[name] = value
        elif name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(value, bool):
                raise fail(f"{where} must be true or false, got {value!r:.40}")
            out[name] = value
        elif name == "layer_types":
            if not isinstance(value, list) or not all(v in ("full", "sliding") for v in value):
                raise fail(f"{where} must be a list of 'full'/'sliding', got {value!r:.60}")
            out[name] = tuple(value)
        elif name == "eos_token_ids":
            if not isinstance(value, list) or not all(_is_index(v) for v in value):
                raise fail(f"{where} must be a list of token ids, got {value!r:.40}")
            out[name] = tuple(value)
        elif name == "bos_token_id":
            if value is not None and not _is_index(value):
                raise fail(f"{where} must be a token id or null, got {value!r:.40}")
            out[name] = value
        elif fields[name].type in ("int", "int | None"):
            if value is None and "None" in fields[name].type:
                out[name] = None
            elif not _is_index(value) or value < 1:
                raise fail(f"{where} must be a positive integer, got {value!r:.40}")
            else:
                out[name] = value
        else:  # float, float | None
            if value is None and "None" in fields[name].type:
                out[name] = None
            elif not _is_positive(value):
                raise fail(f"{where} must be a positive finite number, got {value!r:.40}")
            else:
                out[name] = float(value)
    try:
        return ModelConfig(**out)
    except (InputError, TypeError) as e:
        raise fail(f"config: {e}") from None


def _rope_scaling(value: Any, fail) -> RopeScaling:
    if not isinstance(value, dict):
        raise fail(f"config.rope_scaling must be an object, got {value!r:.40}")
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    _exact_keys(value, fields, "config.rope_scaling.", fail)
    for k, v in value.items():
        if k == "kind":
            if v not in ("none", "linear", "llama3"):
                raise fail(f"config.rope_scaling.kind {v!r:.40} is not none/linear/llama3")
        elif k == "original_max_position":
            if not _is_index(v) or v < 1:
                raise fail(f"config.rope_scaling.{k} must be a positive integer, got {v!r:.40}")
        elif not _is_positive(v):
            raise fail(f"config.rope_scaling.{k} must be a positive finite number, got "
                       f"{v!r:.40}")
    return RopeScaling(**value)


def check_module(module, meta: dict[str, Any], ir_path: str, meta_path: str) -> None:
    """model.jxr against engine.json: vocabulary, KV cache plan, weight dtypes."""
    config: ModelConfig = meta["config"]
    step = module.functions.get("step")
    if step is None or len(step.args) != 8 or len(step.results) != 2:
        raise ModelFormatError(ir_path, "no @step function with the serving signature "
                                        "(8 arguments, logits and cache results)")
    logits = step.results[0].type
    if len(logits.shape) != 2 or logits.shape[1] != config.vocab_size:
        raise ModelFormatError(meta_path, f"config.vocab_size = {config.vocab_size}, but "
                                          f"{os.path.basename(ir_path)} computes logits "
                                          f"{logits}")
    for name, t in module.weights.items():
        if t.dtype.value not in _FLOAT_WEIGHT_DTYPES | _QUANT_WEIGHT_DTYPES:
            raise ModelFormatError(ir_path, f"weight {name} is {t}: engine weights are "
                                            f"f32, bf16, f16, or i8 / f8e4m3fn codes")
        if name.endswith("embed_tokens.weight") and t.shape[0] != config.vocab_size:
            raise ModelFormatError(meta_path, f"config.vocab_size = {config.vocab_size}, but "
                                              f"weight {name} has {t.shape[0]} rows")
    plan = module.attributes.get("kv_cache")
    if not isinstance(plan, dict):
        raise ModelFormatError(ir_path, "no kv_cache plan in the module attributes")
    if meta["kv_cache"] != plan:
        raise ModelFormatError(meta_path, "kv_cache differs from the plan in "
                                          f"{os.path.basename(ir_path)}")
    kv = step.args[7].type
    pages, page_size = plan.get("num_pages"), plan.get("page_size")
    if not kv.is_static or len(kv.shape) != 6 or (kv.shape[2], kv.shape[3]) != (pages,
                                                                             page_size):
        raise ModelFormatError(ir_path, f"the KV cache argument {kv} does not hold the "
                                        f"planned {pages} pages of {page_size} tokens")
    if not _is_index(plan.get("max_model_len")) or not \
            0 < plan["max_model_len"] <= pages * page_size:
        raise ModelFormatError(ir_path, f"kv_cache max_model_len {plan.get('max_model_len')!r}"
                                        f" does not fit {pages} pages of {page_size} tokens")
    recorded = module.attributes.get("config")
    try:
        same = json.loads(json.dumps(recorded)) == config.to_dict()
    except (TypeError, ValueError):
        same = False
    if not same:  # the IR is what runs: a config that disagrees with it is refused
        raise ModelFormatError(meta_path, f"config differs from the one recorded in "
                                          f"{os.path.basename(ir_path)}")


def check_kv_budget(module, ir_path: str, budget_bytes: int) -> None:
    """Refuse a cache larger than `budget_bytes` before anything is allocated. On a mesh
    (the shard pass) both are per device: a device holds its KV heads."""
    from .ir.sharding import device_split, kv_spec, mesh_of
    kv = module.functions["step"].args[7].type
    need = kv.nbytes() // device_split(kv_spec(module), mesh_of(module))
    if need > budget_bytes:
        raise ResourceLimitError(
            f"{ir_path}: the KV cache {kv} needs {need / 2**30:.2f} GiB; this device's "
            f"budget for it is {budget_bytes / 2**30:.2f} GiB (recompile the engine with "
            f"`jaxrt compile` for this device)")


def check_tokenizer_file(path: str) -> None:
    """Only a regular file of bounded size is handed to the tokenizers library."""
    import stat
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFormatError(path, "missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(path, "not a regular file")
    if st.st_size > MAX_TOKENIZER_BYTES:
        raise ModelFormatError(path, f"{st.st_size} bytes, over the {MAX_TOKENIZER_BYTES}-"
                                     f"byte limit")


def _exact_keys(d: dict, expected: set[str], prefix: str, fail,
                optional: set[str] = frozenset()) -> None:
    extra = sorted(set(d) - expected)
    if extra:
        raise fail(f"unexpected key {prefix}{extra[0]!s:.40}")
    missing = sorted(expected - set(d) - optional)
    if missing:
        raise fail(f"missing key {prefix}{missing[0]}")


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
        and x > 0


def _strip(message: str, path: str) -> str:
    return message[len(path) + 2:] if message.startswith(path + ": ") else message
