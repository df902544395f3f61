"""Hugging Face directory reader: checkpoints written by transformers (real SmolLM2
weights, tiny random models of each family) and malformed directories."""
from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from frontends_synth import (tiny_hf_config, tiny_hf_weights, tiny_tokenizer_json,
                             write_tiny_hf_dir)

from jaxrt.frontends.errors import ModelFormatError
from jaxrt.frontends.hf_config import config_from_hf
from jaxrt.frontends.hf_reader import read_hf_dir, read_safetensors_header


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _save_sharded(model, root, shards: int = 3) -> None:
    """config.json + weights in `shards` safetensors files with an index, as
    save_pretrained lays them out (GGUF-loaded models refuse save_pretrained)."""
    from safetensors.numpy import save_file

    os.makedirs(root, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    state = _state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: state[n] for n in part}, os.path.join(root, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory, smollm2_hf_model, smollm2_hf_tokenizer):
    root = tmp_path_factory.mktemp("smollm2_hf")
    _save_sharded(smollm2_hf_model, root)
    smollm2_hf_tokenizer.save_pretrained(root)
    return root


@pytest.mark.xdist_group("smollm2")
class TestSmolLM2Directory:
    def test_weights_config_tokenizer(self, smollm2_hf_dir, smollm2, smollm2_hf_model,
                                      smollm2_hf_tokenizer):
        model = read_hf_dir(smollm2_hf_dir)
        assert model.source == os.fspath(smollm2_hf_dir)
        # Same architecture as read from the GGUF file; eos differs only in that the GGUF
        # reader adds llama.cpp's end-of-generation tokens.
        assert model.config.eos_token_ids == (2,)
        assert model.config.to_dict() | {"eos_token_ids": []} == \
            smollm2.config.to_dict() | {"eos_token_ids": []}
        state = _state(smollm2_hf_model)
        assert set(model.weights) == set(state) - {"lm_head.weight"}
        for name in model.weights:
            w = model.weights[name]
            assert w.dtype == np.float32
            if not np.array_equal(w, state[name]):
                np.testing.assert_array_equal(w, state[name], err_msg=name)
        # The tokenizer.json transformers wrote, read back: same ids as transformers.
        for text in ["Hello world", "  12 ", "<|im_start|>user\nhi<|im_end|>\n", "日本 🤖"]:
            assert model.tokenizer.encode(text) == smollm2_hf_tokenizer.encode(text)
        assert model.tokenizer.bos_id == 1
        assert model.chat_template == smollm2_hf_tokenizer.chat_template


def _tiny_transformers_model(family: str, tied: bool):
    import torch
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    config = {
        "llama": lambda: tf.LlamaConfig(**common, rope_theta=5e5, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=16),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                                   query_pre_attn_scalar=16),
    }[family]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at 0 or 1; make every weight distinctive
        for p in model.parameters():
            p.normal_()
    return model.eval()


@pytest.mark.parametrize("family,tied,dtype", [
    ("llama", False, "float32"), ("llama", True, "bfloat16"), ("mistral", False, "float16"),
    ("qwen2", True, "float32"), ("gemma3_text", True, "bfloat16"),
])
def test_transformers_checkpoints(tmp_path, family, tied, dtype):
    import torch

    model = _tiny_transformers_model(family, tied).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json(64))
    loaded = read_hf_dir(tmp_path)
    expected = config_from_hf(model.config)
    assert loaded.config == expected
    assert loaded.config.tie_embeddings == tied
    state = _state(model)  # bf16/f16 -> f32 is exact
    assert set(loaded.weights) == set(state) - ({"lm_head.weight"} if tied else set())
    for name in loaded.weights:
        np.testing.assert_array_equal(loaded.weights[name], state[name], err_msg=name)
    assert loaded.tokenizer.bos_id == 1 and loaded.tokenizer.eos_ids == (2,)


def test_gemma3_multimodal_checkpoint(tmp_path):
    text = tiny_hf_config("gemma3_text", head_dim=4, sliding_window=4, tie_word_embeddings=True,
                          query_pre_attn_scalar=4, hidden_activation="gelu_pytorch_tanh")
    text.pop("hidden_act")
    weights = tiny_hf_weights(text)
    stored = {n.replace("model.", "language_model.model.", 1): w for n, w in weights.items()}
    stored["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.ones((2, 2),
                                                                                   np.float32)
    stored["multi_modal_projector.mm_input_projection_weight"] = np.ones((2, 2), np.float32)
    config = {"model_type": "gemma3", "text_config": text, "vision_config": {}}
    loaded = read_hf_dir(write_tiny_hf_dir(tmp_path, config, stored))
    assert loaded.config.arch == "gemma3" and loaded.config.model_type == "gemma3_text"
    assert set(loaded.weights) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(loaded.weights[name], w)
    assert loaded.chat_template == "{{ messages[0]['content'] }}"


def test_chat_template_file_and_tokenizer_config(tmp_path):
    root = write_tiny_hf_dir(tmp_path, tokenizer_config={
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True,
        "add_eos_token": True, "chat_template": [{"name": "default", "template": "A"},
                                                 {"name": "tool_use", "template": "B"}]})
    loaded = read_hf_dir(root)
    assert loaded.chat_template == "A"
    assert loaded.tokenizer.encode("w3 w4") == [1, 3, 4, 2]
    assert loaded.tokenizer.encode("w3", add_special_tokens=False) == [3]
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_hf_dir(root).chat_template == "J"


def test_generation_config_eos(tmp_path):
    root = write_tiny_hf_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert read_hf_dir(root).config.eos_token_ids == (2, 5)


# ---- malformed directories ------------------------------------------------------------

def _error(root) -> str:
    with pytest.raises(ModelFormatError) as info:
        model = read_hf_dir(root)
        for name in model.weights:
            model.weights[name]
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def tiny_dir(tmp_path):
    return write_tiny_hf_dir(tmp_path / "m")


def test_valid_tiny_dir_loads(tiny_dir):
    model = read_hf_dir(tiny_dir)
    assert model.config.num_layers == 1 and len(model.weights) == 12


def test_missing_directory_and_files(tmp_path, tiny_dir):
    assert "no such directory" in _error(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    assert "not a directory" in _error(tmp_path / "f")
    for name, needle in (("tokenizer.json", "no tokenizer.json"),
                         ("model.safetensors", "no model.safetensors"),
                         ("config.json", "no such file")):
        root = tmp_path / f"without_{name}"
        shutil.copytree(tiny_dir, root)
        os.remove(root / name)
        assert needle in _error(root)


def test_pickle_checkpoints_are_not_read(tmp_path, tiny_dir):
    os.rename(os.path.join(tiny_dir, "model.safetensors"),
              os.path.join(tiny_dir, "pytorch_model.bin"))
    assert "pickled" in _error(tiny_dir)


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "smollm"}, "unsupported model_type 'smollm'"),
    ({"model_type": "bert"}, "unsupported model_type 'bert'"),
    ({}, "unsupported model_type None"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "hidden_size": None}, "config.json"),
])
def test_bad_configs(tmp_path, config, needle):
    base = tiny_hf_config()
    root = write_tiny_hf_dir(tmp_path, base)
    (tmp_path / "config.json").write_text(json.dumps(base | config if config else {}))
    assert needle in _error(root)


def test_config_not_json(tiny_dir):
    with open(os.path.join(tiny_dir, "config.json"), "w") as f:
        f.write("{not json")
    assert "not readable JSON" in _error(tiny_dir)
    with open(os.path.join(tiny_dir, "config.json"), "w") as f:
        f.write("[1, 2]")
    assert "not a JSON object" in _error(tiny_dir)


def test_missing_unexpected_and_misshapen_weights(tmp_path):
    config = tiny_hf_config()
    weights = tiny_hf_weights(config)
    del weights["model.layers.0.mlp.up_proj.weight"]
    assert "weights missing" in _error(write_tiny_hf_dir(tmp_path / "a", config, weights))
    weights = tiny_hf_weights(config) | {"model.layers.0.self_attn.o_proj.bias": np.ones(8)}
    assert "does not use" in _error(write_tiny_hf_dir(tmp_path / "b", config, weights))
    weights = tiny_hf_weights(config)
    weights["model.norm.weight"] = np.ones(9, np.float32)
    assert "the config implies (8,)" in _error(write_tiny_hf_dir(tmp_path / "c", config, weights))
    weights = tiny_hf_weights(config) | {"model.norm.weight": np.ones(8, np.int32)}
    assert "dtype I32" in _error(write_tiny_hf_dir(tmp_path / "d", config, weights))


def _rewrite(path, header: dict | bytes, data: bytes | None = None, length: int | None = None):
    """Rewrite a safetensors file with this header (and data, default: the old data)."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", blob)
    old_data = blob[8 + n:]
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw)
        f.write(old_data if data is None else data)


def _header(path) -> dict:
    blob = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8:8 + n])


@pytest.mark.parametrize("mutate,needle", [
    (lambda h: h, None),
    (lambda h: h | {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "starts at"),
    (lambda h: _edit(h, "dtype", "F33"), "unknown dtype"),
    (lambda h: _edit(h, "shape", [-1]), "bad shape"),
    (lambda h: _edit(h, "shape", [2**40, 2**40]), "needs"),
    (lambda h: _edit(h, "data_offsets", [0, 2**62]), "outside"),
    (lambda h: _edit(h, "data_offsets", [1.5, 3]), "bad data_offsets"),
    (lambda h: _edit(h, "dtype", "F16"), "needs"),
    (lambda h: h | {"__metadata__": {"a": 1}}, "__metadata__"),
    (lambda h: [1], "not a JSON object"),
])
def test_safetensors_header_validation(tiny_dir, mutate, needle):
    path = os.path.join(tiny_dir, "model.safetensors")
    _rewrite(path, mutate(_header(path)))
    if needle is None:
        assert read_safetensors_header(path)
    else:
        with pytest.raises(ModelFormatError, match=needle):
            read_safetensors_header(path)
        assert needle in _error(tiny_dir)


def _edit(header: dict, field: str, value) -> dict:
    name = sorted(n for n in header if n != "__metadata__")[0]
    return header | {name: header[name] | {field: value}}


def test_safetensors_truncation_and_lengths(tiny_dir):
    path = os.path.join(tiny_dir, "model.safetensors")
    blob = open(path, "rb").read()
    for cut, needle in ((0, "too small"), (5, "too small"), (20, "does not fit"),
                        (len(blob) - 1, "outside the")):
        with open(path, "wb") as f:
            f.write(blob[:cut])
        assert needle in _error(tiny_dir), cut
    with open(path, "wb") as f:
        f.write(blob + b"\0" * 8)
    assert "tensors cover" in _error(tiny_dir)
    _write(path, blob)
    _rewrite(path, _header(path), length=2**60)
    assert "does not fit" in _error(tiny_dir)
    _rewrite(_write(path, blob), b"\xff\xfe not utf8")
    assert "not JSON" in _error(tiny_dir)


def _write(path, blob) -> str:
    with open(path, "wb") as f:
        f.write(blob)
    return path


def test_sharded_index_problems(tmp_path):
    config = tiny_hf_config()
    root = write_tiny_hf_dir(tmp_path, config)
    os.rename(os.path.join(root, "model.safetensors"), os.path.join(root, "a.safetensors"))
    names = list(tiny_hf_weights(config))
    index = os.path.join(root, "model.safetensors.index.json")

    def write_index(weight_map):
        with open(index, "w") as f:
            json.dump({"weight_map": weight_map}, f)

    write_index({n: "a.safetensors" for n in names})
    assert len(read_hf_dir(root).weights) == len(names)
    write_index({n: "../a.safetensors" for n in names})
    assert "bad file" in _error(root)
    write_index({n: "b.safetensors" for n in names})
    assert "no such file" in _error(root)
    write_index({n: "a.safetensors" for n in names} | {"model.extra.weight": "a.safetensors"})
    assert "does not hold" in _error(root)
    write_index({})
    assert "no weight_map" in _error(root)
