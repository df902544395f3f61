"""Fuzzed GGUF and safetensors inputs: the readers either load the model (and every
weight then materializes) or raise ModelFormatError; never another exception, never an
allocation sized by a lying header."""
from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import tempfile
import tracemalloc

from frontends_synth import write_tiny_gguf, write_tiny_hf_dir
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxrt.frontends.errors import ModelFormatError
from jaxrt.frontends.gguf_reader import read_gguf, read_gguf_header
from jaxrt.frontends.hf_reader import read_hf_dir

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def _workdir() -> str:
    return tempfile.mkdtemp(prefix="jaxrt_fuzz_")


@functools.lru_cache(maxsize=None)
def tiny_gguf_bytes(tokenizer: str) -> bytes:
    path = write_tiny_gguf(os.path.join(_workdir(), f"base_{tokenizer}.gguf"),
                           tokenizer=tokenizer, arch="llama" if tokenizer == "gpt2" else "gemma3",
                           hidden=32, ff=32)
    return open(path, "rb").read()


def _load_everything(load, path, size: int) -> None:
    """Read, materialize all weights, encode some text; only ModelFormatError may escape.
    Peak Python/numpy allocation stays within a fixed multiple of the input size: f32
    output is at most 8x a 4-bit input, plus a few copies and the tokenizer."""
    tracemalloc.start()
    try:
        model = load(path)
        for name in model.weights:
            model.weights[name]
        model.tokenizer.encode("hello <|im_start|> world 123")
        model.tokenizer.decode(list(range(min(50, model.tokenizer.vocab_size))))
    except ModelFormatError as e:
        assert str(e).startswith(os.fspath(path)) or ": " in str(e)
        assert "\n" not in str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * size + (64 << 20), f"peak {peak} bytes for a {size}-byte input"


def _write(name: str, blob: bytes) -> str:
    path = os.path.join(_workdir(), name)
    with open(path, "wb") as f:
        f.write(blob)
    return path


# ---- GGUF -----------------------------------------------------------------------------

_INTERESTING_U64 = [0, 1, 2, 3, 7, 31, 32, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1,
                    2**32, 2**40, 2**62, 2**63, 2**64 - 1]


@functools.lru_cache(maxsize=None)
def tiny_gguf_header_end(tokenizer: str) -> int:
    path = _write(f"probe_{tokenizer}.gguf", tiny_gguf_bytes(tokenizer))
    return read_gguf_header(path).data_start


@st.composite
def mutated_gguf(draw):
    tokenizer = draw(st.sampled_from(["gpt2", "llama"]))
    blob = bytearray(tiny_gguf_bytes(tokenizer))
    header_end = tiny_gguf_header_end(tokenizer)
    for _ in range(draw(st.integers(1, 4))):
        if not blob:
            break
        kind = draw(st.sampled_from(["bytes", "u64", "u32", "truncate"]))
        # mostly the header, where every length and count lives
        at = draw(st.one_of(st.integers(0, header_end + 16), st.integers(0, len(blob) - 1)))
        if kind == "bytes":
            data = draw(st.binary(min_size=1, max_size=8))
        elif kind == "u64":
            data = struct.pack("<Q", draw(st.sampled_from(_INTERESTING_U64 + [len(blob)])))
        elif kind == "u32":
            data = struct.pack("<I", draw(st.sampled_from(_INTERESTING_U64[:14])) & 0xFFFFFFFF)
        else:
            del blob[draw(st.integers(0, len(blob))):]
            continue
        blob[at:at + len(data)] = data
    return bytes(blob)


@FUZZ
@given(blob=mutated_gguf())
def test_mutated_gguf_files(blob):
    _load_everything(read_gguf, _write("fuzz.gguf", blob), len(blob))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_real_gguf_header_prefixes(smollm2_path, data):
    """The real SmolLM2 header (49k tokens, 49k merges), cut and mutated: never loads
    (the tensor data is gone), always a ModelFormatError."""
    header_end = read_gguf_header(smollm2_path).data_start
    with open(smollm2_path, "rb") as f:
        head = bytearray(f.read(header_end))
    cut = data.draw(st.integers(0, header_end))
    head = head[:cut]
    for _ in range(data.draw(st.integers(0, 3))):
        if not head:
            break
        at = data.draw(st.integers(0, min(len(head) - 1, 4096)))
        value = data.draw(st.sampled_from(_INTERESTING_U64))
        head[at:at + 8] = struct.pack("<Q", value)
    path = _write("prefix.gguf", bytes(head))
    try:
        read_gguf(path)
    except ModelFormatError:
        return
    raise AssertionError("a GGUF file without its tensor data loaded")


# ---- safetensors ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tiny_hf_template() -> str:
    return write_tiny_hf_dir(os.path.join(_workdir(), "hf_template"))


def _hf_dir_with(weights_blob: bytes) -> str:
    root = os.path.join(_workdir(), "hf_fuzz")
    if os.path.isdir(root):
        shutil.rmtree(root)
    shutil.copytree(tiny_hf_template(), root)
    with open(os.path.join(root, "model.safetensors"), "wb") as f:
        f.write(weights_blob)
    return root


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8:8 + n]), blob[8 + n:]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                   max_size=3),
    max_leaves=8)


@st.composite
def mutated_safetensors(draw):
    blob = open(os.path.join(tiny_hf_template(), "model.safetensors"), "rb").read()
    header, data = _split(blob)
    kind = draw(st.sampled_from(["field", "entry", "bytes", "length", "truncate"]))
    if kind in ("field", "entry"):
        name = draw(st.sampled_from(sorted(header)))
        if kind == "field":
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            value = draw(st.one_of(json_values, st.sampled_from(
                ["F32", "BF16", "F16", "I64", "F8_E4M3", [0, 2**63], [2**40, 2**40], [-1, 4],
                 [3, 1], [0, len(data) + 4]])))
            header[name] = {**header[name], field: value} if isinstance(header[name], dict) \
                else value
        else:
            header[name] = draw(json_values)
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data
    if kind == "bytes":
        out = bytearray(blob)
        at = draw(st.integers(0, min(len(out) - 1, 8 + len(json.dumps(header)) + 8)))
        chunk = draw(st.binary(min_size=1, max_size=6))
        out[at:at + len(chunk)] = chunk
        return bytes(out)
    if kind == "length":
        value = draw(st.sampled_from(_INTERESTING_U64 + [len(blob), len(blob) - 8]))
        return struct.pack("<Q", value) + blob[8:]
    return blob[:draw(st.integers(0, len(blob)))]


@FUZZ
@given(blob=mutated_safetensors())
def test_mutated_safetensors_files(blob):
    _load_everything(read_hf_dir, _hf_dir_with(blob), len(blob))


@FUZZ
@given(key=st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "vocab_size", "intermediate_size",
                            "head_dim", "rope_theta", "rope_scaling", "tie_word_embeddings",
                            "model_type", "max_position_embeddings", "rms_norm_eps",
                            "sliding_window", "eos_token_id", "bos_token_id"]),
       value=json_values)
def test_mutated_config_json(key, value):
    root = _hf_dir_with(open(os.path.join(tiny_hf_template(), "model.safetensors"),
                             "rb").read())
    path = os.path.join(root, "config.json")
    with open(path) as f:
        config = json.load(f)
    config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)
    _load_everything(read_hf_dir, root, 1 << 16)
