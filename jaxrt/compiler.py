"""The compiler driver: model spec -> IR -> pipeline -> (engine directory | executable).

    model = load("smollm2-135m")               # read, build IR, run the default pipeline
    exe = model.executable()                   # StepExecutable on the default device
    save_engine(model, "engines/smollm2")      # IR text + safetensors + tokenizer + json
    model = load("engines/smollm2")            # runs no passes

Everything between reading a model and running it is a Module, so each stage can be
printed (`jaxrt dump`), optimized (`jaxrt opt`) and inspected alone.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .frontends.config import ModelConfig
from .frontends.errors import ModelFormatError
from .frontends.tokenizer import Tokenizer
from .ir import Module

ENGINE_FORMAT = 1
CPU_KV_BUDGET_BYTES = 2 << 30  # CPUs share memory with everything else: a fixed budget


@dataclass
class Target:
    """What the pipeline is compiled for; filled from the local JAX device by default."""

    backend: str
    device_memory_bytes: int
    dtype: str  # float compute dtype: f32 or bf16

    @classmethod
    def detect(cls, dtype: str | None = None) -> "Target":
        import jax
        dev = jax.devices()[0]
        backend = dev.platform
        memory = 0
        if backend != "cpu":
            stats = dev.memory_stats() or {}
            memory = int(stats.get("bytes_limit", 0))
        if not memory:
            memory = CPU_KV_BUDGET_BYTES
        default = "f32" if backend == "cpu" else "bf16"
        return cls(backend, memory, _dtype_name(dtype) if dtype else default)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "device_memory_bytes": self.device_memory_bytes,
                "dtype": self.dtype}


def _dtype_name(dtype: str) -> str:
    aliases = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "auto": None}
    name = aliases.get(dtype, dtype)
    if name not in ("f32", "bf16", "f16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return name


@dataclass
class CompiledModel:
    module: Module
    weights: Mapping[str, np.ndarray]
    tokenizer: Tokenizer
    config: ModelConfig
    chat_template: str | None = None
    source: str = ""
    pipeline: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_plan(self) -> dict[str, Any]:
        return self.module.attributes["kv_cache"]

    def executable(self, **kwargs):
        from .lowering.executable import StepExecutable
        plan = self.kv_plan
        dtype = self.module.attributes.get("float_dtype", "f32")
        return StepExecutable(self.module, self.weights, num_pages=plan["num_pages"],
                              page_size=plan["page_size"], dtype=kwargs.pop("dtype", dtype),
                              **kwargs)


def default_pipeline(target: Target, *, page_size: int = 16, memory_fraction: float = 0.9,
                     max_model_len: int = 0, max_num_seqs: int = 64,
                     max_num_batched_tokens: int = 2048, num_pages: int = 0) -> str:
    passes = ["canonicalize", "cse", "dce"]
    if target.dtype != "f32":
        passes.append(f"cast-float{{dtype={target.dtype}}}")
    passes.append(
        f"plan-kv-cache{{page-size={page_size} memory-fraction={memory_fraction} "
        f"max-model-len={max_model_len} max-num-seqs={max_num_seqs} "
        f"max-num-batched-tokens={max_num_batched_tokens} num-pages={num_pages}}}")
    return ",".join(passes)


def load(spec: str, *, pipeline: str | None = None, target: Target | None = None,
         dtype: str | None = None, **plan_options) -> CompiledModel:
    """Read `spec`, build its IR and run `pipeline` (default: `default_pipeline`).

    Engine directories load as they were compiled: no passes run.
    """
    from .frontends.sources import load_model, resolve_model
    kind, path = resolve_model(spec)
    if kind == "engine":
        return load_engine(path)
    start = time.perf_counter()
    loaded = load_model(spec)
    read_s = time.perf_counter() - start
    model = compile_loaded(loaded, pipeline=pipeline, target=target, dtype=dtype,
                           **plan_options)
    model.stats["read_seconds"] = read_s
    return model


def compile_loaded(loaded, *, pipeline: str | None = None, target: Target | None = None,
                   dtype: str | None = None, **plan_options) -> CompiledModel:
    """A LoadedModel (config, weights, tokenizer) -> IR -> pipeline -> CompiledModel."""
    from .frontends.build import build_module
    from .passes import PassManager
    from .passes.manager import VerifyHook
    start = time.perf_counter()
    module = build_module(loaded.config)
    module.attributes["config"] = loaded.config.to_dict()
    target = target or Target.detect(dtype)
    module.attributes["target"] = target.to_dict()
    if pipeline is None:
        pipeline = default_pipeline(target, **plan_options)
    pm = PassManager(pipeline, [VerifyHook()])
    pm.run(module)
    return CompiledModel(module, loaded.weights, loaded.tokenizer, loaded.config,
                         loaded.chat_template, loaded.source, pm.stats.pipeline,
                         {"build_and_passes_seconds": time.perf_counter() - start,
                          "passes": pm.stats.to_json()})


# ---- engine directories -----------------------------------------------------------------

def save_engine(model: CompiledModel, out_dir: str) -> None:
    """model.jxr, weights.safetensors (module dtypes), tokenizer.json, chat_template.jinja,
    engine.json."""
    from safetensors.numpy import save_file

    from . import __version__
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.jxr"), "w") as f:
        f.write(str(model.module))
    arrays = {}
    for name, t in model.module.weights.items():
        arrays[name] = np.ascontiguousarray(np.asarray(model.weights[name]).astype(
            t.dtype.to_numpy()))
    save_file(arrays, os.path.join(out_dir, "weights.safetensors"))
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(model.tokenizer.to_json_str())
    if model.chat_template:
        with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
            f.write(model.chat_template)
    meta = {"format": ENGINE_FORMAT, "jaxrt_version": __version__, "source": model.source,
            "pipeline": model.pipeline, "config": model.config.to_dict(),
            "kv_cache": model.module.attributes.get("kv_cache"),
            "tokenizer": {"bos_id": model.tokenizer.bos_id,
                          "eos_ids": list(model.tokenizer.eos_ids)}}
    with open(os.path.join(out_dir, "engine.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_engine(path: str) -> CompiledModel:
    from safetensors import safe_open

    from .frontends.hf_reader import read_safetensors_header
    from .ir.parser import parse
    from .ir.verify import verify
    meta_path = os.path.join(path, "engine.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(meta_path, f"unreadable engine.json: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
        raise ModelFormatError(meta_path, f"unsupported engine format "
                                          f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    ir_path = os.path.join(path, "model.jxr")
    try:
        with open(ir_path) as f:
            module = parse(f.read(), ir_path)
    except FileNotFoundError:
        raise ModelFormatError(ir_path, "missing") from None
    verify(module)
    weights_path = os.path.join(path, "weights.safetensors")
    header = read_safetensors_header(weights_path)  # validates before the library reads
    for name, t in module.weights.items():
        if name not in header:
            raise ModelFormatError(weights_path, f"weight {name} missing")
        if tuple(header[name].shape) != t.shape:
            raise ModelFormatError(weights_path, f"weight {name} has shape "
                                                 f"{tuple(header[name].shape)}, IR says {t}")
    with safe_open(weights_path, framework="numpy") as f:
        weights = {name: f.get_tensor(name) for name in module.weights}
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"),
                                    **_tokenizer_meta(meta))
    template = None
    tpath = os.path.join(path, "chat_template.jinja")
    if os.path.exists(tpath):
        with open(tpath) as f:
            template = f.read()
    config = ModelConfig.from_dict(meta["config"])
    return CompiledModel(module, weights, tokenizer, config, template, path,
                         meta.get("pipeline", ""))


def _tokenizer_meta(meta: dict) -> dict[str, Any]:
    t = meta.get("tokenizer", {})
    return {"bos_id": t.get("bos_id"), "eos_ids": tuple(t.get("eos_ids", ()))}
