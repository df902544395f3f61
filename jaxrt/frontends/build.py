"""ModelConfig -> IR module, dispatching on `config.arch`."""
from __future__ import annotations

from typing import Callable

from jaxrt.errors import InputError
from ..ir import Module, verify
from .config import ModelConfig
from .gemma3 import build_gemma3
from .llama import build_llama

BUILDERS: dict[str, Callable[[ModelConfig], Module]] = {
    "llama": build_llama,
    "gemma3": build_gemma3,
}


def build_module(config: ModelConfig) -> Module:
    """The module holding `@step` for `config` (weights f32, symbolic pages/page_size)."""
    try:
        builder = BUILDERS[config.arch]
    except KeyError:
        raise InputError(f"no builder for architecture {config.arch!r}; "
                         f"known: {sorted(BUILDERS)}") from None
    module = builder(config)
    verify(module)
    return module
