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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make `--dist loadgroup` group again. pytest-xdist 3.8 tags grouped tests by
    assigning `item._nodeid`, which pytest 9 no longer reads (`nodeid` comes from
    `item._id`), so every test became its own group and each worker loaded every real
    model. Same tagging, through the attribute pytest 9 uses; a no-op once xdist has
    tagged the id itself, and limited to the tests under this directory."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId

    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        tagged = item.nodeid.rfind("@") > item.nodeid.rfind("]")  # xdist's own test
        if tagged or not os.path.abspath(str(item.path)).startswith(here + os.sep):
            continue
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")
