"""Makes `tests.*` helpers (strategies) importable however pytest is started; the real
models and their transformers references.

The transformers loads of the real models are slow (~15 s SmolLM2, ~40 s Gemma 3 on two
cores), so each happens once per session, on the xdist worker that runs the model's group:
every test using them is marked `xdist_group("smollm2")` or `xdist_group("gemma3")`.
"""
import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Tests load many throw-away model files: they must not fill (and evict the real models
# from) the user's weight cache. tests/test_weight_cache.py turns it on in a tmp dir.
os.environ.setdefault("JAXRT_WEIGHT_CACHE", "off")
# Likewise the tokenizer cache: tests/frontends/test_tokenizer_cache.py turns it on.
os.environ.setdefault("JAXRT_TOKENIZER_CACHE", "off")


def _resolve(alias: str) -> str:
    from jaxrt.frontends.sources import resolve_model
    return resolve_model(alias)[1]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return _resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    return _resolve("gemma3-270m")


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


def f32_executable(loaded):
    """A real model compiled for the CPU in float32 with a 256-token cache."""
    from jaxrt.compiler import Target, compile_loaded
    model = compile_loaded(loaded, target=Target("cpu", 2 << 30, "f32"), max_model_len=256,
                           num_pages=16)
    return model.executable(dtype="f32")


@pytest.fixture(scope="session")
def smollm2_f32_exe(smollm2):
    """SmolLM2's f32 executable, compiled once for the parity and perplexity tests."""
    return f32_executable(smollm2)
