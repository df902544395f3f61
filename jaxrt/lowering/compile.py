"""IR function -> JAX function -> jitted executable.

`lower_function` walks the ops in order, calling each op's lowering rule; traced at
concrete shapes, symbolic dims are bound from the arguments and every rule's results are
checked against the IR types, so the lowered computation follows the IR exactly.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from ..ir import Function, Module
from ..ir.types import TensorType, substitute_dims
from .registry import LoweringContext, LoweringError, lookup_rule

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxrt", "xla")


def enable_persistent_cache(path: str | None = None) -> str | None:
    """Turn on JAX's on-disk compilation cache (also for fast CPU compiles).

    The directory is `path`, else $JAXRT_CACHE_DIR/xla, else ~/.cache/jaxrt/xla;
    JAXRT_XLA_CACHE=off disables it. A directory the user already configured in JAX wins.
    """
    configured = jax.config.jax_compilation_cache_dir
    if path is None and configured:
        return configured
    if os.environ.get("JAXRT_XLA_CACHE", "").lower() in ("off", "none", "0"):
        return None
    root = os.environ.get("JAXRT_CACHE_DIR")
    path = path or (os.path.join(root, "xla") if root else DEFAULT_CACHE_DIR)
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    return path


def default_float_dtype(backend: str | None = None):
    """The compute dtype jaxrt uses by default: f32 on CPU, bf16 on accelerators."""
    from ..ir import DType
    return DType.f32 if (backend or jax.default_backend()) == "cpu" else DType.bf16


def _bind_args(fn: Function, args: Sequence[Any]) -> dict[str, int]:
    if len(args) != len(fn.args):
        raise LoweringError(f"takes {len(fn.args)} arguments, got {len(args)}", f"@{fn.name}")
    bindings: dict[str, int] = {}
    for a, x in zip(fn.args, args):
        where = f"@{fn.name} argument %{a.hint}"
        if np.dtype(x.dtype) != a.type.dtype.to_numpy():
            raise LoweringError(f"dtype {np.dtype(x.dtype).name} != {a.type}", where)
        if len(x.shape) != a.type.rank:
            raise LoweringError(f"shape {tuple(x.shape)} != {a.type}", where)
        for d, n in zip(a.type.shape, x.shape):
            if isinstance(d, str):
                if bindings.setdefault(d, n) != n:
                    raise LoweringError(f"dim {d} is {bindings[d]} elsewhere but {n} here",
                                        where)
            elif d != n:
                raise LoweringError(f"shape {tuple(x.shape)} != {a.type}", where)
    return bindings


def _check_result(x, t: TensorType, where: str) -> None:
    if tuple(x.shape) != t.shape or np.dtype(x.dtype) != t.dtype.to_numpy():
        raise LoweringError(f"rule produced {np.dtype(x.dtype).name}{list(x.shape)}, "
                            f"IR says {t}", where)


def lower_function(module: Module, name: str = "step", *,
                   backends: str | Sequence[str] = "xla") -> Callable[..., tuple]:
    """`f(weights: dict[str, Array], *args) -> tuple of results` for `@name`.

    Rules are looked up now, so an op without a rule fails here and not at trace time.
    """
    fn = module.functions[name]
    plan = []
    for i, op in enumerate(fn.ops):
        try:
            plan.append((op, lookup_rule(op.opdef, backends)))
        except LoweringError as e:
            raise LoweringError(str(e), f"@{fn.name} op #{i}") from None

    def run(weights: Mapping[str, Any], *args) -> tuple:
        bindings = _bind_args(fn, args)
        ctx = LoweringContext(weights=weights, bindings=bindings,
                              backend=backends if isinstance(backends, str) else backends[0],
                              module=module, backends=backends)
        env = dict(zip(fn.args, args))
        for i, (op, lower) in enumerate(plan):
            where = f"@{fn.name} op #{i} ({op.opdef.name})"
            out_types = [substitute_dims(r.type, bindings) for r in op.results]
            outs = lower(ctx, *[env[v] for v in op.operands], attrs=op.attrs,
                         out_types=out_types)
            if not isinstance(outs, (tuple, list)):
                outs = (outs,)
            if len(outs) != len(out_types):
                raise LoweringError(f"rule returned {len(outs)} results, IR has "
                                    f"{len(out_types)}", where)
            for x, t in zip(outs, out_types):
                _check_result(x, t, where)
            env.update(zip(op.results, outs))
        return tuple(env[v] for v in fn.results)

    run.__name__ = f"jaxrt_{module.name}_{name}".replace(".", "_").replace("-", "_")
    return run


def jit_function(module: Module, name: str = "step", *, donate: Sequence[str] = ("kv",),
                 backends: str | Sequence[str] = "xla"):
    """`jax.jit` of `lower_function`, donating the named arguments (the KV cache)."""
    enable_persistent_cache()
    fn = module.functions[name]
    names = fn.arg_names
    donate_argnums = tuple(1 + names.index(n) for n in donate if n in names)
    return jax.jit(lower_function(module, name, backends=backends),
                   donate_argnums=donate_argnums)
