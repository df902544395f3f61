"""Tokenizer: a thin wrapper over the `tokenizers` library, built from a tokenizer.json or
from GGUF metadata, plus the chat-template renderer.

The GGUF builders reproduce what transformers' GGUF converter builds
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so ids agree with
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`; the one deliberate difference is the
"smollm" pre-tokenizer, where we follow llama.cpp (numbers split into single digits, as the
original SmolLM2 tokenizer does) and transformers falls back to plain GPT-2 splitting.

Building a GGUF tokenizer is slow (Gemma 3's 262k-piece SentencePiece vocabulary: deriving
515k merges from scores, then the BPE model, ~2.5 s on two cores), so the result is kept in

    $JAXRT_CACHE_DIR/tokenizers/<key>.json   (default ~/.cache/jaxrt/tokenizers)

and read back with `tokenizers.Tokenizer.from_str` (~1 s for Gemma 3, nearly all of it
the library parsing 262k pieces and 515k merges).

- key: sha256 of the format, jaxrt's and the `tokenizers` library's versions, the code
  that turns metadata into a tokenizer (this file, and gguf_reader.py, which decodes the
  values), and the metadata itself: every key and value, string arrays as their raw file
  bytes. The output is a function of exactly these, so a copied or re-touched file still
  hits and a rewritten one with another vocabulary misses, whatever its path and mtime.
- The file is one JSON object on two lines: a small header (format, key, bos/eos ids, the
  payload's sha256) and the tokenizer JSON itself, which is sliced out, not parsed, in
  Python. A file that does not match byte for byte is ignored and rewritten, never trusted.
- Written to a temporary file beside it and renamed into place; a disk that refuses the
  write just means no cache. The MAX_CACHE_ENTRIES most recently used files are kept (a
  hit touches its file).
- JAXRT_TOKENIZER_CACHE=off disables it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import check_text
from .errors import ModelFormatError
from .sources import CACHE_ENV

# Longest SentencePiece token we derive merges for (real vocabularies: <= ~100 characters).
MAX_PIECE_CHARS = 1024

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """Text <-> ids. `encode` adds BOS/EOS as the tokenizer's post-processor says
    (add_special_tokens=True), `decode` drops special tokens by default."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None = None,
                 eos_ids: Iterable[int] = ()):
        self._tok = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(int(i) for i in eos_ids)

    # ---- construction -----------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, bos_id: int | None = None,
                  eos_ids: Iterable[int] = ()) -> "Tokenizer":
        """From a `tokenizers` tokenizer.json (bos/eos are not part of that format)."""
        with library_errors(path, "cannot read tokenizer"):
            backend = tokenizers.Tokenizer.from_file(os.fspath(path))
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids)

    @classmethod
    def from_json_str(cls, text: str, *, bos_id: int | None = None,
                      eos_ids: Iterable[int] = (), source: str = "<tokenizer.json>") -> "Tokenizer":
        with library_errors(source, "cannot read tokenizer"):
            backend = tokenizers.Tokenizer.from_str(text)
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids)

    def to_json_str(self) -> str:
        return self._tok.to_str()

    # ---- use --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, *,
               what: str = "text") -> list[int]:
        """Special-token text in `text` (`<|im_start|>`) becomes the control token: for
        text the caller wrote as a prompt format. User text goes through `encode_text`.
        `what` names the text in errors (e.g. "prompt")."""
        check_text(text, what)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Like `encode`, but special-token text is tokenized as plain text (llama.cpp's
        parse_special=false), so user text can never forge a control token.
        `add_special_tokens` still adds what the post-processor adds (BOS)."""
        plain = self.__dict__.get("_plain")
        if plain is None:
            # a copy of the backend with the flag set: flipping it on the shared one would
            # race with other threads' `encode`
            plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self.__dict__["_plain"] = plain
        return plain.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The spellings of the special (control) tokens, longest first."""
        cached = self.__dict__.get("_specials")
        if cached is None:
            found = {t.content for t in self._tok.get_added_tokens_decoder().values()
                     if t.special}
            cached = self.__dict__["_specials"] = tuple(sorted(found,
                                                               key=lambda t: (-len(t), t)))
        return cached

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_ids[0]) if self.eos_ids else None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---- GGUF ----------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex splits llama.cpp applies in order before byte-level BPE.
# Plain GPT-2 splitting is ByteLevel's own regex (no Split step).
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (), "gpt2": (), "gpt-2": (),
    # llama.cpp: "\p{N}" first, then the GPT-2 regex: every digit its own word.
    **{k: (r"\p{N}", _GPT2_SPLIT) for k in ("smollm", "starcoder", "refact", "codeshell",
                                            "command-r", "exaone", "minerva-7b")},
    **{k: (_LLAMA3_SPLIT,) for k in ("llama3", "llama-bpe", "llama-v3", "falcon3", "dbrx",
                                     "smaug-bpe", "pixtral")},
    **{k: (_QWEN2_SPLIT,) for k in ("qwen2", "deepseek-r1-qwen")},
}


def tokenizer_from_gguf(meta: Mapping[str, Any], path: str) -> Tokenizer:
    """The tokenizer GGUF metadata describes (`tokenizer.ggml.*`): from the tokenizer cache
    when it holds one built from the same metadata by the same code, else built (and
    stored)."""
    root = tokenizer_cache_dir()
    key = None if root is None else tokenizer_cache_key(meta)
    if key is not None:
        cached = read_cached_tokenizer(os.path.join(root, f"{key}.json"), key)
        if cached is not None:
            return cached
    tokenizer = build_tokenizer_from_gguf(meta, path)
    if key is not None:
        write_cached_tokenizer(root, key, tokenizer)
    return tokenizer


def build_tokenizer_from_gguf(meta: Mapping[str, Any], path: str) -> Tokenizer:
    """Build the tokenizer GGUF metadata describes (`tokenizer.ggml.*`), no cache."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, Sequence) and not isinstance(tokens, (str, bytes)):
        tokens = list(tokens)  # a gguf_reader.StringArray decodes here
    if not isinstance(kind, str) or not isinstance(tokens, list) or not tokens \
            or not all(isinstance(t, str) for t in tokens):
        raise ModelFormatError(path, "no tokenizer (tokenizer.ggml.model / tokens) in metadata")
    n = len(tokens)
    types = _int_list(meta, "tokenizer.ggml.token_type", n, path)
    ids = {}
    for key in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            raise ModelFormatError(path, f"tokenizer.ggml.{key}_token_id {value!r} is not a "
                                         f"token id (vocab of {n})")
        ids[key] = value
    # llama.cpp adds BOS by default to sentencepiece vocabularies only.
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", kind == "llama", path)
    add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False, path)
    arch = meta.get("general.architecture")

    if kind == "gpt2":
        backend, added = _byte_level_bpe(meta, tokens, types, path)
    elif kind == "llama":
        backend, added = _sentencepiece_bpe(meta, tokens, types, ids, arch, path)
    else:
        raise ModelFormatError(path, f"unsupported tokenizer.ggml.model {kind!r} "
                                     f"(supported: gpt2, llama)")
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _CONTROL and added(t)]
    # transformers also registers the named special tokens (bos, eos, unk, pad) whatever
    # their type says, so e.g. a literal "<unk>" in text is one token.
    named = {t.content for t in special}
    for key in ("bos", "eos", "unknown", "padding"):
        if key in ids and tokens[ids[key]] not in named:
            named.add(tokens[ids[key]])
            special.append(AddedToken(tokens[ids[key]], normalized=False, special=True))
    with library_errors(path, "invalid added tokens"):
        if special:
            backend.add_special_tokens(special)
        vocab = backend.get_vocab()
        user = [AddedToken(t, normalized=False, special=False)
                for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens(user)

    bos, eos = ids.get("bos"), ids.get("eos")
    with library_errors(path, "invalid bos/eos token"):
        backend.post_processor = bos_eos_template(
            (tokens[bos], bos) if add_bos and bos is not None else None,
            (tokens[eos], eos) if add_eos and eos is not None else None)
    return Tokenizer(backend, bos_id=bos, eos_ids=_eog_ids(tokens, types, ids))


def _flag(meta: Mapping[str, Any], key: str, default: bool, path: str) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        raise ModelFormatError(path, f"{key} = {value!r} is not a bool")
    return value


def _int_list(meta: Mapping[str, Any], key: str, n: int, path: str) -> list[int]:
    values = meta.get(key)
    if values is None:
        return [_NORMAL] * n
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "iu" or values.ndim != 1:
        raise ModelFormatError(path, f"{key} is not an integer array")
    if len(values) != n:
        raise ModelFormatError(path, f"{key} has {len(values)} entries for {n} tokens")
    return values.tolist()


def _byte_level_bpe(meta, tokens, types, path):
    """GPT-2 style byte-level BPE with the file's merges (transformers' GPT2Tokenizer)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        # llama.cpp writes some tokens as text; the BPE model spells everything in bytes.
        spelled = token if set(token) <= alphabet else "".join(
            spelling[b] for b in token.encode("utf-8"))
        vocab[spelled] = index
    merges = _merges_from_file(meta, vocab, path)
    if merges is None:
        raise ModelFormatError(path, "byte-level BPE vocabulary without tokenizer.ggml.merges")
    backend = _new_bpe(path, vocab, merges, dropout=None, continuing_subword_prefix="",
                       end_of_word_suffix="", fuse_unk=False)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in _PRE_SPLITS:
        raise ModelFormatError(path, f"unsupported tokenizer.ggml.pre {pre!r}; known: "
                                     f"{sorted(_PRE_SPLITS)}")
    splits = _PRE_SPLITS[pre]
    if not splits:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                         trim_offsets=True, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a llama.cpp mislabel: adding it would grow
    # the vocabulary past the model's, so (like transformers) it stays an ordinary token.
    return backend, lambda token: set(token) <= alphabet


def _sentencepiece_bpe(meta, tokens, types, ids, arch, path):
    """SentencePiece vocabulary as a byte-fallback BPE (transformers' Gemma/LlamaTokenizer)."""
    gemma = arch in ("gemma", "gemma2", "gemma3")
    if gemma:
        # Gemma files store whitespace-run tokens with real spaces; the model spells them "▁".
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges_from_file(meta, vocab, path)
    if merges is None:
        if gemma:
            # Gemma's scores do not follow its merge order; the file order does.
            scores = {token: -index for index, token in enumerate(tokens)}
        else:
            raw = meta.get("tokenizer.ggml.scores")
            if not isinstance(raw, np.ndarray) or raw.dtype.kind not in "iuf" \
                    or raw.shape != (len(tokens),):
                raise ModelFormatError(path, "sentencepiece vocabulary without scores or merges")
            scores = dict(zip(tokens, raw.astype(np.float64).tolist()))
        longest = max(range(len(tokens)), key=lambda i: len(tokens[i]))
        if len(tokens[longest]) > MAX_PIECE_CHARS:  # deriving merges is quadratic in length
            raise ModelFormatError(path, f"token #{longest} is {len(tokens[longest])} characters "
                                         f"long (at most {MAX_PIECE_CHARS} supported)")
        merges = _merges_from_scores(vocab, scores)
    unk = tokens[ids["unknown"]] if "unknown" in ids else "<unk>"
    if gemma:
        backend = _new_bpe(path, vocab, merges, fuse_unk=True, unk_token=unk, dropout=None,
                           byte_fallback=True)
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous",
                                                     invert=False)
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        backend = _new_bpe(path, vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
             decoders.Strip(content=" ", left=1)])
    return backend, lambda token: True


def _new_bpe(path, vocab, merges, **kwargs) -> tokenizers.Tokenizer:
    for left, right in merges:  # the library panics on some of these instead of raising
        for part in (left, right, left + right):
            if part not in vocab:
                raise ModelFormatError(path, f"merge {left!r} {right!r}: {part!r} is not in "
                                             f"the vocabulary")
    if "unk_token" in kwargs and kwargs["unk_token"] not in vocab:
        raise ModelFormatError(path, f"unknown token {kwargs['unk_token']!r} not in vocabulary")
    with library_errors(path, "invalid BPE vocabulary"):
        return tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, **kwargs))


@contextlib.contextmanager
def library_errors(path, what: str):
    """`tokenizers` errors as ModelFormatError. Its Rust panics surface as
    pyo3_runtime.PanicException, a BaseException, so those are converted too."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, ModelFormatError):
        raise
    except BaseException as e:  # noqa: B036 - see docstring
        raise ModelFormatError(path, f"{what}: {_one_line(e)}") from None


def _merges_from_file(meta, vocab, path) -> list[tuple[str, str]] | None:
    raw = meta.get("tokenizer.ggml.merges")
    if raw is None:
        return None
    merges = []
    for merge in raw:
        parts = merge.split(" ") if isinstance(merge, str) else ()
        if len(parts) != 2:
            raise ModelFormatError(path, f"malformed merge {merge!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))
    return merges


def _merges_from_scores(vocab: Mapping[str, int],
                        scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    tokens, best-scored token first, then longer left part first (transformers'
    `generate_merges` with scores, which this must reproduce exactly)."""
    merges = []
    for merged, score in scores.items():
        local = []
        for i in range(1, len(merged)):
            left, right = merged[:i], merged[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


# ---- the tokenizer cache (see the module docstring) -----------------------------------

CACHE_FORMAT = 1
MAX_CACHE_ENTRIES = 8
CACHE_SWITCH_ENV = "JAXRT_TOKENIZER_CACHE"
_STALE_TMP_SECONDS = 3600  # a temporary file this old belongs to a writer that died
_HEAD = b'{"jaxrt_tokenizer_cache": '
_BODY = b'"tokenizer": '
_TAIL = b"}\n"
# The code whose output the cache holds: a change to it invalidates every entry.
_CODE = ("tokenizer.py", "gguf_reader.py")


def tokenizer_cache_dir() -> str | None:
    """$JAXRT_CACHE_DIR/tokenizers, else ~/.cache/jaxrt/tokenizers; None when
    JAXRT_TOKENIZER_CACHE is off."""
    if os.environ.get(CACHE_SWITCH_ENV, "").lower() in ("off", "none", "0", "false"):
        return None
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "jaxrt")
    return os.path.join(os.path.expanduser(root), "tokenizers")


def tokenizer_cache_key(meta: Mapping[str, Any]) -> str | None:
    """sha256 of everything `build_tokenizer_from_gguf(meta)` depends on; None when the
    metadata holds a value of a type we cannot hash faithfully (then nothing is cached)."""
    from .. import __version__
    h = hashlib.sha256(f"jaxrt tokenizer cache {CACHE_FORMAT} jaxrt {__version__} "
                       f"tokenizers {tokenizers.__version__}\n".encode())
    try:
        h.update(_code_digest())
    except OSError:  # the sources are not files (a zip import): nothing identifies the code
        return None
    for key in sorted(meta):
        value = _value_bytes(meta[key]) if isinstance(key, str) else None
        if value is None:
            return None
        for part in (key.encode("utf-8", "surrogatepass"), value):
            h.update(struct.pack("<Q", len(part)))
            h.update(part)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _code_digest() -> bytes:
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in _CODE:
        with open(os.path.join(here, name), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.digest()


def _value_bytes(value: Any) -> bytes | None:
    """A metadata value as tagged bytes, distinct for distinct values (and types)."""
    if isinstance(value, bool):
        return b"b1" if value else b"b0"
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, float):
        return b"f" + value.hex().encode()
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return b"a" + f"{value.dtype.str} {value.shape}|".encode() + value.tobytes()
    from .gguf_reader import StringArray  # here: gguf_reader imports this module
    if isinstance(value, StringArray):  # the file's own bytes, nothing decoded
        return b"S" + value.raw
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return b"L" + json.dumps(list(value)).encode()
    return None


def read_cached_tokenizer(path: str, key: str) -> Tokenizer | None:
    """The tokenizer cached at `path` under `key`; None when the file is missing,
    unreadable, for another key, damaged (its payload's sha256) or not loadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.find(b"\n")
    if end < 0 or not data.startswith(_HEAD) or data[end - 1:end] != b"," \
            or not data.startswith(_BODY, end + 1) or not data.endswith(_TAIL):
        return None
    try:
        info = json.loads(data[len(_HEAD):end - 1])
        payload = data[end + 1 + len(_BODY):-len(_TAIL)]
        if not isinstance(info, dict) or info.get("format") != CACHE_FORMAT \
                or info.get("key") != key \
                or info.get("sha256") != hashlib.sha256(payload).hexdigest():
            return None
        bos_id, eos_ids = info["bos_id"], info["eos_ids"]
        if not (bos_id is None or type(bos_id) is int) or not isinstance(eos_ids, list) \
                or not all(type(i) is int for i in eos_ids):
            return None
        backend = tokenizers.Tokenizer.from_str(payload.decode("utf-8"))
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException:  # noqa: B036 - a damaged file may make the library panic
        return None
    _touch(path)
    return Tokenizer(backend, bos_id=bos_id, eos_ids=eos_ids)


def write_cached_tokenizer(root: str, key: str, tokenizer: Tokenizer) -> str | None:
    """Store `tokenizer` as root/<key>.json atomically, then prune; the path, or None when
    the disk refuses (the cache is an optimization: loading goes on without it)."""
    final = os.path.join(root, f"{key}.json")
    tmp = os.path.join(root, f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(root, exist_ok=True)
        payload = tokenizer.to_json_str().encode("utf-8")
        info = {"format": CACHE_FORMAT, "key": key, "bos_id": tokenizer.bos_id,
                "eos_ids": list(tokenizer.eos_ids),
                "sha256": hashlib.sha256(payload).hexdigest()}
        head = json.dumps(info).encode()
        with open(tmp, "wb") as f:
            f.write(b"".join((_HEAD, head, b",\n", _BODY, payload, _TAIL)))
        os.replace(tmp, final)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException:  # noqa: B036 - a full disk, or a library panic: no cache
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None
    prune_tokenizer_cache(root, keep=final)
    return final


def prune_tokenizer_cache(root: str, max_entries: int = MAX_CACHE_ENTRIES,
                          keep: str | None = None) -> list[str]:
    """Delete all but the `max_entries` most recently used entries (and temporary files
    of writers that died); returns the deleted paths. `keep` is never deleted."""
    try:
        files = [e for e in os.scandir(root) if e.is_file(follow_symlinks=False)]
    except OSError:
        return []
    now, entries, deleted = time.time(), [], []
    for e in files:
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if e.name.endswith(".json") and not e.name.startswith("."):
            entries.append((e.path != keep, -mtime, e.path))
        elif e.name.endswith(".tmp") and now - mtime > _STALE_TMP_SECONDS:
            deleted.append(e.path)
    entries.sort()  # `keep` first, then the most recently used
    deleted += [p for _, _, p in entries[max_entries:]]
    for p in deleted:
        with contextlib.suppress(OSError):
            os.unlink(p)
    return deleted


def _touch(path: str) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def bos_eos_template(bos: tuple[str, int] | None,
                     eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """BOS/EOS ((token, id) or None) around each sequence, as transformers'
    `update_post_processor` writes it."""
    b = f"{bos[0]}:0 " if bos else ""
    e = f" {eos[0]}:0" if eos else ""
    single = f"{b}$A:0{e}"
    pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[t for t in (bos, eos) if t])


# Texts llama.cpp treats as end-of-generation when they are control tokens
# (llama-vocab.cpp, special_eog_ids).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")


def _eog_ids(tokens, types, ids) -> tuple[int, ...]:
    """EOS first (what transformers calls eos_token_id), then the other end-of-generation
    tokens llama.cpp stops on (e.g. Gemma's <end_of_turn>, ChatML's <|im_end|>)."""
    out = [ids[k] for k in ("eos", "eot", "eom") if k in ids]
    out += [i for i, (t, ty) in enumerate(zip(tokens, types))
            if ty == _CONTROL and t in _EOG_TEXTS]
    return tuple(dict.fromkeys(out))


# ---- chat templates ------------------------------------------------------------------

# Rendering lives in chat_template.py (sandboxed, bounded in time and memory).
from .chat_template import render_chat  # noqa: E402,F401  (re-exported)


# The Gemma 3 instruction template (google/gemma-3-*-it tokenizer_config.json), used when a
# Gemma 3 file carries none: llama.cpp formats Gemma chats this way too.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
