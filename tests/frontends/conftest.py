"""Shared fixtures for the frontend tests.

The transformers loads of the real models are slow (~15 s SmolLM2, ~40 s Gemma 3 on two
cores), so each happens once per session, on the xdist worker that runs the model's group:
every test using them is marked `xdist_group("smollm2")` or `xdist_group("gemma3")`.
"""
from __future__ import annotations

import os

import pytest

from jaxrt.frontends.sources import resolve_model


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return resolve_model("smollm2-135m")[1]


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    return resolve_model("gemma3-270m")[1]


def _hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_path):
    return _hf_model(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_hf_model(gemma3_path):
    return _hf_model(gemma3_path)


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_path):
    return _hf_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_hf_tokenizer(gemma3_path):
    return _hf_tokenizer(gemma3_path)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from jaxrt.frontends.gguf_reader import read_gguf
    return read_gguf(smollm2_path)


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    from jaxrt.frontends.gguf_reader import read_gguf
    return read_gguf(gemma3_path)
