"""Tokenizers built from GGUF metadata against transformers' GGUF tokenizers, and chat
templates against `apply_chat_template`."""
from __future__ import annotations

import unicodedata

import pytest
from frontends_synth import write_tiny_gguf
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxrt.frontends.gguf_reader import read_gguf
from jaxrt.frontends.tokenizer import GEMMA3_CHAT_TEMPLATE, Tokenizer, render_chat

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing  ",
    "multiple   spaces\tand\ttabs\t\t",
    "line1\nline2\n\nline4\r\nwindows\n\n\n\n",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2024-01-31",
    "punctuation!?.,;:'\"()[]{}<>@#$%^&*-_=+|\\/~`",
    "don't can't I'm you're we've they'll he'd WE'RE",
    "unicode: café naïve résumé Ångström ß",
    "emoji: 🤖🎉👍🏽 👨‍👩‍👧 ❤️",
    "CJK: 日本語のテキスト 中文字符 한국어 텍스트",
    "Arabic: مرحبا بالعالم; Cyrillic: Привет мир; Greek: αβγ",
    "math: ∑ ∫ √ ≤ ≥ ≠ ∞ → ∂",
    "code:\ndef f(x):\n    return x ** 2  # square\n",
    "", " ", "\n", "\t", "a" * 64, "    ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi",
    "<bos>text<eos><pad><unk>",
    "mixed<|im_end|>special<end_of_turn>tokens<|endoftext|>",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic",
    "\u0000control\u0007chars\u001b[0m",
]

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "  Hi there  "}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?\n"}],
]


def check_encode_parity(ours: Tokenizer, hf, text: str) -> None:
    ids = ours.encode(text)
    assert ids == hf.encode(text), repr(text)
    assert ours.encode(text, add_special_tokens=False) == \
        hf.encode(text, add_special_tokens=False), repr(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == \
            hf.decode(ids, skip_special_tokens=skip), repr(text)


def check_chat_parity(ours: Tokenizer, hf, template: str, messages, reference=None,
                      **hf_kwargs) -> None:
    reference = reference or hf
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt,
                                          **hf_kwargs)
        got = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                          bos_token=ours.bos_token, eos_token=ours.eos_token)
        assert got == expected
        assert ours.encode(got, add_special_tokens=False) == \
            reference.encode(got, add_special_tokens=False)


# Random text: any printable or control character but lone surrogates, with special
# tokens spliced in.
_chars = st.characters(blacklist_categories=("Cs",))


def _text(chars, specials):
    piece = st.one_of(st.text(chars, max_size=12), st.sampled_from(specials),
                      st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n "]))
    return st.lists(piece, max_size=8).map("".join)


def _has_numeric(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("N") for ch in text)


_no_numeric_chars = st.characters(blacklist_categories=("Cs", "Nd", "Nl", "No"))
_SMOLLM2_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"]


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_hf_tokenizer):
    """transformers' GGUF tokenizer with the pre-tokenizer the "smollm" pre-type stands
    for (llama.cpp's, and the original SmolLM2 tokenizer.json's): the `tokenizers`
    library's own Digits(individual_digits) before byte-level splitting. transformers'
    GGUF converter does not know "smollm" and keeps plain GPT-2 splitting, which differs
    around numbers: "  0" is [Ġ, Ġ, 0] there and [ĠĠ, 0] in the model's own tokenizer."""
    import copy

    from tokenizers import pre_tokenizers

    ref = copy.deepcopy(smollm2_hf_tokenizer)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return ref


@pytest.mark.xdist_group("smollm2")
class TestSmolLM2:
    @pytest.mark.parametrize("text", TEXTS)
    def test_encode_decode_match_reference(self, smollm2, smollm2_reference, text):
        check_encode_parity(smollm2.tokenizer, smollm2_reference, text)

    @pytest.mark.parametrize("text", [t for t in TEXTS if not _has_numeric(t)])
    def test_encode_decode_match_transformers(self, smollm2, smollm2_hf_tokenizer, text):
        check_encode_parity(smollm2.tokenizer, smollm2_hf_tokenizer, text)

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(text=_text(_chars, _SMOLLM2_SPECIALS + ["0", "12", " 3", "  4", "½"]))
    def test_random_text_matches_reference(self, smollm2, smollm2_reference, text):
        check_encode_parity(smollm2.tokenizer, smollm2_reference, text)

    @settings(max_examples=200, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(text=_text(_no_numeric_chars, _SMOLLM2_SPECIALS))
    def test_random_text_matches_transformers(self, smollm2, smollm2_hf_tokenizer, text):
        check_encode_parity(smollm2.tokenizer, smollm2_hf_tokenizer, text)

    @settings(max_examples=100, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ids=st.lists(st.integers(0, 49151), max_size=20))
    def test_random_ids_decode_like_transformers(self, smollm2, smollm2_hf_tokenizer, ids):
        for skip in (True, False):
            assert smollm2.tokenizer.decode(ids, skip_special_tokens=skip) == \
                smollm2_hf_tokenizer.decode(ids, skip_special_tokens=skip)

    def test_numbers_split_like_llama_cpp(self, smollm2, smollm2_hf_tokenizer):
        """llama.cpp's "smollm" splitting: every \\p{N} character is its own word first."""
        text = "x ½ ² ٣٤ 12  0\n    1"
        pieces, word = [], ""
        for ch in text:
            if unicodedata.category(ch).startswith("N"):
                pieces += [word, ch] if word else [ch]
                word = ""
            else:
                word += ch
        pieces += [word] if word else []
        expected = [i for p in pieces for i in smollm2_hf_tokenizer.encode(p)]
        assert smollm2.tokenizer.encode(text) == expected
        assert smollm2_hf_tokenizer.encode(text) != expected  # the known difference

    def test_backend_differs_from_transformers_only_in_pre_tokenizer(
            self, smollm2, smollm2_hf_tokenizer):
        import json
        ours = json.loads(smollm2.tokenizer.to_json_str())
        theirs = json.loads(smollm2_hf_tokenizer.backend_tokenizer.to_str())
        assert ours["pre_tokenizer"] != theirs["pre_tokenizer"]
        assert ours | {"pre_tokenizer": None} == theirs | {"pre_tokenizer": None}

    def test_special_ids(self, smollm2, smollm2_hf_tokenizer):
        tok = smollm2.tokenizer
        assert tok.bos_id == smollm2_hf_tokenizer.bos_token_id == 1
        assert tok.eos_ids[0] == smollm2_hf_tokenizer.eos_token_id == 2
        assert tok.vocab_size == len(smollm2_hf_tokenizer) == 49152
        assert tok.token_to_id("<|im_start|>") == 1 and tok.id_to_token(2) == "<|im_end|>"
        assert tok.encode("hi")[0] != tok.bos_id  # add_bos_token is false in this file

    @pytest.mark.parametrize("messages", MESSAGES)
    def test_chat_template_matches_transformers(self, smollm2, smollm2_hf_tokenizer,
                                                smollm2_reference, messages):
        assert smollm2.chat_template == smollm2_hf_tokenizer.chat_template
        check_chat_parity(smollm2.tokenizer, smollm2_hf_tokenizer, smollm2.chat_template,
                          messages, reference=smollm2_reference)

    def test_json_round_trip(self, smollm2, tmp_path):
        tok = smollm2.tokenizer
        path = tmp_path / "tokenizer.json"
        path.write_text(tok.to_json_str())
        again = Tokenizer.from_file(path, bos_id=tok.bos_id, eos_ids=tok.eos_ids)
        for text in TEXTS:
            assert again.encode(text) == tok.encode(text)
        assert (again.bos_id, again.eos_ids, again.vocab_size) == \
            (tok.bos_id, tok.eos_ids, tok.vocab_size)


@pytest.mark.xdist_group("gemma3")
class TestGemma3:
    @pytest.mark.parametrize("text", TEXTS)
    def test_encode_decode_match_transformers(self, gemma3, gemma3_hf_tokenizer, text):
        check_encode_parity(gemma3.tokenizer, gemma3_hf_tokenizer, text)

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(text=_text(_chars, ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
                               "<unused7>", "[multimodal]", "<start_of_image>"]))
    def test_random_text_matches_transformers(self, gemma3, gemma3_hf_tokenizer, text):
        check_encode_parity(gemma3.tokenizer, gemma3_hf_tokenizer, text)

    @settings(max_examples=100, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ids=st.lists(st.integers(0, 262143), max_size=20))
    def test_random_ids_decode_like_transformers(self, gemma3, gemma3_hf_tokenizer, ids):
        for skip in (True, False):
            assert gemma3.tokenizer.decode(ids, skip_special_tokens=skip) == \
                gemma3_hf_tokenizer.decode(ids, skip_special_tokens=skip)

    def test_backend_is_identical_to_transformers(self, gemma3, gemma3_hf_tokenizer):
        ours = gemma3.tokenizer.to_json_str()
        theirs = gemma3_hf_tokenizer.backend_tokenizer.to_str()
        if ours != theirs:  # the serializations normally match byte for byte
            import json
            assert json.loads(ours) == json.loads(theirs)

    def test_special_ids(self, gemma3, gemma3_hf_tokenizer):
        tok = gemma3.tokenizer
        assert tok.bos_id == gemma3_hf_tokenizer.bos_token_id == 2
        assert tok.eos_ids == (1, 106)
        assert tok.encode("hi")[0] == 2  # add_bos_token
        assert tok.vocab_size == len(gemma3_hf_tokenizer) == 262144

    @pytest.mark.parametrize("messages", MESSAGES)
    def test_chat_template_matches_transformers(self, gemma3, gemma3_hf_tokenizer, messages):
        # The file has no template; the reader supplies Gemma 3's instruction template.
        assert gemma3_hf_tokenizer.chat_template is None
        assert gemma3.chat_template == GEMMA3_CHAT_TEMPLATE
        check_chat_parity(gemma3.tokenizer, gemma3_hf_tokenizer, GEMMA3_CHAT_TEMPLATE,
                          messages, chat_template=GEMMA3_CHAT_TEMPLATE)

    def test_chat_template_raises_like_transformers(self, gemma3, gemma3_hf_tokenizer):
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(Exception, match="alternate"):
            gemma3_hf_tokenizer.apply_chat_template(bad, tokenize=False,
                                                    chat_template=GEMMA3_CHAT_TEMPLATE)
        with pytest.raises(ValueError, match="alternate"):
            render_chat(GEMMA3_CHAT_TEMPLATE, bad, bos_token="<bos>")


# ---- synthetic vocabularies -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_synthetic_vocabulary_matches_transformers(tmp_path, kind):
    """Byte-level BPE and SentencePiece (llama architecture: Metaspace, merges from scores,
    byte fallback) on tiny vocabularies."""
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tmp_path / "t.gguf", tokenizer=kind)
    ours = read_gguf(path).tokenizer
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in TEXTS + ["abc hi", " abc", "hi  abc\n", "xyz", "<s>abc</s>", "the thin heat"]:
        check_encode_parity(ours, hf, text)


def test_render_chat_helpers():
    template = ("{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
                "{{ strftime_now('%Y') | length }}{% if add_generation_prompt %}>{% endif %}")
    out = render_chat(template, [{"role": "user", "content": "é\"<"}])
    assert out == '"é\\"<"4>'
    with pytest.raises(ValueError, match="boom"):
        render_chat("{{ raise_exception('boom') }}", [])
    # The sandbox refuses attribute access to Python internals.
    with pytest.raises(ValueError, match="unsafe|not safely"):
        render_chat("{{ messages.__class__.__mro__ }}", [])
