"""Hugging Face checkpoint directories -> LoadedModel.

config.json (through `hf_config.config_from_hf_dict`), `model.safetensors` or a sharded
`model.safetensors.index.json`, tokenizer.json with tokenizer_config.json /
chat_template.jinja. Every safetensors header is validated here, against the file size,
before the `safetensors` library sees the file; tensors are then read lazily through it
(numpy framework, bf16 via ml_dtypes) and converted to f32. Pickled checkpoints
(`pytorch_model.bin`) are never read.
"""
from __future__ import annotations

import math
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ml_dtypes  # noqa: F401  (registers numpy's bfloat16, which safetensors hands back)
import numpy as np

from ..errors import InputError, load_json, read_bytes_file, read_text_file
from .errors import ModelFormatError
from .hf_config import config_from_hf_dict
from .loaded import LazyWeights, LoadedModel, check_weight_shapes
from .tokenizer import Tokenizer, library_errors, bos_eos_template

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text", "gemma3")
# safetensors dtype -> bytes per element, for the float types we convert to f32
SAFETENSORS_FLOATS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# every dtype the format defines (for telling "unknown" from "not a float")
SAFETENSORS_DTYPES = {**SAFETENSORS_FLOATS, "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2,
                      "U32": 4, "I32": 4, "U64": 8, "I64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data section
    end: int


def read_safetensors_header(path: str) -> dict[str, SafetensorsEntry]:
    """Validate a .safetensors header against the file; name -> entry (no __metadata__)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open forever
            raise ModelFormatError(path, "not a regular file; expected a safetensors file")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                raise ModelFormatError(path, f"too small for a safetensors header ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n < 2 or n > size - 8 or n > MAX_HEADER_BYTES:
                raise ModelFormatError(path, f"header length {n} does not fit the "
                                             f"{size}-byte file")
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelFormatError(path, "no such file") from None
    except IsADirectoryError:
        raise ModelFormatError(path, "is a directory, not a safetensors file") from None
    except OSError as e:
        raise ModelFormatError(path, f"cannot read: {e}") from None
    if len(raw) != n:
        raise ModelFormatError(path, "file changed while reading its header")
    try:
        header = load_json(raw, "header")
    except InputError as e:
        raise ModelFormatError(path, "header is not JSON: " + str(e).removeprefix(
            "header: ")) from None
    if not isinstance(header, dict):
        raise ModelFormatError(path, "header is not a JSON object")
    data_len = size - 8 - n
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise ModelFormatError(path, "__metadata__ is not a string map")
            continue
        entries[name] = _entry(path, name, spec, data_len)
    spans = sorted((e.begin, e.end, name) for name, e in entries.items())
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise ModelFormatError(path, f"tensor {name!r} starts at {begin}, expected "
                                         f"{position} (gap or overlap in the data section)")
        position = end
    if position != data_len:
        raise ModelFormatError(path, f"tensors cover {position} of the {data_len} data bytes")
    return entries


def _entry(path, name, spec, data_len) -> SafetensorsEntry:
    if not isinstance(spec, dict):
        raise ModelFormatError(path, f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ModelFormatError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise ModelFormatError(path, f"tensor {name!r}: bad shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_uint, offsets)):
        raise ModelFormatError(path, f"tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise ModelFormatError(path, f"tensor {name!r}: data [{begin}, {end}) is outside the "
                                     f"{data_len}-byte data section")
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - begin != expected:
        raise ModelFormatError(path, f"tensor {name!r}: {dtype}{shape} needs {expected} bytes, "
                                     f"the header gives {end - begin}")
    return SafetensorsEntry(dtype, tuple(shape), begin, end)


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# ---- weights -------------------------------------------------------------------------

# Gemma 3 multimodal checkpoints: the text model under language_model (old and new layout).
_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_MULTIMODAL_ONLY = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def _text_name(name: str, multimodal: bool) -> str | None:
    if not multimodal:
        return name
    if _MULTIMODAL_ONLY.match(name):
        return None
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _shard_files(root: str) -> dict[str, list[str]]:
    """file -> tensor names it must hold (None list = everything in it)."""
    single = os.path.join(root, "model.safetensors")
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.isfile(index):
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(index, "no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or os.path.basename(file) != file \
                    or file in ("", ".", ".."):
                raise ModelFormatError(index, f"weight {name!r} maps to bad file {file!r}")
            files.setdefault(os.path.join(root, file), []).append(name)
        return files
    if os.path.isfile(single):
        return {single: []}
    hint = " (pickled pytorch_model.bin checkpoints are not read)" if os.path.exists(
        os.path.join(root, "pytorch_model.bin")) else ""
    raise ModelFormatError(root, f"no model.safetensors or model.safetensors.index.json{hint}")


def _weights(root: str, multimodal: bool):
    """HF name -> (shape, loader) over every shard, with headers validated."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    for file, listed in _shard_files(root).items():
        entries = read_safetensors_header(file)
        missing = [n for n in listed if n not in entries]
        if missing:
            raise ModelFormatError(file, f"the index lists {missing[:3]} here, the file does "
                                         f"not hold them")
        try:
            handle = safe_open(file, framework="numpy")
        except Exception as e:  # SafetensorError; the header was checked, so unexpected
            raise ModelFormatError(file, f"safetensors cannot open it: {e}") from None
        for name in listed or entries:
            target = _text_name(name, multimodal)
            if target is None:
                continue
            entry = entries[name]
            if entry.dtype not in SAFETENSORS_FLOATS:
                raise ModelFormatError(file, f"tensor {name!r} has dtype {entry.dtype}; "
                                             f"weights must be F32/F16/BF16/F64")
            if target in found:
                raise ModelFormatError(file, f"weight {target!r} appears twice")
            found[target] = (entry.shape, _loader(handle, name, file))
    return found


def _loader(handle, name: str, file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            return np.asarray(handle.get_tensor(name), dtype=np.float32)
        except Exception as e:  # the file changed under us
            raise ModelFormatError(file, f"cannot read tensor {name!r}: {e}") from None
    return load


# ---- config, tokenizer ---------------------------------------------------------------

def _read_json(path: str) -> Any:
    """A JSON file of a model directory: a capped read of a regular file (never /dev/zero
    behind a link), its nesting bounded before decoding; errors name the file."""
    try:
        return load_json(read_bytes_file(path, "a JSON file"), path)
    except InputError as e:
        raise ModelFormatError(path, str(e).removeprefix(path + ": ").replace(
            "not valid JSON", "not readable JSON")) from None


def _optional_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ModelFormatError(path, "not a JSON object")
    return data


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(root: str, tok_config: dict) -> str | None:
    jinja = os.path.join(root, "chat_template.jinja")
    if os.path.lexists(jinja):  # capped; a link to /dev/zero or a FIFO is refused
        try:
            return read_text_file(jinja, "a chat template")
        except InputError as e:
            raise ModelFormatError(jinja, str(e).removeprefix(jinja + ": ")) from None
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):  # never silently "none"
        raise ModelFormatError(os.path.join(root, "tokenizer_config.json"),
                               f"chat_template must be a string or a list of named "
                               f"templates, got {type(template).__name__}")
    return template


def _tokenizer(root: str, hf: dict, tok_config: dict, gen_config: dict) -> Tokenizer:
    path = os.path.join(root, "tokenizer.json")
    if not os.path.isfile(path):
        raise ModelFormatError(root, "no tokenizer.json")
    tok = Tokenizer.from_file(path)
    bos_text, eos_text = _token_text(tok_config.get("bos_token")), _token_text(
        tok_config.get("eos_token"))
    bos_ids = _ids(hf.get("bos_token_id")) or (
        [tok.token_to_id(bos_text)] if bos_text and tok.token_to_id(bos_text) is not None else [])
    eos = _ids(hf.get("eos_token_id")) + _ids(gen_config.get("eos_token_id"))
    if eos_text and tok.token_to_id(eos_text) is not None:
        eos.append(tok.token_to_id(eos_text))
    for i in bos_ids + eos:
        if not 0 <= i < tok.vocab_size:
            raise ModelFormatError(root, f"special token id {i} is outside the "
                                         f"{tok.vocab_size}-token vocabulary")
    tok.bos_id = bos_ids[0] if bos_ids else None
    tok.eos_ids = tuple(dict.fromkeys(eos))
    # transformers rebuilds the post-processor when tokenizer_config says explicitly
    # whether to add BOS/EOS; the tokenizer.json's own applies otherwise.
    if "add_bos_token" in tok_config or "add_eos_token" in tok_config:
        def pair(flag, text):
            ok = tok_config.get(flag) and text and tok.token_to_id(text) is not None
            return (text, tok.token_to_id(text)) if ok else None
        with library_errors(path, "invalid bos/eos token"):
            tok.backend.post_processor = bos_eos_template(pair("add_bos_token", bos_text),
                                                          pair("add_eos_token", eos_text))
    return tok


def read_hf_dir(path: str | os.PathLike) -> LoadedModel:
    """Read a Hugging Face checkpoint directory."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ModelFormatError(root, "not a directory" if os.path.exists(root)
                               else "no such directory")
    hf = _read_json(os.path.join(root, "config.json"))
    if not isinstance(hf, dict):
        raise ModelFormatError(os.path.join(root, "config.json"), "not a JSON object")
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelFormatError(os.path.join(root, "config.json"),
                               f"unsupported model_type {model_type!r} (supported: "
                               f"{', '.join(MODEL_TYPES)})")
    multimodal = model_type == "gemma3"
    text_hf = hf.get("text_config") if multimodal else hf
    if not isinstance(text_hf, dict):
        raise ModelFormatError(os.path.join(root, "config.json"), "text_config is not an object")
    # Headers first: the layer count must be bounded by the checkpoint before the config
    # mapping builds per-layer tuples from it.
    found = _weights(root, multimodal)
    layers = text_hf.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= len(found):
        raise ModelFormatError(os.path.join(root, "config.json"),
                               f"num_hidden_layers {layers!r} does not fit a checkpoint of "
                               f"{len(found)} weights")
    try:
        config = config_from_hf_dict(hf)
    except InputError as e:  # names the key
        raise ModelFormatError(os.path.join(root, "config.json"), str(e)) from None
    except (ValueError, KeyError, TypeError, ArithmeticError, AttributeError) as e:
        raise ModelFormatError(os.path.join(root, "config.json"),
                               f"{type(e).__name__}: {e}") from None
    tok_config = _optional_json(os.path.join(root, "tokenizer_config.json"))
    gen_config = _optional_json(os.path.join(root, "generation_config.json"))
    tokenizer = _tokenizer(root, {**hf, **{k: v for k, v in text_hf.items()
                                          if k in ("bos_token_id", "eos_token_id")}},
                           tok_config, gen_config)
    config = replace(config, bos_token_id=tokenizer.bos_id, eos_token_ids=tokenizer.eos_ids)
    ignored = check_weight_shapes(root, config, {n: s for n, (s, _) in found.items()})
    weights = LazyWeights({n: e for n, e in found.items() if n not in ignored})
    return LoadedModel(config, weights, tokenizer, _chat_template(root, tok_config), root)
