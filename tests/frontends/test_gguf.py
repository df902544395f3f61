"""GGUF reader: real-model parity with transformers' GGUF loading, synthetic files of every
supported type, and explicit malformed-file cases."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from frontends_synth import random_quantized_with_source, write_tiny_gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType

from jaxrt.frontends.config import RopeScaling
from jaxrt.frontends.errors import ModelFormatError
from jaxrt.frontends.gguf_reader import (_llama3_divisors, config_from_gguf, read_gguf,
                                         read_gguf_header)
from jaxrt.frontends.hf_config import config_from_hf
from jaxrt.frontends.loaded import expected_weight_shapes


def assert_bitwise_equal(ours: np.ndarray, theirs: np.ndarray, name: str) -> None:
    if ours.shape != theirs.shape or not np.array_equal(ours, theirs):  # fast path first
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def assert_weights_equal(ours, hf_model):
    """Every weight we produce is bit-identical to transformers' parameter: both sides run
    gguf.quants.dequantize and the same f32 post-processing, so no tolerance is needed."""
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    assert set(ours.weights) <= set(state)
    for name in ours.weights:
        w = ours.weights[name]
        assert w.dtype == np.float32 and w.flags.c_contiguous, name
        assert_bitwise_equal(w, state[name], name)
    if ours.config.tie_embeddings:
        assert "lm_head.weight" not in ours.weights
        assert_bitwise_equal(ours.weights["model.embed_tokens.weight"], state["lm_head.weight"],
                             "lm_head.weight")
    # Nothing transformers has that we lack (besides the tied head).
    assert set(state) - set(ours.weights) <= {"lm_head.weight"}


def assert_config_matches(ours, hf_config):
    c = ours.config
    assert c.num_layers == hf_config.num_hidden_layers
    assert c.num_heads == hf_config.num_attention_heads
    assert c.num_kv_heads == hf_config.num_key_value_heads
    assert c.head_dim == hf_config.head_dim
    assert c.hidden_size == hf_config.hidden_size
    assert c.intermediate_size == hf_config.intermediate_size
    assert c.vocab_size == hf_config.vocab_size
    assert c.max_position == hf_config.max_position_embeddings
    assert c.rms_eps == hf_config.rms_norm_eps
    assert c.tie_embeddings == hf_config.tie_word_embeddings
    assert c.bos_token_id == hf_config.bos_token_id
    assert c.eos_token_ids[0] == hf_config.eos_token_id
    # The whole config equals the one the shared HF mapping derives from transformers'
    # config, except eos: we add llama.cpp's end-of-generation tokens.
    theirs = config_from_hf(hf_config)
    assert c.to_dict() | {"eos_token_ids": list(theirs.eos_token_ids)} == theirs.to_dict()


@pytest.mark.xdist_group("smollm2")
class TestSmolLM2:
    def test_weights_match_transformers(self, smollm2, smollm2_hf_model):
        assert_weights_equal(smollm2, smollm2_hf_model)

    def test_config_matches_transformers(self, smollm2, smollm2_hf_model):
        assert_config_matches(smollm2, smollm2_hf_model.config)
        c = smollm2.config
        assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
            ("llama", 30, 9, 3, 64)
        assert c.rope_theta == smollm2_hf_model.config.rope_parameters["rope_theta"] == 1e5
        assert c.layer_types == ("full",) * 30 and c.sliding_window is None
        assert c.eos_token_ids == (2, 0)  # <|im_end|>, then <|endoftext|>

    def test_file_contents(self, smollm2_path):
        header = read_gguf_header(smollm2_path)
        types = {t.qtype for t in header.tensors.values()}
        assert types == {Q.F32, Q.Q4_1, Q.Q8_0}
        assert header.tensors["token_embd.weight"].qtype == Q.Q8_0
        assert "output.weight" not in header.tensors  # tied


@pytest.mark.xdist_group("gemma3")
class TestGemma3:
    def test_weights_match_transformers(self, gemma3, gemma3_hf_model):
        assert_weights_equal(gemma3, gemma3_hf_model)

    def test_config_matches_transformers(self, gemma3, gemma3_hf_model):
        hf = gemma3_hf_model.config
        assert_config_matches(gemma3, hf)
        c = gemma3.config
        assert c.arch == "gemma3" and c.hidden_act == "gelu_tanh"
        assert c.sliding_window == hf.sliding_window == 512
        assert c.layer_types == tuple("full" if t == "full_attention" else "sliding"
                                      for t in hf.layer_types)
        assert [i for i, t in enumerate(c.layer_types) if t == "full"] == [5, 11, 17]
        assert c.rope_theta == hf.rope_parameters["full_attention"]["rope_theta"] == 1e6
        assert c.rope_local_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
        assert c.query_pre_attn_scalar == hf.query_pre_attn_scalar == 256
        assert c.final_logit_softcap is None and c.attn_logit_softcap is None
        assert c.eos_token_ids == (1, 106)  # <eos>, <end_of_turn>

    def test_norms_carry_plus_one_in_the_file(self, gemma3, gemma3_path):
        # llama.cpp stores Gemma norms as 1 + w; we return w (what transformers holds).
        header = read_gguf_header(gemma3_path)
        raw = np.memmap(gemma3_path, dtype=np.uint8, mode="r")
        info = header.tensors["blk.0.attn_q_norm.weight"]
        stored = raw[info.offset:info.offset + info.nbytes].view(np.float32)
        np.testing.assert_array_equal(
            gemma3.weights["model.layers.0.self_attn.q_norm.weight"], stored - np.float32(1))

    def test_file_contents(self, gemma3_path):
        header = read_gguf_header(gemma3_path)
        types = {t.qtype for t in header.tensors.values()}
        assert types == {Q.F32, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K}


def assert_header_matches_gguf_reader(path: str) -> None:
    """Our parser against gguf-py's GGUFReader: every metadata value and tensor entry."""
    import gguf

    ours = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(fields) == set(ours.metadata)
    for key, field in fields.items():
        value = ours.metadata[key]
        theirs = field.contents()
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, np.asarray(theirs, dtype=value.dtype), key)
        else:
            assert value == theirs, key
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert (info.qtype, info.offset, info.nbytes) == \
            (t.tensor_type, t.data_offset, t.n_bytes), t.name
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name


@pytest.mark.xdist_group("smollm2")
def test_header_parser_matches_gguf_reader(smollm2_path, tmp_path):
    assert_header_matches_gguf_reader(smollm2_path)
    assert_header_matches_gguf_reader(write_tiny_gguf(tmp_path / "a.gguf", arch="gemma3",
                                                      tokenizer="llama", tied=False))


def test_expected_shapes_agree_with_the_builders(smollm2_path, gemma3_path):
    from jaxrt.frontends import build
    for path in (smollm2_path, gemma3_path):
        config = config_from_gguf(read_gguf_header(path), path)
        module = build.build_module(config)
        declared = {n: tuple(t.shape) for n, t in module.weights.items()}
        assert declared == expected_weight_shapes(config)


# ---- synthetic files ------------------------------------------------------------------

ALL_TYPES = {"attn_q.weight": Q.Q4_K, "attn_k.weight": Q.Q5_K, "attn_v.weight": Q.Q6_K,
             "attn_output.weight": Q.Q4_0, "ffn_gate.weight": Q.Q5_1, "ffn_up.weight": Q.Q5_0,
             "ffn_down.weight": Q.Q4_1, "token_embd.weight": Q.BF16, "output.weight": Q.Q8_0}


@pytest.mark.parametrize("arch,qtypes", [
    ("llama", ALL_TYPES),
    ("llama", {"attn_q.weight": Q.F16, "attn_k.weight": Q.Q8_0, "ffn_down.weight": Q.Q2_K,
               "ffn_up.weight": Q.Q3_K}),
    ("qwen2", {"attn_q.weight": Q.Q8_0}),
    ("gemma3", {"attn_q.weight": Q.Q4_K}),
])
def test_synthetic_matches_transformers(tmp_path, arch, qtypes):
    """Name mapping, Q/K un-permutation, norm offsets and every quant type against
    transformers' own GGUF load of the same small file."""
    import torch
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, hidden=256, heads=4, kv_heads=2,
                           ff=256, qtypes=qtypes, tied="output.weight" not in qtypes,
                           tokenizer="llama" if arch == "gemma3" else "gpt2")
    ours = read_gguf(path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert_weights_equal(ours, hf)
    assert ours.config.qkv_bias == (arch == "qwen2")


@pytest.mark.parametrize("qtype,tolerance", [
    # About one quantization step of each format for values |x| <= ~2 (0.5 * N(0, 1)):
    # f16/bf16 relative rounding 2^-11 / 2^-8; Q8_0 amax/127; Q5_x, Q4_x 16 / 8 levels
    # per sign (the most negative value of a Q4_0/Q5_0 block clips by one step).
    (Q.F32, 0.0), (Q.F16, 1e-3), (Q.BF16, 8e-3), (Q.Q8_0, 0.02), (Q.Q5_0, 0.15),
    (Q.Q5_1, 0.1), (Q.Q4_0, 0.3), (Q.Q4_1, 0.2),
])
def test_dequantized_values_are_close_to_the_source(tmp_path, qtype, tolerance):
    """Independent of transformers: quantize known values, read them back through the
    whole reader (tensor table, layout, dequantization)."""
    path = write_tiny_gguf(tmp_path / "m.gguf", hidden=64, ff=64, heads=2, kv_heads=2,
                           qtypes={"ffn_up.weight": qtype})
    info = read_gguf_header(path).tensors["blk.0.ffn_up.weight"]
    assert info.shape == (64, 64) and info.qtype == qtype
    data, source = random_quantized_with_source(np.random.default_rng(1), (64, 64), qtype)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    assert raw.size == info.nbytes
    with open(path, "r+b") as f:  # replace the tensor's bytes with ours
        f.seek(info.offset)
        f.write(raw.tobytes())
    got = read_gguf(path).weights["model.layers.0.mlp.up_proj.weight"]
    assert np.max(np.abs(got - source)) <= tolerance


def test_llama3_rope_freqs_are_recovered(tmp_path):
    scaling = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position=8192)
    head_dim = 64
    freqs = _llama3_divisors(scaling, 500000.0, head_dim).astype(np.float32)
    path = _tiny_with_rope_freqs(tmp_path, freqs, theta=500000.0)
    assert read_gguf(path).config.rope_scaling == scaling

    wrong = freqs.copy()
    wrong[10] *= 1.5
    with pytest.raises(ModelFormatError, match="rope_freqs"):
        read_gguf(_tiny_with_rope_freqs(tmp_path, wrong, theta=500000.0, name="w.gguf"))


def _tiny_with_rope_freqs(tmp_path, freqs, theta, name="r.gguf"):
    from gguf import GGUFWriter
    from frontends_synth import byte_level_vocab
    rng = np.random.default_rng(0)
    path = os.fspath(tmp_path / name)
    tokens, types, merges = byte_level_vocab()
    hidden, heads, ff = 128, 2, 64
    w = GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("embedding_length", hidden),
                       ("feed_forward_length", ff), ("attention.head_count", heads),
                       ("context_length", 1024)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", theta)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden, hidden),
              "blk.0.attn_v.weight": (hidden, hidden),
              "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden),
              "blk.0.ffn_down.weight": (hidden, ff), "blk.0.attn_norm.weight": (hidden,),
              "blk.0.ffn_norm.weight": (hidden,)}
    for n, s in shapes.items():
        w.add_tensor(n, rng.standard_normal(s).astype(np.float32))
    w.add_tensor("rope_freqs.weight", freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_linear_rope_scaling_and_eot_tokens(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", extra_meta={
        "llama.rope.scaling.type": ("linear", GGUFValueType.STRING),
        "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32)})
    assert read_gguf(path).config.rope_scaling == RopeScaling("linear", factor=4.0)
    path = write_tiny_gguf(tmp_path / "y.gguf", extra_meta={
        "llama.rope.scaling.type": ("yarn", GGUFValueType.STRING)})
    with pytest.raises(ModelFormatError, match="unsupported rope.scaling.type 'yarn'"):
        read_gguf(path)


# ---- malformed files ------------------------------------------------------------------

@pytest.fixture
def tiny(tmp_path) -> str:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _patched(path, offset, data: bytes, name="bad.gguf") -> str:
    blob = bytearray(open(path, "rb").read())
    blob[offset:offset + len(data)] = data
    out = os.path.join(os.path.dirname(path), name)
    with open(out, "wb") as f:
        f.write(blob)
    return out


def _kv_value_offset(path, key) -> int:
    """Byte offset of the value of metadata `key` (after its type field)."""
    blob = open(path, "rb").read()
    needle = struct.pack("<Q", len(key)) + key.encode()
    at = blob.index(needle) + len(needle)
    return at + 4


def _error(path) -> str:
    with pytest.raises(ModelFormatError) as info:
        model = read_gguf(path)
        for name in model.weights:
            model.weights[name]
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_valid_tiny_file_loads(tiny):
    model = read_gguf(tiny)
    assert model.config.num_layers == 1 and len(model.weights) == 11
    assert model.source == tiny


def test_missing_file(tmp_path):
    assert "no such file" in _error(os.fspath(tmp_path / "nope.gguf"))


def test_directory_is_not_a_file(tmp_path):
    assert "directory" in _error(os.fspath(tmp_path))


def test_empty_and_tiny_files(tmp_path):
    for size in (0, 3, 23):
        path = tmp_path / f"s{size}.gguf"
        path.write_bytes(b"GGUF"[:size] + bytes(max(0, size - 4)))
        assert "too small" in _error(os.fspath(path))


def test_wrong_magic(tiny):
    assert "not a GGUF file" in _error(_patched(tiny, 0, b"GGML"))


def test_unsupported_version(tiny):
    assert "unsupported GGUF version 1" in _error(_patched(tiny, 4, struct.pack("<I", 1)))
    assert "big-endian" in _error(_patched(tiny, 4, struct.pack(">I", 3), "be.gguf"))


@pytest.mark.parametrize("cut", [30, 200, 5000, -100, -1])
def test_truncated(tiny, tmp_path, cut):
    blob = open(tiny, "rb").read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(blob[:cut])
    message = _error(os.fspath(path))
    assert "truncated" in message or "past the end" in message


def test_huge_counts(tiny):
    assert "tensor count" in _error(_patched(tiny, 8, struct.pack("<Q", 2**63)))
    assert "metadata count" in _error(_patched(tiny, 16, struct.pack("<Q", 2**40), "kv.gguf"))


def test_huge_string_length(tiny):
    at = 24  # the first key's length
    assert "truncated" in _error(_patched(tiny, at, struct.pack("<Q", 2**62)))


def test_huge_array_length(tiny):
    at = _kv_value_offset(tiny, "tokenizer.ggml.tokens") + 4  # after the element type
    assert "truncated" in _error(_patched(tiny, at, struct.pack("<Q", 2**61)))


def test_tensor_data_past_end(tiny):
    header = read_gguf_header(tiny)
    info = header.tensors["blk.0.ffn_down.weight"]
    name = b"blk.0.ffn_down.weight"
    blob = open(tiny, "rb").read()
    offset_at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 8 * 2 + 4
    relative = info.offset - header.data_start
    assert struct.unpack_from("<Q", blob, offset_at)[0] == relative
    message = _error(_patched(tiny, offset_at, struct.pack("<Q", relative + 2**20)))
    assert "runs past the end" in message


def test_unknown_and_unsupported_quant_types(tiny):
    name = b"blk.0.ffn_down.weight"
    blob = open(tiny, "rb").read()
    type_at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 8 * 2
    assert "unknown ggml type 77" in _error(_patched(tiny, type_at, struct.pack("<I", 77)))
    message = _error(_patched(tiny, type_at, struct.pack("<I", int(Q.IQ2_XXS)), "iq.gguf"))
    assert "unsupported quantization type IQ2_XXS" in message


def test_shape_metadata_mismatch(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", ff=64)
    at = _kv_value_offset(path, "llama.feed_forward_length")
    message = _error(_patched(path, at, struct.pack("<I", 96)))
    assert "has shape" in message and "the config implies" in message


def test_missing_and_unexpected_tensors(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", drop=("blk.0.ffn_up.weight",))
    assert "missing" in _error(path)
    path = write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2", drop=("blk.0.attn_v.bias",))
    assert "missing" in _error(path)


def test_unknown_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch="mamba")
    assert "unknown architecture 'mamba'" in _error(path)


def test_missing_required_metadata(tiny):
    key = "llama.block_count"
    blob = open(tiny, "rb").read()
    at = blob.index(struct.pack("<Q", len(key)) + key.encode()) + 8
    assert "llama.block_count is missing" in _error(_patched(tiny, at, b"x"))


def test_wrong_metadata_type(tiny):
    at = _kv_value_offset(tiny, "llama.attention.head_count") - 4
    message = _error(_patched(tiny, at, struct.pack("<I", int(GGUFValueType.FLOAT32))))
    assert "is not an integer" in message


def test_misaligned_offset(tiny):
    name = b"blk.0.ffn_down.weight"
    blob = open(tiny, "rb").read()
    offset_at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 16 + 4
    relative = struct.unpack_from("<Q", blob, offset_at)[0]
    assert "not aligned" in _error(_patched(tiny, offset_at, struct.pack("<Q", relative + 4)))


def test_overlapping_tensors(tiny):
    header = read_gguf_header(tiny)
    a, b = (header.tensors[n] for n in ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"))
    name = b"blk.0.ffn_up.weight"
    blob = open(tiny, "rb").read()
    offset_at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 16 + 4
    assert "overlap" in _error(_patched(tiny, offset_at,
                                        struct.pack("<Q", a.offset - header.data_start)))
