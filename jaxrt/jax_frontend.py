"""Serve a model written in JAX or Flax: import -> raise -> insert the KV cache -> pipeline.

    exe = jaxrt.from_flax(nnx_model, max_model_len=512)       # what Engine(...) accepts
    exe = jaxrt.from_jax(forward, params, max_model_len=512)  # forward(params, tokens[T])

`forward(params, tokens: i32[T]) -> logits[T, vocab]` is a whole-sequence causal LM with no
cache. It is traced with a symbolic T, imported (`frontends/jax_import.py`, layers in a
`lax.scan` unrolled, so the pipeline's outline-layers decides how they compile), raised
(`raise-llm-ops`) and turned into the serving @step (`insert-kv-cache`); then the same
default pipeline as a built-in architecture runs (canonicalize, outline-layers by target,
cast-float, plan-kv-cache). Weights are named by their pytree paths.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

RAISE_PIPELINE = ("canonicalize,cse,dce,raise-llm-ops,canonicalize,cse,dce,insert-kv-cache,"
                  "canonicalize,cse,dce")


def import_forward(fn: Callable, params: Any):
    """(Imported, T) for fn(params, tokens[T]) traced with a symbolic T."""
    import jax
    import jax.numpy as jnp

    from .frontends.jax_import import import_jax
    (t,) = jax.export.symbolic_shape("T")
    return import_jax(fn, params, jax.ShapeDtypeStruct((t,), jnp.int32), weight_argnums=(0,),
                      arg_names=["params", "tokens"], scan="unroll")


def raise_module(module, *, stats: bool = False):
    """Run the raising pipeline (through insert-kv-cache) on an imported module; with
    `stats`, the returned PipelineStats also counts each rewrite rule's matches."""
    from .passes import PassManager
    from .passes.manager import VerifyHook
    pm = PassManager(RAISE_PIPELINE, [VerifyHook()], record_stats=stats)
    pm.run(module)
    return pm.stats


def from_jax(fn: Callable, params: Any, *, max_model_len: int,
             eos_token_ids: Sequence[int] = (), tokenizer: Any = None, page_size: int = 16,
             num_pages: int = 0, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
             dtype: str | None = None, outline_layers: bool | None = None, target=None):
    """A StepExecutable for fn(params, tokens[T]) -> logits[T, V], ready for Engine(...)."""
    from .compiler import Target, default_pipeline
    from .lowering.executable import StepExecutable
    from .passes import PassManager
    from .passes.manager import VerifyHook
    imported = import_forward(fn, params)
    module = imported.module
    raise_stats = raise_module(module)
    target = target or Target.detect(dtype)
    module.attributes["target"] = target.to_dict()
    module.attributes.setdefault("config", {})["max_position"] = int(max_model_len)
    pipeline = default_pipeline(target, page_size=page_size, max_model_len=max_model_len,
                                max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                num_pages=num_pages, outline_layers=outline_layers)
    pm = PassManager(pipeline, [VerifyHook()])
    pm.run(module)
    plan = module.attributes["kv_cache"]
    exe = StepExecutable(module, imported.weights, num_pages=plan["num_pages"],
                         page_size=plan["page_size"],
                         dtype=module.attributes.get("float_dtype", "f32"))
    exe.max_model_len = int(max_model_len)
    exe.eos_token_ids = tuple(int(t) for t in eos_token_ids)
    exe.tokenizer = tokenizer
    exe.import_stats = {"raise": raise_stats.to_json(), "pipeline": pm.stats.to_json()}
    return exe


def flax_forward(model_or_apply: Any, params: Any = None):
    """(fn(params, tokens), params) for a Flax NNX module, or a Linen `apply` with its
    variables."""
    from flax import nnx
    if isinstance(model_or_apply, nnx.Module):
        graphdef, weights, rest = nnx.split(model_or_apply, nnx.Param, ...)

        def forward(p, tokens):  # non-Param state (buffers) is closed over: constants
            return nnx.merge(graphdef, p, rest)(tokens)
        return forward, weights
    if callable(model_or_apply) and params is not None:
        return (lambda p, tokens: model_or_apply(p, tokens)), params
    raise TypeError("from_flax takes an nnx.Module, or a Linen apply function and its "
                    f"variables; got {type(model_or_apply).__name__}")


def from_flax(model_or_apply: Any, params: Any = None, **kwargs):
    """`from_jax` for a Flax NNX module (`model(tokens)`) or a Linen `apply(variables,
    tokens)` with `params` = its variables."""
    fn, weights = flax_forward(model_or_apply, params)
    return from_jax(fn, weights, **kwargs)
