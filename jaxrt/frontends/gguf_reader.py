"""GGUF files -> LoadedModel (config, lazily dequantized f32 HF-named weights, tokenizer).

The header is parsed and validated here, against the file size, before any allocation an
untrusted count could size: magic and version, key/value and tensor counts, every string
and array length, tensor dtypes, shapes and data ranges. Dequantization is
`gguf.quants.dequantize`, the function transformers' GGUF loader also calls, and the
post-processing matches transformers' (`modeling_gguf_pytorch_utils.py`): Llama Q/K rows
un-permuted, Gemma norms minus the 1 llama.cpp's converter added.

String arrays (the vocabulary, the merges) come back as `StringArray`s: bounds and UTF-8
are checked while parsing, but the Python strings are only made when something reads the
elements. A warm start that takes its tokenizer from the tokenizer cache never does, and
making 262k strings is most of the parse time for Gemma 3.

(`gguf.GGUFReader` is not used for parsing: it would need the same validation first, and
it takes ~11 s on Gemma 3's 262k-token vocabulary where this parser takes ~0.05 s.)
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from .config import ModelConfig, RopeScaling
from .errors import ModelFormatError
from .loaded import LazyWeights, LoadedModel, check_weight_shapes
from .tokenizer import GEMMA3_CHAT_TEMPLATE, tokenizer_from_gguf

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 counted with 32-bit integers; nothing current writes it
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})

# value type -> (struct format, numpy dtype) of the fixed-size GGUF metadata types
_SCALARS: dict[int, tuple[str, np.dtype]] = {
    0: ("<B", np.dtype("<u1")), 1: ("<b", np.dtype("<i1")), 2: ("<H", np.dtype("<u2")),
    3: ("<h", np.dtype("<i2")), 4: ("<I", np.dtype("<u4")), 5: ("<i", np.dtype("<i4")),
    6: ("<f", np.dtype("<f4")), 7: ("<?", np.dtype("<u1")), 10: ("<Q", np.dtype("<u8")),
    11: ("<q", np.dtype("<i8")), 12: ("<d", np.dtype("<f8")),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_U64 = struct.Struct("<Q")


class StringArray(Sequence[str]):
    """A GGUF array of strings, validated but decoded only on first element access.

    `raw` is the array's bytes exactly as in the file (each string as a u64 length and its
    UTF-8 bytes): the tokenizer cache hashes it instead of the decoded strings. It compares
    equal to any sequence of the same strings (a list, as the parser used to return).
    """

    __slots__ = ("raw", "_starts", "_items")
    __hash__ = None  # type: ignore[assignment]  # like list: equality is by contents

    def __init__(self, raw: bytes, starts: np.ndarray):
        self.raw = raw
        self._starts = starts  # int64 offset of each element's length field in `raw`
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return len(self._starts)

    def tolist(self) -> list[str]:
        return list(self._decoded())

    def __getitem__(self, index):
        return self._decoded()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return self.raw == other.raw
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes, bytearray)):
            return len(other) == len(self) and self._decoded() == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings, {len(self.raw)} bytes)"

    def _decoded(self) -> list[str]:
        if self._items is None:
            self._items = _decode_strings(self.raw, self._starts)
        return self._items


def _joined(raw: bytes, starts: np.ndarray) -> bytes:
    """The strings of `raw`, each preceded by one NUL byte: the lengths' low 7 bytes are
    dropped, the high byte (0: a length below 2**56, so any length a file can hold) stays
    as the separator. An ASCII separator cannot complete a multi-byte sequence, so this
    decodes as UTF-8 exactly when every string does."""
    keep = np.ones(len(raw), dtype=bool)
    for i in range(7):
        keep[starts + i] = False
    return np.frombuffer(raw, dtype=np.uint8)[keep].tobytes()


def _decode_strings(raw: bytes, starts: np.ndarray) -> list[str]:
    """All strings at once: one decode and one split instead of a decode per string."""
    parts = _joined(raw, starts).decode("utf-8").split("\0")
    if len(parts) == len(starts) + 1:
        return parts[1:]
    # Some string holds a NUL itself: one at a time.
    ends = np.append(starts[1:], len(raw)).tolist()
    return [raw[s + 8:e].decode("utf-8") for s, e in zip(starts.tolist(), ends)]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists dimensions fastest-first)
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    # scalars as Python values, numeric arrays as numpy arrays, string arrays as StringArray
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int


# ---- header parsing ------------------------------------------------------------------

class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, message: str):
        raise ModelFormatError(self.path, message)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, "
                      f"file has {self.size}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values if len(values) > 1 else values[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", f"{what} length")
        self.need(length, f"{what} ({length} bytes)")
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def strings(self, count: int, what: str) -> StringArray:
        """`count` strings, walked (bounds) and checked (UTF-8) but not decoded."""
        self.need(count * 8, f"{what} of {count} strings")
        start, buf, unpack = self.pos, self.buf, _U64.unpack_from
        starts = array("q")
        add, pos = starts.append, start
        try:
            for _ in range(count):
                add(pos - start)
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):  # a length ran past the end of the buffer
            pos = self.size + 1
        if pos > self.size:
            self._strings_slowly(count, what)  # fails with the element's position
            self.fail(f"truncated: {what} runs past the end of the file ({self.size} bytes)")
        raw = bytes(buf[start:pos])
        offsets = np.frombuffer(starts, dtype=np.int64)
        try:
            _joined(raw, offsets).decode("utf-8")
        except UnicodeDecodeError:
            self._strings_slowly(count, what)  # fails naming the element
            self.fail(f"{what} is not valid UTF-8")
        self.pos = pos
        return StringArray(raw, offsets)

    def _strings_slowly(self, count: int, what: str) -> None:
        """Walk again one string at a time, only to fail naming the bad element."""
        start = self.pos
        try:
            for i in range(count):
                self.string(f"element #{i} of {what}")
        finally:
            self.pos = start

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        self.need(count * dtype.itemsize, f"{what} ({count} x {dtype.itemsize} bytes)")
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return out


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate a GGUF header (metadata and tensor table) without reading data."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 24:
                raise ModelFormatError(path, f"too small for a GGUF header ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, size, path))
    except ModelFormatError:  # already names the problem (and is a ValueError)
        raise
    except FileNotFoundError:
        raise ModelFormatError(path, "no such file") from None
    except IsADirectoryError:
        raise ModelFormatError(path, "is a directory, not a GGUF file") from None
    except PermissionError:
        raise ModelFormatError(path, "permission denied") from None
    except (OSError, ValueError) as e:  # mmap of special files, I/O errors
        raise ModelFormatError(path, f"cannot read: {e}") from None


def _parse(c: _Cursor) -> GGUFHeader:
    magic = bytes(c.buf[0:4])
    if magic != GGUF_MAGIC:
        c.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian file?)" if version >= 1 << 16 else ""
        c.fail(f"unsupported GGUF version {version}{hint}; supported: {SUPPORTED_VERSIONS}")
    n_tensors, n_kv = c.unpack("<QQ", "counts")
    # Every key/value takes >= 13 bytes (8 key length, 4 type, 1 value), every tensor
    # info >= 32: counts beyond that cannot be honest, and would make us loop for nothing.
    if n_kv * 13 > c.size - c.pos:
        c.fail(f"metadata count {n_kv} cannot fit in a {c.size}-byte file")
    if n_tensors * 32 > c.size - c.pos:
        c.fail(f"tensor count {n_tensors} cannot fit in a {c.size}-byte file")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        if key in metadata:
            c.fail(f"duplicate metadata key {key!r}")
        vtype = c.unpack("<I", f"type of {key!r}")
        metadata[key] = _value(c, vtype, key)

    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}")
        n_dims = c.unpack("<I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = [c.unpack("<Q", f"dimensions of {name!r}") for _ in range(n_dims)]
        raw_type, offset = c.unpack("<IQ", f"type and offset of {name!r}")
        infos.append((name, dims, raw_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment > 1 << 20:
        c.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            c.fail(f"duplicate tensor {name!r}")
        tensors[name] = _tensor(c, name, dims, raw_type, offset, alignment, data_start)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            c.fail(f"tensors {a!r} and {b!r} overlap")
    return GGUFHeader(version, metadata, tensors, data_start, c.size)


def _value(c: _Cursor, vtype: int, key: str):
    if vtype in _SCALARS:
        fmt, _ = _SCALARS[vtype]
        value = c.unpack(fmt, f"value of {key!r}")
        if vtype == _BOOL:
            value = bool(value)
        return value
    if vtype == _STRING:
        return c.string(f"value of {key!r}")
    if vtype == _ARRAY:  # of scalars or strings; nested arrays are not supported
        etype, count = c.unpack("<IQ", f"array header of {key!r}")
        if etype in _SCALARS:
            values = c.array(_SCALARS[etype][1], count, f"array {key!r}")
            return values.astype(bool) if etype == _BOOL else values
        if etype == _STRING:
            return c.strings(count, f"array {key!r}")
        c.fail(f"array {key!r} has unsupported element type {etype}")
    c.fail(f"metadata {key!r} has unknown value type {vtype}")


def _tensor(c: _Cursor, name, dims, raw_type, offset, alignment, data_start) -> TensorInfo:
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        c.fail(f"tensor {name!r} has unknown ggml type {raw_type}")
    if qtype not in SUPPORTED_TYPES:
        c.fail(f"tensor {name!r} has unsupported quantization type {qtype.name}; supported: "
               f"{sorted(t.name for t in SUPPORTED_TYPES)}")
    if any(d == 0 for d in dims):
        c.fail(f"tensor {name!r} has a zero dimension {dims}")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        c.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
               f"{qtype.name} block size {block}")
    nbytes = math.prod(dims) // block * block_bytes
    if offset % alignment:
        c.fail(f"tensor {name!r} data offset {offset} is not aligned to {alignment}")
    start = data_start + offset
    if start + nbytes > c.size:
        c.fail(f"tensor {name!r} data [{start}, {start + nbytes}) runs past the end of the "
               f"file ({c.size} bytes)")
    return TensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)


# ---- metadata -> ModelConfig ---------------------------------------------------------

ARCHITECTURES = ("llama", "qwen2", "gemma3")


class _Meta:
    """Typed access to `{arch}.*` keys, failing with the key's name."""

    def __init__(self, meta: dict[str, Any], arch: str, path: str):
        self.meta, self.arch, self.path = meta, arch, path

    def fail(self, message: str):
        raise ModelFormatError(self.path, message)

    def get(self, key: str, kind: type, default=None, *, required: bool = False):
        full = f"{self.arch}.{key}"
        value = self.meta.get(full)
        if value is None:
            if required:
                self.fail(f"metadata {full} is missing")
            return default
        if kind is int:
            if isinstance(value, np.ndarray):
                self.fail(f"metadata {full} is per-layer ({value.tolist()[:4]}...), "
                          f"which is not supported")
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(f"metadata {full} = {value!r} is not an integer")
            return value
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                self.fail(f"metadata {full} = {value!r} is not a finite number")
            return float(value)
        if not isinstance(value, kind):
            self.fail(f"metadata {full} = {value!r} is not a {kind.__name__}")
        return value

    def positive(self, key: str, default=None, *, required: bool = False) -> int:
        value = self.get(key, int, default, required=required)
        if value is not None and value <= 0:
            self.fail(f"metadata {self.arch}.{key} = {value} must be positive")
        return value


def config_from_gguf(header: GGUFHeader, path: str) -> ModelConfig:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(path, "metadata general.architecture is missing")
    if arch not in ARCHITECTURES:
        raise ModelFormatError(path, f"unknown architecture {arch!r} (supported: "
                                     f"{', '.join(ARCHITECTURES)})")
    m = _Meta(meta, arch, path)
    gemma = arch == "gemma3"
    hidden = m.positive("embedding_length", required=True)
    heads = m.positive("attention.head_count", required=True)
    kv_heads = m.positive("attention.head_count_kv", heads)
    layers = m.positive("block_count", required=True)
    if layers > len(header.tensors):  # before anything is sized by it
        m.fail(f"block_count {layers} but only {len(header.tensors)} tensors")
    if heads % kv_heads:
        m.fail(f"{heads} attention heads are not a multiple of {kv_heads} kv heads")
    head_dim = m.positive("attention.key_length")
    if head_dim is None:
        if hidden % heads:
            m.fail(f"embedding_length {hidden} is not a multiple of {heads} heads")
        head_dim = hidden // heads
    value_dim = m.positive("attention.value_length", head_dim)
    rope_dims = m.positive("rope.dimension_count", head_dim)
    if value_dim != head_dim or rope_dims != head_dim:
        m.fail(f"value_length {value_dim} / rope.dimension_count {rope_dims} differ from "
               f"head dim {head_dim} (unsupported)")
    embed = header.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        m.fail("tensor token_embd.weight is missing or not 2-D")
    vocab = m.positive("vocab_size", embed.shape[0])
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (list, StringArray)) and len(tokens) != vocab:
        m.fail(f"{len(tokens)} tokenizer tokens for a vocabulary of {vocab}")

    eps = m.get("attention.layer_norm_rms_epsilon", float, 1e-6 if gemma else 1e-5)
    if not eps > 0:
        m.fail(f"layer_norm_rms_epsilon {eps} must be positive")
    theta = m.get("rope.freq_base", float, 1e6 if gemma else 1e4)
    if not theta > 0:
        m.fail(f"rope.freq_base {theta} must be positive")
    extra: dict[str, Any] = {}
    if gemma:
        window = m.positive("attention.sliding_window", required=True)
        extra = dict(
            hidden_act="gelu_tanh",
            sliding_window=window,
            layer_types=_gemma3_layer_types(m, layers),
            # llama.cpp (and HF's configs): local layers rotate with base 10000; the 27B
            # model (62 layers) scales queries by hidden/heads, every other by head_dim.
            rope_local_theta=10000.0,
            query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
            attn_logit_softcap=m.get("attn_logit_softcapping", float),
            final_logit_softcap=m.get("final_logit_softcapping", float),
        )
    return ModelConfig(
        arch="gemma3" if gemma else "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=m.positive("feed_forward_length", required=True),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position=m.positive("context_length", 2048),
        rms_eps=eps,
        rope_theta=theta,
        rope_scaling=_rope_scaling(m, header),
        tie_embeddings="output.weight" not in header.tensors,
        qkv_bias="blk.0.attn_q.bias" in header.tensors,
        bos_token_id=_token_id(meta, "bos", path),
        eos_token_ids=(),  # filled from the tokenizer (EOS plus end-of-turn tokens)
        model_type="gemma3_text" if gemma else arch,
        **extra,
    )


def _token_id(meta, key, path) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(path, f"tokenizer.ggml.{key}_token_id {value!r} is not an id")
    return value


def _gemma3_layer_types(m: _Meta, layers: int) -> tuple[str, ...]:
    pattern = m.meta.get(f"{m.arch}.attention.sliding_window_pattern")
    if isinstance(pattern, np.ndarray):  # one flag per layer, True = sliding
        if pattern.shape != (layers,):
            m.fail(f"attention.sliding_window_pattern has {pattern.size} entries for "
                   f"{layers} layers")
        return tuple("sliding" if flag else "full" for flag in pattern)
    period = m.positive("attention.sliding_window_pattern", 6)
    # Every period-th layer is global (transformers' Gemma3TextConfig, llama.cpp's
    # set_swa_pattern(6)).
    return tuple("sliding" if (i + 1) % period else "full" for i in range(layers))


def _rope_scaling(m: _Meta, header: GGUFHeader) -> RopeScaling:
    kind = m.get("rope.scaling.type", str, "none")
    freqs = header.tensors.get("rope_freqs.weight")
    if freqs is not None:
        if kind not in ("none", "llama3"):
            m.fail(f"rope_freqs tensor together with rope.scaling.type {kind!r}")
        return _llama3_scaling_from_freqs(m, header, freqs)
    if kind == "none":
        return RopeScaling()
    if kind == "linear":
        factor = m.get("rope.scaling.factor", float, required=True)
        if not factor > 0:
            m.fail(f"rope.scaling.factor {factor} must be positive")
        return RopeScaling("linear", factor=factor)
    m.fail(f"unsupported rope.scaling.type {kind!r}")


def _llama3_scaling_from_freqs(m: _Meta, header: GGUFHeader, info: TensorInfo) -> RopeScaling:
    """llama.cpp stores Llama 3.1+ RoPE scaling as per-frequency divisors (`rope_freqs`),
    computed from (factor, low 1, high 4, original 8192). Recover the parameters and check
    they reproduce every divisor, so a file made differently fails instead of running wrong."""
    head_dim = m.positive("attention.key_length") or \
        m.positive("embedding_length") // m.positive("attention.head_count")
    theta = m.get("rope.freq_base", float, 1e4)
    if info.qtype != Q.F32 or info.shape != (head_dim // 2,):
        m.fail(f"rope_freqs.weight is {info.qtype.name}{list(info.shape)}, expected "
               f"F32[{head_dim // 2}]")
    stored = _read_raw(header, info, m.path).view(np.float32)
    factor = float(stored.max())
    scaling = RopeScaling("llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position=8192)
    if not np.allclose(stored, _llama3_divisors(scaling, theta, head_dim), rtol=1e-5, atol=0):
        m.fail("rope_freqs.weight does not match Llama 3 scaling with low/high frequency "
               "factors 1/4 and original context 8192 (unsupported)")
    return scaling


def _llama3_divisors(s: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / \
        (s.high_freq_factor - s.low_freq_factor)
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, mid))


# ---- tensors -------------------------------------------------------------------------

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_COMMON_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm"}
# gguf-py's tensor map (MODEL_TENSOR.FFN_NORM etc.), the one transformers goes through.
_LAYER_NAMES = {
    "llama": {**_COMMON_LAYER, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {**_COMMON_LAYER, "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm",
               "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_LAYER_NAMES["qwen2"] = _LAYER_NAMES["llama"]
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES[arch] or m.group(1) != str(int(m.group(1))):
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[arch][m.group(2)]}.{m.group(3)}"


def _read_raw(header: GGUFHeader, info: TensorInfo, path: str, data=None) -> np.ndarray:
    if data is None:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size != header.file_size:
        raise ModelFormatError(path, f"file changed size while reading ({data.size} bytes, "
                                     f"was {header.file_size})")
    block, block_bytes = GGML_QUANT_SIZES[info.qtype]
    row_bytes = info.shape[-1] // block * block_bytes
    return data[info.offset:info.offset + info.nbytes].reshape(*info.shape[:-1], row_bytes)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row interleave (transformers' `_reverse_permute_weights`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1) \
        .reshape(w.shape)


def _loader(header: GGUFHeader, info: TensorInfo, path: str, data: np.ndarray,
            post: Callable[[np.ndarray], np.ndarray] | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        raw = _read_raw(header, info, path, data)
        w = np.array(dequantize(raw, info.qtype), dtype=np.float32)  # [*shape], owned
        return post(w) if post is not None else w
    return load


def read_gguf(path: str | os.PathLike) -> LoadedModel:
    """Read a GGUF model: validated header, ModelConfig, lazy f32 weights, tokenizer."""
    path = os.fspath(path)
    header = read_gguf_header(path)
    config = config_from_gguf(header, path)
    arch = header.metadata["general.architecture"]

    names: dict[str, TensorInfo] = {}
    for gguf_name, info in header.tensors.items():
        if gguf_name == "rope_freqs.weight":  # folded into config.rope_scaling
            continue
        name = hf_name(gguf_name, arch)
        if name is None:
            raise ModelFormatError(path, f"unexpected tensor {gguf_name!r} for architecture "
                                         f"{arch!r}")
        names[name] = info
    check_weight_shapes(path, config, {n: i.shape for n, i in names.items()})

    data = np.memmap(path, dtype=np.uint8, mode="r")
    entries = {}
    for name, info in names.items():
        post = None
        if arch == "llama" and re.search(r"\.[qk]_proj\.(weight|bias)$", name):
            n_head = config.num_heads if ".q_proj." in name else config.num_kv_heads
            post = (lambda n: lambda w: _unpermute_rows(w, n))(n_head)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's RMSNorm weights as 1 + w; transformers subtracts it.
            post = lambda w: w - np.float32(1)  # noqa: E731
        entries[name] = (info.shape, _loader(header, info, path, data, post))

    tokenizer = tokenizer_from_gguf(header.metadata, path)
    config = replace(config, eos_token_ids=tokenizer.eos_ids)
    template = header.metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):  # never silently "none"
        raise ModelFormatError(path, f"metadata tokenizer.chat_template must be a string, "
                                     f"got {type(template).__name__}")
    if template is None:
        if arch == "gemma3" and tokenizer.token_to_id("<start_of_turn>") is not None:
            template = GEMMA3_CHAT_TEMPLATE
    return LoadedModel(config, LazyWeights(entries), tokenizer, template, path)
