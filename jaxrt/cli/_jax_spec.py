"""`jax:MODULE:ATTR` model specs for `jaxrt dump` and `jaxrt inspect`: a JAX or Flax model
from the user's own Python code, imported and raised as `jaxrt.from_jax` does.

ATTR names an `nnx.Module`, a `(forward, params)` pair (`forward(params, tokens[T]) ->
logits[T, V]`), or a function of no arguments returning either (a factory, so building
the model can wait until it is asked for). Naming the spec runs that module's code, as
`python -c "import MODULE"` would: only name code you trust.
"""
from __future__ import annotations

import importlib
import sys

from jaxrt.errors import InputError

PREFIX = "jax:"


def is_jax_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _user_call(what: str, fn, *args):
    try:
        return fn(*args)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code failed: say so in one line
        raise InputError(f"{what}: {type(e).__name__}: {e}") from None


def load_forward(spec: str):
    """`jax:MODULE:ATTR` -> (forward(params, tokens), params)."""
    from jaxrt.jax_frontend import flax_forward
    body = spec[len(PREFIX):]
    module_name, sep, attr = body.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{spec}: expected jax:MODULE:ATTR (e.g. jax:mymodels:build)")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the working directory's modules
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise InputError(f"{spec}: no module named {e.name!r}") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{spec}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    from flax import nnx
    if callable(target) and not isinstance(target, nnx.Module):
        target = _user_call(f"{spec}: calling {attr}()", target)
    if isinstance(target, nnx.Module):
        return flax_forward(target)
    if isinstance(target, tuple) and len(target) == 2 and callable(target[0]):
        return target
    raise InputError(f"{spec}: {attr} gave a {type(target).__name__}; expected an "
                     f"nnx.Module or a (forward, params) pair")


def import_and_raise(spec: str, *, stage: str = "raise", stats: bool = False):
    """The IR Module of a `jax:` spec after `stage` (import: primitives as traced; raise:
    raise-llm-ops and insert-kv-cache) and the raising's PipelineStats (None at import)."""
    from jaxrt.jax_frontend import import_forward, raise_module
    fn, params = load_forward(spec)
    imported = _user_call(f"{spec}: tracing", import_forward, fn, params)
    if stage == "import":
        return imported.module, None
    return imported.module, raise_module(imported.module, stats=stats)
