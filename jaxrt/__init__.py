"""jaxrt: an LLM inference compiler on JAX.

`from jaxrt import Engine, SamplingParams` loads the runtime (and jax) on first use;
`import jaxrt.ir` alone never imports jax.
"""
__version__ = "0.1.0"

_LAZY = {"Engine": "jaxrt.runtime.engine", "SamplingParams": "jaxrt.runtime.request",
         "RequestOutput": "jaxrt.runtime.request", "from_jax": "jaxrt.jax_frontend",
         "from_flax": "jaxrt.jax_frontend", "import_function": "jaxrt.frontends.jax_import"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxrt' has no attribute {name!r}")


__all__ = ["Engine", "SamplingParams", "RequestOutput", "from_jax", "from_flax",
           "import_function", "__version__"]
