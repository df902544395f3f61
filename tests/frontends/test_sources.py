"""Model specs: aliases, files, directories."""
from __future__ import annotations

import os

import pytest
from frontends_synth import write_tiny_gguf, write_tiny_hf_dir

from jaxrt.frontends import sources
from jaxrt.frontends.errors import ModelFormatError
from jaxrt.frontends.loaded import LoadedModel
from jaxrt.frontends.sources import load_model, resolve_model


def test_aliases_resolve_to_packaged_files():
    kind, path = resolve_model("smollm2-135m")
    assert kind == "gguf" and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.getsize(path) == 98362432
    kind, path = resolve_model("gemma3-270m")
    assert kind == "gguf" and path.endswith("gemma-3-270m-q4_k_m.gguf")
    assert os.path.getsize(path) == 253113024


def test_gemma3_alias_respects_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV, os.fspath(tmp_path))
    kind, path = resolve_model("gemma3-270m")
    assert path.startswith(os.fspath(tmp_path)) and os.path.getsize(path) == 253113024
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]
    # A damaged file is rebuilt, not trusted.
    sources._assembled_gemma3.cache_clear()
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    assert resolve_model("gemma3-270m") == (kind, path)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_paths(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    assert resolve_model(gguf) == ("gguf", gguf)
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(open(gguf, "rb").read())
    assert resolve_model(os.fspath(renamed)) == ("gguf", os.fspath(renamed))
    hf = write_tiny_hf_dir(tmp_path / "hf")
    assert resolve_model(hf) == ("hf", hf)
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.json").write_text("{}")
    assert resolve_model(os.fspath(engine)) == ("engine", os.fspath(engine))


@pytest.mark.parametrize("spec,needle", [
    ("no-such-model", "aliases: gemma3-270m, smollm2-135m"),
    ("/no/such/file.gguf", "no such file or directory"),
])
def test_unknown_specs(spec, needle):
    with pytest.raises(ModelFormatError, match=needle):
        resolve_model(spec)


def test_unrecognized_files_and_directories(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match="not a .gguf file"):
        resolve_model(os.fspath(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="neither engine.json"):
        resolve_model(os.fspath(tmp_path / "empty"))


def test_load_model(tmp_path):
    assert load_model(write_tiny_gguf(tmp_path / "m.gguf")).config.arch == "llama"
    assert load_model(write_tiny_hf_dir(tmp_path / "hf")).config.num_layers == 1
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.json").write_text("{}")
    with pytest.raises(ModelFormatError, match="engine directory"):
        load_model(os.fspath(engine))
    marker = object()
    assert load_model(os.fspath(engine), engine_loader=lambda path: marker) is marker
    assert isinstance(load_model(write_tiny_gguf(tmp_path / "x.gguf")), LoadedModel)
