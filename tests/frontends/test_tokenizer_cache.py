"""The persistent tokenizer cache (jaxrt/frontends/tokenizer.py) and the lazily decoded GGUF
string arrays a warm start relies on (jaxrt/frontends/gguf_reader.py).

tests/conftest.py turns the cache off for the suite (so every other test exercises the
build path, and throw-away files never evict the user's entries); the `cache` fixture turns
it on in a tmp dir.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from frontends_synth import byte_level_vocab, write_tiny_gguf
from gguf import GGUFValueType

import jaxrt
from jaxrt.frontends import gguf_reader, tokenizer as tok_mod
from jaxrt.frontends.errors import ModelFormatError
from jaxrt.frontends.gguf_reader import StringArray, read_gguf, read_gguf_header
from jaxrt.frontends.tokenizer import Tokenizer, tokenizer_from_gguf

TEXTS = [
    "Hello, world!",
    "", " ", "  ", "\n", "\t", "\r\n", "    indented", "trailing   ", "a  b   c    d",
    "line1\nline2\n\n\nline5\r\nwin\n\n\n\n",
    "tabs\t\tand\t spaces \t mixed",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e10 0x1F",
    "don't can't I'm you're we've they'll he'd WE'RE",
    "unicode: café naïve résumé Ångström ß ﬁ",
    "emoji: 🤖🎉👍🏽 👨‍👩‍👧 ❤️",
    "CJK: 日本語のテキスト 中文字符 한국어 텍스트",
    "Arabic: مرحبا بالعالم; Cyrillic: Привет мир; Greek: αβγ",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic",
    "\u0000control\u0007chars\u001b[0m",
    "code:\ndef f(x):\n    return x ** 2  # square\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi",
    "<bos>text<eos><pad><unk>",
    "mixed<|im_end|>special<end_of_turn>tokens<|endoftext|>",
    "a" * 300,
]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The tokenizer cache on, in a tmp dir; its directory of entries."""
    monkeypatch.setenv("JAXRT_CACHE_DIR", os.fspath(tmp_path / "cache"))
    monkeypatch.setenv("JAXRT_TOKENIZER_CACHE", "on")
    return tmp_path / "cache" / "tokenizers"


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The paths of the real builds made: a hit makes none."""
    made: list[str] = []
    real = tok_mod.build_tokenizer_from_gguf

    def counting(meta, path):
        made.append(path)
        return real(meta, path)

    monkeypatch.setattr(tok_mod, "build_tokenizer_from_gguf", counting)
    return made


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json")) if cache.is_dir() else []


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer, texts=TEXTS) -> None:
    assert a.to_json_str() == b.to_json_str()
    assert (a.bos_id, a.eos_ids, a.bos_token, a.eos_token, a.vocab_size) == \
        (b.bos_id, b.eos_ids, b.bos_token, b.eos_token, b.vocab_size)
    for text in texts:
        ids = a.encode(text)
        assert b.encode(text) == ids, repr(text)
        assert b.encode(text, add_special_tokens=False) == \
            a.encode(text, add_special_tokens=False), repr(text)
        for skip in (True, False):
            assert b.decode(ids, skip_special_tokens=skip) == \
                a.decode(ids, skip_special_tokens=skip), repr(text)


def tiny(tmp_path: Path, kind: str = "gpt2", name: str = "m.gguf", **kwargs) -> str:
    return write_tiny_gguf(tmp_path / name, tokenizer=kind,
                           arch="llama" if kind == "gpt2" else "gemma3", **kwargs)


def load(path: str) -> Tokenizer:
    return tokenizer_from_gguf(read_gguf_header(path).metadata, path)


# ---- the real models ---------------------------------------------------------------------

def check_real_model(path: str, cache: Path, builds: list[str], monkeypatch) -> None:
    miss = read_gguf(path)
    assert builds == [path] and len(entries(cache)) == 1

    def no_decoding(*args):
        raise AssertionError("a warm start decoded a GGUF string array")

    with monkeypatch.context() as m:
        m.setattr(gguf_reader, "_decode_strings", no_decoding)
        hit = read_gguf(path)
    assert builds == [path]  # served from the cache, no string array decoded
    assert hit.config == miss.config and hit.chat_template == miss.chat_template
    added = [t.content for t in miss.tokenizer.backend.get_added_tokens_decoder().values()]
    texts = TEXTS + ["".join(added[:64]), " x ".join(added[-64:])]
    assert_same_tokenizer(miss.tokenizer, hit.tokenizer, texts)


@pytest.mark.xdist_group("smollm2")
def test_real_smollm2_hit_equals_miss(smollm2_path, cache, builds, monkeypatch):
    check_real_model(smollm2_path, cache, builds, monkeypatch)


@pytest.mark.xdist_group("gemma3")
def test_real_gemma3_hit_equals_miss(gemma3_path, cache, builds, monkeypatch):
    check_real_model(gemma3_path, cache, builds, monkeypatch)


# ---- the cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hit_equals_miss(tmp_path, cache, builds, kind):
    path = tiny(tmp_path, kind)
    miss = load(path)
    hit = load(path)
    assert builds == [path]
    [entry] = entries(cache)
    assert entry.name == tok_mod.tokenizer_cache_key(read_gguf_header(path).metadata) + ".json"
    assert_same_tokenizer(miss, hit)
    json.loads(entry.read_bytes())  # the entry is one JSON document, tokenizer inside


def _reframed(good: bytes, *, payload: bytes | None = None, **info) -> bytes:
    """`good` with its header fields or payload replaced (the sha256 kept consistent)."""
    end = good.index(b"\n")
    head = json.loads(good[len(tok_mod._HEAD):end - 1])
    body = good[end + 1 + len(tok_mod._BODY):-len(tok_mod._TAIL)]
    if payload is not None:
        import hashlib
        body, head["sha256"] = payload, hashlib.sha256(payload).hexdigest()
    head.update(info)
    return b"".join((tok_mod._HEAD, json.dumps(head).encode(), b",\n", tok_mod._BODY, body,
                     tok_mod._TAIL))


CORRUPTIONS = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[:len(good) // 2],
    "garbage": lambda good: b"\x00\xff not a cache file \n at all",
    "payload byte flipped": lambda good: good[:-40] + bytes([good[-40] ^ 1]) + good[-39:],
    "no tail": lambda good: good[:-2],
    "other key": lambda good: _reframed(good, key="0" * 64),
    "other format": lambda good: _reframed(good, format=0),
    "bad eos ids": lambda good: _reframed(good, eos_ids="2"),
    "bool bos id": lambda good: _reframed(good, bos_id=True),
    "not a tokenizer": lambda good: _reframed(good, payload=b'{"model": 1}'),
    "not utf-8": lambda good: _reframed(good, payload=b'"\xff"'),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_entry_is_ignored_and_rewritten(tmp_path, cache, builds, corruption):
    path = tiny(tmp_path, "gpt2")
    original = load(path)
    [entry] = entries(cache)
    good = entry.read_bytes()
    entry.write_bytes(CORRUPTIONS[corruption](good))
    again = load(path)
    assert builds == [path, path]  # not trusted: built again
    assert_same_tokenizer(original, again)
    assert entry.read_bytes() == good  # and rewritten
    assert_same_tokenizer(original, load(path))
    assert len(builds) == 2


def test_off_switch_writes_nothing(tmp_path, cache, builds, monkeypatch):
    monkeypatch.setenv("JAXRT_TOKENIZER_CACHE", "off")
    path = tiny(tmp_path, "llama")
    first, second = load(path), load(path)
    assert builds == [path, path]
    assert not cache.parent.exists()
    assert_same_tokenizer(first, second)


def test_unwritable_cache_dir_means_no_cache(tmp_path, builds, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("JAXRT_CACHE_DIR", os.fspath(blocker))
    monkeypatch.setenv("JAXRT_TOKENIZER_CACHE", "on")
    path = tiny(tmp_path, "gpt2")
    first, second = load(path), load(path)
    assert builds == [path, path]
    assert_same_tokenizer(first, second)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "m.gguf"]


def test_key_follows_the_metadata_not_the_file(tmp_path, cache, builds):
    path = tiny(tmp_path, "gpt2")
    load(path)
    # A touched file, a copy elsewhere, other weights: the same metadata, so hits.
    os.utime(path, ns=(1, 1))
    load(path)
    copy = shutil.copy(path, tmp_path / "copy.gguf")
    load(copy)
    load(tiny(tmp_path, "gpt2", name="reweighted.gguf", seed=7))
    assert builds == [path]
    # Any tokenizer metadata changed: misses, and the cached tokenizers differ.
    eos = tiny(tmp_path, "gpt2", name="eos.gguf",
               extra_meta={"tokenizer.ggml.add_eos_token": (True, GGUFValueType.BOOL)})
    with_eos = load(eos)
    assert builds[-1] == eos and with_eos.encode("hi")[-1] == 2
    tokens, _, _ = byte_level_vocab()
    renamed = tmp_path / "renamed.gguf"
    blob = Path(path).read_bytes()
    assert blob.count(b"<|im_end|>") == 1
    renamed.write_bytes(blob.replace(b"<|im_end|>", b"<|im_END|>"))
    assert load(os.fspath(renamed)).token_to_id("<|im_END|>") == tokens.index("<|im_end|>")
    assert builds[-1] == os.fspath(renamed) and len(entries(cache)) == 3


@pytest.mark.parametrize("change", ["code", "jaxrt version", "tokenizers version"])
def test_key_follows_code_and_versions(tmp_path, cache, builds, monkeypatch, change):
    path = tiny(tmp_path, "llama")
    load(path)
    if change == "code":
        monkeypatch.setattr(tok_mod, "_code_digest", lambda: b"edited")
    elif change == "jaxrt version":
        monkeypatch.setattr(jaxrt, "__version__", jaxrt.__version__ + ".post1")
    else:
        monkeypatch.setattr(tok_mod.tokenizers, "__version__", "0.0.0")
    load(path)
    assert builds == [path, path] and len(entries(cache)) == 2


def test_metadata_without_a_faithful_key_is_not_cached(tmp_path, cache, builds):
    path = tiny(tmp_path, "gpt2")
    meta = dict(read_gguf_header(path).metadata, **{"odd.value": object()})
    assert tok_mod.tokenizer_cache_key(meta) is None
    tokenizer_from_gguf(meta, path)
    tokenizer_from_gguf(meta, path)
    assert builds == [path, path] and not cache.exists()


def test_bounded_least_recently_used(tmp_path, cache, builds):
    path = tiny(tmp_path, "gpt2")
    base = read_gguf_header(path).metadata
    keys = []
    for i in range(tok_mod.MAX_CACHE_ENTRIES + 2):
        meta = dict(base, **{"general.name": f"model {i}"})  # another key, same tokenizer
        tokenizer_from_gguf(meta, path)
        keys.append(tok_mod.tokenizer_cache_key(meta))
        os.utime(cache / f"{keys[-1]}.json", (1000 + i, 1000 + i))  # distinct use times
    assert [p.stem for p in entries(cache)] == sorted(keys[2:])
    # A hit counts as a use: the oldest entry, used now, survives the next write.
    tokenizer_from_gguf(dict(base, **{"general.name": "model 2"}), path)
    assert len(builds) == len(keys)
    stale, fresh = cache / ".dead.1.tmp", cache / ".live.2.tmp"
    stale.write_text("x")
    fresh.write_text("x")
    os.utime(stale, (1, 1))
    tokenizer_from_gguf(dict(base, **{"general.name": "model new"}), path)
    assert {p.stem for p in entries(cache)} == set(keys[4:]) | {keys[2]} | {
        tok_mod.tokenizer_cache_key(dict(base, **{"general.name": "model new"}))}
    assert not stale.exists() and fresh.exists()


# ---- lazily decoded string arrays ----------------------------------------------------------

def test_string_arrays_are_lazy_lists(tmp_path, monkeypatch):
    strings = ["", "a\0b", "é", "日本語", "\0", "🤖", " ", "x" * 1000, "last"]
    path = tiny(tmp_path, "gpt2", extra_meta={"test.strings": (strings, GGUFValueType.ARRAY)})
    tokens, _, merges = byte_level_vocab()
    with monkeypatch.context() as m:
        m.setattr(gguf_reader, "_decode_strings", lambda *a: pytest.fail("decoded eagerly"))
        meta = read_gguf_header(path).metadata
        assert [len(meta[k]) for k in ("test.strings", "tokenizer.ggml.tokens",
                                       "tokenizer.ggml.merges")] == \
            [len(strings), len(tokens), len(merges)]
    assert isinstance(meta["test.strings"], StringArray)
    assert meta["test.strings"] == strings and strings == meta["test.strings"]
    assert meta["test.strings"] != strings[:-1] and meta["test.strings"] != "".join(strings)
    assert list(meta["test.strings"]) == meta["test.strings"].tolist() == strings
    assert meta["test.strings"][1] == "a\0b" and meta["test.strings"][-2:] == strings[-2:]
    assert meta["tokenizer.ggml.tokens"] == tokens and meta["tokenizer.ggml.merges"] == merges
    ascii_only = StringArray(b"".join(struct.pack("<Q", len(s)) + s.encode() for s in "abc"),
                             np.array([0, 9, 18], dtype=np.int64))
    assert ascii_only == ["a", "b", "c"]  # the one-decode path (no NUL inside)


def _error(path) -> str:
    with pytest.raises(ModelFormatError) as e:
        read_gguf_header(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_invalid_utf8_string_is_named(tmp_path):
    path = tiny(tmp_path, "gpt2")
    blob = Path(path).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(blob.replace(b"<|im_start|>", b"<|im\xffstart|>"))
    assert "element #1 of array 'tokenizer.ggml.tokens' is not valid UTF-8" in _error(bad)


def test_character_split_across_strings_is_invalid(tmp_path):
    # "\xc3" + "\xa9" is "é" when joined: each string alone is not UTF-8.
    path = tiny(tmp_path, "gpt2",
                extra_meta={"test.split": (["AAAX", "YBBB"], GGUFValueType.ARRAY)})
    blob = Path(path).read_bytes()
    assert blob.count(b"AAAX") == blob.count(b"YBBB") == 1
    bad = tmp_path / "split.gguf"
    bad.write_bytes(blob.replace(b"AAAX", b"AAA\xc3").replace(b"YBBB", b"\xa9BBB"))
    assert "element #0 of array 'test.split' is not valid UTF-8" in _error(bad)


@pytest.mark.parametrize("cut", [0.25, 0.5, 0.999])
def test_truncated_string_array_is_named(tmp_path, cut):
    path = tiny(tmp_path, "gpt2")
    blob = Path(path).read_bytes()
    start = blob.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 12
    end = blob.index(b"tokenizer.ggml.token_type") - 8  # the next key's length
    cut_file = tmp_path / "cut.gguf"
    cut_file.write_bytes(blob[:start + int((end - start) * cut)])
    message = _error(cut_file)
    assert message.split(": ")[1].startswith("truncated") and \
        "'tokenizer.ggml.tokens'" in message


def test_lying_string_length_is_named(tmp_path):
    path = tiny(tmp_path, "gpt2")
    blob = bytearray(Path(path).read_bytes())
    at = blob.index(struct.pack("<Q", len("<|im_start|>")) + b"<|im_start|>")
    for length in (2**40, 2**63 + 5, 2**64 - 1):
        blob[at:at + 8] = struct.pack("<Q", length)
        lying = tmp_path / "lying.gguf"
        lying.write_bytes(bytes(blob))
        message = _error(lying)
        assert "truncated: element #1 of array 'tokenizer.ggml.tokens'" in message
