"""`jax:MODULE:ATTR` model specs for `jaxrt dump` and `jaxrt inspect`: a JAX or Flax model
from the user's own Python code, imported and raised as `jaxrt.from_jax` does.

ATTR names an `nnx.Module`, a `(forward, params)` pair (`forward(params, tokens[T]) ->
logits[T, V]`), or a function of no arguments returning either (a factory, so building
the model can wait until it is asked for). Naming the spec runs that module's code, as
`python -c "import MODULE"` would: only name code you trust.
"""
from __future__ import annotations

import importlib
import os
import sys

from jaxrt.errors import InputError, one_line, user_frame

PREFIX = "jax:"


def is_jax_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _short(e: BaseException, limit: int = 200) -> str:
    text = one_line(e)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _blame(e: BaseException, user_paths: tuple[str, ...]) -> str:
    """" at FILE:LINE" of the innermost frame of the user's code in `e`'s traceback."""
    where = user_frame(e, user_paths)
    return f" (at {where})" if where else ""


def _user_call(what: str, fn, *args, user_paths: tuple[str, ...] = ()):
    try:
        return fn(*args)
    except InputError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - their code failed (or exited)
        raise InputError(f"{what}: {type(e).__name__}: {_short(e)}"
                         f"{_blame(e, user_paths)}") from e


def _import_user_module(spec: str, module_name: str):
    """Import the user's module; whatever fails in it (a syntax error, a missing package,
    an exception at import) is one line blaming the user's file and line."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise InputError(f"{spec}: no module named {e.name!r}") from None
        raise InputError(f"{spec}: importing {module_name}: no module named {e.name!r}"
                         f"{_blame(e, ())}") from e
    except SyntaxError as e:
        raise InputError(f"{spec}: importing {module_name}: {type(e).__name__}: {e.msg} "
                         f"(at {user_frame(e)})") from e
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed while importing
        raise InputError(f"{spec}: importing {module_name}: {type(e).__name__}: "
                         f"{_short(e)}{_blame(e, ())}") from e


def _module_paths(module) -> tuple[str, ...]:
    """Where the user's module (or package) lives: frames there are the user's even when
    it is installed among the site packages."""
    path = getattr(module, "__file__", None)
    if not path:
        return ()
    path = os.path.abspath(path)
    if os.path.basename(path) == "__init__.py":
        return (os.path.dirname(path) + os.sep,)
    return (path,)


def load_forward(spec: str):
    """`jax:MODULE:ATTR` -> (forward(params, tokens), params, the user's module paths)."""
    from jaxrt.jax_frontend import flax_forward
    body = spec[len(PREFIX):]
    module_name, sep, attr = body.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{spec}: expected jax:MODULE:ATTR (e.g. jax:mymodels:build)")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the working directory's modules
    module = _import_user_module(spec, module_name)
    paths = _module_paths(module)
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{spec}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    from flax import nnx
    if callable(target) and not isinstance(target, nnx.Module):
        target = _user_call(f"{spec}: calling {attr}()", target, user_paths=paths)
    if isinstance(target, nnx.Module):
        return (*flax_forward(target), paths)
    if isinstance(target, tuple) and len(target) == 2 and callable(target[0]):
        return (*target, paths)
    raise InputError(f"{spec}: {attr} gave a {type(target).__name__}; expected an "
                     f"nnx.Module or a (forward, params) pair")


def import_and_raise(spec: str, *, stage: str = "raise", stats: bool = False):
    """The IR Module of a `jax:` spec after `stage` (import: primitives as traced; raise:
    raise-llm-ops and insert-kv-cache) and the raising's PipelineStats (None at import)."""
    from jaxrt.jax_frontend import import_forward, raise_module
    fn, params, paths = load_forward(spec)
    try:
        imported = import_forward(fn, params)
    except InputError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - decided by where it was raised, below
        # Raised while tracing the user's forward (a frame of theirs is on the stack):
        # their error, blamed on their line. With no frame of theirs it arose importing
        # the traced program, in jaxrt: a bug, reported as one.
        if not user_frame(e, paths):
            raise
        raise InputError(f"{spec}: tracing: {type(e).__name__}: "
                         f"{_short(e)}{_blame(e, paths)}") from e
    if stage == "import":
        return imported.module, None
    return imported.module, raise_module(imported.module, stats=stats)
