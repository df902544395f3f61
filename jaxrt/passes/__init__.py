"""Rewrite passes. Importing this package registers every pass with the pipeline parser."""
from . import canonicalize, cse, dce, cast_float, outline_layers, plan_kv_cache, quantize, raise_llm_ops, insert_kv_cache, shard  # noqa: F401  (registration)
from . import fuse_add_rmsnorm, fuse_gate_up, fuse_qkv, quantize_kv_cache  # noqa: F401  (registration)
from .manager import PASSES, Pass, PassManager, PipelineError, parse_pipeline

__all__ = ["PASSES", "Pass", "PassManager", "PipelineError", "parse_pipeline"]
